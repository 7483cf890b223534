"""The token cache: a --data path tokenized once into a stream of ids that later runs memory-map.

`cached_tokens(settings, tokenizer)` finds the cache a source has for a tokenizer (or for the
settings a fresh run makes its tokenizer from: cachefiles.CacheSettings) and builds it if need
be, under a lock so that concurrent runs (torchrun's ranks) build it once; it returns the
tokenizer and the memory-mapped ids. The two kinds share the keys and the one reader of
cachefiles.py, and differ in how they are built:
- a text file or a directory of *.txt: textcache.py;
- a corpus of documents (jsonl, parquet): documentcache.py, prepared on every core.
A cache lives in --cache_dir (by default $XDG_CACHE_HOME/gpt-train/tokens), never beside the
data; a changed source is tokenized again (a document corpus only in its changed files), and a
damaged cache is rebuilt with one line saying why. A build that fails leaves no temporary file,
no lock and no directory it created; a failure is one line, blaming the file it is about: a
source file, or --cache_dir (status 1 when the disk is full). `data_fingerprint` is a cheap
fingerprint of the source that survives a copy, which train.py keeps in step checkpoints. What
the tokens are used for (splits, batches) is dataset.py's business.
"""

import contextlib
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gpt_train.atomic import remove_temporary_files
from gpt_train.cachefiles import (CACHE_FORMAT, DOCUMENT_CACHE_FORMAT, SAMPLE_BYTES, SAMPLES,
                                  exclusive_lock, read_cache, same_source, sample_offsets,
                                  source_fingerprint)
from gpt_train.cli import raise_os_failure
from gpt_train.documentcache import build_document_cache
from gpt_train.documents import TEXT, corpus_files, open_source, unreadable
from gpt_train.textcache import build_text_cache
from gpt_train.tokenizer import tokenizer_for_documents, tokenizer_from_state

class Source(NamedTuple):
    """The files a cache is built from, as they are now: their kind ("text", or a kind of
    document shard), paths and fingerprint (cachefiles.source_fingerprint)."""

    kind: str
    files: list
    fingerprint: list


def cached_tokens(settings, tokenizer=None):
    """(tokenizer, memory-mapped ids) of the source `settings` name, tokenized once into the cache.

    With `tokenizer` given (a resumed or fine-tuned run, evaluate.py) the text is encoded with
    it, and any cache of the same bytes with the same tokenizer is used, however it was built;
    without, the tokenizer is made from the text as `settings` say.
    """
    kind, files = corpus_files(settings.path)
    if kind != TEXT and tokenizer is not None:
        tokenizer = tokenizer_for_documents(tokenizer)
    directory = settings.directory
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(settings.lock_path()) as locked:
            source = Source(kind, files, source_fingerprint(files))
            meta = find_or_build(settings, source, tokenizer, locked)
            tokenizer = tokenizer_from_state(meta["tokenizer"])
            if meta["num_tokens"] == 0:
                return tokenizer, np.zeros(0, dtype=np.int64)
            # opened under the lock: the map holds this file even if a later build replaces it
            return tokenizer, np.memmap(directory / meta["stream"], dtype=meta["dtype"],
                                        mode="r", shape=(meta["num_tokens"],))
    except BaseException as error:
        if created:  # a failed first build leaves no empty cache directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(error, OSError) and not isinstance(error, BrokenPipeError):
            cache_failure(directory, error)
        raise


def find_or_build(settings, source, tokenizer, locked):
    """The JSON of the complete, current cache of `source` for `tokenizer` (or, without one, for
    the settings), built if need be (under the lock)."""
    cache_format = CACHE_FORMAT if source.kind == TEXT else DOCUMENT_CACHE_FORMAT
    wanted = tokenizer.state_dict() if tokenizer is not None else None
    keys = settings.keys(source.kind, wanted)
    previous, problem = None, None  # a cache of an earlier state of the source; why not the last
    for key in keys:
        meta, problem = read_cache(settings.directory, key, cache_format)
        if meta is not None and wanted in (None, meta["tokenizer"]):
            if same_source(meta["fingerprint"], source.fingerprint):
                return meta
            previous = previous or meta
    cache_path = settings.directory / keys[-1]  # a fresh build's key, or the tokenizer's
    if source.kind == TEXT and previous is not None:
        problem = "the source text changed since it was built"
    if problem:
        print(f"token cache {cache_path}.json: {problem}; rebuilding it")
    if locked:  # no one else is building this cache: a killed build's leftovers go
        remove_leftovers(cache_path)
    if source.kind == TEXT:
        return build_text_cache(settings, source, tokenizer, cache_path)
    return build_document_cache(settings, source, tokenizer, previous, cache_path)


def remove_leftovers(cache_path):
    """What a killed build of `cache_path` left: temporary files, and pieces in flight."""
    remove_temporary_files(cache_path.parent, f"{cache_path.name}.*")
    parts = cache_path.with_suffix(".parts")
    if parts.is_dir():
        remove_temporary_files(parts)
        for leftover in parts.glob("*.tmp"):  # a killed worker's piece
            leftover.unlink(missing_ok=True)


def cache_failure(directory, error):
    """One line for an OSError while building: about the source file it names, if it names one
    outside the cache; else about --cache_dir, the machine's (status 1) when the disk is full."""
    named = Path(error.filename).resolve() if error.filename else None
    if named is not None and directory.resolve() not in (named, *named.parents):
        unreadable(named, error)
    raise_os_failure(f"cannot build the token cache in {directory} (--cache_dir): "
                     f"{error.strerror or error}", error)


def data_fingerprint(path, samples=SAMPLES, sample_bytes=SAMPLE_BYTES):
    """A cheap fingerprint of a --data file or directory (or shards of documents), for a resume
    to notice that the data changed since its checkpoint: each file's name and size, and
    `samples` evenly spaced blocks of its bytes (the first and last included; the blocks the
    cache's fingerprint reads). Unlike the cache's, it survives a copy."""
    digest = hashlib.sha256()
    for file in corpus_files(path)[1]:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open_source(file) as handle:
            for offset in sample_offsets(size, samples, sample_bytes):
                handle.seek(offset)
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:32]
