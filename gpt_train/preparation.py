"""Preparation: the pieces of a document corpus worked through by a pool of processes.

`prepare_pieces` runs one job per piece (documents.py cuts a corpus into pieces) on --num_proc
processes and yields each job's result as it completes. Two jobs:
- `tokenize_piece` writes the piece's ids (each document followed by the end-of-text id) to a file
  of its own, under a temporary name renamed when complete: the file exists exactly when the
  piece is done, so a preparation stopped at any moment goes on from the pieces it finished;
- `piece_characters`: the distinct characters of a piece, for a char vocabulary.
The pool is the standard library's `ProcessPoolExecutor`, which notices a worker that dies: the
OOM killer taking one, or a kill, ends the preparation within seconds in one line and exit
status 1 (a ResourceError), the pool stopping the other workers; a mistake in the source that a
worker finds (a bad line) is raised here as the UserError it is. Workers end with the main
process (workers.end_with_parent) and leave Ctrl-C to it. Pieces are handed out in order, at
most two more than there are processes ahead of the results, so memory stays flat whatever the
corpus's size (a .jsonl.gz's pieces travel as bytes). Workers are forked (where the platform
can) with the `tokenizers` library's own threads off: the processes are the parallelism. Each
encodes on a thread of its own rather than its main one, where the library's sequential encoder
runs slower (tokenizer.off_the_main_thread).
Progress (`Progress`): on a terminal a bar of the source's MB, MB/s and the time left; in a log
(stderr not a terminal, as a cluster job's) a line of the same every PROGRESS_SECONDS, and one
at the end. This module imports no torch; where the ids go after a piece is tokenized (the
cache's one stream) is documentcache.py's business.
"""

import concurrent.futures
import functools
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from gpt_train.cli import ResourceError
from gpt_train.documents import piece_documents
from gpt_train.tokenizer import encode_documents, tokenizer_from_state
from gpt_train.workers import end_with_parent

PARALLELISM = "TOKENIZERS_PARALLELISM"  # the variable the `tokenizers` library reads
PROGRESS_SECONDS = 5.0  # how often a log gets a progress line
# tqdm's own, with the unit after the amounts: "19.0MB/100MB" (decimal megabytes, as MB/s)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
DEAD_WORKER = ("a preparation worker process died (killed by a signal: the out-of-memory killer, "
               "or a kill; a smaller --num_proc needs less memory); run the same command again: "
               "it goes on from the pieces already tokenized")


@functools.lru_cache(maxsize=2)
def tokenizer_of(state_json):
    """A worker's tokenizer, rebuilt once from its saved state (a GPT-2 one takes a tenth of a
    second) rather than for every piece."""
    return tokenizer_from_state(json.loads(state_json))


def tokenize_piece(job):
    """Write the ids of a piece's documents to `job["part"]`; return (ids written, lone surrogates
    replaced, where the first was, source bytes)."""
    piece, part = job["piece"], job["part"]
    documents = piece_documents(piece, job["text_field"])
    ids = encode_documents(tokenizer_of(job["tokenizer"]), documents.texts)
    temporary = f"{part}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(ids.astype(job["dtype"]).tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, part)
    return len(ids), documents.surrogates, documents.first_surrogate, piece.size


def piece_characters(job):
    """(the sorted distinct code points of a piece's text, source bytes)."""
    texts = piece_documents(job["piece"], job["text_field"]).texts
    code_points = np.unique(np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32))
    return code_points, job["piece"].size


def prepare_pieces(function, jobs, num_proc, total_bytes, description="tokenizing"):
    """Yield `function(job)` for each job, in the order they complete; each result's last item
    is the source bytes it stands for (for progress). A job marked "done" (a piece an earlier
    preparation finished) only counts as done."""
    with Progress(total_bytes, description) as progress:
        jobs = skip_done(jobs, progress)
        if num_proc <= 1:
            for job in jobs:
                result = function(job)
                progress.update(result[-1])
                yield result
        else:
            yield from in_pool(function, jobs, num_proc, progress)


def skip_done(jobs, progress):
    for job in jobs:
        if job.get("done"):
            progress.skip(job["piece"].size)
        else:
            yield job


def in_pool(function, jobs, num_proc, progress):
    """`prepare_pieces` on `num_proc` worker processes. However this ends (the last result, an
    error, a signal), the jobs not started are dropped and the workers have ended when it
    returns: a worker that died took the pool down, and the others finish their current piece
    (which is kept) and stop."""
    previous = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "false"  # in the environment the workers are forked with
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=start_method(),
                                                  initializer=start_worker,
                                                  initargs=(os.getpid(),))
    try:
        running = set()
        for job in jobs:
            running.add(pool.submit(function, job))
            while len(running) >= num_proc + 2:
                running = yield from completed(running, progress)
        while running:
            running = yield from completed(running, progress)
    except BrokenProcessPool:
        raise ResourceError(DEAD_WORKER) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = previous


def completed(running, progress):
    """Yield the results of the jobs that complete within a progress interval; return the jobs
    still running."""
    done, running = concurrent.futures.wait(running, timeout=max(progress.interval, 0.1),
                                            return_when=concurrent.futures.FIRST_COMPLETED)
    progress.tick()
    for future in done:
        result = future.result()
        progress.update(result[-1])
        yield result
    return running


def start_method():
    """Fork where the platform can: a worker starts at once, with the modules already loaded."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def start_worker(parent):
    """A worker ends with the main process `parent`, and leaves Ctrl-C to it: Ctrl-C reaches the
    whole process group, and the main process stops the pool; SIGTERM (sent to a worker alone,
    or to the group) ends a worker, which the pool reports as a dead worker."""
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Progress:
    """Source bytes done: a bar on a terminal; in a log, a line every `interval` seconds (and one
    at the end, after any). Either says the MB done of all, MB/s and the time left; pieces done
    by an earlier preparation (`skip`) count as done but not in the rate."""

    def __init__(self, total, description, stream=None, interval=None):
        self.total, self.description = total, description
        self.stream = stream or sys.stderr
        self.interval = PROGRESS_SECONDS if interval is None else interval
        self.done = self.skipped = self.lines = 0
        self.started = self.written = time.monotonic()
        self.bar = None
        if is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=description, file=self.stream, dynamic_ncols=True,
                            smoothing=0.1, mininterval=0.5, bar_format=BAR_FORMAT)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if self.bar is not None:
            self.bar.close()
        elif kind is None and self.lines:  # a log that was told how it went hears the end
            self.write_line(f"{self.description}: done, {self.figures()}")

    def skip(self, size):
        self.skipped += size
        self.update(size)

    def update(self, size):
        self.done += size
        if self.bar is not None:
            self.bar.update(size)
        self.tick()

    def tick(self):
        if self.bar is not None:
            self.bar.refresh()
        elif time.monotonic() - self.written >= self.interval:
            rate = self.rate()
            left = f"{clock((self.total - self.done) / rate)} left" if rate > 0 else \
                "time left not yet known"
            self.write_line(f"{self.description}: {self.figures()}, {left}")

    def rate(self):
        return (self.done - self.skipped) / max(time.monotonic() - self.started, 1e-9)

    def figures(self):
        share = self.done / self.total if self.total else 1.0
        return (f"{self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({share:.0%}) in "
                f"{clock(time.monotonic() - self.started)}, {self.rate() / 1e6:,.2f} MB/s")

    def write_line(self, line):
        self.lines += 1
        self.written = time.monotonic()
        print(line, file=self.stream, flush=True)


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def clock(seconds):
    """h:mm:ss (or m:ss) of a number of seconds."""
    minutes, seconds = divmod(int(min(seconds, 99 * 3600)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
