"""The text cache: a text file or a directory of *.txt (documents.corpus_files), tokenized into
one stream of ids as a single text, its progress shown as a preparation's (preparation.Progress).

- the text is read in chunks that never split a UTF-8 character (`iter_text_chunks`), so no
  whole-corpus string is held in memory, and BPE sees them re-cut after line ends;
- the char vocabulary is collected in the same pass that writes the ids, which are renumbered
  in place at the end in the vocabulary's sorted order;
- BPE learns from the training split only: the leading 1 - --val_fraction of the bytes.
The ids are written under a temporary name and renamed, then the JSON that makes the cache
complete (cachefiles.py says what a cache is, tokencache.py when one is built).
"""

import codecs

import numpy as np

from gpt_train.atomic import atomic_write
from gpt_train.cachefiles import CACHE_FORMAT, CHUNK_BYTES, token_dtype, write_json
from config import fail
from gpt_train.documents import corpus_files, open_source, unreadable
from gpt_train.preparation import Progress
from gpt_train.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

UNICODE_SIZE = 0x110000  # code points 0..U+10FFFF: the size of the char pass's lookup table


def iter_text_chunks(path, chunk_bytes=CHUNK_BYTES, progress=None):
    """Yield the text of a file or directory in pieces, never splitting a UTF-8 character;
    `progress` (a preparation.Progress) is told the bytes read."""
    files = corpus_files(path)[1]
    if sum(f.stat().st_size for f in files) == 0:
        fail(f"data {path} is empty")
    for file in files:
        with open_source(file) as handle:
            try:
                yield from file_chunks(file, handle, chunk_bytes, progress)
            except OSError as error:
                unreadable(file, error)


def file_chunks(file, handle, chunk_bytes, progress):
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # of the first byte of `raw` in the file
    while True:
        raw = handle.read(chunk_bytes)
        if progress is not None:
            progress.update(len(raw))
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


def build_text_cache(settings, source, tokenizer, cache_path):
    """Write the ids (cache_path.bin), then the JSON (cache_path.json): a cache is complete
    exactly when its JSON describes it. `tokenizer` None: one is made from the text, as
    `settings` say; `source`: the files (and their fingerprint) as they were before reading."""
    bin_path, meta_path = cache_path.with_suffix(".bin"), cache_path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)  # first: a build killed from here on leaves no JSON behind
    with atomic_write(bin_path) as handle:
        if tokenizer is None and settings.kind == "char":
            tokenizer, dtype, count = write_char_tokens(settings, handle)
        else:
            tokenizer = tokenizer or text_tokenizer(settings)
            dtype = token_dtype(tokenizer.vocab_size)
            count = write_tokens(settings, tokenizer, dtype, handle)
    meta = {"format": CACHE_FORMAT, "source": settings.source, "fingerprint": source.fingerprint,
            "dtype": np.dtype(dtype).name, "num_tokens": count, "tokenizer": tokenizer.state_dict()}
    write_json(meta_path, meta)
    return {**meta, "stream": bin_path.name}


def write_tokens(settings, tokenizer, dtype, handle):
    """Encode the text chunk by chunk with a known tokenizer; return the number of ids written."""
    count = 0
    with source_progress(settings) as progress:
        for text in whole_lines(iter_text_chunks(settings.path, settings.chunk_bytes, progress)):
            ids = tokenizer.encode(text)
            handle.write(ids.astype(dtype))
            count += len(ids)
    return count


def source_progress(settings):
    """The progress of a pass over the text (a bar on a terminal, lines in a log)."""
    return Progress(sum(f.stat().st_size for f in corpus_files(settings.path)[1]), "tokenizing")


def whole_lines(chunks):
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


def text_tokenizer(settings):
    """The byte or BPE tokenizer for a corpus (char vocabularies are collected while writing)."""
    if settings.kind == "byte":
        return ByteTokenizer()
    # BPE learns from the training split only: the leading (1 - val_fraction) of the bytes
    budget = (1.0 - settings.val_fraction) * sum(
        f.stat().st_size for f in corpus_files(settings.path)[1])

    def training_text():
        remaining = int(budget)
        for chunk in iter_text_chunks(settings.path, settings.chunk_bytes):
            encoded = chunk.encode("utf-8")
            if len(encoded) >= remaining:  # the chunk that crosses into validation is cut there
                yield encoded[:remaining].decode("utf-8", errors="ignore")
                return
            remaining -= len(encoded)
            yield chunk

    return BPETokenizer.train(training_text(), settings.bpe_vocab_size)


class TooManyCharacters(Exception):
    """More distinct characters than 2-byte ids can number."""


def write_char_tokens(settings, handle):
    """Collect the char vocabulary and write the ids in one pass; return (tokenizer, dtype, count).

    Ids are first numbered as the characters turn up; at the end the vocabulary is sorted (the
    CharTokenizer order) and the ids are renumbered in place, one chunk of the file at a time.
    """
    dtype = np.uint16
    try:
        code_points, count = write_ids_in_order_of_appearance(settings, handle, dtype)
    except TooManyCharacters:  # more than 65,536 distinct characters: again, with 4-byte ids
        dtype = np.uint32
        handle.seek(0)
        handle.truncate()
        code_points, count = write_ids_in_order_of_appearance(settings, handle, dtype)
    order = np.argsort(code_points)
    if np.any(order != np.arange(len(order))):
        sorted_id = np.empty(len(order), dtype=dtype)
        sorted_id[order] = np.arange(len(order))
        renumber(handle, sorted_id, count, settings.chunk_bytes)
    return CharTokenizer("".join(map(chr, code_points[order]))), dtype, count


def write_ids_in_order_of_appearance(settings, handle, dtype):
    """Write provisional ids; return (code point of each provisional id, number of ids)."""
    id_of = np.full(UNICODE_SIZE, -1, dtype=np.int32)  # code point -> provisional id
    found = []  # arrays of code points, in the order their ids were given
    num_chars = count = 0
    with source_progress(settings) as progress:
        for text in iter_text_chunks(settings.path, settings.chunk_bytes, progress):
            code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = id_of[code_points]
            unseen = ids < 0
            if unseen.any():
                new = np.unique(code_points[unseen])
                if num_chars + len(new) > np.iinfo(dtype).max + 1:
                    raise TooManyCharacters
                id_of[new] = np.arange(num_chars, num_chars + len(new))
                found.append(new)
                num_chars += len(new)
                ids[unseen] = id_of[code_points[unseen]]
            handle.write(ids.astype(dtype))
            count += len(ids)
    return np.concatenate(found), count


def renumber(handle, new_id, count, chunk_bytes):
    """Replace every id i in the open file by new_id[i], reading and writing a chunk at a time."""
    itemsize = new_id.dtype.itemsize
    per_chunk = max(1, chunk_bytes // itemsize)
    for start in range(0, count, per_chunk):
        handle.seek(start * itemsize)
        ids = np.frombuffer(handle.read(min(per_chunk, count - start) * itemsize), dtype=new_id.dtype)
        handle.seek(start * itemsize)
        handle.write(new_id[ids])
