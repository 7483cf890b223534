"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process.

With the same global batch (2 processes x batch B against 1 process x batch 2B) both runs see
the same windows, so their losses and weights agree up to floating-point rounding. Each torchrun
start costs seconds, so the runs are made once per module and shared between the tests.
"""

import json

import numpy as np
import pytest
import torch

from conftest import (REPO, assert_same_weights, checkpoint_weights, metrics_records, tiny_argv,
                      torchrun, write_corpus)
from dataset import RandomWindows, validation_batches

pytestmark = pytest.mark.slow  # every test here starts processes
BATCH = 4  # per process; the single-process run uses 2 * BATCH
STEPS = 8
FLAGS = dict(dropout=0.0, batch_size=BATCH, grad_accum_steps=2, max_iters=STEPS, log_iter=1,
             eval_iter=4, save_iter=4)


def write_tasks(directory):
    """Three tiny benchmark tasks (multiple choice, schema, language modelling): the flags."""
    directory.mkdir()
    lines = {"piqa": [{"query": f"line {i}: the", "choices": ["quick", "lazy dog", "fox"],
                       "gold": i % 3} for i in range(5)],
             "winogrande": [{"context_options": [f"line {i}: the quick", f"line {i}: the lazy"],
                             "continuation": "fox", "gold": i % 2} for i in range(3)],
             "lambada_openai": [{"context": f"line {i}: the quick brown", "continuation": "fox"}
                                for i in range(4)]}
    for name, items in lines.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return {"eval_tasks": ",".join(lines), "tasks_dir": directory}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, two_process_run):
    """A torchrun launch and one in-process run, shared by every test of this module, beside the
    suite's 2-process run with dropout (conftest's `two_process_run`; a 2-process resume of it,
    after torchrun restarted a killed rank, is test_cluster.py's)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_corpus(root)
    results = {"root": root}
    # 2 processes x batch B, and 1 process x batch 2B: the same global batch
    tasks = write_tasks(root / "tasks")  # --eval_tasks: each rank scores its share of the items
    results["ddp"] = torchrun([REPO / "train.py", *tiny_argv(root / "ddp", data, **FLAGS, **tasks)],
                              root)
    import train
    results["single"] = train.train(tiny_argv(root / "single", data, **{**FLAGS, **tasks,
                                                                        "batch_size": 2 * BATCH}))
    results["dropout"], _, _ = two_process_run
    return results


def test_a_two_process_run_finishes_with_exit_status_0_and_prints_once(runs):
    ddp = runs["ddp"]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("final validation loss") == 1
    assert "device: cpu x 2 processes" in ddp.stdout
    tokens = BATCH * 16 * 2 * 2  # batch x block x accumulation x processes
    assert f"tokens per optimizer step: {tokens:,} = batch {BATCH} x block 16 x accumulation 2 " \
           f"x processes 2" in ddp.stdout


def test_a_two_process_run_writes_one_set_of_checkpoints_and_one_metrics_log(runs):
    directory = runs["root"] / "ddp"
    assert sorted(p.name for p in directory.iterdir()) == \
        ["gpt_best.pt", "gpt_final.pt", "gpt_step4.pt", "gpt_step8.pt", "metrics.jsonl"]
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == STEPS
    assert [record["step"] for record in map(json.loads, lines)] == list(range(1, STEPS + 1))


def test_two_ranks_building_the_token_cache_at_once_leave_one_cache(runs):
    cache = runs["root"] / "token-cache"  # every run of the module tokenized the same corpus
    names = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert [name.rsplit(".", 1)[1] for name in names] == ["bin", "json"], names


def test_checkpoints_of_a_two_process_run_hold_the_unwrapped_models_keys(runs):
    from gpt_train.checkpoint import model_from_checkpoint
    final = runs["root"] / "ddp" / "gpt_final.pt"
    model, _, _ = model_from_checkpoint(final)  # a plain GPT, built from the saved configuration
    for name in ("gpt_step4.pt", "gpt_step8.pt", "gpt_final.pt"):
        assert checkpoint_weights(runs["root"] / "ddp" / name).keys() == model.state_dict().keys()
    assert_same_weights(model.state_dict(), final)  # loaded as saved, no key renamed or dropped


def test_two_processes_evaluate_like_one_process_with_the_same_global_batch(runs):
    ddp, single = metrics_records(runs["root"] / "ddp"), metrics_records(runs["root"] / "single")
    ddp_val = [(r["step"], r["val_loss"]) for r in ddp if "val_loss" in r]
    single_val = [(r["step"], r["val_loss"]) for r in single if "val_loss" in r]
    assert [step for step, _ in ddp_val] == [step for step, _ in single_val] == [4, 8]
    for (_, mine), (_, theirs) in zip(ddp_val, single_val):
        assert mine == pytest.approx(theirs, abs=1e-4)
    # the task figures too: each rank scored its share, one all-reduce summed them
    names = ("piqa/acc", "piqa/acc_norm", "winogrande/acc", "lambada_openai/acc",
             "lambada_openai/perplexity", "tasks/centered_accuracy")
    ddp_tasks = [r[name] for r in ddp if "val_loss" in r for name in names]
    single_tasks = [r[name] for r in single if "val_loss" in r for name in names]
    assert ddp_tasks == pytest.approx(single_tasks, rel=1e-3)


def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(runs):
    ddp = checkpoint_weights(runs["root"] / "ddp" / "gpt_final.pt")
    single = checkpoint_weights(runs["root"] / "single" / "gpt_final.pt")
    assert ddp.keys() == single.keys()
    worst = max((ddp[key] - single[key]).abs().max().item() for key in ddp)
    assert worst < 1e-5


def test_two_processes_log_the_training_loss_curve_of_one_process_with_the_same_global_batch(runs):
    ddp, single = metrics_records(runs["root"] / "ddp"), metrics_records(runs["root"] / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for mine, theirs in zip(ddp, single):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)


def test_a_two_process_checkpoint_resumed_in_one_process_says_the_data_order_changed(runs, capsys):
    import train
    record = train.train(["--resume", str(runs["dropout"] / "gpt_step4.pt"),
                          "--checkpoint_dir", str(runs["root"] / "one-process")])
    assert record["step"] == STEPS
    notes = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1" in notes and "data order changes" in notes


# -------------------------------------------------- why the runs agree: the data, rank by rank

def test_the_ranks_training_batches_together_are_the_single_process_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    single = RandomWindows(tokens, block_size=16, batch_size=2 * BATCH, seed=7)
    ranks = [RandomWindows(tokens, 16, BATCH, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for index in (0, 1, 50):
        x, y = single[index]
        assert torch.equal(torch.cat([rank[index][0] for rank in ranks]), x)
        assert torch.equal(torch.cat([rank[index][1] for rank in ranks]), y)


def test_the_ranks_validation_batches_together_are_the_single_process_batches():
    tokens = np.arange(3000, dtype=np.uint16)
    single = validation_batches(tokens, block_size=16, batch_size=2 * BATCH, num_batches=3)
    ranks = [validation_batches(tokens, 16, BATCH, 3, rank=r, world_size=2) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)
