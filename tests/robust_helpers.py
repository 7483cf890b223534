"""Helpers for tests/test_robustness.py: hostile checkpoints, training runs to kill or interrupt.

Imported by the tests, and also run as a script that starts `train.py` with one fault planted:

    python tests/robust_helpers.py pause-after-save STEP <train.py flags>
        after gpt_step{STEP}.pt is saved, print PAUSED_LINE and wait for SIGINT/SIGTERM, so the
        test signals a run that has certainly made progress and has certainly not finished;
        when the stop checkpoint is then written, send the same signal again in the middle of
        that save (a second Ctrl-C while saving).
    python tests/robust_helpers.py die-mid-save N <train.py flags>
        the Nth checkpoint write of this process writes half of its bytes, then the process
        SIGKILLs itself: a crash during a save, at a moment a test can rely on.
    python tests/robust_helpers.py pause-in-save N <train.py flags>
        the Nth checkpoint write of this process writes all of its bytes to the temporary file,
        then (before the flush, fsync and rename) prints PAUSED_IN_SAVE_LINE and waits to be
        killed: the test kills a run it knows to be in the middle of a save.
    torchrun ... tests/robust_helpers.py rank0-dies-after-step N <train.py flags>
        under torchrun, rank 0 of the first attempt SIGKILLs itself right after optimizer step N:
        a rank crash that torchrun --max-restarts answers by restarting every rank.

Everything else about the run is train.py's own code path.
"""

import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PAUSED_LINE = "robust_helpers: paused, waiting for a signal"
SECOND_SIGNAL_LINE = "robust_helpers: sent the signal again during the save"
PAUSED_IN_SAVE_LINE = "robust_helpers: paused in a save, waiting to be killed"


class CreatesFileWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): what a hostile checkpoint would do.

    The pickle refers only to `builtins.open`, never to this module, so any process that
    unpickles it unsafely creates the marker file.
    """

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def forge_checkpoint(source, destination, marker):
    """A copy of a real checkpoint with one extra entry whose unpickling creates `marker`."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["note"] = CreatesFileWhenUnpickled(marker)
    torch.save(checkpoint, destination)
    return Path(destination)


def checkpoint_files(directory):
    """Every file under a final checkpoint name: gpt_step*.pt and gpt_final.pt."""
    directory = Path(directory)
    return sorted(directory.glob("gpt_step*.pt")) + sorted(directory.glob("gpt_final.pt"))


def temporary_files(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(".tmp-"))


def poison_training_losses(monkeypatch, bad_steps):
    """Make the training loss NaN at the given optimizer steps (one micro-step per step).

    Evaluation and sampling forwards (eval mode or no labels) are left alone.
    """
    import model as model_module

    original = model_module.GPT.forward
    training_calls = [0]

    def forward(self, input_ids, labels=None, cache=None, **options):
        output = original(self, input_ids, labels=labels, cache=cache, **options)
        if self.training and labels is not None:
            training_calls[0] += 1
            if training_calls[0] in bad_steps:
                output = dataclasses.replace(output, loss=output.loss * float("nan"))
        return output

    monkeypatch.setattr(model_module.GPT, "forward", forward)


# ------------------------------------------------------------------- training runs in a subprocess

def start_training(argv, fault=None, log_dir=None):
    """`python train.py argv` (or with a planted `fault`: (mode, number)), stdout piped as text.

    stderr (tqdm's progress bar) goes to a file so that a full pipe can never block the run.
    """
    if fault is None:
        command = [sys.executable, str(REPO / "train.py"), *map(str, argv)]
    else:
        mode, number = fault
        command = [sys.executable, str(Path(__file__).resolve()), mode, str(number),
                   *map(str, argv)]
    log_dir = Path(log_dir or ".")
    stderr = open(log_dir / f"stderr-{len(list(log_dir.glob('stderr-*')))}.txt", "w")
    # the same number of threads as this process, so results match in-process runs bit for bit
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               env=env)
    process.stderr_file = stderr
    process.lines = []
    return process


@contextlib.contextmanager
def bounded(process, seconds):
    """Kill `process` if it still runs after `seconds`: a hung run fails its test, not the suite."""
    timer = threading.Timer(seconds, process.kill)
    timer.start()
    try:
        yield process
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr_file.close()


def read_until(process, predicate):
    """Read stdout lines (kept in process.lines) until predicate(line); the line, or None at EOF."""
    for line in process.stdout:
        process.lines.append(line.rstrip("\n"))
        if predicate(process.lines[-1]):
            return process.lines[-1]
    return None


def finish(process):
    """Wait for the process to end; return its exit status (negative: killed by that signal)."""
    process.lines += process.stdout.read().splitlines()
    return process.wait()


def stderr_text(process):
    process.stderr_file.flush()
    return Path(process.stderr_file.name).read_text()


def step_of(line):
    """The step number of a `step N | loss ...` log line, else None."""
    words = line.split()
    if len(words) >= 2 and words[0] == "step" and words[1].isdigit():
        return int(words[1])
    return None


# --------------------------------------------------------------- faults planted in a training run

def plant_pause_after_save(pause_step):
    import train

    # The signals received, appended by the handler. Not a threading.Event: a handler that sets
    # one while the main thread waits on it can deadlock on the Event's own lock.
    received = []
    record_signal = train.StopRequest._handle

    def handle(self, number, frame):
        record_signal(self, number, frame)
        received.append(number)

    save_step_checkpoint = train.save_step_checkpoint

    def save_then_pause(run, loss):
        path = save_step_checkpoint(run, loss)
        if run.step == pause_step:
            print(PAUSED_LINE, flush=True)
            deadline = time.monotonic() + 60  # at most a minute; the test's own timeout is shorter
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        return path

    real_fsync = os.fsync
    resent = []

    def fsync_with_second_signal(descriptor):
        if received and not resent:  # the stop checkpoint is being written right now
            resent.append(True)
            os.kill(os.getpid(), received[0])
            print(SECOND_SIGNAL_LINE, flush=True)
        return real_fsync(descriptor)

    train.StopRequest._handle = handle
    train.save_step_checkpoint = save_then_pause
    os.fsync = fsync_with_second_signal


def plant_death_mid_save(fatal_call):
    real_save = torch.save
    calls = [0]

    def torn_save(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] < fatal_call:
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = torn_save


def plant_pause_in_save(paused_call):
    real_save = torch.save
    calls = [0]

    def save_then_wait(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        calls[0] += 1
        if calls[0] == paused_call:
            print(PAUSED_IN_SAVE_LINE, flush=True)
            threading.Event().wait(60)  # the test kills this process long before
            sys.exit("robust_helpers: nobody killed the paused save")

    torch.save = save_then_wait


def plant_rank_death(fatal_step):
    import train

    # torchrun counts its restarts: only the first attempt dies, so the restarted one can finish
    if os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
        return
    real_add = train.LossMeter.add

    def step_then_die(meter, step, *args):  # the loop counts each step it took, right after it
        real_add(meter, step, *args)
        if step == fatal_step:
            os.kill(os.getpid(), signal.SIGKILL)

    train.LossMeter.add = step_then_die


FAULTS = {"pause-after-save": plant_pause_after_save, "die-mid-save": plant_death_mid_save,
          "pause-in-save": plant_pause_in_save, "rank0-dies-after-step": plant_rank_death}


def main(arguments):
    mode, number, *train_argv = arguments
    sys.path.insert(0, str(REPO))
    FAULTS[mode](int(number))
    import train
    from gpt_train.cli import run_main
    run_main(train.train, train_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
