"""Atomic file writes: a file is replaced whole or not at all. No torch, no project imports.

- `atomic_write`: the new file is written under a temporary name in the same directory, flushed,
  fsynced and renamed over the final name, and the directory is fsynced, so a crash at any moment
  leaves the old file or the new one, never a truncated one;
- every temporary name starts with `TEMPORARY_PREFIX`, so `remove_temporary_files` can delete what
  a killed process left behind.
Used by checkpoint.py (checkpoints) and tokencache.py (token caches). What a failed write means to
the user (a full disk, how much room was needed) is the caller's business.
"""

import contextlib
import os
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path):
    """A new file, open for writing and reading, that replaces `path` only if the block completes.

    On any failure the temporary file is removed and the error propagates.
    """
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")
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
    """Delete the half-written files (of the given final names) a killed process left behind."""
    for leftover in Path(directory).glob(f"{TEMPORARY_PREFIX}{names}"):
        leftover.unlink(missing_ok=True)
