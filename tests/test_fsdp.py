"""--parallel fsdp: a sharded model trains like an unsharded one and its checkpoints resume exactly.

Most runs here are FSDP runs of one process (a process group of one, started in-process), which
go through every sharding and checkpoint path cheaply; one torchrun launch of two processes
checks the sharding itself against one process with the same global batch, as
test_distributed.py does for DDP.
"""

import errno
import os

import pytest
import torch

import train
from gpt_train.checkpoint import load_checkpoint
from conftest import (REPO, assert_same_weights, checkpoint_weights, exit_status,
                      metrics_records, one_error_line, tiny_argv, torchrun, write_corpus)

FLAGS = dict(n_layer=2, max_iters=8, save_iter=4, log_iter=1, eval_iter=4, dropout=0.1,
             grad_accum_steps=2)
SHARDED = dict(FLAGS, parallel="fsdp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted one-process FSDP run, and the same run without FSDP."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_corpus(root)
    train.train(tiny_argv(root / "fsdp", data, **SHARDED))
    train.train(tiny_argv(root / "plain", data, **FLAGS))
    return root, data


def test_fsdp_step_checkpoints_are_directories_and_final_and_best_are_plain_weight_files(runs):
    from gpt_train.checkpoint import model_from_checkpoint
    directory = runs[0] / "fsdp"
    assert sorted(p.name for p in directory.iterdir()) == \
        ["gpt_best.pt", "gpt_final.pt", "gpt_step4", "gpt_step8", "metrics.jsonl"]
    assert sorted(p.name for p in (directory / "gpt_step8").iterdir()) == \
        [".metadata", "__0_0.distcp", "run_state.pt"]
    model, _, final = model_from_checkpoint(directory / "gpt_final.pt")
    assert "optimizer_state_dict" not in final and final["step"] == 8
    assert checkpoint_weights(directory / "gpt_final.pt").keys() == model.state_dict().keys()


def test_the_weights_in_a_sharded_step_checkpoint_are_those_of_the_final_file_at_that_step(runs):
    directory = runs[0] / "fsdp"
    assert_same_weights(load_checkpoint(directory / "gpt_step8")["model_state_dict"],
                        directory / "gpt_final.pt")


def test_one_process_fsdp_trains_like_one_process_without_it(runs):
    sharded, plain = metrics_records(runs[0] / "fsdp"), metrics_records(runs[0] / "plain")
    assert [r["step"] for r in sharded] == [r["step"] for r in plain]
    for mine, theirs in zip(sharded, plain):  # float32 sums in another order: rounding only
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    ours = checkpoint_weights(runs[0] / "fsdp" / "gpt_final.pt")
    reference = checkpoint_weights(runs[0] / "plain" / "gpt_final.pt")
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-5


def test_an_fsdp_run_resumed_from_its_sharded_checkpoint_ends_with_the_uninterrupted_weights(
        runs, tmp_path, capsys):
    root, data = runs
    record = train.train(["--resume", str(root / "fsdp" / "gpt_step4"),
                          "--checkpoint_dir", str(tmp_path / "resumed")])
    assert record["step"] == 8
    output = capsys.readouterr()
    assert "resumed from" in output.out and "not bit-exactly" not in output.err
    assert_same_weights(tmp_path / "resumed" / "gpt_final.pt", root / "fsdp" / "gpt_final.pt")
    later = [r["loss"] for r in metrics_records(root / "fsdp") if r["step"] > 4]
    assert [r["loss"] for r in metrics_records(tmp_path / "resumed")] == later


@pytest.mark.parametrize("source, parallel", [("fsdp/gpt_step4", "ddp"),
                                              ("plain/gpt_step4.pt", "fsdp")])
def test_a_checkpoint_resumes_across_ddp_and_fsdp_saying_it_is_not_bit_exact(
        runs, tmp_path, capsys, source, parallel):
    root, _ = runs
    train.train(["--resume", str(root / source), "--parallel", parallel,
                 "--checkpoint_dir", str(tmp_path / "resumed")])
    notes = [line for line in capsys.readouterr().err.splitlines() if "bit-exactly" in line]
    assert len(notes) == 1 and f"this run has 1 with --parallel {parallel}" in notes[0]
    # the same weights and optimizer state continue: the end is the uninterrupted run's, rounded
    ours = checkpoint_weights(tmp_path / "resumed" / "gpt_final.pt")
    reference = checkpoint_weights(root / "fsdp" / "gpt_final.pt")
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-5


def test_resume_latest_and_keep_last_see_sharded_checkpoints(runs, tmp_path, capsys):
    root, data = runs
    directory = tmp_path / "run"
    train.train(tiny_argv(directory, data, **{**SHARDED, "max_iters": 4}))
    (directory / ".tmp-gpt_step8.4194305").mkdir()  # what a killed save leaves
    (directory / ".tmp-gpt_step8.4194305" / "__0_0.distcp").write_bytes(b"half")
    train.train(tiny_argv(directory, data, **{**SHARDED, "resume": "latest", "keep_last": 1}))
    assert f"resumed from {directory / 'gpt_step4'} after step 4" in capsys.readouterr().out
    assert sorted(p.name for p in directory.iterdir()) == \
        ["gpt_best.pt", "gpt_final.pt", "gpt_step8", "metrics.jsonl"]


def test_a_full_disk_during_a_sharded_save_stops_the_run_and_leaves_no_partial_directory(
        runs, tmp_path, monkeypatch, capsys):
    from gpt_train import sharded_checkpoint
    from torch.distributed.checkpoint import CheckpointException
    root, data = runs
    directory = tmp_path / "run"
    saves = iter(range(2))
    real_save = sharded_checkpoint.dcp.save

    def save_on_filling_disk(state, checkpoint_id):
        if next(saves) == 1:  # the second save: step 8
            real_save(state, checkpoint_id=checkpoint_id)  # some files are written...
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise CheckpointException("save failed", {0: (full, None)})  # ...then the disk fills
        real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", save_on_filling_disk)
    assert exit_status(train.train, tiny_argv(directory, data, **SHARDED)) == 1
    one_error_line(capsys.readouterr().err, "gpt_step8", os.strerror(errno.ENOSPC),
                   "earlier checkpoints are intact")
    assert sorted(p.name for p in directory.iterdir()) == \
        ["gpt_best.pt", "gpt_step4", "metrics.jsonl"]
    assert_same_weights(load_checkpoint(directory / "gpt_step4")["model_state_dict"],
                        load_checkpoint(root / "fsdp" / "gpt_step4")["model_state_dict"])


def test_sharding_keeps_the_tied_head_and_embedding_one_parameter_and_bfloat16_trains(
        runs, tmp_path):
    """The head shares the embedding matrix: after sharding it is still one parameter (the root
    group holds it once). With --dtype bfloat16 the gathered weights are bfloat16, the slices and
    so the saved weights float32, and the losses follow the float32 run's to bfloat16 precision."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from config import TrainConfig
    from conftest import tiny_model
    from gpt_train.parallel import mixed_precision_policy, shard_model
    from gpt_train.runtime import Runtime
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model()
        names = [name for name, _ in model.named_parameters()]
        shard_model(model, TrainConfig(parallel="fsdp"), Runtime(torch.device("cpu"), torch.float32))
        assert model.lm_head.weight is model.token_embedding.weight
        assert isinstance(model.lm_head.weight, DTensor)
        assert [name for name, _ in model.named_parameters()] == names
    finally:
        dist.destroy_process_group()
    policy = mixed_precision_policy(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    root, data = runs
    train.train(tiny_argv(tmp_path / "bf16", data, **{**SHARDED, "max_iters": 4,
                                                      "dtype": "bfloat16"}))
    saved = checkpoint_weights(tmp_path / "bf16" / "gpt_final.pt")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    ours, reference = metrics_records(tmp_path / "bf16"), metrics_records(root / "fsdp")
    for mine, theirs in zip(ours, reference[:4]):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=0.05)


@pytest.mark.parametrize("flags, named", [
    (dict(optimizer="muon"), "--optimizer muon cannot run with --parallel fsdp"),
    (dict(lora_rank=2), "--lora_rank cannot run with --parallel fsdp"),
    (dict(dtype="float16"), "--dtype float16 cannot run with --parallel fsdp"),
    (dict(parallel="zero"), "unknown --parallel 'zero'")])
def test_what_fsdp_cannot_do_is_one_line_before_anything_is_written(tmp_path, flags, named,
                                                                    capsys):
    data = write_corpus(tmp_path)
    argv = tiny_argv(tmp_path / "run", data, **{"parallel": "fsdp", **flags})
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, named)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ two processes (torchrun)

@pytest.mark.slow
def test_two_process_fsdp_trains_like_one_process_with_the_same_global_batch(runs, tmp_path,
                                                                             capsys):
    """Each rank holds half of every tensor, yet the losses and the weights are one process's
    with the batch of both ranks, up to float32 rounding (the sums run in another order); the
    two ranks' checkpoint reads back whole, and resumes in one process saying it is resharded."""
    root, data = runs
    argv = tiny_argv(tmp_path / "two", data, **{**SHARDED, "batch_size": 4, "dropout": 0.0})
    finished = torchrun([REPO / "train.py", *argv], tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("memory per rank (--parallel fsdp, 2 processes)") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "gpt_step8").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp", "run_state.pt"]
    train.train(tiny_argv(tmp_path / "one", data, **{**FLAGS, "batch_size": 8, "dropout": 0.0}))
    two, one = metrics_records(tmp_path / "two"), metrics_records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for mine, theirs in zip(two, one):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    for ours, reference in [(checkpoint_weights(tmp_path / "two" / "gpt_final.pt"),
                             checkpoint_weights(tmp_path / "one" / "gpt_final.pt")),
                            (load_checkpoint(tmp_path / "two" / "gpt_step4")[
                                "model_state_dict"],
                             checkpoint_weights(tmp_path / "one" / "gpt_step4.pt"))]:
        assert ours.keys() == reference.keys()
        assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-5
    capsys.readouterr()
    train.train(["--resume", str(tmp_path / "two" / "gpt_step4"),
                 "--checkpoint_dir", str(tmp_path / "resharded")])
    assert "written by 2 process(es) with --parallel fsdp and this run has 1 with --parallel " \
           "fsdp" in capsys.readouterr().err
