"""Preparation: the pieces of a document corpus worked through by a pool of processes.

`prepare_pieces` runs one job per piece (documents.py cuts a corpus into pieces) on --num_proc
processes and yields each job's result as it completes, with a progress bar (source MB/s and the
time left) on a terminal. Two jobs:
- `tokenize_piece` writes the piece's ids (each document followed by the end-of-text id) to a file
  of its own, under a temporary name renamed when complete: the file exists exactly when the
  piece is done, so a preparation killed at any moment goes on from the pieces it finished;
- `piece_characters`: the distinct characters of a piece, for a char vocabulary.
Pieces are handed out in order, at most two more than there are processes ahead of the results,
so memory stays flat whatever the corpus's size (a .jsonl.gz's pieces travel as bytes). Workers
are forked (where the platform can) with the `tokenizers` library's own threads off: the
processes are the parallelism. Each encodes on a thread of its own rather than its main one,
where the library's sequential encoder runs about 1.4x slower (tokenizer.off_the_main_thread).
This module imports no torch; where the ids go after a piece is tokenized (the cache's one
stream) is tokencache.py's business.
"""

import collections
import functools
import json
import multiprocessing
import os
import signal
import sys

import numpy as np

from gpt_train.documents import piece_documents
from gpt_train.tokenizer import encode_documents, tokenizer_from_state

PARALLELISM = "TOKENIZERS_PARALLELISM"  # the variable the `tokenizers` library reads


def default_num_proc():
    """Every core this process may run on (--num_proc 0)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=2)
def tokenizer_of(state_json):
    """A worker's tokenizer, rebuilt once from its saved state (a GPT-2 one takes a tenth of a
    second) rather than for every piece."""
    return tokenizer_from_state(json.loads(state_json))


def tokenize_piece(job):
    """Write the ids of a piece's documents to `job["part"]`; return (ids written, source bytes)."""
    piece, part = job["piece"], job["part"]
    texts = piece_documents(piece, job["text_field"])
    ids = encode_documents(tokenizer_of(job["tokenizer"]), texts)
    temporary = f"{part}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(ids.astype(job["dtype"]).tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, part)
    return len(ids), piece.size


def piece_characters(job):
    """(the sorted distinct code points of a piece's text, source bytes)."""
    texts = piece_documents(job["piece"], job["text_field"])
    code_points = np.unique(np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32))
    return code_points, job["piece"].size


def progress_bar(total_bytes, description):
    """tqdm over source bytes (MB/s and the time left), on a terminal only."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1 << 20,
                desc=description, disable=None, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5)


def prepare_pieces(function, jobs, num_proc, total_bytes, description="tokenizing"):
    """Yield `function(job)` for each job (in the order they complete, where there are several
    processes); a UserError in a worker (a bad line, a missing field) is raised here. A job
    marked "done" (a piece a killed preparation finished) only moves the progress bar."""
    with progress_bar(total_bytes, description) as bar:
        jobs = skip_done(jobs, bar)
        if num_proc <= 1:
            for job in jobs:
                result = function(job)
                bar.update(result[-1])
                yield result
            return
        with worker_pool(num_proc) as pool:
            waiting = collections.deque()
            for job in jobs:
                waiting.append(pool.apply_async(function, (job,)))
                while len(waiting) >= num_proc + 2 or (waiting and waiting[0].ready()):
                    result = waiting.popleft().get()
                    bar.update(result[-1])
                    yield result
            while waiting:
                result = waiting.popleft().get()
                bar.update(result[-1])
                yield result


def skip_done(jobs, bar):
    for job in jobs:
        if job.get("done"):
            bar.update(job["piece"].size)
        else:
            yield job


def leave_signals_to_the_main_process():
    """Ctrl-C reaches the whole process group: the main process ends the pool, which stops its
    workers with SIGTERM, and a worker then ends quietly rather than with the main process's
    one-line message (config.exit_on_signals)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_pool(num_proc):
    """A pool of forked workers whose `tokenizers` library does not start threads of its own (set
    in the environment they are forked with, which also keeps the library from warning that a
    process that used its threads was forked)."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    previous = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "false"
    try:
        return context.Pool(num_proc, initializer=leave_signals_to_the_main_process)
    finally:
        if previous is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = previous
