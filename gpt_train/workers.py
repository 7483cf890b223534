"""Worker processes this tool forks (preparation's pool, the DataLoader's --num_workers): how many
by default, and how each one ends with the process that started it.

A forked worker inherits its parent's open files, the flock on the run directory's train.lock
among them, and the kernel drops a flock only when every process holding it has closed it. A
worker that outlived a parent killed with SIGKILL would hold the run directory (an immediate
requeue refused) and later fail writing to a pipe no one reads. So a worker is killed by the
kernel the moment its parent dies (Linux's PR_SET_PDEATHSIG) or, where that is missing, ends
itself within a second of seeing its parent gone; one whose parent died before it could arrange
either ends at once. What a worker does, and what its parent does when one dies, is the business
of preparation.py and dataset.py.
"""

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
WATCH_SECONDS = 1.0  # how often a worker without prctl looks for its parent


def default_num_proc():
    """Every core this process may run on (--num_proc 0)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def end_with_parent(parent):
    """In a worker started by the process `parent` (its pid, read before the worker started):
    end when the parent does, however it dies."""
    if not killed_with_parent():
        threading.Thread(target=watch_parent, args=(parent,), name="watch-parent",
                         daemon=True).start()
    if os.getppid() != parent:  # it died before this worker could ask
        os.kill(os.getpid(), signal.SIGKILL)


def killed_with_parent():
    """Ask the kernel to SIGKILL this process when its parent dies; whether it can (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent):
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
