"""Atomic file writes: a file is replaced whole or not at all. No torch, no project imports.

- `atomic_write`: the new file is written under a temporary name in the same directory, flushed,
  fsynced and renamed over the final name, and the directory is fsynced, so a crash at any moment
  leaves the old file or the new one, never a truncated one;
- a new file gets the permissions of any file the process creates (0666 less the user's umask),
  as `open` gives it: a checkpoint is as readable by a teammate as the other files of the run;
- every temporary name this tool writes, file or directory, has one form, `.tmp-NAME.PID` with
  PID the writer's process id in digits (`temporary_path`, `temporary_parts`), so what a killed
  process left behind can be found and nothing else: a user's own `.tmp-notes`,
  `.tmp-gpt_final.pt.bak` or `.tmp-metrics.jsonl.old` is not in that form, and is never removed.
Used by checkpoint.py (checkpoints), tokencache.py (token caches), rundir/ (its leftovers) and
export.py (its temporary directory). What a failed write means to the user (a full disk, how much
room was needed) is the caller's business.
"""

import contextlib
import fnmatch
import os
import re
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
TEMPORARY_PATTERN = re.compile(rf"^{re.escape(TEMPORARY_PREFIX)}(.+)\.(\d+)$")  # NAME, PID


def temporary_path(path, pid=None):
    """Where `path` is written before it is renamed into place: .tmp-NAME.PID beside it, PID
    this process's id unless given (the ranks of an FSDP save write into rank 0's)."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid() if pid is None else pid}")


def temporary_parts(name):
    """(NAME, PID) of a name in the form .tmp-NAME.PID, else None."""
    match = TEMPORARY_PATTERN.match(name)
    return (match.group(1), int(match.group(2))) if match else None


@contextlib.contextmanager
def atomic_write(path):
    """A new file, open for writing and reading, that replaces `path` only if the block completes.

    On any failure the temporary file is removed and the error propagates.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory):
    """Make a rename in `directory` durable, where the platform can open a directory."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temporary_files(directory, names="*"):
    """Delete the half-written files a killed process left behind in `directory`: regular files
    named .tmp-NAME.PID, as `atomic_write` names them, whose NAME `names` accepts (a glob, or a
    function of the name). Anything else, however it is named, is left alone."""
    accepts = names if callable(names) else (lambda name: fnmatch.fnmatchcase(name, names))
    for leftover in Path(directory).glob(f"{TEMPORARY_PREFIX}*"):
        parts = temporary_parts(leftover.name)
        if parts and accepts(parts[0]) and leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)
