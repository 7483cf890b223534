"""Data: text -> tokens -> a DataLoader of (x, y) batches that a run can resume exactly.

- `get_dataset(path)`: the training text; with no path, the built-in corpus (the Python language
  reference that ships with CPython in `pydoc_data.topics`).
- `load_tokens`: the whole corpus as one array of token ids. A text file is tokenized once, in
  streaming chunks, into a token cache that later runs memory-map; the built-in corpus is small
  and is tokenized in memory.
- `cached_tokens`: the token cache. A flat uint16 binary (uint32 when the vocabulary needs it)
  beside a JSON with the tokenizer and a fingerprint of the source (path, size, mtime); a changed
  source rebuilds it. It lives in --cache_dir, by default $XDG_CACHE_HOME/gpt-train/tokens, never
  beside the data. Files are written under temporary names and renamed, and a lock makes
  concurrent runs (or torchrun's ranks) build a cache once. The char vocabulary is collected in
  the same pass that writes the ids, so no whole-corpus string is ever held in memory.
- `build_dataloader`: item `i` of the dataset is micro-batch `i` of the run, drawn from a random
  generator seeded by (seed, i). The data order is therefore a pure function of the seed and the
  position, so a resumed run (or a worker process) rebuilds exactly the batches it would have seen.
  Under data parallelism every rank draws the same global batch and keeps its own slice of it.
  A memory-mapped corpus is read through a fresh map of its file per batch: a worker started by
  pickling the dataset (the spawn start method) reopens the file instead of receiving a copy.
- `validation_batches`: a fixed set of evenly spaced windows of the validation split; it uses no
  random state at all, and like the training batches it depends only on the global batch.
Tokenizers live in tokenizer.py; what a batch is used for lives in train.py.
"""

import codecs
import contextlib
import hashlib
import json
import mmap
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import fail
from tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_state

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), caches are built unlocked
except ImportError:
    fcntl = None

CHUNK_BYTES = 1 << 22  # how much text is read, decoded and tokenized at a time
CACHE_FORMAT = 2  # bumped when the cache layout changes: caches of another format are rebuilt
UNICODE_SIZE = 0x110000  # code points 0..U+10FFFF: the size of the char pass's lookup table


def builtin_corpus():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        fail("this Python build lacks pydoc_data, which holds the built-in corpus; "
             "give a text file with --data")
    return "\n".join(topics[key] for key in sorted(topics))


def corpus_files(path):
    """The files a --data path stands for: the file itself, or a directory's *.txt in sorted order."""
    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.glob("*.txt") if p.is_file())
        if not files:
            fail(f"data directory {path} has no *.txt files")
        return files
    if not source.is_file():
        fail(f"data file not found: {path}")
    return [source]


def iter_text_chunks(path, chunk_bytes=CHUNK_BYTES):
    """Yield the text of a file or directory in pieces, never splitting a UTF-8 character."""
    files = corpus_files(path)
    if sum(f.stat().st_size for f in files) == 0:
        fail(f"data {path} is empty")
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        offset = 0  # of the first byte of `raw` in the file
        with open(file, "rb") as handle:
            while True:
                raw = handle.read(chunk_bytes)
                held_back = len(decoder.getstate()[0])  # a character's first bytes, from the last read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as error:
                    position = offset - held_back + error.start
                    fail(f"{file} is not UTF-8 text (bad byte at offset {position})")
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    break


def get_dataset(path=None):
    """The training text: the built-in corpus when `path` is empty, else the file or directory."""
    if not path:
        return builtin_corpus()
    return "".join(iter_text_chunks(path))


def default_cache_dir():
    """$XDG_CACHE_HOME/gpt-train/tokens, or ~/.cache/gpt-train/tokens: never beside the data."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG rule: a relative (or empty) value is ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt-train", "tokens")


def _fingerprint(files):
    """Each source file's path, size and modification time: editing a file changes them."""
    fingerprint = []
    for file in files:
        stat = file.stat()
        fingerprint.append({"path": str(file.resolve()), "size": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns})
    return fingerprint


def _cache_key(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@contextlib.contextmanager
def _exclusive_lock(path):
    """Hold an exclusive lock on the file `path`; yields whether a lock is actually held."""
    if fcntl is None:
        yield False
        return
    with open(path, "a") as handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without locks: go on unlocked, as on Windows
            locked = False
        yield locked


@contextlib.contextmanager
def _atomic_file(path):
    """A new file open for writing and reading, renamed to `path` only if the block completes."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(descriptor, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _complete_cache(bin_path, meta_path, fingerprint):
    """The cache's JSON if the cache is complete and was built from the source as it is now."""
    try:
        meta = json.loads(meta_path.read_text())
        expected_bytes = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        complete = (meta["format"] == CACHE_FORMAT and meta["fingerprint"] == fingerprint
                    and bin_path.stat().st_size == expected_bytes)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def cached_tokens(path, kind, cache_dir, val_fraction=0.1, bpe_vocab_size=4096, tokenizer=None,
                  chunk_bytes=CHUNK_BYTES):
    """Tokenize a text file or directory once into the cache; return (tokenizer, memmapped ids).

    The cache is keyed by the source path and the tokenizer settings, and rebuilt when the source's
    size or modification time changes. With `tokenizer` given (a resumed or fine-tuned run), the
    text is encoded with that tokenizer; a cache a fresh run built with the same tokenizer (the
    usual resume) is reused rather than written again.
    """
    files = corpus_files(path)
    directory = Path(cache_dir or default_cache_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the token cache directory {directory}: {error.strerror}")
    settings = {"source": str(Path(path).resolve()), "kind": kind,
                "bpe_vocab_size": bpe_vocab_size if kind == "bpe" else None,
                "val_fraction": val_fraction if kind == "bpe" else None}
    wanted = tokenizer.state_dict() if tokenizer is not None else None
    keys = [_cache_key(settings)]
    if wanted is not None:
        keys.append(_cache_key({**settings, "tokenizer": wanted}))
    try:
        with _exclusive_lock(directory / f"{keys[0]}.lock") as locked:
            # taken before the text is read: a file that changes while it is read is rebuilt next time
            fingerprint = _fingerprint(files)
            for key in keys:
                bin_path, meta_path = directory / f"{key}.bin", directory / f"{key}.json"
                meta = _complete_cache(bin_path, meta_path, fingerprint)
                if meta is not None and wanted in (None, meta["tokenizer"]):
                    break
            else:
                if locked:  # no one else is building this cache: a killed build's leftovers go
                    for leftover in directory.glob(f".{key}.*.tmp"):
                        leftover.unlink(missing_ok=True)
                meta = _build_token_cache(path, kind, tokenizer, bin_path, meta_path, fingerprint,
                                          val_fraction, bpe_vocab_size, chunk_bytes)
            tokenizer = tokenizer_from_state(meta["tokenizer"])
            if meta["num_tokens"] == 0:
                return tokenizer, np.zeros(0, dtype=np.int64)
            # opened under the lock: the map holds this file even if a later build replaces it
            return tokenizer, np.memmap(bin_path, dtype=meta["dtype"], mode="r",
                                        shape=(meta["num_tokens"],))
    except OSError as error:  # a full disk, a read-only directory, an unreadable source file
        fail(f"cannot build the token cache in {directory} (--cache_dir): {error}")


def _build_token_cache(path, kind, tokenizer, bin_path, meta_path, fingerprint, val_fraction,
                       bpe_vocab_size, chunk_bytes):
    """Write the ids, then the JSON: a cache is complete exactly when its JSON describes it."""
    with _atomic_file(bin_path) as handle:
        if tokenizer is None and kind == "char":
            tokenizer, dtype, count = _write_char_tokens(path, handle, chunk_bytes)
        else:
            if tokenizer is None:
                tokenizer = _train_tokenizer(kind, path, val_fraction, bpe_vocab_size)
            dtype = _token_dtype(tokenizer.vocab_size)
            count = _write_tokens(path, tokenizer, dtype, handle, chunk_bytes)
    meta = {"format": CACHE_FORMAT, "source": str(Path(path).resolve()), "fingerprint": fingerprint,
            "dtype": np.dtype(dtype).name, "num_tokens": count, "tokenizer": tokenizer.state_dict()}
    with _atomic_file(meta_path) as handle:
        handle.write(json.dumps(meta).encode())
    return meta


def _write_tokens(path, tokenizer, dtype, handle, chunk_bytes):
    """Encode the text chunk by chunk with a known tokenizer; return the number of ids written."""
    count = 0
    for text in _whole_lines(iter_text_chunks(path, chunk_bytes)):
        ids = tokenizer.encode(text)
        handle.write(ids.astype(dtype))
        count += len(ids)
    return count


def _whole_lines(chunks):
    """The same text re-cut after line ends, so BPE does not see a word cut in two by a chunk
    edge (a chunk without any line end is passed on as it is)."""
    rest = ""
    for chunk in chunks:
        text = rest + chunk
        cut = text.rfind("\n") + 1 or len(text)
        rest = text[cut:]
        yield text[:cut]
    if rest:
        yield rest


def _train_tokenizer(kind, path, val_fraction, bpe_vocab_size):
    """The byte or BPE tokenizer for a corpus (char vocabularies are collected while writing)."""
    if kind == "byte":
        return ByteTokenizer()
    # BPE learns from the training split only: the leading (1 - val_fraction) of the bytes
    budget = (1.0 - val_fraction) * sum(f.stat().st_size for f in corpus_files(path))

    def training_text():
        remaining = int(budget)
        for chunk in iter_text_chunks(path):
            encoded = chunk.encode("utf-8")
            if len(encoded) >= remaining:  # the chunk that crosses into validation is cut there
                yield encoded[:remaining].decode("utf-8", errors="ignore")
                return
            remaining -= len(encoded)
            yield chunk

    return BPETokenizer.train(training_text(), bpe_vocab_size)


class _TooManyCharacters(Exception):
    """More distinct characters than 2-byte ids can number."""


def _write_char_tokens(path, handle, chunk_bytes):
    """Collect the char vocabulary and write the ids in one pass; return (tokenizer, dtype, count).

    Ids are first numbered as the characters turn up; at the end the vocabulary is sorted (the
    CharTokenizer order) and the ids are renumbered in place, one chunk of the file at a time.
    """
    dtype = np.uint16
    try:
        code_points, count = _write_ids_in_order_of_appearance(path, handle, dtype, chunk_bytes)
    except _TooManyCharacters:  # more than 65,536 distinct characters: again, with 4-byte ids
        dtype = np.uint32
        handle.seek(0)
        handle.truncate()
        code_points, count = _write_ids_in_order_of_appearance(path, handle, dtype, chunk_bytes)
    order = np.argsort(code_points)
    if np.any(order != np.arange(len(order))):
        sorted_id = np.empty(len(order), dtype=dtype)
        sorted_id[order] = np.arange(len(order))
        _renumber(handle, sorted_id, count, chunk_bytes)
    return CharTokenizer("".join(map(chr, code_points[order]))), dtype, count


def _write_ids_in_order_of_appearance(path, handle, dtype, chunk_bytes):
    """Write provisional ids; return (code point of each provisional id, number of ids)."""
    id_of = np.full(UNICODE_SIZE, -1, dtype=np.int32)  # code point -> provisional id
    found = []  # arrays of code points, in the order their ids were given
    num_chars = count = 0
    for text in iter_text_chunks(path, chunk_bytes):
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = id_of[code_points]
        unseen = ids < 0
        if unseen.any():
            new = np.unique(code_points[unseen])
            if num_chars + len(new) > np.iinfo(dtype).max + 1:
                raise _TooManyCharacters
            id_of[new] = np.arange(num_chars, num_chars + len(new))
            found.append(new)
            num_chars += len(new)
            ids[unseen] = id_of[code_points[unseen]]
        handle.write(ids.astype(dtype))
        count += len(ids)
    return np.concatenate(found), count


def _renumber(handle, new_id, count, chunk_bytes):
    """Replace every id i in the open file by new_id[i], reading and writing a chunk at a time."""
    itemsize = new_id.dtype.itemsize
    per_chunk = max(1, chunk_bytes // itemsize)
    for start in range(0, count, per_chunk):
        handle.seek(start * itemsize)
        ids = np.frombuffer(handle.read(min(per_chunk, count - start) * itemsize), dtype=new_id.dtype)
        handle.seek(start * itemsize)
        handle.write(new_id[ids])


def load_tokens(train_config, tokenizer=None):
    """(tokenizer, ids) for the configured corpus; `tokenizer` fixes the vocabulary when given."""
    t = train_config
    if t.data:
        return cached_tokens(t.data, t.tokenizer, t.cache_dir, t.val_fraction, t.bpe_vocab_size,
                             tokenizer)
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


def split_tokens(tokens, val_fraction, block_size):
    """The leading part trains, the last `val_fraction` validates; each needs block_size+1 tokens."""
    boundary = int(len(tokens) * (1.0 - val_fraction))
    train_tokens, val_tokens = tokens[:boundary], tokens[boundary:]
    for name, part in (("training", train_tokens), ("validation", val_tokens)):
        if len(part) < block_size + 1:
            fail(f"the corpus is too short: its {name} split has {len(part)} tokens but needs at "
                 f"least block_size + 1 = {block_size + 1}; use more text or a smaller --block_size")
    return train_tokens, val_tokens


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

    def state_dict(self):
        return {"position": self.start}

    def load_state_dict(self, state):
        self.start = int(state["position"])


def build_dataloader(tokens, block_size, batch_size, seed, start=0, stop=None, num_workers=0,
                     pin_memory=False, rank=0, world_size=1):
    """A DataLoader of (x, y) batches of shape (batch_size, block_size), micro-batch `start` first."""
    dataset = RandomWindows(tokens, block_size, batch_size, seed, rank, world_size)
    sampler = StepSampler(start, stop if stop is not None else len(dataset))
    # The loader's own generator: creating an iterator draws a worker seed from it, which must
    # not come from (and shift) the global torch generator that dropout uses.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_leave_interrupts_to_the_main_process)


def _leave_interrupts_to_the_main_process(worker_id):
    """Ctrl-C reaches every process of the terminal; the training loop, not a worker, handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
