"""Training: the schedule, the optimizer groups, a tiny end-to-end run, and exact resume."""

import gc
import itertools
import math
import multiprocessing
import signal

import pytest
import torch

from gpt_train import optim
import train
from config import GPTConfig, TrainConfig
from conftest import (assert_same_weights, checkpoint_weights, exit_status, metrics_records,
                      one_error_line, read_checkpoint, run_stopped_after, snapshot, tiny_argv,
                      write_corpus)
from model import build_model

# The resume tests stop after STOP steps of a MAX_STEPS run; checkpoints are saved every STOP steps.
STOP, MAX_STEPS = 4, 8


def loss_history(checkpoint_dir):
    """(step, loss, lr, val_loss) of every logged record: everything but the timing."""
    return [(r["step"], r["loss"], r["lr"], r.get("val_loss"))
            for r in metrics_records(checkpoint_dir) if "loss" in r]


# ----------------------------------------------------------------------------------- schedule

def learning_rates(num_steps, num_warmup_steps, num_training_steps, min_lr_ratio):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = optim.Schedule("cosine", num_warmup_steps, num_training_steps, min_lr_ratio, 0.2)
    scheduler = optim.learning_rate_scheduler(optimizer, schedule)
    rates = []
    for _ in range(num_steps + 1):  # rates[s] is the rate optimizer step s runs at
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_warms_up_linearly_from_a_nonzero_first_step_to_the_peak():
    rates = learning_rates(100, num_warmup_steps=10, num_training_steps=100, min_lr_ratio=0.1)
    assert rates[0] == pytest.approx(1 / 10)  # the very first step already learns
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[9] == pytest.approx(1.0)  # the peak at the end of warmup
    assert max(rates) == pytest.approx(1.0)


def test_schedule_decays_along_a_cosine_to_min_lr_ratio_at_the_end():
    rates = learning_rates(100, num_warmup_steps=10, num_training_steps=100, min_lr_ratio=0.1)
    assert rates[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert rates[100] == pytest.approx(0.1)
    assert min(rates) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_schedule_without_warmup_starts_at_the_peak():
    rates = learning_rates(20, num_warmup_steps=0, num_training_steps=20, min_lr_ratio=0.0)
    assert rates[0] == pytest.approx(1.0)
    assert rates[20] == pytest.approx(0.0, abs=1e-12)


def rate_at_step(step, warmup, max_iters):
    """The learning rate optimizer step `step` runs at, with the default peak and floor."""
    defaults = TrainConfig()
    multiplier = learning_rates(max_iters, num_warmup_steps=warmup, num_training_steps=max_iters,
                                min_lr_ratio=defaults.min_lr_ratio)[step]
    return defaults.learning_rate * multiplier


# ---------------------------------------------------------------------------------- optimizer

def test_weight_decay_applies_only_to_parameters_of_two_or_more_dimensions():
    model = build_model(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16))
    optimizer = optim.configure_optimizer(model, TrainConfig(weight_decay=0.25, betas=(0.8, 0.9),
                                                             learning_rate=3e-3))
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] == 0.25 for p in g["params"]]
    not_decayed = [p for g in optimizer.param_groups if g["weight_decay"] == 0.0
                   for p in g["params"]]
    assert {id(p) for p in decayed} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in not_decayed} == {id(p) for p in model.parameters() if p.dim() < 2}
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))
    assert any(p is model.token_embedding.weight for p in decayed)  # embeddings decay
    assert any(p is model.ln_f.weight for p in not_decayed)  # LayerNorm gains do not
    assert all(g["betas"] == (0.8, 0.9) and g["lr"] == 3e-3 for g in optimizer.param_groups)


# ------------------------------------------------------------------------------- a tiny run

def test_a_tiny_run_writes_step_checkpoints_a_final_and_metrics_and_learns(tmp_path, corpus_file,
                                                                          capsys):
    checkpoint_dir = tmp_path / "checkpoints"
    record = train.train(tiny_argv(checkpoint_dir, corpus_file, max_iters=12, save_iter=5,
                                   eval_iter=6, log_iter=3))
    output = capsys.readouterr().out
    assert "device: cpu" in output and "trainable parameters" in output

    names = sorted(p.name for p in checkpoint_dir.iterdir())
    assert names == ["gpt_best.pt", "gpt_final.pt", "gpt_step10.pt", "gpt_step12.pt",
                     "gpt_step5.pt", "metrics.jsonl"]
    for step in (5, 10, 12):
        checkpoint = read_checkpoint(checkpoint_dir / f"gpt_step{step}.pt")  # plain data only
        assert checkpoint["step"] == step
        for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "loss",
                    "gpt_config", "train_config", "tokenizer", "random_states", "data_state"):
            assert key in checkpoint
    final = read_checkpoint(checkpoint_dir / "gpt_final.pt")
    assert "optimizer_state_dict" not in final and "scheduler_state_dict" not in final
    assert final["step"] == 12 and final["gpt_config"]["n_layer"] == 1
    assert final["tokenizer"]["kind"] == "char"
    assert_same_weights(final["model_state_dict"], checkpoint_dir / "gpt_step12.pt")

    records = metrics_records(checkpoint_dir)
    assert [r["step"] for r in records] == [3, 5, 6, 9, 10, 12]  # every log_iter, save and the end
    assert all({"step", "loss", "lr"} <= r.keys() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert records[-1]["lr"] == pytest.approx(rate_at_step(11, warmup=2, max_iters=12))
    vocab_size = final["gpt_config"]["vocab_size"]
    assert records[0]["loss"] < math.log(vocab_size) + 0.1
    assert records[-1]["loss"] < records[0]["loss"] - 0.2  # it learns
    assert records[-1]["val_loss"] < records[2]["val_loss"]
    assert record["step"] == 12 and record["val_loss"] == records[-1]["val_loss"]


# ---------------------------------------------------------------------------------- resume

def resume_argv(checkpoint_dir, data, num_workers):
    return tiny_argv(checkpoint_dir, data, max_iters=MAX_STEPS, save_iter=STOP, eval_iter=STOP,
                     log_iter=2, dropout=0.1, num_workers=num_workers)


@pytest.fixture(scope="module", params=[0, pytest.param(2, marks=pytest.mark.slow)],
                ids=["workers0", "workers2"])
def uninterrupted(request, tmp_path_factory):
    """A MAX_STEPS run with dropout, never stopped: the reference a resumed run must match."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = write_corpus(root)
    train.train(resume_argv(root / "checkpoints", data, request.param))
    return request.param, data, root / "checkpoints"


@pytest.mark.parametrize("resume_from", ["path", "latest"])
def test_a_resumed_run_matches_the_uninterrupted_run_bit_for_bit(uninterrupted, resume_from,
                                                                 tmp_path, monkeypatch):
    num_workers, data, reference_dir = uninterrupted
    checkpoint_dir = tmp_path / "checkpoints"
    argv = resume_argv(checkpoint_dir, data, num_workers)
    assert run_stopped_after(monkeypatch, STOP, argv) == 130  # the Ctrl-C exit status
    assert sorted(p.name for p in checkpoint_dir.glob("gpt_step*.pt")) == [f"gpt_step{STOP}.pt"]

    torch.manual_seed(999)  # whatever the process did in between must not matter
    if resume_from == "latest":
        train.train(["--resume", "latest", "--checkpoint_dir", str(checkpoint_dir)])
    else:
        train.train(["--resume", str(checkpoint_dir / f"gpt_step{STOP}.pt")])

    assert_same_weights(checkpoint_dir / f"gpt_step{MAX_STEPS}.pt",
                        reference_dir / f"gpt_step{MAX_STEPS}.pt")
    assert_same_weights(checkpoint_dir / "gpt_final.pt", reference_dir / "gpt_final.pt")
    assert loss_history(checkpoint_dir) == loss_history(reference_dir)


@pytest.mark.slow
def test_a_run_ended_by_an_exception_leaves_no_data_loader_workers_behind(tmp_path, monkeypatch):
    data = write_corpus(tmp_path)
    workers_before = set(multiprocessing.active_children())
    calls = itertools.count(1)
    monkeypatch.setattr(train.StopRequest, "pending_signal",
                        lambda self: signal.SIGINT if next(calls) == 2 else 0)
    try:
        train.train(tiny_argv(tmp_path / "checkpoints", data, num_workers=2))
    except SystemExit:
        leftover = set(multiprocessing.active_children()) - workers_before
    finally:
        gc.collect()  # shut the workers down now, before another run forks (see run_stopped_after)
    assert not leftover


def test_resuming_an_earlier_checkpoint_rewrites_history_without_duplicate_steps(tmp_path):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "checkpoints"
    train.train(resume_argv(checkpoint_dir, data, num_workers=0))
    first_history = loss_history(checkpoint_dir)
    first_weights = checkpoint_weights(checkpoint_dir / f"gpt_step{MAX_STEPS}.pt")
    assert any(step > STOP for step, *_ in first_history)

    train.train(["--resume", str(checkpoint_dir / f"gpt_step{STOP}.pt"), "--overwrite", "true"])
    history = loss_history(checkpoint_dir)
    steps = [step for step, *_ in history]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    assert history == first_history
    assert_same_weights(checkpoint_dir / f"gpt_step{MAX_STEPS}.pt", first_weights)


def test_resume_with_a_larger_max_iters_continues_from_the_checkpoint(trained_run, tmp_path):
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    for name in ("gpt_step8.pt", "metrics.jsonl"):
        (checkpoint_dir / name).write_bytes((trained_run / name).read_bytes())
    record = train.train(["--resume", str(checkpoint_dir / "gpt_step8.pt"), "--max_iters", "12",
                          "--checkpoint_dir", str(checkpoint_dir)])
    assert record["step"] == 12
    assert read_checkpoint(checkpoint_dir / "gpt_step12.pt")["step"] == 12
    assert read_checkpoint(checkpoint_dir / "gpt_step12.pt")["train_config"]["max_iters"] == 12
    steps = [step for step, *_ in loss_history(checkpoint_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and 10 in steps
    # the decay ended at step 8 with the run it resumes: the extra steps run at the minimum
    last_rate = metrics_records(checkpoint_dir)[-1]["lr"]
    assert last_rate == pytest.approx(rate_at_step(8, 2, max_iters=8))
    assert not torch.equal(checkpoint_weights(checkpoint_dir / "gpt_step12.pt")["ln_f.weight"],
                           checkpoint_weights(checkpoint_dir / "gpt_step8.pt")["ln_f.weight"])


@pytest.mark.parametrize("flag, value", [("n_layer", "3"), ("n_embd", "64"), ("block_size", "32"),
                                         ("bias", "false")])
def test_an_architecture_flag_that_contradicts_the_checkpoint_exits_2(trained_run, flag, value,
                                                                      capsys):
    before = snapshot(trained_run)
    status = exit_status(train.train, ["--resume", str(trained_run / "gpt_step4.pt"),
                                       f"--{flag}", value])
    assert status == 2
    one_error_line(capsys.readouterr().err, f"--{flag}", "contradicts")
    assert snapshot(trained_run) == before


def test_resuming_a_final_checkpoint_explains_it_holds_weights_only(trained_run, capsys):
    status = exit_status(train.train, ["--resume", str(trained_run / "gpt_final.pt")])
    assert status == 2
    one_error_line(capsys.readouterr().err, "weights only")
