"""The run directory (--checkpoint_dir): its files, its lock, and the rules for changing it.

Everything about the directory a training run writes lives here, for train.py, configure.py,
loggers.py and the readers (sample.py, evaluate.py, export.py, plot.py):
- its names (gpt_step{N}.pt, gpt_final.pt, gpt_best.pt, metrics.jsonl, train.lock), spelled here
  and nowhere else, and its inventory: `run_files` (what makes it hold a run), the step
  checkpoints, the newest readable one, the file a reader loads (`find_sampling_checkpoint`,
  `readable_sampling_checkpoint`);
- the lock: a training run holds the directory with a flock on train.lock, which the kernel drops
  when the process dies, so a second run there is refused and a killed run never blocks the next;
- the safety rules, as the README's "Safety" section states them, each a function that refuses
  with one line before any file is touched:
  a new run never replaces a run's files unless --overwrite (`refuse_to_replace_a_run`); a resume
  that goes back to an earlier step never replaces later files unless --overwrite
  (`refuse_to_go_back`); --resume auto leaves a finished run alone (`exit_if_finished`) and
  replaces an attempt that saved no checkpoint (`replace_an_attempt_that_saved_nothing`);
  what a run replaces goes only once its first steps passed the finite-loss check
  (`RunDirectory.delete_replaced_files`); --keep_last deletes only the run's own step checkpoints
  (`prune_checkpoints`).
What a checkpoint file holds and how it is read and written is checkpoint.py's; which configs a
run takes from a checkpoint and which from the flags is configure.py's.
"""

import contextlib
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from atomic import TEMPORARY_PREFIX, remove_temporary_files
from best_model import BestModel
from checkpoint import is_readable, load_checkpoint, saved_step
from cli import UserError, fail
from runtime import print0

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), runs are not locked
except ImportError:
    fcntl = None

STEP_PATTERN = re.compile(r"^gpt_step(\d+)\.pt$")
FINAL_NAME = "gpt_final.pt"
BEST_NAME = "gpt_best.pt"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"  # --log_to tensorboard: the event files' directory
WANDB_RUN_ID_NAME = "wandb_run_id"  # --log_to wandb: the run a resume continues (files: wandb/)
LOCK_NAME = "train.lock"  # not part of the run: present only while a training process holds it


# ------------------------------------------------------------------------------ names and contents

def step_path(directory, step):
    """gpt_step{N}.pt: everything needed to continue the run after step N."""
    return Path(directory) / f"gpt_step{step}.pt"


def final_path(directory):
    """gpt_final.pt: the weights at the end of the run."""
    return Path(directory) / FINAL_NAME


def best_path(directory):
    """gpt_best.pt: the weights of the evaluation with the lowest validation loss so far."""
    return Path(directory) / BEST_NAME


def metrics_path(directory):
    """metrics.jsonl: one JSON object per log line."""
    return Path(directory) / METRICS_NAME


def is_run_file(path, directory):
    """Whether `path` is one of the files a run writes into `directory`."""
    path = Path(path)
    return same_directory(path, directory) and (
        path.name in (FINAL_NAME, BEST_NAME, METRICS_NAME) or bool(STEP_PATTERN.match(path.name)))


def same_directory(path, directory):
    """Whether the file `path` lies in `directory`."""
    return Path(path).resolve().parent == Path(directory).resolve()


def run_files(directory):
    """The run files in `directory`: step checkpoints (oldest first), final, best, metrics.

    A directory that has any of them holds a run; other files are never a run's.
    """
    named = [final_path(directory), best_path(directory), metrics_path(directory)]
    return step_checkpoints(directory) + [path for path in named if path.is_file()]


def run_files_after(directory, step):
    """The checkpoints in `directory` from after `step`: what going back to `step` would replace.

    Step files are judged by name, gpt_final.pt and gpt_best.pt by the step they hold (one that
    cannot be read counts as later: it is not ours to judge).
    """
    later = [path for path in step_checkpoints(directory) if step_of(path) > step]
    for path in (final_path(directory), best_path(directory)):
        if path.is_file():
            saved = saved_step(path)
            if saved is None or saved > step:
                later.append(path)
    return later


def step_of(path):
    """N, from the name gpt_step{N}.pt."""
    return int(STEP_PATTERN.match(Path(path).name).group(1))


def step_checkpoints(directory):
    """The gpt_step{N}.pt files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if STEP_PATTERN.match(p.name)),
                  key=lambda path: (step_of(path), path))


def latest_checkpoint(directory, require_readable=False, report=print):
    """The newest step checkpoint; with `require_readable`, the newest one that loads."""
    for path in reversed(step_checkpoints(directory)):
        if not require_readable:
            return path
        try:
            load_checkpoint(path)
            return path
        except UserError as error:
            report(f"skipping {path.name}: {error}")
    return None


def list_names(paths, shown=4):
    """The files' names for a message: the first `shown`, then how many more."""
    names = [Path(p).name for p in paths]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --------------------------------------------------------- reading: sample.py, evaluate.py, export.py

def find_sampling_checkpoint(directory):
    """gpt_best.pt, else gpt_final.pt, else the newest gpt_step*.pt, else None."""
    for path in (best_path(directory), final_path(directory)):
        if path.is_file():
            return path
    return latest_checkpoint(directory)


def add_checkpoint_arguments(parser):
    """--checkpoint and --checkpoint_dir, as sample.py, evaluate.py and export.py take them."""
    parser.add_argument("--checkpoint", default="", help="a checkpoint file, a Hugging Face GPT-2 "
                        "directory or model id (gpt2, gpt2-medium, ...); empty = the best in "
                        "--checkpoint_dir: gpt_best.pt, gpt_final.pt, then the newest step")
    parser.add_argument("--checkpoint_dir", default="checkpoints")


def readable_sampling_checkpoint(directory):
    """`find_sampling_checkpoint`'s choice if it reads, else the next that does in the same order
    (gpt_final.pt, then the newest step), said in one line on stderr; None if there is none.
    If none reads, the first: loading it says what is wrong with it."""
    named = [path for path in (best_path(directory), final_path(directory)) if path.is_file()]
    candidates = named + list(reversed(step_checkpoints(directory)))
    for index, path in enumerate(candidates):
        if is_readable(path):
            if index:
                verb = "is" if index == 1 else "are"
                print(f"note: {list_names(candidates[:index])} {verb} unreadable (corrupt or "
                      f"truncated); using {path.name}", file=sys.stderr)
            return path
    return candidates[0] if candidates else None


def checkpoint_to_load(args):
    """The --checkpoint given, else the best readable file of --checkpoint_dir, else a UserError."""
    if not args.checkpoint and not args.checkpoint_dir.strip():
        fail("--checkpoint_dir must not be empty (use . for the current directory)")
    path = args.checkpoint or readable_sampling_checkpoint(args.checkpoint_dir)
    if not path:
        fail(f"no checkpoint in {args.checkpoint_dir}/: train a model first with `python train.py`")
    return path


# --------------------------------------------------- the rules: may this run write here, and how

def refuse_to_replace_a_run(train_config):
    """A run never replaces another run's files, nor the model it fine-tunes, unless told to.

    The directory holds a run when it has any run file (checkpoints or metrics.jsonl). A resume
    continues the run in its own directory; anywhere else, as for a new run, the directory must
    hold no run, or --overwrite must say to replace it.
    """
    t = train_config
    if t.init_from and is_run_file(t.init_from, t.checkpoint_dir):
        fail(f"--init_from {t.init_from} lies in --checkpoint_dir {t.checkpoint_dir}, where this run "
             f"writes its own checkpoints: the model being fine-tuned would be replaced; give "
             f"another --checkpoint_dir")
    if t.overwrite or (t.resume and same_directory(t.resume, t.checkpoint_dir)):
        return
    existing = run_files(t.checkpoint_dir)
    if existing:
        ways = ["train into another --checkpoint_dir",
                "replace it with --overwrite true"]
        command = resume_command(t.checkpoint_dir)
        if command:
            ways.insert(0, f"continue it with {command}")
        first = ", ".join(ways[:-1])
        fail(f"{t.checkpoint_dir} already holds a run ({list_names(existing)}); nothing was "
             f"changed. {first[0].upper()}{first[1:]}, or {ways[-1]}")


def refuse_to_go_back(path, step, train_config):
    """--resume PATH at an earlier step of the run in its own directory: the later files would be
    replaced, so that takes --overwrite."""
    t = train_config
    if t.overwrite or not same_directory(path, t.checkpoint_dir):
        return
    later = run_files_after(t.checkpoint_dir, step)
    if later:
        fail(f"--resume {path} goes back to step {step}, but {t.checkpoint_dir} "
             f"holds later files of the run ({list_names(later)}) that it would replace; "
             f"nothing was changed. Continue from the newest with --resume latest, branch off "
             f"into another --checkpoint_dir, or discard the later files with --overwrite true")


def exit_if_finished(path, checkpoint, train_config):
    """--resume auto on a finished run: a gpt_final.pt written after the newest step checkpoint,
    which is at max_iters or an early stop. A requeued job must not train it again (exit status 0)."""
    t, step, final = train_config, checkpoint.get("step"), final_path(path.parent)
    if not (isinstance(step, int) and final.is_file()
            and final.stat().st_mtime_ns >= path.stat().st_mtime_ns):
        return
    best = BestModel(t.early_stop_patience, t.early_stop_min_delta)
    with contextlib.suppress(KeyError, TypeError, ValueError):  # a resume would report damage
        best.load_state_dict(checkpoint["early_stopping"])
    if step >= t.max_iters:
        ending, flag = f"step {step} of --max_iters {t.max_iters}", "a larger --max_iters"
    elif best.should_stop:
        ending, flag = f"its early stop at step {step}", "a larger --early_stop_patience"
    else:
        return
    print0(f"the run in {path.parent} is finished: {final.name} follows {ending}; nothing to "
           f"train ({flag} continues it)")
    raise SystemExit(0)


def replace_an_attempt_that_saved_nothing(train_config):
    """--resume auto without a checkpoint to resume: an earlier attempt of the same job that never
    saved one left at most metrics.jsonl and gpt_best.pt, which the new attempt replaces. A
    gpt_final.pt is another run's model: the usual refusal keeps it."""
    t = train_config
    existing = run_files(t.checkpoint_dir)
    if existing and not final_path(t.checkpoint_dir).exists() and not t.overwrite:
        print0(f"note: --resume auto: {t.checkpoint_dir} holds no checkpoint to resume, only "
               f"{list_names(existing)} of an attempt that saved none; this run replaces them")
        t.overwrite = True


def resume_command(directory):
    """The flags that continue the run in `directory`, or None if it has no step checkpoint."""
    if not step_checkpoints(directory):
        return None
    final = final_path(directory)
    finished_at = saved_step(final) if final.is_file() else None
    if finished_at:  # the run is over: it continues only with more steps
        return f"--resume latest --max_iters {2 * finished_at}"
    return "--resume latest"


def files_replaced(train_config, step):
    """The files of an earlier run that this run deletes when it starts (only with --overwrite)."""
    t = train_config
    if not t.overwrite:
        return []
    if t.resume and same_directory(t.resume, t.checkpoint_dir):
        return run_files_after(t.checkpoint_dir, step)
    return run_files(t.checkpoint_dir)


# ----------------------------------------------------------------- one training run's directory

@dataclass
class RunDirectory:
    """The directory as one training run writes it: where its files go and what it replaces.

    `replaced_files` (--overwrite) are only noted when the run starts: `delete_replaced_files`
    deletes them once the first steps are done, so a run that fails before then has changed
    nothing.
    """

    path: Path
    replaced_files: list[Path] = field(default_factory=list)
    changed: bool = False  # whether the run has started to change the directory

    def delete_replaced_files(self):
        """The moment the directory starts to change: call it before the run's first record or
        file. The first call deletes the files of the run this one replaces; later calls do
        nothing."""
        if self.changed:
            return
        self.changed = True
        for path in self.replaced_files:
            Path(path).unlink(missing_ok=True)


def prepare_run_directory(train_config, resumed_step, bytes_per_checkpoint):
    """Before the first step, on the rank that writes: the directory is writable and has room for
    two checkpoints, a killed run's temporary files are gone, and what --overwrite replaces is
    noted. Returns the RunDirectory."""
    directory = Path(train_config.checkpoint_dir)
    check_room_for_checkpoints(directory, bytes_per_checkpoint)
    remove_temporary_files(directory)
    return RunDirectory(directory, files_replaced(train_config, resumed_step))


def check_room_for_checkpoints(directory, bytes_per_checkpoint):
    """Fail before training if `directory` is not writable or cannot hold two checkpoints."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f"{TEMPORARY_PREFIX}probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")
    free = shutil.disk_usage(directory).free
    if free < 2 * bytes_per_checkpoint:
        fail(f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free but two checkpoints "
             f"of this model need about {2 * bytes_per_checkpoint / 2**20:.1f} MiB")


def prune_checkpoints(directory, keep_last, up_to_step):
    """Keep only the `keep_last` newest step checkpoints (0 keeps all) among the run's own, those
    up to its current step; gpt_best.pt, gpt_final.pt and any later step file (one the run skipped as
    unreadable on --resume latest, or not its own) are never touched."""
    if keep_last <= 0:
        return
    own = [path for path in step_checkpoints(directory) if step_of(path) <= up_to_step]
    for path in own[:-keep_last]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_directory(directory, enabled=True):
    """Hold `directory` for one training run while the block runs; a second run is refused.

    The lock is a flock on train.lock, which the kernel drops when the process dies, however it
    dies (kill -9 included): a file left by a dead run blocks nothing. The file names the holder
    (host and pid) for the message the second run prints. Readers never take the lock.
    """
    if not enabled or fcntl is None:
        yield
        return
    directory = Path(directory)
    path, created = directory / LOCK_NAME, not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = lock_file(path)
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one else can hold this file now
        handle.close()
        if created:  # a run that failed before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                directory.rmdir()


def lock_file(path):
    """The lock file at `path`, open and exclusively locked; a UserError if a live run holds it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a run that is starting"
            handle.close()
            fail(f"checkpoint directory {path.parent} is in use by another training run "
                 f"({holder}); wait for it to end, or give another --checkpoint_dir")
        except OSError:  # a file system without locks: go on unlocked
            return handle
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the last holder removed the file as we opened it: lock the new one
