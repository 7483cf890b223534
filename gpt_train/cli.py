"""Process plumbing for every command-line entry point: user errors, signals, exit statuses.

- `UserError` (a mistake in the user's input, exit status 2) and `ResourceError` (the machine
  cannot do it, exit status 1), raised through `fail`; `run_main` turns either into one line on
  stderr, and so does running out of memory;
- Ctrl-C, SIGTERM or SIGHUP (the terminal closed, the ssh connection dropped) before the
  training loop takes over (even while torch is still being imported: `exit_on_signals`) is one
  line and exit status 130, 143 or 129 (`EXIT_STATUS`);
- `output_that_may_close`: standard output and error whose reader may go away (`| head`, a
  closed terminal); from then on what is written is dropped, and the program goes on (training);
- any other command whose reader goes away (`sample.py | head -c 100`, `plot.py | true`) ends
  quietly, with the status a shell gives a command stopped by SIGPIPE, 141
  (`exit_on_closed_output`): there is no one left to write for;
- `ArgumentParser`: argparse whose mistakes are UserErrors and whose --help ends each option with
  its default as it is typed (`shown_default`), and `parse_bool` for true/false flags.
No torch and no project imports, so a script can install all of this, and read its flags (--help
answers at once), before its slow imports.
What the flags are and mean is config.py's business; the training loop's own signal handling
(save, then stop) is train.py's.
"""

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import threading


class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit status 2, never a traceback."""

    exit_status = 2


class ResourceError(Exception):
    """The machine cannot do what was asked (a full disk): one line and exit status 1."""

    exit_status = 1


def fail(message):
    raise UserError(message)


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
    """Run a command-line entry point; a UserError or ResourceError becomes one line on stderr,
    and so does running out of memory (the sizes given do not fit this machine)."""
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
        if not is_out_of_memory(error):
            raise
        print(f"error: out of memory: {_first_line(error)}; the sizes given do not fit on this "
              f"machine", file=sys.stderr)
        sys.exit(2)
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


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def parse_bool(text):
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def shown_default(value):
    """A default as a user types it after its flag: true/false, `0.9 0.95`, and `empty` for ''."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return " ".join(map(shown_default, value))
    return "empty" if value == "" else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with `(default: ...)`, unless it says its default itself (one that
    is None, such as sample.py's --prompt, must: what happens without the flag is no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        shown = shown_default(action.default).replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default: {shown})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one line and exit status 2, and `-1e-3` or `-inf`
    after a flag is a value (argparse itself takes only `-1` and `-0.5` for negative numbers)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):
        # argparse prints usage and exits 2 itself; one line suits a tool people script
        fail(message)

