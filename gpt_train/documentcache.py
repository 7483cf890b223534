"""The document cache: a corpus of documents (documents.py) tokenized on every core into one stream
of ids, each document followed by the end-of-text id, with the segment of each source file.

Its pieces are tokenized by preparation.py's workers into files of their own in KEY.parts/, then
joined, in the order of the source, into one stream KEY.<tag>.bin that the JSON names. A build
stopped at any moment (a kill, a signal, a dead worker) goes on from the pieces done, to the same
bytes; a learned tokenizer is saved in KEY.parts/ before the first piece for the same reason. A
source whose files changed keeps the ids of the unchanged ones (the tokenizer stays the one they
were made with, except a char vocabulary, which new text may extend) and tokenizes only the
others. The old stream and the pieces go once the new JSON is written; a build that fails before
any piece is done leaves no KEY.parts/ behind. Lone surrogates replaced in the text are counted
and named in one note. What a cache is on disk is cachefiles.py's business; when one is built,
tokencache.py's.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gpt_train.atomic import atomic_write
from gpt_train.cachefiles import (CHUNK_BYTES, DOCUMENT_CACHE_FORMAT, cache_key, same_file,
                                  token_dtype, write_json)
from config import fail
from gpt_train.documents import file_pieces, piece_documents
from gpt_train.preparation import piece_characters, prepare_pieces, tokenize_piece
from gpt_train.tokenizer import (SAMPLE_BYTES, BPETokenizer, ByteTokenizer, CharTokenizer,
                                 tokenizer_from_state)


class Build(NamedTuple):
    """What every piece of one build shares: the tokenizer's state, the ids' dtype, and the
    directory of the piece files."""

    tokenizer: dict
    dtype: str
    parts: Path


def build_document_cache(settings, source, tokenizer, previous, cache_path):
    """Tokenize what `previous` (a complete cache of an earlier state of the source, or None)
    lacks into piece files, join them (and `previous`'s ids of unchanged files) into one stream,
    then write the JSON that names it; return the JSON."""
    parts = cache_path.with_suffix(".parts")
    parts.mkdir(exist_ok=True)
    try:
        if tokenizer is None and previous is not None and settings.kind != "char":
            tokenizer = tokenizer_from_state(previous["tokenizer"])  # its ids stay valid
        tokenizer = tokenizer or document_tokenizer(settings, source, parts)
        build = Build(tokenizer.state_dict(), np.dtype(token_dtype(tokenizer.vocab_size)).name,
                      parts)
        plan = reused_segments(source, previous, build)
        tokenize_pieces(settings, source, build, plan)
        return join_stream(cache_path, settings, source, build, plan, previous)
    except BaseException:
        if not any(parts.glob("*.bin")):  # nothing done that a rerun could go on from
            shutil.rmtree(parts, ignore_errors=True)
        raise


def reused_segments(source, previous, build):
    """{file index: ("previous", offset, count)} for each file whose ids `previous` holds as
    they would be made now: the file unchanged, the same tokenizer and dtype."""
    if previous is None or (previous["tokenizer"], previous["dtype"]) != build[:2]:
        return {}
    saved = {entry["path"]: (entry, segment)
             for entry, segment in zip(previous["fingerprint"], previous["segments"])}
    plan = {}
    for index, entry in enumerate(source.fingerprint):
        if entry["path"] in saved and same_file(saved[entry["path"]][0], entry):
            plan[index] = ("previous", *saved[entry["path"]][1])
    return plan


def tokenize_pieces(settings, source, build, plan):
    """Tokenize every piece of the files `plan` lacks into `build.parts`, filling in `plan`
    with ("parts", [piece files]) for each; pieces an earlier build finished are kept."""
    todo = [index for index in range(len(source.files)) if index not in plan]
    tokenizer_tag = cache_key(build.tokenizer)  # once: the JSON of a 32k BPE is 1.7 MB
    tags = {index: cache_key([json.dumps(source.fingerprint[index], sort_keys=True),
                              tokenizer_tag, settings.text_field, settings.piece_bytes])
            for index in todo}
    wanted = set(tags.values())  # a piece file is <tag>-<index>.bin
    kept = sum(1 for part in build.parts.glob("*.bin") if part.name.split("-")[0] in wanted)
    total = sum(source.files[index].stat().st_size for index in todo)
    print(f"token cache: tokenizing {len(todo)} of {len(source.files)} file(s) of "
          f"{settings.source} ({total / 1e6:,.1f} MB) on {settings.processes} process(es)"
          + (f"; {kept} piece(s) finished by an earlier preparation are kept" if kept else ""))
    jobs = piece_jobs(settings, source, build, tags, plan)
    surrogates, first = 0, None
    for _, replaced, where, _ in prepare_pieces(tokenize_piece, jobs, settings.processes, total):
        surrogates, first = surrogates + replaced, first or where
    if surrogates:
        print(f"note: {surrogates:,} lone surrogate escape(s) in the text of {settings.source} "
              f"(\\ud800 to \\udfff: half of a UTF-16 pair, not a character) were replaced by "
              f"U+FFFD; the first in {first}", file=sys.stderr)  # notes go to stderr


def piece_jobs(settings, source, build, tags, plan):
    """The tokenize job of each piece of the files in `tags`. A piece file's name says which
    file (as it is now), tokenizer and cut it is of."""
    state_json = json.dumps(build.tokenizer)  # once per build, not once per piece
    for index, tag in tags.items():
        plan[index] = ("parts", [])
        for piece in file_pieces(index, source.kind, source.files[index], settings.piece_bytes):
            part = build.parts / f"{tag}-{piece.index:06d}.bin"
            plan[index][1].append(part)
            yield {"piece": piece, "part": str(part), "tokenizer": state_json,
                   "dtype": build.dtype, "text_field": settings.text_field,
                   "done": part.is_file()}


def join_stream(cache_path, settings, source, build, plan, previous):
    """Write the one stream of ids in the order of the files, then its JSON; the previous stream
    and the piece files go once the JSON names the new stream."""
    itemsize = np.dtype(build.dtype).itemsize
    name = f"{cache_path.name}.{cache_key([source.fingerprint, build.tokenizer])}.bin"
    segments, offset = [], 0
    with atomic_write(cache_path.with_name(name)) as out:
        for index in range(len(source.files)):
            if plan[index][0] == "previous":
                _, start, count = plan[index]
                with open(cache_path.with_name(previous["stream"]), "rb") as handle:
                    handle.seek(start * itemsize)
                    copy(handle, out, count * itemsize)
            else:
                count = sum(copy_file(part, out) for part in plan[index][1]) // itemsize
            segments.append([offset, count])
            offset += count
        if offset == 0:  # every piece is empty: nothing worth keeping
            shutil.rmtree(build.parts, ignore_errors=True)
            fail(f"data {settings.path} holds no documents: every line is blank or its text "
                 f"null (--text_field {settings.text_field})")
    meta = {"format": DOCUMENT_CACHE_FORMAT, "source": settings.source,
            "fingerprint": source.fingerprint, "segments": segments, "stream": name,
            "dtype": build.dtype, "num_tokens": offset, "tokenizer": build.tokenizer}
    write_json(cache_path.with_suffix(".json"), meta)
    for old in cache_path.parent.glob(f"{cache_path.name}.*.bin"):
        if old.name != name:
            old.unlink(missing_ok=True)
    shutil.rmtree(build.parts, ignore_errors=True)
    return meta


def copy_file(path, out):
    with open(path, "rb") as handle:
        return copy(handle, out)


def copy(source, out, count=None, block=CHUNK_BYTES):
    """Copy `count` bytes (all the rest, if None) from one open file to another; return how many."""
    copied = 0
    while count is None or copied < count:
        data = source.read(block if count is None else min(block, count - copied))
        if not data:
            break
        out.write(data)
        copied += len(data)
    return copied


def document_tokenizer(settings, source, parts):
    """The tokenizer of a new document corpus, with an end-of-text id; saved in `parts` so that a
    build stopped after it was made goes on with the same one."""
    saved = parts / "tokenizer.json"
    if saved.is_file():
        return tokenizer_from_state(json.loads(saved.read_text()))
    if settings.kind == "byte":
        tokenizer = ByteTokenizer(end_of_text=True)
    elif settings.kind == "bpe":
        print(f"token cache: learning a BPE tokenizer of {settings.bpe_vocab_size} tokens from "
              f"documents spread over {settings.source}")
        tokenizer = BPETokenizer.train(training_sample(settings, source), settings.bpe_vocab_size,
                                       end_of_text=True)
    else:
        tokenizer = document_characters(settings, source)
    write_json(saved, tokenizer.state_dict())
    return tokenizer


def all_pieces(settings, source):
    for index, file in enumerate(source.files):
        yield from file_pieces(index, source.kind, file, settings.piece_bytes)


def document_characters(settings, source):
    """The char tokenizer of a corpus: its distinct characters, gathered by every process."""
    jobs = ({"piece": piece, "text_field": settings.text_field}
            for piece in all_pieces(settings, source))
    total = sum(f.stat().st_size for f in source.files)
    found = [code_points for code_points, _ in
             prepare_pieces(piece_characters, jobs, settings.processes, total,
                            description="reading its characters")]
    code_points = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.uint32)
    if len(code_points) == 0:
        fail(f"data {settings.path} holds no text")
    return CharTokenizer("".join(map(chr, code_points)), end_of_text=True)


def training_sample(settings, source, most_pieces=32):
    """The documents BPE learns from: the leading ones of up to `most_pieces` pieces spread evenly
    over the training part (the first 1 - val_fraction of the source's bytes), SAMPLE_BYTES in
    all, so a corpus of any size trains in seconds."""
    budget = (1.0 - settings.val_fraction) * sum(f.stat().st_size for f in source.files)
    kept, stride, seen = [], 1, 0
    for number, piece in enumerate(all_pieces(settings, source)):
        if seen >= budget:
            break
        seen += piece.size
        if number % stride == 0:
            kept.append((number, leading_documents(piece, settings.text_field,
                                                   SAMPLE_BYTES // most_pieces)))
            while len(kept) > most_pieces:  # keep every other one, and take half as many
                stride *= 2
                kept = [entry for entry in kept if entry[0] % stride == 0]
    return [text for _, texts in kept for text in texts]


def leading_documents(piece, text_field, budget_bytes):
    texts, size = [], 0
    for text in piece_documents(piece, text_field).texts:
        if size >= budget_bytes:
            break
        texts.append(text)
        size += len(text)
    return texts
