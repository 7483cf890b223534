"""The token cache: a text file or directory, tokenized once, memory-mapped by every later run.

A flat uint16 binary (uint32 when the vocabulary needs it) beside a JSON with the tokenizer and a
fingerprint of the source (path, size, mtime); a changed source rebuilds it. It lives in
--cache_dir, by default $XDG_CACHE_HOME/gpt-train/tokens, never beside the data. Notable details:
- the text is read in chunks that never split a UTF-8 character, so no whole-corpus string is held
  in memory; the char vocabulary is collected in the same pass that writes the ids;
- files are written under temporary names and renamed (`atomic.atomic_write`), and a lock makes
  concurrent runs (or torchrun's ranks) build a cache once;
- a cache is complete exactly when its JSON describes it; anything else (a truncated file,
  damaged JSON, a changed source) is rebuilt, with one line saying why. A build removes the old
  JSON first and writes the new one last, so a build killed at any moment is never taken for
  a complete cache.
`data_fingerprint` is a cheap fingerprint of the source that survives a copy, which train.py keeps
in step checkpoints. What the tokens are used for (splits, batches) is dataset.py's business.
"""

import codecs
import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from atomic import atomic_write, remove_temporary_files
from cli import UserError, fail
from tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_state

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), caches are built unlocked
except ImportError:
    fcntl = None

CHUNK_BYTES = 1 << 22  # how much text is read, decoded and tokenized at a time
CACHE_FORMAT = 2  # bumped when the cache layout changes: caches of another format are rebuilt
UNICODE_SIZE = 0x110000  # code points 0..U+10FFFF: the size of the char pass's lookup table


def corpus_files(path):
    """The files a --data path stands for: the file itself, or a directory's *.txt in sorted order."""
    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.glob("*.txt") if p.is_file())
        if not files:
            fail(f"data directory {path} has no *.txt files")
        return files
    if not source.exists():
        fail(f"data file not found: {path}")
    if not source.is_file():  # /dev/null, a pipe: a cache needs a file it can fingerprint
        fail(f"--data {path} is not a regular file; give a text file or a directory of *.txt")
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


def _read_cache(bin_path, meta_path, fingerprint):
    """(the cache's JSON, None) if the cache is complete and was built from the source as it is
    now; else (None, why it must be rebuilt), the reason being None where there is no cache."""
    try:
        meta = json.loads(meta_path.read_text())
        expected_bytes = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        cache_format, source = meta["format"], meta["fingerprint"]
        tokenizer_from_state(meta["tokenizer"])
        if not isinstance(expected_bytes, int):
            raise TypeError("num_tokens is not a whole number")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, UserError) as error:
        return None, f"its metadata {meta_path.name} is damaged ({type(error).__name__})"
    if cache_format != CACHE_FORMAT:
        return None, "it was written by another version of this tool"
    if source != fingerprint:
        return None, "the source text changed since it was built"
    size = bin_path.stat().st_size if bin_path.is_file() else 0
    if size != expected_bytes:
        return None, f"it is truncated ({size:,} of {expected_bytes:,} bytes)"
    return meta, None


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
                meta, problem = _read_cache(bin_path, meta_path, fingerprint)
                if meta is not None and wanted in (None, meta["tokenizer"]):
                    break
            else:
                if problem:
                    print(f"token cache {bin_path}: {problem}; rebuilding it")
                if locked:  # no one else is building this cache: a killed build's leftovers go
                    remove_temporary_files(directory, f"{key}.*")
                meta = _build_token_cache(path, settings, tokenizer, directory / key, fingerprint,
                                          chunk_bytes)
            tokenizer = tokenizer_from_state(meta["tokenizer"])
            if meta["num_tokens"] == 0:
                return tokenizer, np.zeros(0, dtype=np.int64)
            # opened under the lock: the map holds this file even if a later build replaces it
            return tokenizer, np.memmap(bin_path, dtype=meta["dtype"], mode="r",
                                        shape=(meta["num_tokens"],))
    except OSError as error:  # a full disk, a read-only directory, an unreadable source file
        fail(f"cannot build the token cache in {directory} (--cache_dir): {error}")


def _build_token_cache(path, settings, tokenizer, cache_path, fingerprint, chunk_bytes):
    """Write the ids (cache_path.bin), then the JSON (cache_path.json): a cache is complete exactly
    when its JSON describes it. `settings` are the tokenizer's, as `cached_tokens` keys them."""
    bin_path, meta_path = cache_path.with_suffix(".bin"), cache_path.with_suffix(".json")
    kind = settings["kind"]
    meta_path.unlink(missing_ok=True)  # first: a build killed from here on leaves no JSON behind
    with atomic_write(bin_path) as handle:
        if tokenizer is None and kind == "char":
            tokenizer, dtype, count = _write_char_tokens(path, handle, chunk_bytes)
        else:
            if tokenizer is None:
                tokenizer = _train_tokenizer(kind, path, settings["val_fraction"],
                                             settings["bpe_vocab_size"])
            dtype = _token_dtype(tokenizer.vocab_size)
            count = _write_tokens(path, tokenizer, dtype, handle, chunk_bytes)
    meta = {"format": CACHE_FORMAT, "source": str(Path(path).resolve()), "fingerprint": fingerprint,
            "dtype": np.dtype(dtype).name, "num_tokens": count, "tokenizer": tokenizer.state_dict()}
    with atomic_write(meta_path) as handle:
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


def data_fingerprint(path, samples=64, sample_bytes=1 << 12):
    """A cheap fingerprint of a --data file or directory, for a resume to notice that the data
    changed since its checkpoint: each file's name and size, and `samples` evenly spaced blocks
    of its bytes (the first and last included). Unlike the cache's, it survives a copy."""
    digest = hashlib.sha256()
    for file in corpus_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for index in range(samples):
                handle.seek(max(0, size - sample_bytes) * index // (samples - 1))
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:32]
