"""One training run per run directory: a flock on train.lock, held while the run lasts.

The kernel drops a flock when its process dies, however it dies (kill -9 included), so a second
run in the directory is refused and a killed run never blocks the next. The file names its holder
(host and pid) for the second run's message; a train.lock this tool did not write is refused,
never written over. Readers never take the lock. What the run may change in the directory is
rules.py's.
"""

import contextlib
import os
import re
import socket
from pathlib import Path

from config import fail
from gpt_train.cli import raise_os_failure
from gpt_train.rundir.moves import make_directory
from gpt_train.rundir.names import LOCK_NAME

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), runs are not locked
except ImportError:
    fcntl = None

LOCK_CONTENT = re.compile(r"(pid \d+ on host [^\n]*\n?)?")  # what hold_run_directory writes


@contextlib.contextmanager
def hold_run_directory(directory, enabled=True):
    """Hold `directory` for one training run while the block runs; a second run is refused.

    A directory the run created, and left empty, is removed at the end (a run that failed before
    writing anything leaves no trace).
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
        raise_os_failure(f"checkpoint directory {directory} is not writable: "
                         f"{error.strerror or error}", error)
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one else can hold this file now
        handle.close()
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()


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
