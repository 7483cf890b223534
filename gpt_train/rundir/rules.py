"""The run directory's safety rules, as the README's "Safety" section states them, and what one
run replaces or sets aside.

Each rule refuses with one line before any file is touched:
- a new run never replaces a run's files unless --overwrite (`refuse_to_replace_a_run`);
- a resume that goes back to an earlier step moves the run's later files aside into
  superseded/<time>-after-step{N}/ (`files_set_aside`), or deletes them with --overwrite
  (`files_replaced`);
- --resume auto leaves a finished run alone (`exit_if_finished`), sets aside what an attempt that
  saved no checkpoint left, and refuses when its checkpoints are all unreadable
  (`accept_an_attempt_that_saved_nothing`);
- what a run deletes or moves goes only once its first steps passed the finite-loss check, all or
  none, each file checked first (`prepare_run_directory`, `RunDirectory.clear_replaced_files`);
- --keep_last deletes only step checkpoints holding the run's own run_id (`RunDirectory.prune`).
The moves themselves are moves.py's, the names names.py's; which configs a run takes from a
checkpoint and which from the flags is configure.py's.
"""

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from config import fail
from gpt_train.atomic import TEMPORARY_PREFIX
from gpt_train.checkpoint import saved_step
from gpt_train.cli import NothingToTrain, ResourceError, raise_os_failure
from gpt_train.rundir.moves import (check_directory, delete_files, make_directory,
                                    remove_leftovers, remove_step_checkpoint, set_aside)
from gpt_train.rundir.names import (SUPERSEDED_NAME, best_path, final_path, is_run_file,
                                    is_step_directory_name, list_names, run_files,
                                    same_directory, step_checkpoints, step_of)
from gpt_train.runtime import note, print0
from gpt_train.step_checkpoint import resumable_step, run_id_of, saved_best_model


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
    resumes_in_place = bool(t.resume) and same_directory(t.resume, t.checkpoint_dir)
    if not (t.overwrite or attempt_accepted or resumes_in_place):
        refuse_a_directory_holding_a_run(t.checkpoint_dir)
    check_place_to_set_aside(t)


def refuse_a_directory_holding_a_run(directory):
    """One line naming the run's files and the ways on, if `directory` holds a run."""
    existing = run_files(directory)
    if existing:
        ways = ["train into another --checkpoint_dir",
                "replace it with --overwrite true"]
        command = resume_command(directory)
        if command:
            ways.insert(0, f"continue it with {command}")
        first = ", ".join(ways[:-1])
        fail(f"{directory} already holds a run ({list_names(existing)}); nothing was "
             f"changed. {first[0].upper()}{first[1:]}, or {ways[-1]}")


def check_place_to_set_aside(train_config):
    """Where this run will set files aside, superseded/ must be a folder it can write into (or
    not be there yet): asked before training starts, on every rank."""
    t = train_config
    files, _ = files_set_aside(t, (saved_step(t.resume) or 0) if t.resume else 0)
    place = Path(t.checkpoint_dir) / SUPERSEDED_NAME
    if not files or not (place.exists() or place.is_symlink()):
        return
    if not place.is_dir():
        what = "a file" if place.is_file() else "not a folder"
        fail(f"{place} is {what}, and this run would set {list_names(files)} aside in a folder "
             f"of that name; nothing was changed; move or rename {place}")
    if not os.access(place, os.W_OK | os.X_OK):
        fail(f"{place} is not writable, and this run would set {list_names(files)} aside in it; "
             f"nothing was changed")


def exit_if_finished(path, checkpoint, train_config):
    """--resume auto on a finished run: a gpt_final.pt written after the newest step checkpoint,
    which is at max_iters or an early stop. A requeued job must not train it again: NothingToTrain
    (exit status 0)."""
    t, step, final = train_config, resumable_step(checkpoint, path), final_path(path.parent)
    if not (final.is_file() and final.stat().st_mtime_ns >= path.stat().st_mtime_ns):
        return
    best = saved_best_model(checkpoint, t)
    if step >= t.max_iters:
        ending, flag = f"step {step} of --max_iters {t.max_iters}", "a larger --max_iters"
    elif best.should_stop:
        ending, flag = f"its early stop at step {step}", "a larger --early_stop_patience"
    else:
        return
    print0(f"the run in {path.parent} is finished: {final.name} follows {ending}; nothing to "
           f"train ({flag} continues it)")
    raise NothingToTrain


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
    note(f"--resume auto: {directory} holds no checkpoint to resume, only "
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
               and run_id_of(path) == self.run_id]
        for path in own[:-keep_last]:
            try:
                remove_step_checkpoint(path)
            except OSError as error:
                if path not in self.kept:
                    self.kept.add(path)
                    note(f"--keep_last {keep_last} could not delete {path} "
                         f"({error.strerror or error}); it is kept and training goes on")


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


def check_room_for_checkpoints(directory, bytes_per_checkpoint):
    """Fail before training if `directory` is not writable or cannot hold two checkpoints."""
    directory = Path(directory)
    make_directory(directory)
    try:
        probe = directory / f"{TEMPORARY_PREFIX}probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise_os_failure(f"checkpoint directory {directory} is not writable: "
                         f"{error.strerror or error}", error)
    free = shutil.disk_usage(directory).free
    if free < 2 * bytes_per_checkpoint:
        raise ResourceError(f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free but "
                            f"two checkpoints of this model need about "
                            f"{2 * bytes_per_checkpoint / 2**20:.1f} MiB")


def check_movable(paths, reason):
    """Fail before training, naming the file, if one of `paths` could not be deleted or moved."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink() and not is_step_directory_name(path.name):
            fail(f"{path} is a directory, where {reason} would replace a file; nothing was "
                 f"changed; move it away first")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            fail(f"{path} cannot be removed from {path.parent} (the directory is not writable); "
                 f"nothing was changed")
