"""The token cache: a text file or directory, or a corpus of documents, tokenized once and
memory-mapped by every later run.

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
A corpus of documents (documents.py) has a cache of its own kind (format 3), prepared on every
core (preparation.py): its pieces are tokenized into files of their own in KEY.parts/, then
joined, in the order of the source, into one stream KEY.<tag>.bin that the JSON names, with the
segment of each source file. A killed build goes on from the pieces done, to the same bytes; a
source whose files changed keeps the ids of the unchanged ones (the tokenizer stays the one they
were made with) and tokenizes only the others. The old stream goes once the new JSON is written.
`data_fingerprint` is a cheap fingerprint of the source that survives a copy, which train.py keeps
in step checkpoints. What the tokens are used for (splits, batches) is dataset.py's business.
"""

import codecs
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from gpt_train.atomic import atomic_write, remove_temporary_files
from config import UserError, fail
from gpt_train.cli import raise_os_failure
from gpt_train.documents import PIECE_BYTES, document_files, file_pieces, piece_documents
from gpt_train.preparation import default_num_proc, piece_characters, prepare_pieces, tokenize_piece
from gpt_train.tokenizer import (SAMPLE_BYTES, BPETokenizer, ByteTokenizer, CharTokenizer,
                       tokenizer_for_documents, tokenizer_from_state)

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), caches are built unlocked
except ImportError:
    fcntl = None

CHUNK_BYTES = 1 << 22  # how much text is read, decoded and tokenized at a time
CACHE_FORMAT = 2  # bumped when the cache layout changes: caches of another format are rebuilt
DOCUMENT_CACHE_FORMAT = 3  # a document corpus's cache: the same, with the files' segments
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
                  chunk_bytes=CHUNK_BYTES, text_field="text", num_proc=1, piece_bytes=PIECE_BYTES):
    """Tokenize a text file or directory, or a corpus of documents, once into the cache; return
    (tokenizer, memmapped ids).

    The cache is keyed by the source path and the tokenizer settings, and rebuilt when the source's
    size or modification time changes. With `tokenizer` given (a resumed or fine-tuned run), the
    text is encoded with that tokenizer; a cache a fresh run built with the same tokenizer (the
    usual resume) is reused rather than written again. A document corpus (documents.py) is
    prepared by `num_proc` processes, `piece_bytes` of its source at a time.
    """
    documents = document_files(path)
    files = corpus_files(path) if documents is None else documents[1]
    directory = Path(cache_dir or default_cache_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the token cache directory {directory}: {error.strerror}")
    settings = {"source": str(Path(path).resolve()), "kind": kind,
                "bpe_vocab_size": bpe_vocab_size if kind == "bpe" else None,
                "val_fraction": val_fraction if kind == "bpe" else None}
    if documents is not None:  # (a text cache's key is what it always was)
        settings.update(documents=documents[0], text_field=text_field, piece_bytes=piece_bytes)
        tokenizer = tokenizer if tokenizer is None else tokenizer_for_documents(tokenizer)
    wanted = tokenizer.state_dict() if tokenizer is not None else None
    keys = [_cache_key(settings)]
    if wanted is not None:
        keys.append(_cache_key({**settings, "tokenizer": wanted}))
    try:
        with _exclusive_lock(directory / f"{keys[0]}.lock") as locked:
            if documents is None:
                meta, bin_path = _text_cache(path, settings, tokenizer, directory, keys, locked,
                                             chunk_bytes)
            else:
                meta, bin_path = _document_cache(settings, files, tokenizer, directory, keys,
                                                 locked, num_proc)
            tokenizer = tokenizer_from_state(meta["tokenizer"])
            if meta["num_tokens"] == 0:
                return tokenizer, np.zeros(0, dtype=np.int64)
            # opened under the lock: the map holds this file even if a later build replaces it
            return tokenizer, np.memmap(bin_path, dtype=meta["dtype"], mode="r",
                                        shape=(meta["num_tokens"],))
    except OSError as error:  # a full disk, a read-only directory, an unreadable source file
        raise_os_failure(f"cannot build the token cache in {directory} (--cache_dir): {error}",
                         error)


def _text_cache(path, settings, tokenizer, directory, keys, locked, chunk_bytes):
    """(meta, ids file) of a text file's or directory's cache, built if need be (under the lock)."""
    wanted = tokenizer.state_dict() if tokenizer is not None else None
    # taken before the text is read: a file that changes while it is read is rebuilt next time
    fingerprint = _fingerprint(corpus_files(path))
    for key in keys:
        bin_path, meta_path = directory / f"{key}.bin", directory / f"{key}.json"
        meta, problem = _read_cache(bin_path, meta_path, fingerprint)
        if meta is not None and wanted in (None, meta["tokenizer"]):
            return meta, bin_path
    if problem:
        print(f"token cache {bin_path}: {problem}; rebuilding it")
    if locked:  # no one else is building this cache: a killed build's leftovers go
        remove_temporary_files(directory, f"{key}.*")
    return _build_token_cache(path, settings, tokenizer, directory / key, fingerprint,
                              chunk_bytes), bin_path


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


def _document_cache(settings, files, tokenizer, directory, keys, locked, num_proc):
    """(meta, ids file) of a document corpus's cache, built if need be (under the lock).

    A cache whose files have changed is brought up to date rather than rebuilt: the ids of the
    files it holds unchanged are copied from it, and only new or changed files are tokenized.
    """
    wanted = tokenizer.state_dict() if tokenizer is not None else None
    fingerprint = _fingerprint(files)
    for key in keys:
        meta, problem = _read_document_cache(directory, key)
        if meta is not None and wanted in (None, meta["tokenizer"]):
            if meta["fingerprint"] == fingerprint:
                return meta, directory / meta["stream"]
            break
    if problem:
        print(f"token cache {directory / key}.json: {problem}; rebuilding it")
    if locked:  # no one else is building this cache: a killed build's leftovers go
        remove_temporary_files(directory, f"{key}.*")
        remove_temporary_files(directory / f"{key}.parts")
        for leftover in (directory / f"{key}.parts").glob("*.tmp"):  # a killed worker's piece
            leftover.unlink(missing_ok=True)
    meta = _build_document_cache(settings, files, fingerprint, tokenizer, meta, directory / key,
                                 num_proc)
    return meta, directory / meta["stream"]


def _read_document_cache(directory, key):
    """(the JSON of a complete document cache, None) whatever its source is like now, else (None,
    why it cannot be used: None where there is none)."""
    meta_path = directory / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        expected_bytes = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        cache_format, stream, segments = meta["format"], meta["stream"], meta["segments"]
        tokenizer_from_state(meta["tokenizer"])
        if not isinstance(expected_bytes, int) or len(segments) != len(meta["fingerprint"]):
            raise TypeError("num_tokens or segments do not fit")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, UserError) as error:
        return None, f"its metadata {meta_path.name} is damaged ({type(error).__name__})"
    if cache_format != DOCUMENT_CACHE_FORMAT:
        return None, "it was written by another version of this tool"
    stream_path = directory / stream
    size = stream_path.stat().st_size if stream_path.is_file() else 0
    if size != expected_bytes:
        return None, f"it is truncated ({size:,} of {expected_bytes:,} bytes)"
    return meta, None


def _build_document_cache(settings, files, fingerprint, tokenizer, previous, cache_path, num_proc):
    """Tokenize what `previous` (a complete cache of an earlier state of the source, or None)
    lacks into piece files, join them (and `previous`'s ids of unchanged files) into one stream,
    then write the JSON that names it. Everything a kill interrupts is picked up again by the
    next build: the pieces done, and a trained tokenizer (saved before the first piece)."""
    parts = cache_path.with_suffix(".parts")
    parts.mkdir(exist_ok=True)
    if tokenizer is None and previous is not None and settings["kind"] != "char":
        tokenizer = tokenizer_from_state(previous["tokenizer"])  # the ids already made stay valid
    if tokenizer is None:
        tokenizer = _document_tokenizer(settings, files, parts, num_proc)
    state = tokenizer.state_dict()
    dtype = np.dtype(_token_dtype(tokenizer.vocab_size)).name
    reusable = {}  # fingerprint entry -> (offset, count) of its ids in the previous stream
    if previous is not None and previous["tokenizer"] == state and previous["dtype"] == dtype:
        reusable = {json.dumps(entry, sort_keys=True): segment
                    for entry, segment in zip(previous["fingerprint"], previous["segments"])}
    plan = {}  # file index -> ("previous", offset, count) or ("parts", [piece files])
    jobs = _piece_jobs(settings, files, fingerprint, state, dtype, parts, reusable, plan)
    todo = [f for i, f in enumerate(files)
            if json.dumps(fingerprint[i], sort_keys=True) not in reusable]
    total = sum(f.stat().st_size for f in todo)
    print(f"token cache: tokenizing {len(todo)} of {len(files)} file(s) of {settings['source']} "
          f"({total / 1e6:,.1f} MB) on {_processes(num_proc)} process(es)")
    for _ in prepare_pieces(tokenize_piece, jobs, _processes(num_proc), total):
        pass
    return _join_stream(cache_path, settings, fingerprint, state, dtype, plan, previous, parts)


def _piece_jobs(settings, files, fingerprint, state, dtype, parts, reusable, plan):
    """The tokenize jobs of the files that `reusable` lacks, filling in `plan` (see above). A
    piece file's name says which file (as it is now), tokenizer and cut it is of."""
    tokenizer_tag, state_json = _cache_key(state), json.dumps(state)  # once: 1.7 MB for a 32k BPE
    for index, file in enumerate(files):
        entry = json.dumps(fingerprint[index], sort_keys=True)
        if entry in reusable:
            plan[index] = ("previous", *reusable[entry])
            continue
        tag = _cache_key([entry, tokenizer_tag, settings["text_field"], settings["piece_bytes"]])
        plan[index] = ("parts", [])
        for piece in file_pieces(index, settings["documents"], file, settings["piece_bytes"]):
            part = parts / f"{tag}-{piece.index:06d}.bin"
            plan[index][1].append(part)
            yield {"piece": piece, "part": str(part), "tokenizer": state_json,
                   "dtype": dtype, "text_field": settings["text_field"], "done": part.is_file()}


def _join_stream(cache_path, settings, fingerprint, state, dtype, plan, previous, parts):
    """Write the one stream of ids in the order of the files, then its JSON; the previous stream
    and the piece files go once the JSON names the new stream."""
    itemsize = np.dtype(dtype).itemsize
    name = f"{cache_path.name}.{_cache_key([fingerprint, state])}.bin"
    stream_path = cache_path.with_name(name)
    segments, offset = [], 0
    with atomic_write(stream_path) as out:
        for index in range(len(fingerprint)):
            if plan[index][0] == "previous":
                _, start, count = plan[index]
                with open(cache_path.with_name(previous["stream"]), "rb") as handle:
                    handle.seek(start * itemsize)
                    _copy(handle, out, count * itemsize)
            else:
                count = 0
                for part in plan[index][1]:
                    with open(part, "rb") as handle:
                        count += _copy(handle, out) // itemsize
            segments.append([offset, count])
            offset += count
    meta = {"format": DOCUMENT_CACHE_FORMAT, "source": settings["source"],
            "fingerprint": fingerprint, "segments": segments, "stream": name, "dtype": dtype,
            "num_tokens": offset, "tokenizer": state}
    with atomic_write(cache_path.with_suffix(".json")) as handle:
        handle.write(json.dumps(meta).encode())
    for old in cache_path.parent.glob(f"{cache_path.name}.*.bin"):
        if old.name != name:
            old.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
    return meta


def _copy(source, out, count=None, block=CHUNK_BYTES):
    """Copy `count` bytes (all the rest, if None) from one open file to another; return how many."""
    copied = 0
    while count is None or copied < count:
        data = source.read(block if count is None else min(block, count - copied))
        if not data:
            break
        out.write(data)
        copied += len(data)
    return copied


def _processes(num_proc):
    return num_proc if num_proc > 0 else default_num_proc()


def _document_tokenizer(settings, files, parts, num_proc):
    """The tokenizer of a new document corpus, with an end-of-text id; saved in `parts` so that a
    build killed after it was made goes on with the same one."""
    saved = parts / "tokenizer.json"
    if saved.is_file():
        return tokenizer_from_state(json.loads(saved.read_text()))
    kind = settings["kind"]
    if kind == "byte":
        tokenizer = ByteTokenizer(end_of_text=True)
    elif kind == "bpe":
        texts = _training_sample(settings, files)
        tokenizer = BPETokenizer.train(texts, settings["bpe_vocab_size"], end_of_text=True)
    else:
        tokenizer = _document_characters(settings, files, num_proc)
    with atomic_write(saved) as handle:
        handle.write(json.dumps(tokenizer.state_dict()).encode())
    return tokenizer


def _document_characters(settings, files, num_proc):
    """The char tokenizer of a corpus: its distinct characters, gathered by every process."""
    jobs = ({"piece": piece, "text_field": settings["text_field"]}
            for index, file in enumerate(files)
            for piece in file_pieces(index, settings["documents"], file, settings["piece_bytes"]))
    total = sum(f.stat().st_size for f in files)
    found = [code_points for code_points, _ in
             prepare_pieces(piece_characters, jobs, _processes(num_proc), total,
                            description="reading its characters")]
    code_points = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.uint32)
    if len(code_points) == 0:
        fail(f"data {settings['source']} holds no text")
    return CharTokenizer("".join(map(chr, code_points)), end_of_text=True)


def _training_sample(settings, files, most_pieces=32):
    """The documents BPE learns from: the leading ones of up to `most_pieces` pieces spread evenly
    over the training part (the first 1 - val_fraction of the source's bytes), SAMPLE_BYTES in
    all, so a corpus of any size trains in seconds."""
    budget = (1.0 - settings["val_fraction"]) * sum(f.stat().st_size for f in files)
    kept, stride, seen, number = [], 1, 0, 0
    for index, file in enumerate(files):
        for piece in file_pieces(index, settings["documents"], file, settings["piece_bytes"]):
            if seen >= budget:
                break
            seen += piece.size
            if number % stride == 0:
                kept.append((number, _leading_documents(piece, settings["text_field"],
                                                        SAMPLE_BYTES // most_pieces)))
                while len(kept) > most_pieces:  # keep every other one, and take half as many
                    stride *= 2
                    kept = [entry for entry in kept if entry[0] % stride == 0]
            number += 1
    return [text for _, texts in kept for text in texts]


def _leading_documents(piece, text_field, budget_bytes):
    texts, size = [], 0
    for text in piece_documents(piece, text_field):
        if size >= budget_bytes:
            break
        texts.append(text)
        size += len(text)
    return texts


def data_fingerprint(path, samples=64, sample_bytes=1 << 12):
    """A cheap fingerprint of a --data file or directory (or shards of documents), for a resume
    to notice that the data changed since its checkpoint: each file's name and size, and
    `samples` evenly spaced blocks of its bytes (the first and last included). Unlike the
    cache's, it survives a copy."""
    digest = hashlib.sha256()
    documents = document_files(path)
    for file in corpus_files(path) if documents is None else documents[1]:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for index in range(samples):
                handle.seek(max(0, size - sample_bytes) * index // (samples - 1))
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:32]
