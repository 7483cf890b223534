"""The run directory (--checkpoint_dir): its files, its lock, and the rules for changing it.

Everything about the directory a training run writes lives here, for train.py, configure.py,
loggers.py and the readers (sample.py, evaluate.py, export.py, plot.py):
- its names (gpt_step{N}.pt, gpt_final.pt, gpt_best.pt, metrics.jsonl, train.lock), spelled here
  and nowhere else (under --parallel fsdp a step checkpoint is a gpt_step{N} directory, which
  every rule treats as it treats a gpt_step{N}.pt), and its inventory: `run_files` (what makes
  it hold a run), the step checkpoints, the newest readable one, the file a reader loads
  (`find_sampling_checkpoint`, `readable_sampling_checkpoint`);
- the lock: a training run holds the directory with a flock on train.lock, which the kernel drops
  when the process dies, so a second run there is refused and a killed run never blocks the next;
- the safety rules, as the README's "Safety" section states them, each a function that refuses
  with one line before any file is touched:
  a new run never replaces a run's files unless --overwrite (`refuse_to_replace_a_run`); a resume
  that goes back to an earlier step moves the run's later files aside into
  superseded/<time>-after-step{N}/ (`files_set_aside`), or deletes them with --overwrite;
  --resume auto leaves a finished run alone (`exit_if_finished`), sets aside what an attempt that
  saved no checkpoint left, and refuses when its checkpoints are all unreadable
  (`accept_an_attempt_that_saved_nothing`); what a run deletes or moves goes only once its first
  steps passed the finite-loss check, all or none, each file checked first
  (`RunDirectory.clear_replaced_files`); --keep_last deletes only step checkpoints holding the
  run's own run_id (`RunDirectory.prune`); only names this tool writes, in its own temporary
  form, are ever removed as leftovers (`remove_leftovers`), and a train.lock it did not write is
  refused (`check_lock_file`).
What a checkpoint file holds and how it is read and written is checkpoint.py's; which configs a
run takes from a checkpoint and which from the flags is configure.py's.
"""

import contextlib
import itertools
import os
import re
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gpt_train.atomic import TEMPORARY_PREFIX, fsync_directory, remove_temporary_files
from gpt_train.best_model import BestModel
from gpt_train.checkpoint import is_readable, load_checkpoint, saved_step, saved_value
from gpt_train.sharded_checkpoint import is_sharded_checkpoint
from gpt_train.cli import UserError, fail
from gpt_train.runtime import print0

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), runs are not locked
except ImportError:
    fcntl = None

# a step checkpoint: a gpt_step{N}.pt file, or under --parallel fsdp a gpt_step{N} directory
STEP_PATTERN = re.compile(r"^gpt_step(\d+)(\.pt)?$")
FINAL_NAME = "gpt_final.pt"
BEST_NAME = "gpt_best.pt"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"  # --log_to tensorboard: the event files' directory
WANDB_RUN_ID_NAME = "wandb_run_id"  # --log_to wandb: the run a resume continues (files: wandb/)
LOCK_NAME = "train.lock"  # not part of the run: present only while a training process holds it
SUPERSEDED_NAME = "superseded"  # the files a rewind moved aside: superseded/<time>-after-step{N}/
REPLACED_NAME = "replaced"  # .tmp-replaced.PID/: what --overwrite is deleting, all or none
REPLACED_PATTERN = re.compile(rf"^\.tmp-{REPLACED_NAME}\.\d+$")
# an FSDP step checkpoint being written (.sharded), or an old one being replaced (.replaced)
SHARDED_TEMPORARY_PATTERN = re.compile(r"^\.tmp-gpt_step\d+\.sharded(\.replaced)?$")


# ------------------------------------------------------------------------------ names and contents

def step_path(directory, step):
    """gpt_step{N}.pt: everything needed to continue the run after step N."""
    return Path(directory) / f"gpt_step{step}.pt"


def sharded_step_path(directory, step):
    """gpt_step{N}: a step checkpoint of an FSDP run, a directory of every rank's slices."""
    return Path(directory) / f"gpt_step{step}"


def sharded_temporary_path(path):
    """.tmp-gpt_step{N}.sharded: where the ranks write gpt_step{N} before rank 0 renames it."""
    return Path(path).with_name(f"{TEMPORARY_PREFIX}{Path(path).name}.sharded")


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
    """N, from the name gpt_step{N}.pt (or gpt_step{N})."""
    return int(STEP_PATTERN.match(Path(path).name).group(1))


def step_checkpoints(directory):
    """The gpt_step{N}.pt files, and FSDP's gpt_step{N} directories, in `directory`, oldest step
    first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if (match := STEP_PATTERN.match(p.name))
                   and (p.is_file() if match.group(2) else is_sharded_checkpoint(p))),
                  key=lambda path: (step_of(path), path))


def latest_checkpoint(directory, require_readable=False, report=print):
    """The newest step checkpoint; with `require_readable`, the newest one that loads."""
    for path in reversed(step_checkpoints(directory)):
        if not require_readable:
            return path
        try:
            load_checkpoint(path, weights=False)  # a sharded one: its run state and index
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

def refuse_to_replace_a_run(train_config, attempt_accepted=False):
    """A run never replaces another run's files, nor the model it fine-tunes, unless told to.

    The directory holds a run when it has any run file (checkpoints or metrics.jsonl). A resume
    continues the run in its own directory; anywhere else, as for a new run, the directory must
    hold no run, or --overwrite must say to replace it (or, `attempt_accepted`, the files are
    those of an attempt that saved no checkpoint, which are set aside).
    """
    t = train_config
    if t.init_from and is_run_file(t.init_from, t.checkpoint_dir):
        fail(f"--init_from {t.init_from} lies in --checkpoint_dir {t.checkpoint_dir}, where this run "
             f"writes its own checkpoints: the model being fine-tuned would be replaced; give "
             f"another --checkpoint_dir")
    check_directory(t.checkpoint_dir)
    if t.overwrite or attempt_accepted or (t.resume and same_directory(t.resume, t.checkpoint_dir)):
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


def accept_an_attempt_that_saved_nothing(train_config):
    """--resume auto without a readable checkpoint to resume: whether the directory's run files
    are what an earlier attempt of the same job left before its first checkpoint (metrics.jsonl,
    gpt_best.pt), which the new run sets aside (superseded/) once its first steps are done.

    A gpt_final.pt is another run's model: False, and the usual refusal keeps it. A step
    checkpoint that cannot be read is evidence, not an attempt's leftovers: refused, naming it.
    """
    t = train_config
    directory = t.checkpoint_dir
    existing = run_files(directory)
    if t.overwrite or not existing or final_path(directory).exists():
        return False
    unreadable = step_checkpoints(directory)
    if unreadable:
        fail(f"--resume auto: {directory} holds step checkpoints, but none can be read "
             f"({list_names(unreadable)}); nothing was changed. Look at them (written by another "
             f"version? a damaged disk?), then move them out of {directory}, train into another "
             f"--checkpoint_dir, or replace them with --overwrite true")
    print0(f"note: --resume auto: {directory} holds no checkpoint to resume, only "
           f"{list_names(existing)} of an attempt that saved none; this run sets them aside in "
           f"{Path(directory) / SUPERSEDED_NAME} once its first steps are done")
    return True


def resume_command(directory):
    """The flags that continue the run in `directory`, or None if no step checkpoint is readable."""
    if not any(saved_step(path) is not None for path in step_checkpoints(directory)):
        return None
    final = final_path(directory)
    finished_at = saved_step(final) if final.is_file() else None
    if finished_at:  # the run is over: it continues only with more steps
        return f"--resume latest --max_iters {2 * finished_at}"
    return "--resume latest"


def files_replaced(train_config, step):
    """The files of an earlier run that this run deletes when it starts (only with --overwrite):
    all of them for a new run, the later ones for a resume that goes back to `step`."""
    t = train_config
    if not t.overwrite:
        return []
    if t.resume and same_directory(t.resume, t.checkpoint_dir):
        return run_files_after(t.checkpoint_dir, step)
    return run_files(t.checkpoint_dir)


def files_set_aside(train_config, step):
    """(files, the name of their place in superseded/): what this run moves aside, never deletes.

    A resume in its own directory that goes back to `step` (a rewind, or --resume latest past an
    unreadable newer file) sets aside the run's later files; a new run, the files of an attempt
    that saved nothing (configure.py accepted them, `accept_an_attempt_that_saved_nothing`).
    """
    t = train_config
    if t.overwrite:
        return [], ""
    if t.resume:
        if not same_directory(t.resume, t.checkpoint_dir):
            return [], ""
        return run_files_after(t.checkpoint_dir, step), f"after-step{step}"
    return run_files(t.checkpoint_dir), "attempt-without-checkpoint"


# ----------------------------------------------------------------- one training run's directory

@dataclass
class RunDirectory:
    """The directory as one training run writes it: where its files go and what it replaces.

    What the run replaces is only noted when it starts: `clear_replaced_files` deletes
    `replaced_files` (--overwrite) and moves `set_aside_files` to superseded/ once the first steps
    are done, so a run that fails before then has changed nothing. `run_id` marks the run's own
    step checkpoints, the only ones --keep_last deletes (`prune`).
    """

    path: Path
    replaced_files: list[Path] = field(default_factory=list)
    set_aside_files: list[Path] = field(default_factory=list)
    set_aside_as: str = ""  # the place's name in superseded/, after its time: after-step{N}, ...
    run_id: str = ""  # kept in every step checkpoint of the run, resumes included
    room_needed: int | None = None  # bytes: what the start-up check asked for
    changed: bool = False  # whether the run has started to change the directory
    kept: set = field(default_factory=set)  # step files --keep_last could not delete (said once)

    def clear_replaced_files(self):
        """The moment the directory starts to change: call it before the run's first record or
        file. The first call deletes what --overwrite replaces and moves aside what a rewind
        supersedes; later calls do nothing."""
        if self.changed:
            return
        self.changed = True
        if self.replaced_files:
            delete_files(self.path, self.replaced_files)
        if self.set_aside_files:
            place = set_aside(self.path, self.set_aside_files, self.set_aside_as)
            print0(f"moved aside to {place}/: {list_names(sorted(place.iterdir()), shown=6)} "
                   f"(kept as they were; --resume, sample.py, evaluate.py and export.py ignore "
                   f"them)")

    def prune(self, keep_last, up_to_step):
        """Keep only the `keep_last` newest step checkpoints (0 keeps all) among the run's own:
        those up to its current step that hold its run_id. gpt_best.pt, gpt_final.pt and any
        other step file (a later one, one copied in, one of an older version) are never touched.
        A file that cannot be deleted is kept, with one line, and training goes on."""
        if keep_last <= 0:
            return
        own = [path for path in step_checkpoints(self.path) if step_of(path) <= up_to_step
               and saved_value(path, "run_id") == self.run_id]
        for path in own[:-keep_last]:
            try:
                remove_step_checkpoint(path)
            except OSError as error:
                if path not in self.kept:
                    self.kept.add(path)
                    print0(f"note: --keep_last {keep_last} could not delete {path} "
                           f"({error.strerror or error}); it is kept and training goes on")


def remove_step_checkpoint(path):
    """Delete a gpt_step{N}.pt, or an FSDP run's gpt_step{N} directory (renamed away first, so
    that it is gone at once as a checkpoint, whatever is left of its files on an error)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    doomed = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.sharded.replaced")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def new_run_id():
    return uuid.uuid4().hex


def prepare_run_directory(train_config, resumed_step, bytes_per_checkpoint, run_id):
    """Before the first step, on the rank that writes: the directory is writable and has room for
    two checkpoints, a killed run's temporary files are gone, and what the run deletes
    (--overwrite) or sets aside (a rewind) is noted, each file checked first. Returns the
    RunDirectory."""
    t = train_config
    directory = Path(t.checkpoint_dir)
    check_room_for_checkpoints(directory, bytes_per_checkpoint)
    remove_leftovers(directory)
    replaced = files_replaced(t, resumed_step)
    set_aside_files, set_aside_as = files_set_aside(t, resumed_step)
    check_movable(replaced + set_aside_files, "--overwrite true" if replaced else "this resume")
    return RunDirectory(directory, replaced, set_aside_files, set_aside_as, run_id,
                        2 * bytes_per_checkpoint)


def check_directory(directory):
    """--checkpoint_dir names a directory, or nothing yet (it is created)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        fail(f"--checkpoint_dir {directory} is a file, not a directory; give a directory (it is "
             f"created if missing)")


def make_directory(directory):
    """Create `directory` if missing; one line if it cannot be."""
    check_directory(directory)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")


def check_room_for_checkpoints(directory, bytes_per_checkpoint):
    """Fail before training if `directory` is not writable or cannot hold two checkpoints."""
    directory = Path(directory)
    make_directory(directory)
    try:
        probe = directory / f"{TEMPORARY_PREFIX}probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")
    free = shutil.disk_usage(directory).free
    if free < 2 * bytes_per_checkpoint:
        fail(f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free but two checkpoints "
             f"of this model need about {2 * bytes_per_checkpoint / 2**20:.1f} MiB")


def is_own_name(name):
    """Whether the tool writes files of this name in a run directory (temporary ones included)."""
    return (name in (FINAL_NAME, BEST_NAME, METRICS_NAME, WANDB_RUN_ID_NAME, "probe")
            or bool(STEP_PATTERN.match(name)))


def remove_leftovers(directory):
    """What a killed run left: its temporary files (.tmp-NAME.PID, for the names this tool writes),
    the folder of files it was deleting (.tmp-replaced.PID) and an FSDP checkpoint directory it
    was writing or deleting (.tmp-gpt_step{N}.sharded, .replaced). Nothing else is touched."""
    remove_temporary_files(directory, is_own_name)
    for folder in Path(directory).glob(f"{TEMPORARY_PREFIX}*"):
        own = REPLACED_PATTERN.match(folder.name) or SHARDED_TEMPORARY_PATTERN.match(folder.name)
        if own and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def check_movable(paths, reason):
    """Fail before training, naming the file, if one of `paths` could not be deleted or moved."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink() and not is_sharded_checkpoint(path):
            fail(f"{path} is a directory, where {reason} would replace a file; nothing was "
                 f"changed; move it away first")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            fail(f"{path} cannot be removed from {path.parent} (the directory is not writable); "
                 f"nothing was changed")


def move_files(paths, folder):
    """Move `paths` into `folder` (names kept), all or none: on a failure the ones moved go back,
    and the error propagates. Returns the new paths."""
    moved = []
    try:
        for path in paths:
            destination = Path(folder) / Path(path).name
            os.rename(path, destination)
            moved.append((Path(path), destination))
    except OSError:
        for path, destination in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(destination, path)
        raise
    return [destination for _, destination in moved]


def delete_files(directory, paths):
    """Delete `paths` (--overwrite), all or none: they are moved into one folder first, which
    then goes; if one cannot be moved, none is deleted and the run stops with one line."""
    folder = Path(directory) / f"{TEMPORARY_PREFIX}{REPLACED_NAME}.{os.getpid()}"
    try:
        folder.mkdir()
        move_files(paths, folder)
    except OSError as error:
        with contextlib.suppress(OSError):
            folder.rmdir()
        fail(f"--overwrite true could not delete {error.filename or directory} "
             f"({error.strerror or error}); no file of the old run was deleted")
    shutil.rmtree(folder, ignore_errors=True)
    fsync_directory(directory)


def set_aside(directory, paths, label):
    """Move `paths` into a new folder superseded/<time>-<label>/ of `directory`, names and bytes
    kept; after a rewind (label after-step{N}) also keep the whole metrics.jsonl and the
    TensorBoard events there, whose records past N the resumed run drops or hides. All or
    nothing: on a failure nothing is moved, and the run stops with one line. Returns the folder."""
    directory = Path(directory)
    folder = new_folder(directory / SUPERSEDED_NAME, label)
    try:
        if label.startswith("after-step"):
            keep_a_copy(metrics_path(directory), folder)
            keep_a_copy(directory / TENSORBOARD_NAME, folder)
        move_files(paths, folder)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)  # only links and copies of files still in place
        fail(f"could not move {error.filename or list_names(paths)} aside to {folder} "
             f"({error.strerror or error}); nothing was moved")
    fsync_directory(directory)
    return folder


def new_folder(parent, label):
    """A new folder parent/<local time>-<label> (a suffix -2, -3, ... if that name is taken)."""
    stem = f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-{label}"
    make_directory(parent)
    for suffix in itertools.count(1):
        folder = parent / (stem if suffix == 1 else f"{stem}-{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            fail(f"could not create {folder} to set the later files aside "
                 f"({error.strerror or error}); nothing was moved")


def keep_a_copy(source, folder):
    """A copy of the file or folder `source` in `folder`, byte for byte (a hard link where the file
    system has them: no room taken); nothing if `source` is missing."""
    source, destination = Path(source), Path(folder) / Path(source).name
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=link_or_copy)
    elif source.is_file():
        link_or_copy(source, destination)


def link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


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
    make_directory(directory)
    check_lock_file(path)
    try:
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


LOCK_CONTENT = re.compile(r"(pid \d+ on host [^\n]*\n?)?")  # what hold_run_directory writes


def check_lock_file(path):
    """A train.lock that this tool did not write (the user's own file, a directory) is refused:
    the lock writes into it and deletes it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    content = b"?"
    if path.is_file() and not path.is_symlink():
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            content = handle.read(1024)
    if not LOCK_CONTENT.fullmatch(content.decode("utf-8", "replace")):
        fail(f"{path} is not a lock of this tool's, which a training run writes there and deletes "
             f"at its end; nothing was changed; move it out of {path.parent}")


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
