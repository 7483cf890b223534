"""Data: text -> tokens -> a DataLoader of (x, y) batches that a run can resume exactly.

- `get_dataset`: the whole corpus as one array of token ids, with its tokenizer. A text file or
  directory, or a corpus of documents (jsonl, parquet: documents.py), goes through the token
  cache (tokencache.py), which later runs memory-map; with no --data, the built-in corpus (the
  Python language reference that ships with CPython in `pydoc_data.topics`) is tokenized in
  memory. A --tokenizer that is not char, byte or bpe is a pretrained one (pretrained.py).
- `split_tokens`: training and validation. Documents are never cut between the two: the split
  falls just after an end-of-text id; --val_data replaces the split by a corpus of its own.
- `build_dataloader`: item `i` of the dataset is micro-batch `i` of the run, drawn from a random
  generator seeded by (seed, i). The data order is therefore a pure function of the seed and the
  position, so a resumed run (or a worker process) rebuilds exactly the batches it would have seen.
  Under data parallelism every rank draws the same global batch and keeps its own slice of it.
  A memory-mapped corpus is read through a fresh map of its file per batch: a worker started by
  pickling the dataset (the spawn start method) reopens the file instead of receiving a copy.
  A worker (--num_workers) ends with the main process, and one that dies is one line and exit
  status 1 (`BatchLoader`), never a traceback or a hang.
- `validation_batches`: a fixed set of evenly spaced windows of the validation split; it uses no
  random state at all, and like the training batches it depends only on the global batch.
- `check_token_ids`: a mapped token cache holds only ids of its vocabulary (a damaged cache of the
  right size is one line, not an IndexError deep in the model).
Tokenizers live in tokenizer.py; what a batch is used for lives in train.py.
"""

import functools
import mmap
import os
import signal
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import TOKENIZERS, fail
from gpt_train.cli import ResourceError
from gpt_train.cachefiles import CacheSettings
from gpt_train.documents import is_documents
from gpt_train.pretrained import tokenizer_from_pretrained
from gpt_train.tokencache import cached_tokens
from gpt_train.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer
from gpt_train.workers import end_with_parent

def builtin_corpus():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        fail("this Python build lacks pydoc_data, which holds the built-in corpus; "
             "give a text file with --data")
    return "\n".join(topics[key] for key in sorted(topics))

def get_dataset(train_config, tokenizer=None):
    """(tokenizer, token ids) of the configured corpus; `tokenizer` fixes the vocabulary when given
    (a resumed or fine-tuned run), else one is built from the text (BPE learns from the training
    split only) or, for a pretrained --tokenizer, loaded."""
    t = train_config
    if tokenizer is None and t.tokenizer not in TOKENIZERS:
        tokenizer = tokenizer_from_pretrained(t.tokenizer)
    if t.data:
        tokenizer, ids = corpus_tokens(t.data, t, tokenizer)
        return tokenizer, check_token_ids(ids, tokenizer.vocab_size, t.data)
    text = builtin_corpus()
    if tokenizer is None:
        if t.tokenizer == "char":
            tokenizer = CharTokenizer(text)
        elif t.tokenizer == "byte":
            tokenizer = ByteTokenizer()
        else:
            cut = int(len(text) * (1.0 - t.val_fraction))
            tokenizer = BPETokenizer.train([text[:cut]], t.bpe_vocab_size)
    return tokenizer, tokenizer.encode(text)


def corpus_tokens(path, train_config, tokenizer=None):
    """(tokenizer, token ids) of a --data or --val_data path, through the token cache."""
    t = train_config
    settings = CacheSettings(path, t.tokenizer, t.cache_dir, t.val_fraction, t.bpe_vocab_size,
                             t.text_field, t.num_proc)
    return cached_tokens(settings, tokenizer)


def training_and_validation(tokens, tokenizer, train_config, block_size):
    """(training ids, validation ids): all of `tokens` and the --val_data corpus (in the same
    tokenizer), or `split_tokens` of `tokens`, at a document start where --data is documents
    (plain text splits where it always did, whatever the tokenizer)."""
    t = train_config
    if not t.val_data:
        documents = bool(t.data) and is_documents(t.data)
        return split_tokens(tokens, t.val_fraction, block_size,
                            getattr(tokenizer, "end_of_text", None) if documents else None)
    _, val_tokens = corpus_tokens(t.val_data, t, tokenizer)
    val_tokens = check_token_ids(val_tokens, tokenizer.vocab_size, t.val_data)
    for name, part in (("training", tokens), ("validation (--val_data)", val_tokens)):
        check_length(name, part, block_size)
    return tokens, val_tokens


def split_tokens(tokens, val_fraction, block_size, end_of_text=None):
    """The leading part trains, the last `val_fraction` validates; each needs block_size+1 tokens.
    With `end_of_text` (a corpus of documents) the split moves to the nearest document start."""
    boundary = int(len(tokens) * (1.0 - val_fraction))
    if end_of_text is not None:
        boundary = document_start(tokens, boundary, end_of_text)
    train_tokens, val_tokens = tokens[:boundary], tokens[boundary:]
    for name, part in (("training", train_tokens), ("validation", val_tokens)):
        check_length(name, part, block_size)
    return train_tokens, val_tokens


def check_length(name, part, block_size):
    if len(part) < block_size + 1:
        fail(f"the corpus is too short: its {name} split has {len(part)} tokens but needs at "
             f"least block_size + 1 = {block_size + 1}; use more text or a smaller --block_size")


def document_start(tokens, position, end_of_text, chunk=1 << 20):
    """The index just past the first end-of-text id at or after `position` - 1, where a document
    starts (the last one before, if the first is the corpus's very end), read a chunk at a time."""
    for start in range(max(position - 1, 0), len(tokens) - 1, chunk):
        found = np.flatnonzero(tokens[start:min(start + chunk, len(tokens) - 1)] == end_of_text)
        if len(found):
            return start + int(found[0]) + 1
    for stop in range(max(position - 1, 0), 0, -chunk):
        found = np.flatnonzero(tokens[max(stop - chunk, 0):stop] == end_of_text)
        if len(found):
            return max(stop - chunk, 0) + int(found[-1]) + 1
    fail("the corpus is a single document, which a validation split would cut in two; give a "
         "held-out corpus with --val_data")


def windows_at(tokens, starts, block_size):
    """(x, y) int64 tensors of windows starting at `starts`; y is x shifted one token left."""
    rows = tokens[starts[:, None] + np.arange(block_size + 1)]  # one gather, no per-token loop
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def _memmap_location(array):
    """(file name, dtype, byte offset, length) of a 1-D array that views a np.memmap, else None."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not (isinstance(root, np.memmap) and isinstance(root.base, mmap.mmap) and root.filename
            and array.ndim == 1 and array.flags.c_contiguous and len(array) > 0):
        return None
    offset = root.offset + (array.ctypes.data - root.ctypes.data)
    return str(root.filename), array.dtype.str, offset, len(array)


def _map_again(location, file=None):
    """A new map of the file region at `location`. Its pages are released with it: the kernel may
    map a large block of the file around each window read, and a map that lives for the whole run
    would keep all of them resident."""
    name, dtype, offset, length = location
    return np.memmap(file or name, dtype=dtype, mode="r", offset=offset, shape=(length,))


class RandomWindows(Dataset):
    """Item i is micro-batch i of the run: `batch_size` windows at positions drawn from (seed, i).

    All ranks draw the same `batch_size * world_size` positions and each keeps its own slice, so
    the global batch depends only on the seed and the step, not on how it is split across ranks.

    Memory-mapped tokens are read through a fresh map of their file for each batch, from a file
    handle each process opens at its first batch. Pickling (how a spawned DataLoader worker gets
    its dataset) therefore carries the file's name, not a copy of the tokens, and the pages a
    batch touched are released with its map, so resident memory does not grow over a long run.
    """

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        self.tokens = tokens
        self.location = _memmap_location(tokens)
        self.file = None
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_starts = len(tokens) - block_size  # windows need block_size + 1 tokens

    def __len__(self):
        return 2**62  # an endless stream; the sampler decides where a run starts and stops

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.num_starts, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return windows_at(self._open_tokens(), mine, self.block_size)

    def _open_tokens(self):
        if self.location is None:
            return self.tokens
        if self.file is None:
            self.file = open(self.location[0], "rb")
        return _map_again(self.location, self.file)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.location is not None:
            state["tokens"] = state["file"] = None  # the unpickled copy opens the file itself
        return state


class StepSampler(Sampler):
    """Yields the micro-batch indices start, start+1, ..., stop-1: the run's position in its data."""

    def __init__(self, start, stop):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start

    def seek(self, position):
        """Start at micro-batch `position`: where a resumed run continues."""
        self.start = position


def build_dataloader(windows, stop, start=0, num_workers=0, pin_memory=False):
    """A DataLoader of the micro-batches start, ..., stop-1 of `windows` (a RandomWindows)."""
    sampler = StepSampler(start, stop)
    # The loader's own generator: creating an iterator draws a worker seed from it, which must
    # not come from (and shift) the global torch generator that dropout uses.
    generator = torch.Generator().manual_seed(windows.seed)
    return BatchLoader(windows, batch_size=None, sampler=sampler, num_workers=num_workers,
                       pin_memory=pin_memory, generator=generator,
                       worker_init_fn=functools.partial(start_worker, parent=os.getpid()))


def batches(loader):
    """The loader's batches; closing this generator shuts its worker processes down at once."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator


class BatchLoader(DataLoader):
    """torch's DataLoader, but a worker that dies (the OOM killer, a kill) is one line when the
    next batch is waited for: a ResourceError (exit status 1) naming the worker, the checkpoints
    written so far untouched.

    torch's own SIGCHLD handler raises the worker's death wherever the main process happens to
    be (inside the model, or a checkpoint being written), as a traceback; it is set back to what
    it was, and the loader's own check (every few seconds while a batch is awaited, that each
    worker is alive) reports the death instead, at the one place it can be answered.
    """

    def __iter__(self):
        settable = hasattr(signal, "SIGCHLD") and \
            threading.current_thread() is threading.main_thread()  # POSIX, the main thread
        handler = signal.getsignal(signal.SIGCHLD) if settable else None
        iterator = super().__iter__()
        if settable and self.num_workers > 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL if handler is None else handler)
        return batches_until_a_worker_dies(iterator)


def batches_until_a_worker_dies(iterator):
    try:
        yield from iterator
        return
    except RuntimeError as error:
        if not str(error).startswith("DataLoader worker"):  # torch's words for a dead worker
            raise
        death = str(error).strip().splitlines()[0].rstrip(". ")
    # out of the except block, nothing holds the iterator any more (the error's traceback did):
    # it shuts the other workers down now, not at the interpreter's exit
    del iterator
    raise ResourceError(f"{death} (--num_workers; the out-of-memory killer, or a kill); the "
                        f"checkpoints written so far are kept: resume with --resume latest")


def start_worker(worker_id, parent):
    """A DataLoader worker ends with the main process `parent` (workers.end_with_parent), and
    leaves Ctrl-C and SIGTERM to it: Ctrl-C reaches every process of the terminal, and `timeout`,
    schedulers and `kill -- -PGID` send SIGTERM to the whole process group, while the main
    process saves a checkpoint and shuts the workers down."""
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def validation_batches(tokens, block_size, batch_size, num_batches, rank=0, world_size=1):
    """The fixed validation set: `num_batches` batches of evenly spaced windows (this rank's share).

    Like a training batch, each validation batch is a global batch of `batch_size * world_size`
    windows of which rank r keeps slice r, so the set depends only on the global batch: two
    processes with batch B evaluate exactly the windows one process with batch 2B does.
    """
    location = _memmap_location(tokens)
    source = tokens if location is None else _map_again(location)  # unmapped when this returns
    global_batch = batch_size * world_size
    starts = np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch)
    starts = starts.round().astype(np.int64).reshape(num_batches, global_batch)
    mine = starts[:, rank * batch_size:(rank + 1) * batch_size]
    return [windows_at(source, s, block_size) for s in mine]


def check_token_ids(tokens, vocab_size, source):
    """`tokens`, once every id is known to be in [0, vocab_size); else one line naming the file.

    A token cache of the right size whose content was damaged (or written by something else)
    maps without complaint, and its ids would fail deep inside the embedding. One pass over the
    ids (about a second per GB of cache) checks them where they are obtained."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        return tokens
    largest, smallest = int(ids.max()), int(ids.min())
    if largest < vocab_size and smallest >= 0:
        return tokens
    location = _memmap_location(ids)
    where = f"the token cache {location[0]} of {source}" if location else f"the tokens of {source}"
    bad = largest if largest >= vocab_size else smallest
    fail(f"{where} holds token id {bad}, outside the vocabulary of {vocab_size} tokens: the cache "
         f"is damaged; delete it and it is rebuilt from the text")
