"""What a token cache is on disk, shared by both kinds: the settings it is built from, its keys,
the one reader that says whether a cache is complete, the source's fingerprint, and the lock.

- `CacheSettings`: what a cache is built from (the --data path, the tokenizer's kind and
  settings, --text_field, --num_proc, --cache_dir), one frozen bundle that every helper takes;
- a cache is a JSON (KEY.json) describing one stream of ids, uint16 (uint32 when the vocabulary
  needs it): KEY.bin for a text file or directory (format 2), KEY.<tag>.bin with the segment of
  each source file for a corpus of documents (format 3). It is complete exactly when its JSON
  describes the stream as it is (`read_cache`); anything else is rebuilt, with one line saying
  why;
- `source_fingerprint`: each source file's path, size, modification time and a digest of 64
  blocks of its bytes (the blocks `data_fingerprint` reads for a resume's note, so an edit that
  keeps the size and the time is seen by the cache as by the note). A JSON without the digest
  (written by an earlier version) is compared on the rest;
- the keys (`CacheSettings.keys`): a hash of the settings a fresh build makes its tokenizer
  from, and with a tokenizer given, of the source and that tokenizer alone, so the same bytes
  encoded with the same tokenizer find one cache whichever command asks;
- `exclusive_lock`: one lock per source, so concurrent runs (or torchrun's ranks) build a cache
  once; the lock file goes when its holder is done.
How each kind is built is textcache.py's and documentcache.py's business; finding a cache,
building it if need be and mapping it, tokencache.py's.
"""

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_train.atomic import atomic_write
from config import UserError
from gpt_train.documents import PIECE_BYTES, TEXT, open_source, unreadable
from gpt_train.tokenizer import tokenizer_from_state
from gpt_train.workers import default_num_proc

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), caches are built unlocked
except ImportError:
    fcntl = None

CHUNK_BYTES = 1 << 22  # how much text is read, decoded and tokenized at a time
CACHE_FORMAT = 2  # a text cache; bumped when the layout changes: another format is rebuilt
DOCUMENT_CACHE_FORMAT = 3  # a document corpus's cache: the same, with the files' segments
SAMPLES, SAMPLE_BYTES = 64, 1 << 12  # the blocks of a file its fingerprint reads


def default_cache_dir():
    """$XDG_CACHE_HOME/gpt-train/tokens, or ~/.cache/gpt-train/tokens: never beside the data."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG rule: a relative (or empty) value is ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt-train", "tokens")


@dataclass(frozen=True)
class CacheSettings:
    """What a token cache is built from: the source (`path`: a --data or --val_data path), the
    tokenizer a fresh build makes (`kind`: --tokenizer, with --bpe_vocab_size and --val_fraction
    for BPE), how documents are read (--text_field, `piece_bytes` at a time on --num_proc
    processes, 0 for every core), and where the cache lives (--cache_dir)."""

    path: str
    kind: str
    cache_dir: str = None
    val_fraction: float = 0.1
    bpe_vocab_size: int = 4096
    text_field: str = "text"
    num_proc: int = 1
    chunk_bytes: int = CHUNK_BYTES
    piece_bytes: int = PIECE_BYTES

    @property
    def source(self):
        return str(Path(self.path).resolve())

    @property
    def directory(self):
        return Path(self.cache_dir or default_cache_dir())

    @property
    def processes(self):
        return self.num_proc if self.num_proc > 0 else default_num_proc()

    def keys(self, corpus_kind, tokenizer_state=None):
        """The names a cache of this source may have, in the order they are looked up; the last
        is where a build goes. Without a tokenizer: the key of the settings (a fresh build).
        With one: that key (a fresh build may have made this very tokenizer), the key of the
        settings and the tokenizer (where earlier versions built it), and the key of the source
        and the tokenizer alone, whatever the settings."""
        settings = {"source": self.source, "kind": self.kind,
                    "bpe_vocab_size": self.bpe_vocab_size if self.kind == "bpe" else None,
                    "val_fraction": self.val_fraction if self.kind == "bpe" else None}
        reading = {}  # how the text is read, for documents (a text cache's key never had it)
        if corpus_kind != TEXT:
            reading = {"documents": corpus_kind, "text_field": self.text_field}
            settings.update(reading, piece_bytes=self.piece_bytes)
        keys = [cache_key(settings)]
        if tokenizer_state is not None:
            keys.append(cache_key({**settings, "tokenizer": tokenizer_state}))
            keys.append(cache_key({"source": self.source, **reading,
                                   "tokenizer": tokenizer_state}))
        return keys

    def lock_path(self):
        """One lock for every cache of this source."""
        return self.directory / f"{cache_key({'source': self.source})}.lock"


def cache_key(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_json(path, meta):
    """The JSON that makes a cache complete: written last, whole or not at all."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(meta).encode())


def read_cache(directory, key, cache_format):
    """(the JSON of the complete cache KEY of `cache_format`, whatever its source is like now,
    None), else (None, why it cannot be used: None where there is none). The JSON's "stream" is
    the file of ids, in the directory (a text cache's is KEY.bin)."""
    meta_path = directory / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        expected_bytes = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        found_format, fingerprint = meta["format"], meta["fingerprint"]
        if found_format == DOCUMENT_CACHE_FORMAT:
            stream, segments = meta["stream"], meta["segments"]
        else:
            stream, segments = f"{key}.bin", fingerprint
        tokenizer_from_state(meta["tokenizer"])
        if not isinstance(expected_bytes, int) or len(segments) != len(fingerprint) or \
                Path(stream).name != stream:
            raise TypeError("num_tokens, segments or stream do not fit")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, UserError) as error:
        return None, f"its metadata {meta_path.name} is damaged ({type(error).__name__})"
    if found_format != cache_format:
        return None, "it was written by another version of this tool"
    stream_path = directory / stream
    size = stream_path.stat().st_size if stream_path.is_file() else 0
    if size != expected_bytes:
        return None, f"it is truncated ({size:,} of {expected_bytes:,} bytes)"
    return {**meta, "stream": stream}, None


def sample_offsets(size, samples=SAMPLES, sample_bytes=SAMPLE_BYTES):
    """Where the blocks a fingerprint reads start: evenly spaced, the first and last included."""
    return [max(0, size - sample_bytes) * index // (samples - 1) for index in range(samples)]


def source_fingerprint(files):
    """Each source file's path, size, modification time and a digest of its sampled blocks."""
    fingerprint = []
    for file in files:
        stat = file.stat()
        digest = hashlib.sha256()
        with open_source(file) as handle:
            try:
                for offset in sample_offsets(stat.st_size):
                    handle.seek(offset)
                    digest.update(handle.read(SAMPLE_BYTES))
            except OSError as error:
                unreadable(file, error)
        fingerprint.append({"path": str(file.resolve()), "size": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns, "sample": digest.hexdigest()[:16]})
    return fingerprint


def same_file(saved, current):
    """Whether a fingerprint entry a cache saved still describes the file: every field it has
    (one without "sample" was written before the digest was kept) is the file's now."""
    return all(current.get(name) == value for name, value in saved.items())


def same_source(saved, current):
    return len(saved) == len(current) and all(map(same_file, saved, current))


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive lock on the file `path` while the block runs; yields whether a lock is
    actually held. The file is removed when the block ends, while still locked: a process that
    opened it meanwhile finds it gone, and locks a new one (`lock_file`)."""
    if fcntl is None:
        yield False
        return
    handle, locked = lock_file(path)
    try:
        yield locked
    finally:
        if locked:
            Path(path).unlink(missing_ok=True)
        handle.close()  # releases the lock


def lock_file(path):
    """(`path` open, whether it is locked): waits for the holder; on a file system without locks,
    goes on unlocked, as on Windows."""
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            return handle, False
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle, True
        except FileNotFoundError:
            pass
        handle.close()  # the last holder removed the file as it was opened: lock the new one
