"""The best model of a run: evaluation on its own schedule, gpt_best.pt, early stopping, LoRA.

Early stopping is made deterministic with a --early_stop_min_delta no loss can drop by: only the
first evaluation counts as an improvement, so the run stops exactly `patience` evaluations later.
"""

import pytest
import torch

import sample
import train
from gpt_train.checkpoint import model_from_checkpoint
from conftest import (REPO, assert_same_weights, exit_status, metrics_records, read_checkpoint,
                      run_stopped_after, tiny_argv, write_corpus)
from gpt_train.lora import LoRALinear
from gpt_train.rundir.reading import find_sampling_checkpoint


def test_evaluation_follows_eval_iter_whatever_log_iter(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    train.train(tiny_argv(run_dir, corpus_file, max_iters=9, eval_iter=3, log_iter=4, save_iter=9))
    evaluated = [r["step"] for r in metrics_records(run_dir) if "val_loss" in r]
    assert evaluated == [3, 6, 9]


def test_gpt_best_holds_the_step_with_the_lowest_validation_loss(tmp_path, corpus_file, capsys):
    run_dir = tmp_path / "run"
    # a learning rate this high, never decayed, makes the validation loss go up and down
    train.train(tiny_argv(run_dir, corpus_file, max_iters=12, eval_iter=2, save_iter=2,
                          log_iter=12, learning_rate=0.2, warmup_iters=1, min_lr_ratio=1.0))
    evaluations = [r for r in metrics_records(run_dir) if "val_loss" in r]
    lowest = min(evaluations, key=lambda r: r["val_loss"])
    assert lowest["step"] < 12  # the best is not the last: gpt_best.pt is not gpt_final.pt
    best = read_checkpoint(run_dir / "gpt_best.pt")
    assert best["step"] == lowest["step"] and best["val_loss"] == lowest["val_loss"]
    assert "optimizer_state_dict" not in best
    assert_same_weights(best["model_state_dict"], run_dir / f"gpt_step{lowest['step']}.pt")
    printed = capsys.readouterr().out
    assert f"best validation loss: {lowest['val_loss']:.4f} at step {lowest['step']}" in printed
    final = evaluations[-1]
    assert f"final validation loss: {final['val_loss']:.4f} at step 12" in printed


def test_sampling_prefers_gpt_best_then_gpt_final_then_the_newest_step(tmp_path):
    for name in ("gpt_step9.pt", "gpt_step10.pt", "gpt_final.pt", "gpt_best.pt"):
        (tmp_path / name).write_bytes(b"")
    for expected in ("gpt_best.pt", "gpt_final.pt", "gpt_step10.pt"):
        assert find_sampling_checkpoint(tmp_path).name == expected
        (tmp_path / expected).unlink()


EARLY_STOP = dict(max_iters=40, eval_iter=2, save_iter=2, log_iter=2, early_stop_patience=3,
                  early_stop_min_delta=100.0, dropout=0.1)


@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory):
    """An uninterrupted run that stops early: evaluations at 2 (an improvement), 4, 6, 8 (stop)."""
    root = tmp_path_factory.mktemp("early")
    data = write_corpus(root)
    status = exit_status(train.train, tiny_argv(root / "run", data, **EARLY_STOP))
    return status, data, root / "run"


def test_early_stopping_stops_writes_gpt_final_and_exits_0(early_stopped_run):
    status, _, run_dir = early_stopped_run
    assert status == 0
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 8
    assert max(r["step"] for r in metrics_records(run_dir)) == 8
    assert sorted(p.name for p in run_dir.glob("gpt_step*.pt")) == \
        ["gpt_step2.pt", "gpt_step4.pt", "gpt_step6.pt", "gpt_step8.pt"]


def test_sample_py_without_checkpoint_uses_gpt_best_and_says_so(early_stopped_run, capsys):
    _, _, run_dir = early_stopped_run
    argv = ["--max_new_tokens", "20", "--seed", "5", "--device", "cpu"]
    sample.main(["--checkpoint_dir", str(run_dir), *argv])
    chosen = capsys.readouterr()
    assert chosen.err == f"sampling from {run_dir / 'gpt_best.pt'}\n"
    sample.main(["--checkpoint", str(run_dir / "gpt_best.pt"), *argv])
    assert capsys.readouterr().out == chosen.out


def test_a_resumed_run_keeps_best_so_far_and_patience_exactly(early_stopped_run, tmp_path,
                                                              monkeypatch):
    _, data, reference = early_stopped_run
    run_dir = tmp_path / "run"
    argv = tiny_argv(run_dir, data, **EARLY_STOP)
    assert run_stopped_after(monkeypatch, 5, argv) == 130  # stale count 1 after step 4
    train.train(["--resume", str(run_dir / "gpt_step5.pt"), "--checkpoint_dir", str(run_dir)])
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 8  # a fresh count would stop at 12
    for name in ("gpt_best.pt", "gpt_final.pt"):
        resumed, uninterrupted = read_checkpoint(run_dir / name), read_checkpoint(reference / name)
        assert (resumed["step"], resumed.get("val_loss")) == \
            (uninterrupted["step"], uninterrupted.get("val_loss"))
        assert_same_weights(resumed["model_state_dict"], uninterrupted["model_state_dict"])


LORA = dict(max_iters=8, eval_iter=4, save_iter=4, log_iter=4, lora_rank=4, lora_alpha=8.0,
            lora_dropout=0.1, learning_rate=1e-2)


def test_lora_trains_only_adapters_resumes_exactly_and_saves_merged_plain_weights(
        trained_run, tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    base = trained_run / "gpt_final.pt"
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    train.train(tiny_argv(uninterrupted, data, init_from=base, **LORA))
    argv = tiny_argv(interrupted, data, init_from=base, **LORA)
    assert run_stopped_after(monkeypatch, 6, argv) == 130
    train.train(["--resume", "latest", "--checkpoint_dir", str(interrupted)])

    step = read_checkpoint(uninterrupted / "gpt_step8.pt")
    adapters = {name for name in step["model_state_dict"] if "lora_" in name}
    assert len(adapters) == 2 * 4  # A and B on the qkv, attention, MLP in and out projections
    assert len(step["optimizer_state_dict"]["state"]) == len(adapters)  # nothing else trains
    assert_same_weights(interrupted / "gpt_step8.pt", step["model_state_dict"])

    final = read_checkpoint(uninterrupted / "gpt_final.pt")["model_state_dict"]
    start = read_checkpoint(base)["model_state_dict"]
    assert final.keys() == start.keys()  # merged: the plain model's keys, no adapters
    adapter = {k.rsplit(".", 1)[-1]: v for k, v in step["model_state_dict"].items()
               if k.startswith("blocks.0.attn.qkv.lora_")}
    merged = start["blocks.0.attn.qkv.weight"] + 8.0 / 4 * adapter["lora_B"] @ adapter["lora_A"]
    assert torch.allclose(final["blocks.0.attn.qkv.weight"], merged, atol=1e-6, rtol=0)
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert torch.equal(final["blocks.0.ln_1.weight"], start["blocks.0.ln_1.weight"])  # frozen
    model, _, _ = model_from_checkpoint(uninterrupted / "gpt_final.pt")
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    capsys.readouterr()
    sample.main(["--checkpoint", str(uninterrupted / "gpt_final.pt"), "--max_new_tokens", "10",
                 "--device", "cpu"])
    assert len(capsys.readouterr().out) > 10


def test_bench_lora_gives_the_optimizer_only_the_adapters(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_lora
    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--vocab_size", "64",
            "--block_size", "16", "--device", "cpu", "--warmup_steps", "0", "--bench_steps", "1"]
    full = bench_lora.measure(bench_lora.parse_bench_args([*tiny, "--variant", "full"]))
    lora = bench_lora.measure(bench_lora.parse_bench_args([*tiny, "--variant", "lora"]))
    adapters = 8 * (32 + 3 * 32) + 8 * (32 + 32) + 8 * (32 + 4 * 32) + 8 * (4 * 32 + 32)
    assert lora["trainable"] == adapters and full["trainable"] == full["parameters"]
    assert lora["parameters"] == full["parameters"] + adapters
    for result in (full, lora):  # AdamW: two float32 moments per trained number, a step each
        assert 8 * result["trainable"] < result["optimizer_bytes"] < 9 * result["trainable"]
    assert lora["ms_per_step"] > 0 and lora["peak_memory"] > 0
