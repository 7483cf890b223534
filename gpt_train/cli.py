"""How every command ends: exit statuses, one-line errors, signals, output whose reader goes away.

The rule, for every command: exit status 2 is the user's input or flags (a `UserError`, defined
with the flags in config.py and raised through `fail`); 1 is the machine (a `ResourceError`: a
full disk, out of memory, a lost rank); 130, 143 and 129 are Ctrl-C, SIGTERM and SIGHUP; 0 also
ends a run that had nothing to train (`NothingToTrain`). Library code raises; only the commands
exit, through `run_main` (this module exits on their behalf), which turns each of these into one
line on stderr.
- `raise_os_failure`: a failed file operation is the machine's (no room, an I/O error) or the
  user's (a path they gave that cannot be written), by its errno;
- Ctrl-C, SIGTERM or SIGHUP (the terminal closed, the ssh connection dropped) before the
  training loop takes over (even while torch is still being imported: `exit_on_signals`) is one
  line and exit status 130, 143 or 129 (`EXIT_STATUS`);
- `output_that_may_close`: standard output and error whose reader may go away (`| head`, a
  closed terminal); from then on what is written is dropped, and the program goes on (training);
- any other command whose reader goes away (`sample.py | head -c 100`, `plot.py | true`) ends
  quietly, with the status a shell gives a command stopped by SIGPIPE, 141
  (`exit_on_closed_output`): there is no one left to write for.
No torch, and of the project only config.py, so a script can install all of this before its slow
imports. The training loop's own signal handling (save, then stop) is train.py's.
"""

import contextlib
import errno
import os
import re
import signal
import sys
import threading

from config import UserError, fail


class ResourceError(Exception):
    """The machine cannot do what was asked (a full disk, out of memory, a lost rank): one line
    and exit status 1."""

    exit_status = 1


class NothingToTrain(Exception):
    """A training command that has done what was asked without training: --print_config printed
    the recipe, --resume auto found its run finished (each says so first). Exit status 0."""


# What an OSError's errno says is the machine's failure, not a path the user gave.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM})


def is_machine_failure(error):
    """Whether `error` (or the OSError behind it) is a full disk, a quota, an I/O error or no
    memory; a library that reports a failed write in words (safetensors) is read by those words."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.errno is not None:
        return cause.errno in MACHINE_ERRNOS
    return any(os.strerror(number) in str(error) for number in MACHINE_ERRNOS)


def raise_os_failure(message, error):
    """Raise `message` for a failed file operation: a ResourceError (exit status 1) where the
    machine failed (`is_machine_failure`), else a UserError (2): a path the user gave that cannot
    be read or written, a name in the way."""
    if is_machine_failure(error):
        raise ResourceError(message) from error
    fail(message)


# The conventional exit status of a program stopped by a signal: 128 + the signal's number.
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNAL_LINES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):  # POSIX: a hang-up is a request to stop, like SIGTERM
    EXIT_STATUS[signal.SIGHUP] = 129
    SIGNAL_LINES[signal.SIGHUP] = "hung up"
CLOSED_OUTPUT_EXIT_STATUS = 141  # 128 + SIGPIPE (13), what `yes | head` reports for `yes`


def exit_on_signals():
    """From now on, Ctrl-C (SIGINT), SIGTERM or SIGHUP ends the program with one line and exit
    status 130, 143 or 129, never a traceback; the training loop installs its own handlers, which
    save first.

    The scripts call this before their slow imports (torch takes a second or more to load).
    Returns the handlers it replaced (none outside the main thread, where it does nothing).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, _exit_on_signal) for number in EXIT_STATUS}


def _exit_on_signal(number, frame):
    # under torchrun every rank gets the signal: rank 0 says so, once
    if os.environ.get("RANK", "0") == "0":
        # os.write, not print: the signal may arrive in the middle of a print to stderr
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            os.write(2, f"{SIGNAL_LINES[number]}\n".encode())
    raise SystemExit(EXIT_STATUS[number])


# What a write to a reader that went away raises: a closed pipe (`| head`), a hung-up terminal.
CLOSED_OUTPUT_ERRORS = (errno.EPIPE, errno.EIO)


class OutputThatMayClose:
    """A text stream whose reader may go away; from then on what is written to it is dropped.

    The first failed write points the stream's file descriptor at the null device, so nothing
    written later (Python's own flush at exit included) fails again.
    """

    def __init__(self, stream):
        self.stream, self.closed_by_reader = stream, False

    def write(self, text):
        if not self.closed_by_reader:
            try:
                self.stream.write(text)
            except OSError as error:
                self.reader_went_away(error)
        return len(text)

    def flush(self):
        if not self.closed_by_reader:
            try:
                self.stream.flush()
            except OSError as error:
                self.reader_went_away(error)

    def reader_went_away(self, error):
        if error.errno not in CLOSED_OUTPUT_ERRORS:
            raise error
        self.closed_by_reader = True
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream without a file
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_that_may_close():
    """While the block runs, sys.stdout and sys.stderr drop what is written once their reader has
    gone away (`python train.py | head`, a closed terminal), instead of raising BrokenPipeError."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (OutputThatMayClose(stream) for stream in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def run_main(main, argv=None):
    """Run a command-line entry point; a UserError or ResourceError becomes one line on stderr
    and its exit status, and so does running out of memory (the sizes given do not fit this
    machine, exit status 1)."""
    previous = exit_on_signals()
    try:
        return main(argv)
    except (UserError, ResourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    except BrokenPipeError:
        exit_on_closed_output()
    except KeyboardInterrupt:  # Ctrl-C, should anything have restored Python's own handler
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as error:
        if is_out_of_memory(error):
            print(f"error: out of memory: {_first_line(error)}; the sizes given do not fit on this "
                  f"machine", file=sys.stderr)
        elif is_lost_rank(error):
            where = re.compile(r"^\[[^\]]*\]\s*")  # gloo's source file and line
            print(f"error: another process of this run was lost: "
                  f"{where.sub('', _first_line(error))}", file=sys.stderr)
        else:
            raise
        sys.exit(ResourceError.exit_status)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_on_closed_output():
    """The reader of our standard output went away: nothing more can be said to it, and nothing is
    wrong, so stop without a word (not a traceback) and with SIGPIPE's conventional status."""
    try:  # the flush at exit would fail again: what is left goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stand-in stdout without a descriptor
        pass
    sys.exit(CLOSED_OUTPUT_EXIT_STATUS)


def is_out_of_memory(error):
    """Python's MemoryError, torch's OutOfMemoryError (CUDA, MPS) or its CPU allocator's failure."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in str(error) or "out of memory" in str(error)


# What torch's process groups raise on the ranks left when another rank dies.
LOST_RANK_TYPES = ("DistBackendError", "DistNetworkError")
LOST_RANK_WORDS = ("Connection closed by peer", "Connection reset by peer")


def is_lost_rank(error):
    """A collective whose peer is gone: NCCL's or gloo's error on the ranks that survive."""
    return type(error).__name__ in LOST_RANK_TYPES or \
        any(words in str(error) for words in LOST_RANK_WORDS)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
