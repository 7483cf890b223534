"""Data: text -> tokens -> a DataLoader of (x, y) batches that a run can resume exactly.

- `get_dataset(path)`: the training text; with no path, the built-in corpus (the Python language
  reference that ships with CPython in `pydoc_data.topics`).
- `load_tokens`: the whole corpus as one array of token ids. A text file is tokenized once, in
  streaming chunks, into a token cache (a flat uint16/uint32 binary plus a JSON with the tokenizer
  and a fingerprint of the source) that later runs memory-map; the built-in corpus is small and is
  tokenized in memory.
- `build_dataloader`: item `i` of the dataset is micro-batch `i` of the run, drawn from a random
  generator seeded by (seed, i). The data order is therefore a pure function of the seed and the
  position, so a resumed run (or a worker process) rebuilds exactly the batches it would have seen.
  Under data parallelism every rank draws the same global batch and keeps its own slice of it.
- `validation_batches`: a fixed set of evenly spaced windows of the validation split; it uses no
  random state at all.
Tokenizers live in tokenizer.py; what a batch is used for lives in train.py.
"""

import codecs
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import fail
from tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_state

CHUNK_BYTES = 1 << 22  # how much text is read, decoded and tokenized at a time


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
        offset = 0
        with open(file, "rb") as handle:
            while True:
                raw = handle.read(chunk_bytes)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as error:
                    fail(f"{file} is not UTF-8 text (bad byte at offset {offset + error.start})")
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
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt-train", "tokens")


def _fingerprint(files):
    return [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in files]


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _train_tokenizer(kind, path, val_fraction, bpe_vocab_size):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(iter_text_chunks(path))
    # BPE learns from the training split only: the leading (1 - val_fraction) of the bytes
    budget = (1.0 - val_fraction) * sum(f.stat().st_size for f in corpus_files(path))

    def training_text():
        seen = 0
        for chunk in iter_text_chunks(path):
            if seen >= budget:
                return
            seen += len(chunk.encode("utf-8"))
            yield chunk

    return BPETokenizer.train(training_text(), bpe_vocab_size)


def _write_token_cache(path, tokenizer, bin_path, meta_path, fingerprint):
    dtype = _token_dtype(tokenizer.vocab_size)
    temporary = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
    count = 0
    with open(temporary, "wb") as out:
        for chunk in iter_text_chunks(path):
            ids = tokenizer.encode(chunk)
            out.write(ids.astype(dtype).tobytes())
            count += len(ids)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, bin_path)
    meta = {"fingerprint": fingerprint, "dtype": np.dtype(dtype).name, "num_tokens": count,
            "tokenizer": tokenizer.state_dict()}
    temporary = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(meta))
    os.replace(temporary, meta_path)  # the JSON is written last: it marks the cache complete


def cached_tokens(path, kind, cache_dir, val_fraction=0.1, bpe_vocab_size=4096, tokenizer=None):
    """Tokenize a text file or directory once into the cache; return (tokenizer, memmapped ids).

    The cache is keyed by the source path and the tokenizer settings, and rebuilt when the source's
    size or modification time changes. With `tokenizer` given (a resumed or fine-tuned run), the
    text is encoded with that tokenizer instead of a newly trained one.
    """
    files = corpus_files(path)
    fingerprint = _fingerprint(files)
    settings = {"source": str(Path(path).resolve()), "kind": kind,
                "bpe_vocab_size": bpe_vocab_size if kind == "bpe" else None,
                "val_fraction": val_fraction if kind == "bpe" else None,
                "tokenizer": tokenizer.state_dict() if tokenizer is not None else None}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_dir or default_cache_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the token cache directory {directory}: {error.strerror}")
    bin_path, meta_path = directory / f"{key}.bin", directory / f"{key}.json"
    meta = None
    if meta_path.exists() and bin_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
    if meta is None or meta.get("fingerprint") != fingerprint:
        if tokenizer is None:
            tokenizer = _train_tokenizer(kind, path, val_fraction, bpe_vocab_size)
        _write_token_cache(path, tokenizer, bin_path, meta_path, fingerprint)
        meta = json.loads(meta_path.read_text())
    tokenizer = tokenizer_from_state(meta["tokenizer"])
    if meta["num_tokens"] == 0:
        return tokenizer, np.zeros(0, dtype=np.int64)
    return tokenizer, np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


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


class RandomWindows(Dataset):
    """Item i is micro-batch i of the run: `batch_size` windows at positions drawn from (seed, i).

    All ranks draw the same `batch_size * world_size` positions and each keeps its own slice, so
    the global batch depends only on the seed and the step, not on how it is split across ranks.
    """

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world_size=1):
        self.tokens = tokens
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_starts = len(tokens) - block_size  # windows need block_size + 1 tokens

    def __len__(self):
        return 2**62  # an endless stream; the sampler decides where a run starts and stops

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.num_starts, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return windows_at(self.tokens, mine, self.block_size)


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
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=generator)


def validation_batches(tokens, block_size, batch_size, num_batches, rank=0, world_size=1):
    """The fixed validation set: `num_batches` batches of evenly spaced windows (this rank's share)."""
    num_windows = num_batches * batch_size
    starts = np.linspace(0, len(tokens) - block_size - 1, num_windows).round().astype(np.int64)
    batches = [starts[i:i + batch_size] for i in range(0, num_windows, batch_size)]
    return [windows_at(tokens, s, block_size) for s in batches[rank::world_size]]
