"""Shared helpers for the test suite: the repository path, tiny training runs, running the CLI, and
reading what a run leaves behind (checkpoints, metrics, the one error line of a user's mistake).

Every run here is tiny (one or two layers, width 32, context 16, a few steps) so the whole suite
stays fast on a 2-core CPU. Tests call `train.train(argv)` and `sample.main(argv)` in-process where
they can; `run_cli` starts a real `python train.py ...` only where the command line itself is tested.
"""

import gc
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_train.cli import run_main  # noqa: E402  (needs the repository on sys.path)
from config import GPTConfig  # noqa: E402  (needs the repository on sys.path)
from model import build_model  # noqa: E402

# The models here are so small that a second intra-op thread only adds synchronisation, which
# costs seconds when other processes share the 2 cores; the commands the tests start run on one
# thread too (torch reads OMP_NUM_THREADS as it starts).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# A small corpus with a few dozen distinct characters; about 12 KB, so every split is long enough.
TINY_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n"
                    for i in range(200))


class UnsafePayload:
    """An arbitrary Python object: `torch.load(weights_only=True)` must refuse to rebuild it."""

    def __init__(self):
        self.message = "a pickle of this class could run code when loaded"


@pytest.fixture(autouse=True)
def private_token_cache(tmp_path, monkeypatch):
    """Keep token caches out of the user's ~/.cache, for in-process runs and subprocesses alike."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def write_corpus(directory, text=TINY_TEXT, name="corpus.txt"):
    path = Path(directory) / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus_file(tmp_path):
    return write_corpus(tmp_path)


def tiny_argv(checkpoint_dir, data, **flags):
    """argv for a tiny CPU run; keyword arguments add or replace flags (a list value: several)."""
    settings = {
        "data": data, "cache_dir": Path(checkpoint_dir).parent / "token-cache",
        "checkpoint_dir": checkpoint_dir, "device": "cpu",
        "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16,
        "batch_size": 8, "max_iters": 8, "warmup_iters": 2,
        "log_iter": 2, "eval_iter": 4, "save_iter": 4, "eval_batches": 2,
    }
    settings.update(flags)
    argv = []
    for name, value in settings.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{name}", *(str(v) for v in values)]
    return argv


def exit_status(main, argv):
    """Run an entry point the way its `__main__` block does; return its exit status."""
    try:
        run_main(main, argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def run_cli(*args, cwd=REPO):
    """`python <args>` in a subprocess (script paths relative to the repository)."""
    script, *rest = args
    script_path = REPO / script if not Path(script).is_absolute() else Path(script)
    return subprocess.run([sys.executable, str(script_path), *map(str, rest)], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def one_error_line(stderr, *fragments):
    """The `error: ...` line a user's mistake ends in, checked to be all that stderr holds.

    Frames of the training progress bar (carriage-return separated) and notes (`note: ...`, which
    go to stderr) may come first, but the error starts a line of its own, and nothing else (a
    traceback, a warning) is printed. Each fragment must appear in the line, which is returned.
    """
    lines = [line for line in stderr.split("\n") if line.strip()]
    messages = [line for line in lines
                if not all(frame.strip().startswith(("training:", "note: "))
                           for frame in line.split("\r") if frame.strip())]
    assert len(messages) == 1 and messages[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in messages[0], messages[0]
    return messages[0]


def snapshot(directory):
    """Every file under `directory` with its bytes: to prove a failed run changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny run (8 steps, checkpoints at 4 and 8) shared by the sampling tests.

    Seed 1 differs from the default seed, so a command that failed to protect these files would
    leave different bytes behind.
    """
    root = tmp_path_factory.mktemp("trained")
    data = write_corpus(root)
    checkpoint_dir = root / "checkpoints"
    import train
    train.train(tiny_argv(checkpoint_dir, data, seed=1))
    return checkpoint_dir


def torchrun(script_and_argv, cwd, max_restarts=0):
    """`torchrun --standalone --nproc_per_node=2 [--max-restarts=N] SCRIPT ARGV` on the CPU
    (gloo, one thread per process); the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--max-restarts={max_restarts}", *map(str, script_and_argv)]
    environment = {**os.environ, "XDG_CACHE_HOME": str(cwd / "xdg-cache"), "OMP_NUM_THREADS": "1"}
    environment.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torchrun's default store
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=240)


# With dropout every rank draws its own masks: what a resume of a 2-process run must restore.
TWO_PROCESS_FLAGS = dict(dropout=0.2, batch_size=4, grad_accum_steps=2, max_iters=8, log_iter=1,
                         eval_iter=4, save_iter=4)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
    """A finished 2-process torchrun run (TWO_PROCESS_FLAGS, checkpoints at steps 4 and 8): the
    uninterrupted run that the resumed and the restarted 2-process runs must match. Each torchrun
    start costs seconds, so it is made once. Returns (its directory, the corpus, the process)."""
    root = tmp_path_factory.mktemp("two-process")
    data = write_corpus(root)
    finished = torchrun([REPO / "train.py", *tiny_argv(root / "run", data, **TWO_PROCESS_FLAGS)],
                        root)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return root / "run", data, finished


# ----------------------------------------------------------------- what a run leaves behind

def read_checkpoint(path):
    """A checkpoint's contents as plain data on the CPU (weights_only: no code is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_weights(path):
    return read_checkpoint(path)["model_state_dict"]


def metrics_records(checkpoint_dir):
    """Every record of a run's metrics.jsonl, in the order written."""
    lines = (Path(checkpoint_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_same_weights(ours, reference):
    """Equal bit for bit, tensor by tensor; each side is a state dict or a checkpoint's path."""
    ours, reference = (checkpoint_weights(side) if isinstance(side, (str, os.PathLike)) else side
                       for side in (ours, reference))
    assert ours.keys() == reference.keys()
    different = [name for name in ours if not torch.equal(ours[name], reference[name])]
    assert not different, f"the weights differ in {different}"



def logged_steps(directory):
    """(step, loss, learning rate) of every training record in metrics.jsonl."""
    return [(r["step"], r["loss"], r["lr"]) for r in metrics_records(directory) if "loss" in r]


def assert_equal_nested(a, b, where="state"):
    """Tensors equal bit for bit, everything else equal, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where} keys differ"
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where} lengths differ"
        for index, (item_a, item_b) in enumerate(zip(a, b)):
            assert_equal_nested(item_a, item_b, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# What two runs that took the same steps must agree on, bit for bit.
RUN_STATE_KEYS = ("model_state_dict", "optimizer_state_dict", "loss")


def assert_same_run_state(path_a, path_b):
    """Two step checkpoints hold the same weights, optimizer state and loss, bit for bit."""
    a, b = read_checkpoint(path_a), read_checkpoint(path_b)
    for key in RUN_STATE_KEYS:
        assert_equal_nested(a[key], b[key], key)

TINY_VOCAB = 65  # tiny_model's vocabulary


def tiny_model(seed=0, **overrides):
    """A freshly initialised 2-layer GPT of width 32 and context 16, without dropout."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=TINY_VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32,
                    dropout=0.0)
    settings.update(overrides)
    return build_model(GPTConfig(**settings)).eval()


def run_stopped_after(monkeypatch, steps, argv):
    """Run train.train as if Ctrl-C came during optimizer step `steps`; return the exit status."""
    import train
    calls = itertools.count(1)
    pending = train.StopRequest.pending_signal
    with monkeypatch.context() as patch:
        patch.setattr(train.StopRequest, "pending_signal",
                      lambda self: signal.SIGINT if next(calls) == steps else pending(self))
        try:
            train.train(argv)
        except SystemExit as stop:
            status = stop.code
        else:
            pytest.fail("the run was not stopped")
    # The exception's frames still hold the stopped run's DataLoader iterator. Collect it now:
    # once another run has forked workers, shutting down the old ones takes 5 s each.
    gc.collect()
    return status
