"""Never lose a run: crashes, interrupts, divergence, unwritable directories, hostile checkpoints.

Runs that must be killed or signalled are real `python train.py` subprocesses; everything else
calls the entry points in-process, the way their `__main__` blocks do. All runs are tiny.
"""

import errno
import importlib
import os
import shlex
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import train
from gpt_train.checkpoint import load_checkpoint
from conftest import (REPO, assert_same_weights, checkpoint_weights, exit_status, one_error_line,
                      read_checkpoint, snapshot, tiny_argv, write_corpus)
from robust_helpers import (PAUSED_IN_SAVE_LINE, PAUSED_LINE, SECOND_SIGNAL_LINE, bounded,
                            checkpoint_files, finish, forge_checkpoint, poison_training_losses,
                            read_until, start_training, stderr_text, step_of, temporary_files)

SUBPROCESS_SECONDS = 90  # a bound for a hung run; a healthy one takes a few seconds


def run_flags(checkpoint_dir, data, **flags):
    """Six steps with dropout (so restoring the random state matters), a checkpoint every 2."""
    settings = dict(max_iters=6, save_iter=2, log_iter=1, eval_iter=100, warmup_iters=2,
                    dropout=0.1)
    settings.update(flags)
    return tiny_argv(checkpoint_dir, data, **settings)


def assert_every_checkpoint_loads(directory):
    for path in checkpoint_files(directory):
        checkpoint = read_checkpoint(path)
        assert "model_state_dict" in checkpoint, path


def step_checkpoint_names(directory):
    return {path.name for path in checkpoint_files(directory)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted run of run_flags: gpt_step2/4/6.pt and gpt_final.pt."""
    root = tmp_path_factory.mktemp("finished")
    data = write_corpus(root)
    checkpoint_dir = root / "checkpoints"
    assert exit_status(train.train, run_flags(checkpoint_dir, data)) == 0
    return checkpoint_dir, data


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run's directory that a test may damage or extend."""
    source, data = finished_run
    directory = tmp_path / "run"
    shutil.copytree(source, directory)
    return directory, data


# ------------------------------------------------------------------------------ SIGKILL at any time

@pytest.mark.slow
def test_runs_killed_at_any_moment_leave_only_loadable_checkpoints_and_resume_to_the_same_weights(
        tmp_path):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "killed"
    argv = run_flags(checkpoint_dir, data, max_iters=16, save_iter=1)
    resume_latest = ["--resume", "latest", "--checkpoint_dir", checkpoint_dir]

    # 1. killed soon after its first checkpoint: the line for step 2 follows gpt_step1.pt's save
    with bounded(start_training(argv, log_dir=tmp_path), SUBPROCESS_SECONDS) as process:
        assert read_until(process, lambda line: step_of(line) == 2), stderr_text(process)
        process.kill()
        assert finish(process) == -signal.SIGKILL
    assert "gpt_step1.pt" in step_checkpoint_names(checkpoint_dir)
    assert_every_checkpoint_loads(checkpoint_dir)

    # 2. killed halfway through writing a checkpoint (its second save after resuming)
    fault = ("die-mid-save", 2)
    with bounded(start_training(resume_latest, fault, tmp_path), SUBPROCESS_SECONDS) as process:
        assert finish(process) == -signal.SIGKILL, stderr_text(process)
        resumed = [line for line in process.lines if line.startswith("resumed from")]
    assert resumed, process.lines
    torn = temporary_files(checkpoint_dir)
    assert len(torn) == 1, torn
    with pytest.raises(Exception):  # the half-written file really is unreadable...
        read_checkpoint(checkpoint_dir / torn[0])
    assert_every_checkpoint_loads(checkpoint_dir)  # ...and no final name holds it

    # 3. killed by another process while its first save has all its bytes written but is not yet
    #    renamed into place
    fault = ("pause-in-save", 1)
    with bounded(start_training(resume_latest, fault, tmp_path), SUBPROCESS_SECONDS) as process:
        resumed = read_until(process, lambda line: line.startswith("resumed from"))
        assert read_until(process, lambda line: line == PAUSED_IN_SAVE_LINE), stderr_text(process)
        unfinished = temporary_files(checkpoint_dir)
        process.kill()
        assert finish(process) == -signal.SIGKILL
    assert torn[0] not in unfinished, "the next run removes leftovers"
    saving = f"gpt_step{int(resumed.split(' after step ')[1].split()[0]) + 1}.pt"
    assert len(unfinished) == 1 and unfinished[0].startswith(f".tmp-{saving}."), unfinished
    assert saving not in step_checkpoint_names(checkpoint_dir)
    assert_every_checkpoint_loads(checkpoint_dir)

    # 4. --resume latest completes, with the weights of a run that was never killed
    assert exit_status(train.train, list(map(str, resume_latest))) == 0
    assert_every_checkpoint_loads(checkpoint_dir)
    assert read_checkpoint(checkpoint_dir / "gpt_final.pt")["step"] == 16
    reference_dir = tmp_path / "never-killed"
    assert exit_status(train.train, run_flags(reference_dir, data, max_iters=16, save_iter=1)) == 0
    assert_same_weights(checkpoint_dir / "gpt_final.pt", reference_dir / "gpt_final.pt")


# ------------------------------------------------------------------------------- SIGINT / SIGTERM

@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_a_signal_saves_the_step_prints_the_resume_command_and_the_resumed_run_matches(
        signal_number, status, finished_run, tmp_path):
    reference_dir, data = finished_run
    checkpoint_dir = tmp_path / "interrupted"
    argv = run_flags(checkpoint_dir, data)
    fault = ("pause-after-save", 2)
    with bounded(start_training(argv, fault, tmp_path), SUBPROCESS_SECONDS) as process:
        assert read_until(process, lambda line: line == PAUSED_LINE), stderr_text(process)
        assert (checkpoint_dir / "gpt_step2.pt").is_file()
        process.send_signal(signal_number)
        assert finish(process) == status, stderr_text(process)
    output = process.lines
    assert SECOND_SIGNAL_LINE in output, "the stop checkpoint was written under a second signal"

    stopped = [line for line in output if line.startswith(f"stopped by {signal_number.name}")]
    assert stopped, output
    stop_step = int(stopped[0].split(" after step ")[1].split(";")[0])
    assert 2 < stop_step < 6
    stop_checkpoint = checkpoint_dir / f"gpt_step{stop_step}.pt"
    assert load_checkpoint(stop_checkpoint)["step"] == stop_step
    assert not (checkpoint_dir / "gpt_final.pt").exists()

    command = shlex.split(stopped[0].split("; resume with: ", 1)[1])  # one line says it all
    assert command[:2] == ["python", "train.py"] and Path(command[-1]) == stop_checkpoint
    assert exit_status(train.train, command[2:]) == 0
    assert_same_weights(checkpoint_dir / "gpt_final.pt", reference_dir / "gpt_final.pt")


# ---------------------------------------------------------------------------- hostile checkpoints

def entry_point_argv(entry_point, checkpoint, tmp_path, data):
    """(main function, argv) that makes `entry_point` load `checkpoint`."""
    if entry_point == "train --resume":
        return train.train, ["--resume", checkpoint, "--checkpoint_dir", tmp_path / "resumed",
                             "--max_iters", 8]  # beyond the checkpoint's step 6: a step to train
    if entry_point == "train --init_from":
        return train.train, tiny_argv(tmp_path / "fine-tuned", data, init_from=checkpoint)
    if not (REPO / f"{entry_point}.py").is_file():
        pytest.skip(f"{entry_point}.py does not exist")
    module = importlib.import_module(entry_point)
    if entry_point == "export":
        pytest.importorskip("safetensors")  # export.py names it before reading the checkpoint
        return module.main, ["--checkpoint", checkpoint, "--out", tmp_path / "exported"]
    return module.main, ["--checkpoint", checkpoint]


ENTRY_POINTS = ["train --resume", "train --init_from", "sample", "evaluate", "export"]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_checkpoint_that_would_run_code_is_refused_as_unsafe_and_the_code_never_runs(
        entry_point, run_copy, tmp_path, capsys):
    directory, data = run_copy
    marker = tmp_path / "code-ran"
    forged = forge_checkpoint(directory / "gpt_step6.pt", tmp_path / "forged.pt", marker)
    main, argv = entry_point_argv(entry_point, forged, tmp_path, data)
    assert exit_status(main, list(map(str, argv))) == 2
    one_error_line(capsys.readouterr().err, "unsafe", "forged.pt")
    assert not marker.exists()


def test_the_forged_checkpoint_does_run_code_when_loaded_without_weights_only(run_copy, tmp_path):
    directory, _ = run_copy
    marker = tmp_path / "code-ran"
    forged = forge_checkpoint(directory / "gpt_step6.pt", tmp_path / "forged.pt", marker)
    torch.load(forged, weights_only=False)
    assert marker.exists()  # so the refusals above are what kept the marker away


def test_resume_latest_skips_a_newest_checkpoint_that_would_run_code(run_copy, tmp_path, capsys):
    directory, _ = run_copy
    marker = tmp_path / "code-ran"
    forge_checkpoint(directory / "gpt_step6.pt", directory / "gpt_step8.pt", marker)
    argv = ["--resume", "latest", "--checkpoint_dir", str(directory), "--max_iters", "7"]
    assert exit_status(train.train, argv) == 0
    output = capsys.readouterr()
    assert "skipping gpt_step8.pt" in output.err and "unsafe" in output.err
    assert f"resumed from {directory / 'gpt_step6.pt'} after step 6" in output.out
    assert not marker.exists()


def missing_tokenizer(checkpoint):
    del checkpoint["tokenizer"]
    return "'tokenizer'"


def missing_weight(checkpoint):
    del checkpoint["model_state_dict"]["ln_f.weight"]
    return "ln_f.weight"


def wrong_shape(checkpoint):
    state = checkpoint["model_state_dict"]
    rows, columns = state["blocks.0.attn.qkv.weight"].shape
    state["blocks.0.attn.qkv.weight"] = torch.zeros(rows - 3, columns)
    return "blocks.0.attn.qkv.weight"


def invalid_config(checkpoint):
    checkpoint["gpt_config"]["n_embd"] = 33  # n_head is 2
    return "divisible"


@pytest.mark.parametrize("damage", [missing_tokenizer, missing_weight, wrong_shape, invalid_config])
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_damaged_checkpoint_is_one_clear_error_line_at_every_entry_point(
        entry_point, damage, run_copy, tmp_path, capsys):
    directory, data = run_copy
    checkpoint = read_checkpoint(directory / "gpt_step6.pt")
    named = damage(checkpoint)
    damaged = tmp_path / "damaged.pt"
    torch.save(checkpoint, damaged)
    main, argv = entry_point_argv(entry_point, damaged, tmp_path, data)
    assert exit_status(main, list(map(str, argv))) == 2
    one_error_line(capsys.readouterr().err, "damaged.pt", named)


@pytest.mark.parametrize("key", [
    "scheduler_state_dict", "random_states", "step", "data_state",
])
def test_resuming_a_step_checkpoint_without_its_training_state_is_one_clear_error_line(
        key, run_copy, tmp_path, capsys):
    directory, _ = run_copy
    checkpoint = read_checkpoint(directory / "gpt_step6.pt")
    del checkpoint[key]
    damaged = tmp_path / "damaged.pt"
    torch.save(checkpoint, damaged)
    argv = ["--resume", str(damaged), "--checkpoint_dir", str(tmp_path / "resumed"),
            "--max_iters", "8"]
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, "damaged.pt", key)


# --------------------------------------------------------------------------- non-finite losses

def test_an_absurd_learning_rate_stops_naming_the_step_and_leaves_the_good_checkpoints(
        run_copy, capsys):
    directory, _ = run_copy
    before = {name: data for name, data in snapshot(directory).items() if name.endswith(".pt")}
    argv = ["--resume", str(directory / "gpt_step6.pt"), "--checkpoint_dir", str(directory),
            "--learning_rate", "1e30", "--weight_decay", "0", "--max_iters", "10"]
    assert exit_status(train.train, argv) == 2
    line = one_error_line(capsys.readouterr().err, "--learning_rate", "lower")
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 7 <= step <= 10
    after = {name: data for name, data in snapshot(directory).items() if name.endswith(".pt")}
    assert after == before, "no checkpoint is written or changed"
    good = load_checkpoint(directory / "gpt_step6.pt")
    assert all(torch.isfinite(tensor).all() for tensor in good["model_state_dict"].values())


def test_a_lazily_detected_non_finite_loss_names_the_step_it_happened_at(
        tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    poison_training_losses(monkeypatch, {3})
    argv = run_flags(checkpoint_dir, data, log_iter=100)  # detected at step 4's save, not before
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, "diverged at step 3:", "--learning_rate")
    assert step_checkpoint_names(checkpoint_dir) == {"gpt_step2.pt"}
    load_checkpoint(checkpoint_dir / "gpt_step2.pt")


def test_an_error_during_training_is_printed_on_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    poison_training_losses(monkeypatch, {1})
    assert exit_status(train.train, run_flags(tmp_path / "run", data)) == 2
    stderr = capsys.readouterr().err
    assert "training:" in stderr  # the progress bar was drawn, and the error did not join it
    one_error_line(stderr, "diverged at step 1:", "not finite", "--learning_rate")


def test_skip_nonfinite_skips_a_bad_batch_without_updating_the_weights(
        tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    poison_training_losses(monkeypatch, {3})
    argv = run_flags(checkpoint_dir, data, save_iter=1, skip_nonfinite=1)
    assert exit_status(train.train, argv) == 0
    assert "step 3: non-finite loss or gradient, batch skipped" in capsys.readouterr().out
    assert_same_weights(checkpoint_dir / "gpt_step3.pt", checkpoint_dir / "gpt_step2.pt")
    final = checkpoint_weights(checkpoint_dir / "gpt_final.pt")
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    after_skip = checkpoint_weights(checkpoint_dir / "gpt_step3.pt")
    assert not torch.equal(final["lm_head.weight"], after_skip["lm_head.weight"])  # it went on


def test_skip_nonfinite_stops_once_more_batches_than_allowed_are_bad(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    poison_training_losses(monkeypatch, {2, 4})
    argv = run_flags(checkpoint_dir, data, skip_nonfinite=1)
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, "step 4", "more than 1 skipped")
    assert step_checkpoint_names(checkpoint_dir) == {"gpt_step2.pt"}


# ------------------------------------------------------------- the checkpoint directory and disk

def assert_one_error_line_before_training(capsys, *fragments):
    captured = capsys.readouterr()
    assert "training:" not in captured.err  # no progress bar either
    one_error_line(captured.err, *fragments)
    assert not any(line.startswith("step ") for line in captured.out.splitlines()), captured.out


def test_an_unwritable_checkpoint_directory_is_reported_before_the_first_step(tmp_path, capsys):
    data = write_corpus(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    checkpoint_dir = blocker / "checkpoints"  # root ignores permissions, but not this
    argv = run_flags(checkpoint_dir, data, cache_dir=tmp_path / "token-cache")
    assert exit_status(train.train, argv) == 2
    assert_one_error_line_before_training(capsys, str(checkpoint_dir), "not writable")


def test_a_disk_without_room_for_two_checkpoints_is_reported_before_the_first_step(
        tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    assert exit_status(train.train, run_flags(tmp_path / "run", data)) == 1
    assert_one_error_line_before_training(capsys, "MiB free", "two checkpoints")


def test_a_save_that_fails_midway_is_reported_and_leaves_the_previous_checkpoint_intact(
        tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert exit_status(train.train, run_flags(checkpoint_dir, data)) == 1  # not the user's mistake
    one_error_line(capsys.readouterr().err, "gpt_step4.pt", os.strerror(errno.ENOSPC))
    assert step_checkpoint_names(checkpoint_dir) == {"gpt_step2.pt"}
    assert temporary_files(checkpoint_dir) == []
    load_checkpoint(checkpoint_dir / "gpt_step2.pt")


# ------------------------------------------------------------------ --keep_last, --resume latest

def test_keep_last_keeps_the_newest_step_checkpoints_and_the_final_one(tmp_path):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    assert exit_status(train.train, run_flags(checkpoint_dir, data, save_iter=1, keep_last=2)) == 0
    assert step_checkpoint_names(checkpoint_dir) == {"gpt_step5.pt", "gpt_step6.pt", "gpt_final.pt"}


def test_resume_latest_skips_a_truncated_newest_checkpoint_and_resumes_from_the_one_before(
        run_copy, finished_run, capsys):
    directory, _ = run_copy
    newest = directory / "gpt_step6.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    argv = ["--resume", "latest", "--checkpoint_dir", str(directory)]
    assert exit_status(train.train, argv) == 0
    output = capsys.readouterr()
    assert "skipping gpt_step6.pt" in output.err
    assert f"resumed from {directory / 'gpt_step4.pt'} after step 4" in output.out
    assert_same_weights(directory / "gpt_final.pt", finished_run[0] / "gpt_final.pt")
