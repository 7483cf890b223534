"""The file operations the run directory's rules ask for, each all or none.

- `set_aside`: files moved into a new superseded/<time>-<label>/, names and bytes kept;
- `delete_files`: --overwrite's deletion, by way of one folder, so that none goes if one cannot;
- `remove_step_checkpoint`: --keep_last's deletion of one step checkpoint, file or directory;
- `remove_leftovers`: what a killed run left, in the tool's own temporary names only;
- `make_directory`: --checkpoint_dir (or a folder in it) created, or one line why not.
Which files a run may move or delete, and when, is rules.py's; the names are names.py's.
"""

import contextlib
import itertools
import os
import shutil
import time
from pathlib import Path

from gpt_train.atomic import (TEMPORARY_PREFIX, fsync_directory, remove_temporary_files,
                              temporary_parts, temporary_path)
from config import fail
from gpt_train.cli import raise_os_failure
from gpt_train.rundir.names import (REPLACED_NAME, SUPERSEDED_NAME, TENSORBOARD_NAME, is_own_name,
                                    is_step_directory_name, list_names, metrics_path)


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
        raise_os_failure(f"checkpoint directory {directory} is not writable: "
                         f"{error.strerror or error}", error)


def remove_step_checkpoint(path):
    """Delete a gpt_step{N}.pt, or an FSDP run's gpt_step{N} directory (renamed to
    .tmp-replaced.PID first, so that it is gone at once as a checkpoint, whatever is left of its
    files on an error, and the next run removes the rest as a leftover)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    doomed = temporary_path(path.with_name(REPLACED_NAME))
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(directory):
    """What a killed run left, in the one temporary form .tmp-NAME.PID (atomic.py): its files
    being written (NAME one of the names a run writes), an FSDP step directory being written
    (.tmp-gpt_step{N}.PID) and a folder being deleted (.tmp-replaced.PID). Nothing else, however
    like them it is named, is touched."""
    remove_temporary_files(directory, is_own_name)
    for folder in Path(directory).glob(f"{TEMPORARY_PREFIX}*"):
        parts = temporary_parts(folder.name)
        own = parts and (parts[0] == REPLACED_NAME or is_step_directory_name(parts[0]))
        if own and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


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
    folder = temporary_path(Path(directory) / REPLACED_NAME)
    try:
        folder.mkdir()
        move_files(paths, folder)
    except OSError as error:
        with contextlib.suppress(OSError):
            folder.rmdir()
        raise_os_failure(f"--overwrite true could not delete {error.filename or directory} "
                         f"({error.strerror or error}); no file of the old run was deleted", error)
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
        raise_os_failure(f"could not move {error.filename or list_names(paths)} aside to "
                         f"{folder} ({error.strerror or error}); nothing was moved", error)
    fsync_directory(directory)
    return folder


def new_folder(parent, label):
    """A new folder parent/<local time>-<label> (a suffix -2, -3, ... if that name is taken)."""
    stem = f"{time.strftime('%Y-%m-%dT%H-%M-%S')}-{label}"
    try:
        parent.mkdir(exist_ok=True)
    except OSError as error:  # a file of that name (rules.py refuses one before training)
        reason = "a file is in the way" if parent.exists() else error.strerror or error
        raise_os_failure(f"could not create {parent} to set files aside ({reason}); nothing was "
                         f"moved", error)
    for suffix in itertools.count(1):
        folder = parent / (stem if suffix == 1 else f"{stem}-{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            raise_os_failure(f"could not create {folder} to set files aside "
                             f"({error.strerror or error}); nothing was moved", error)


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
