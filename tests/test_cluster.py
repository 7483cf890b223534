"""What clusters do to runs: requeues, rank crashes, two runs in one directory, full disks.

`--resume auto` lets a requeued job repeat its command; torchrun --max-restarts brings a crashed
rank back into the run; the run lock keeps a second run out of a live run's directory; a full
disk stops a run cleanly; a token cache left damaged or half built is rebuilt. Training runs are
in-process except the torchrun test (the one slow test here). A process "killed" in these tests
is a forked child that SIGKILLs itself, or is SIGKILLed, at a chosen moment.
"""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import sys

import pytest

import sample
from gpt_train import cachefiles, textcache, tokencache
from gpt_train.cachefiles import CacheSettings
import train
from gpt_train.checkpoint import load_checkpoint
from conftest import (REPO, TWO_PROCESS_FLAGS, assert_same_weights, exit_status, metrics_records,
                      one_error_line, snapshot, tiny_argv, torchrun, write_corpus)
from gpt_train.rundir.lock import hold_run_directory
from gpt_train.rundir.names import LOCK_NAME

FLAGS = dict(max_iters=8, save_iter=4, log_iter=2, eval_iter=4, dropout=0.1)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`--resume auto` in an empty directory, run to the end: checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("cluster")
    data = write_corpus(root)
    directory = root / "run"
    status = exit_status(train.train, tiny_argv(directory, data, resume="auto", **FLAGS))
    return directory, data, status


@pytest.fixture
def run_copy(finished_run, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(finished_run[0], directory)
    return directory, finished_run[1]


# ------------------------------------------------------------------------------- --resume auto

def test_resume_auto_in_an_empty_directory_starts_a_new_run(finished_run):
    directory, _, status = finished_run
    assert status == 0
    assert sorted(p.name for p in directory.iterdir()) == \
        ["gpt_best.pt", "gpt_final.pt", "gpt_step4.pt", "gpt_step8.pt", "metrics.jsonl"]  # no lock
    assert [record["step"] for record in metrics_records(directory)] == [2, 4, 6, 8]  # no resume


def test_resume_auto_continues_from_the_newest_readable_checkpoint_to_the_uninterrupted_weights(
        run_copy, finished_run, capsys):
    directory, data = run_copy
    (directory / "gpt_final.pt").unlink()
    newest = directory / "gpt_step8.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # unreadable: the one before is taken
    assert exit_status(train.train, tiny_argv(directory, data, resume="auto", **FLAGS)) == 0
    output = capsys.readouterr()
    assert "note: skipping gpt_step8.pt" in output.err  # a note, on stderr
    assert f"resumed from {directory / 'gpt_step4.pt'} after step 4" in output.out
    assert_same_weights(directory / "gpt_final.pt", finished_run[0] / "gpt_final.pt")


def test_resume_auto_on_a_finished_run_says_so_and_exits_0_without_training(finished_run, capsys):
    directory, data, _ = finished_run
    before = snapshot(directory)
    assert exit_status(train.train, tiny_argv(directory, data, resume="auto", **FLAGS)) == 0
    output = capsys.readouterr().out
    assert f"the run in {directory} is finished" in output
    assert not [line for line in output.splitlines() if line.startswith("step ")]
    assert snapshot(directory) == before


def test_resume_auto_on_a_run_that_stopped_early_does_not_train_it_again(tmp_path, capsys):
    data = write_corpus(tmp_path)
    # no evaluation after the first improves by 100: the run stops at its second, step 4
    argv = tiny_argv(tmp_path / "run", data, resume="auto", eval_iter=2, early_stop_patience=1,
                     early_stop_min_delta=100)
    assert exit_status(train.train, argv) == 0
    assert "early stop after step 4" in capsys.readouterr().out
    before = snapshot(tmp_path / "run")
    assert exit_status(train.train, argv) == 0
    assert "is finished: gpt_final.pt follows its early stop at step 4" in capsys.readouterr().out
    assert snapshot(tmp_path / "run") == before


def test_a_requeued_fine_tune_starts_from_init_from_and_then_resumes_its_own_checkpoint(
        finished_run, tmp_path, capsys):
    base, data, _ = finished_run
    directory = tmp_path / "fine-tune"
    argv = tiny_argv(directory, data, resume="auto", init_from=base / "gpt_final.pt", max_iters=4,
                     save_iter=2)
    assert exit_status(train.train, argv) == 0  # the first submission: a new run from the base
    (directory / "gpt_final.pt").unlink()  # preempted after its step-4 save, then requeued as is
    assert exit_status(train.train, argv) == 0
    assert f"resumed from {directory / 'gpt_step4.pt'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ one run, one lock

@contextlib.contextmanager
def lock_held_by_another_process(directory):
    """A forked child holds the run lock of `directory` until the block ends, then is SIGKILLed."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with hold_run_directory(directory):
                os.write(ready_write, b"locked")
                signal.pause()  # until the parent kills this process
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 6) == b"locked"
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
        os.close(ready_write)


def test_a_second_run_on_a_live_runs_directory_stops_before_its_first_step_naming_that_run(
        run_copy, capsys):
    directory, data = run_copy
    (directory / "gpt_final.pt").unlink()
    with lock_held_by_another_process(directory) as pid:
        before = snapshot(directory)
        status = exit_status(train.train, tiny_argv(directory, data, resume="auto", **FLAGS))
        assert snapshot(directory) == before
    assert status == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, f"in use by another training run (pid {pid} on host "
                                 f"{socket.gethostname()})")
    assert not [line for line in captured.out.splitlines() if line.startswith("step ")]


def test_a_lock_left_by_a_killed_run_does_not_block_the_next_run(tmp_path):
    data = write_corpus(tmp_path)
    directory = tmp_path / "run"
    with lock_held_by_another_process(directory):
        pass  # the holder is SIGKILLed: its lock file stays behind, its lock goes with it
    assert (directory / LOCK_NAME).exists()
    assert exit_status(train.train, tiny_argv(directory, data, max_iters=2, save_iter=2)) == 0
    assert not (directory / LOCK_NAME).exists()


def test_reading_a_directory_a_live_run_holds_is_never_blocked(finished_run, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(finished_run[0], directory)
    with lock_held_by_another_process(directory):
        sample.main(["--checkpoint_dir", str(directory), "--device", "cpu", "--prompt", "line",
                     "--max_new_tokens", "8"])
    assert capsys.readouterr().out.startswith("line")


# -------------------------------------------------------------------------------------- full disk

def test_a_full_disk_stops_the_run_with_exit_status_1_and_the_room_the_run_needs(
        tmp_path, monkeypatch, capsys):
    """The second checkpoint's write fails partway, as on a disk that fills up mid-run."""
    from gpt_train import atomic
    data = write_corpus(tmp_path)
    directory = tmp_path / "run"
    checkpoint_writes = []

    class FillingDisk(io.FileIO):
        def write(self, data):
            if len(checkpoint_writes) > 1 and self.tell() + len(data) > 20_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def open_on_filling_disk(path, mode="r", *args, **kwargs):
        if "gpt_step" not in str(path):
            return open(path, mode, *args, **kwargs)
        checkpoint_writes.append(path)
        return FillingDisk(path, mode)

    monkeypatch.setattr(atomic, "open", open_on_filling_disk, raising=False)
    assert exit_status(train.train, tiny_argv(directory, data, **FLAGS)) == 1
    error = one_error_line(capsys.readouterr().err, "gpt_step8.pt", os.strerror(errno.ENOSPC))
    size = (directory / "gpt_step4.pt").stat().st_size
    # the room the start-up check asks for (test_nothing_lost checks the two figures agree)
    needed = float(re.search(r"two checkpoints of this model need about ([\d.]+) MiB",
                             error).group(1))
    assert needed >= 2 * size / 2**20
    assert sorted(p.name for p in directory.iterdir()) == ["gpt_best.pt", "gpt_step4.pt",
                                                           "metrics.jsonl"]
    load_checkpoint(directory / "gpt_step4.pt")


# ------------------------------------------------------------------------------------ token cache

def corrupt_truncate_bin(bin_path):
    bin_path.write_bytes(bin_path.read_bytes()[:100])


def corrupt_cut_json(bin_path):
    meta_path = bin_path.with_suffix(".json")
    meta_path.write_text(meta_path.read_text()[:40])


def corrupt_damage_tokenizer(bin_path):
    meta_path = bin_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = {"kind": "char"}  # its characters are gone
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, reason", [(corrupt_truncate_bin, "is truncated"),
                                            (corrupt_cut_json, "is damaged"),
                                            (corrupt_damage_tokenizer, "is damaged")])
def test_a_damaged_token_cache_is_rebuilt_saying_so_in_one_line(tmp_path, capsys, damage, reason):
    text = write_corpus(tmp_path).read_text()
    cache = tmp_path / "cache"
    _, ids = tokencache.cached_tokens(CacheSettings(str(tmp_path / "corpus.txt"), "char", cache))
    damage(cache / os.path.basename(ids.filename))
    capsys.readouterr()
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(tmp_path / "corpus.txt"), "char",
                                                            cache))
    assert tokenizer.decode(ids) == text
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and reason in lines[0] and "rebuilding" in lines[0], lines


def killed_build(source, cache, moment):
    """Build the cache of `source` in a forked child that SIGKILLs itself at `moment`."""
    pid = os.fork()
    if pid == 0:
        try:
            real_atomic_write = textcache.atomic_write

            @contextlib.contextmanager
            def dying_write(path):
                if moment == "before the JSON" and path.suffix == ".json":
                    os.kill(os.getpid(), signal.SIGKILL)
                with real_atomic_write(path) as handle:
                    yield handle
                    if moment == "while writing the ids":
                        handle.flush()
                        os.kill(os.getpid(), signal.SIGKILL)

            textcache.atomic_write = cachefiles.atomic_write = dying_write
            tokencache.cached_tokens(CacheSettings(str(source), "char", cache))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("moment", ["while writing the ids", "before the JSON"])
def test_a_token_cache_build_killed_midway_is_never_taken_for_a_complete_cache(tmp_path, moment):
    source = write_corpus(tmp_path, "an older text\n" * 50)
    cache = tmp_path / "cache"
    # a complete cache of the older text
    tokencache.cached_tokens(CacheSettings(str(source), "char", cache))
    new_text = "the text as it is now, longer than before\n" * 60
    source.write_text(new_text)
    killed_build(source, cache, moment)
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(source), "char", cache))
    assert tokenizer.decode(ids) == new_text
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------ torchrun restarts

@pytest.mark.slow
def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_ends_with_the_uninterrupted_weights(
        tmp_path, two_process_run):
    """A 2-process resume at the same world size is exact: the restarted ranks continue from the
    step-4 checkpoint with the losses and the final weights of the run never killed."""
    uninterrupted, data, _ = two_process_run  # conftest's: the same flags, never killed
    # rank 0 of the first attempt SIGKILLs itself after step 6; the last checkpoint is step 4
    restarted = torchrun([REPO / "tests" / "robust_helpers.py", "rank0-dies-after-step", 6,
                          *tiny_argv(tmp_path / "restarted", data, **TWO_PROCESS_FLAGS,
                                     resume="auto")], tmp_path, max_restarts=1)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from {tmp_path / 'restarted' / 'gpt_step4.pt'} after step 4" in \
        restarted.stdout
    assert "data order changes" not in restarted.stdout + restarted.stderr
    assert_same_weights(tmp_path / "restarted" / "gpt_final.pt", uninterrupted / "gpt_final.pt")
    losses = [[(r["step"], r["loss"]) for r in metrics_records(directory) if "loss" in r]
              for directory in (tmp_path / "restarted", uninterrupted)]
    assert losses[0] == losses[1]  # steps 1 to 4 of the first attempt, 5 to 8 after the restart


@pytest.mark.parametrize("environment, command", [
    ({}, "python train.py --resume 'runs/a b/gpt_step8.pt'"),
    ({"TORCHELASTIC_RUN_ID": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1",
      "TORCHELASTIC_MAX_RESTARTS": "3"},
     "torchrun --standalone --nproc_per_node 4 --max-restarts 3 train.py --resume "
     "'runs/a b/gpt_step8.pt'"),
], ids=["python", "torchrun"])
def test_a_stopped_run_names_the_command_that_started_it_to_resume(environment, command,
                                                                   monkeypatch):
    from gpt_train.stopping import stop_line
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
                 "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    line = stop_line(signal.SIGTERM, 8, "runs/a b/gpt_step8.pt")
    assert line == (f"stopped by SIGTERM after step 8; checkpoint runs/a b/gpt_step8.pt; resume "
                    f"with: {command}")
