"""Documents: what a --data path names, cut into pieces, and the texts of a piece's documents.

`corpus_files` says what a --data path names: plain text (a UTF-8 file, or a directory of *.txt:
one stream, which textcache.py reads) or a corpus of documents:
- `.jsonl` or `.jsonl.gz`: one JSON object per line, its text under the key --text_field;
- `.parquet`: one document per row, its text in the column --text_field (needs `pyarrow`);
- a directory or a glob (`shards/*.parquet`) of such shards, all of one kind, in sorted order.
A directory holding both *.txt and shards is refused: which of them is the corpus is the user's
to say (a README.txt beside the shards, or one stray .jsonl among notes, would otherwise be read
alone). A document corpus is cut into pieces that processes tokenize independently, and that a
killed preparation need not repeat: byte ranges of a .jsonl ending at line ends, a few row groups
of a .parquet, and consecutive lines of a .jsonl.gz (which cannot be entered in the middle, so
its pieces are read here, in one pass, and handed over as bytes). A lone surrogate escape in a
.jsonl ("\\ud800": valid JSON, not a character) is replaced by U+FFFD and counted. A source that
cannot be read is one line naming it (`open_source`). How the tokens are cached is the token
cache's business (tokencache.py); which tokenizer encodes them, tokenizer.py's.
"""

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from config import fail
from gpt_train.cli import raise_os_failure

DOCUMENT_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".parquet": "parquet"}
PIECE_BYTES = 8 << 20  # the source text a piece holds: a few seconds of one core's work
READ_BYTES = 1 << 20  # how much of a .jsonl.gz is decompressed at a time
TEXT = "text"  # the kind of a plain-text corpus
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half a UTF-16 pair: no UTF-8 encoding exists


@dataclass(frozen=True)
class Piece:
    """Piece `index` of file `file_index` of a corpus: bytes [start, stop) of a .jsonl or of a
    .jsonl.gz's decompressed text (then `payload` holds them), or row groups [start, stop) of a
    .parquet. `size` is the share of the file's bytes on disk it stands for (for progress)."""

    file_index: int
    index: int
    kind: str
    path: str
    start: int
    stop: int
    size: int
    payload: bytes = None


def document_kind(path):
    """"jsonl", "jsonl.gz" or "parquet" for a file name with that ending, else None."""
    name = str(path).lower()
    for suffix, kind in DOCUMENT_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def corpus_files(path):
    """(kind, files) of what a --data path names: kind "text" (a file, or a directory's *.txt in
    sorted order: one stream of text) or "jsonl", "jsonl.gz" or "parquet" (documents)."""
    source = Path(path)
    if source.is_dir():
        return directory_files(source, path)
    if source.is_file():
        return document_kind(source) or TEXT, [source]
    if not source.exists() and glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            fail(f"--data {path} matches no files")
        return one_kind(files, path)
    if not source.exists():
        fail(f"data file not found: {path}")
    # /dev/null, a pipe: a cache needs a file it can fingerprint
    fail(f"--data {path} is not a regular file; give a text file or a directory of *.txt")


def directory_files(source, path):
    """A directory's *.txt, or its shards of documents; both at once is refused (see above)."""
    texts = sorted(p for p in source.glob("*.txt") if p.is_file())
    shards = sorted(p for p in source.iterdir() if p.is_file() and document_kind(p))
    if texts and shards:
        shard_kinds = sorted({f"*.{document_kind(p)}" for p in shards})
        fail(f"data directory {path} holds both text files ({names(texts)}) and shards of "
             f"documents ({names(shards)}): which is the corpus? Move the others out, or name "
             f"the shards with a glob: --data '{source / shard_kinds[0]}'")
    if shards:
        return one_kind(shards, path)
    if not texts:
        fail(f"data directory {path} has no *.txt, *.jsonl, *.jsonl.gz or *.parquet files")
    return TEXT, texts


def names(files, shown=3):
    listed = ", ".join(f.name for f in files[:shown])
    return listed + (f" and {len(files) - shown} more" if len(files) > shown else "")


def is_documents(path):
    """Whether a --data path names a corpus of documents (rather than plain text)."""
    return corpus_files(path)[0] != TEXT


def one_kind(files, path):
    kinds = sorted({document_kind(f) for f in files}, key=str)
    if kinds == [None]:
        fail(f"--data {path}: a glob names shards of documents (*.jsonl, *.jsonl.gz or "
             f"*.parquet); for *.txt give their directory")
    if len(kinds) > 1:
        shown = ", ".join(f"*.{kind}" if kind else "other files" for kind in kinds)
        fail(f"--data {path} holds shards of several kinds ({shown}); keep one kind together")
    return kinds[0], files


def open_source(path):
    """`path` open for reading in binary; a file that cannot be read is one line naming it (a
    failing disk is the machine's, exit status 1; anything else, the user's)."""
    try:
        return open(path, "rb")
    except OSError as error:
        unreadable(path, error)


def unreadable(path, error):
    raise_os_failure(f"cannot read {path}: {error.strerror or first_line(error)}", error)


def import_parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        fail("reading .parquet needs the 'pyarrow' package, which is not installed: "
             "pip install pyarrow")
    return pyarrow.parquet


def open_parquet(path):
    try:
        return import_parquet().ParquetFile(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        fail(f"{path} is not a readable parquet file: {first_line(error)}")


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def file_pieces(file_index, kind, path, piece_bytes=PIECE_BYTES):
    """The pieces of one file, in order; a .jsonl.gz's carry their bytes (see the docstring)."""
    if kind == "jsonl":
        yield from jsonl_pieces(file_index, path, piece_bytes)
    elif kind == "jsonl.gz":
        yield from gzip_pieces(file_index, path, piece_bytes)
    else:
        yield from parquet_pieces(file_index, path, piece_bytes)


def jsonl_pieces(file_index, path, piece_bytes):
    size = os.path.getsize(path)
    start, index = 0, 0
    with open_source(path) as handle:
        while start < size:
            handle.seek(min(start + piece_bytes, size))
            handle.readline()  # on to the end of the line the cut falls in
            stop = min(handle.tell(), size)
            yield Piece(file_index, index, "jsonl", str(path), start, stop, stop - start)
            start, index = stop, index + 1


def gzip_pieces(file_index, path, piece_bytes):
    """Consecutive lines of at least `piece_bytes` decompressed bytes (the last may be shorter)."""
    with open_source(path) as raw:
        try:
            with gzip.GzipFile(fileobj=raw) as text:
                start, index, held, read_at = 0, 0, b"", 0
                while True:
                    block = text.read(READ_BYTES)
                    held += block
                    # a piece ends at a line end (or the file's end): never inside a document
                    cut = held.rfind(b"\n") + 1 if block else len(held)
                    if cut and (len(held) >= piece_bytes or not block):
                        piece, held = held[:cut], held[cut:]
                        yield Piece(file_index, index, "jsonl.gz", str(path), start,
                                    start + len(piece), raw.tell() - read_at, piece)
                        start, index, read_at = start + len(piece), index + 1, raw.tell()
                    if not block:
                        return
        except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
            fail(f"{path} is not a readable gzip file: {first_line(error)}")


def parquet_pieces(file_index, path, piece_bytes):
    """Runs of whole row groups of about `piece_bytes` of uncompressed data each."""
    metadata = open_parquet(path).metadata
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    on_disk, total = os.path.getsize(path), max(sum(sizes), 1)
    start, index, gathered = 0, 0, 0
    for group, size in enumerate(sizes):
        gathered += size
        if gathered >= piece_bytes or group == len(sizes) - 1:
            yield Piece(file_index, index, "parquet", str(path), start, group + 1,
                        on_disk * gathered // total)
            start, index, gathered = group + 1, index + 1, 0


class PieceText(NamedTuple):
    """The texts of a piece's documents, and the lone surrogates replaced in them (with where the
    first one was, for the note)."""

    texts: list
    surrogates: int = 0
    first_surrogate: str = None


def piece_documents(piece, text_field):
    """The texts of the documents in `piece`, in order (a PieceText)."""
    if piece.kind == "parquet":
        return PieceText(parquet_documents(piece, text_field))
    if piece.payload is not None:
        return jsonl_documents(piece.payload, piece, text_field)
    try:
        with open_source(piece.path) as handle:
            handle.seek(piece.start)
            data = handle.read(piece.stop - piece.start)
    except OSError as error:
        unreadable(piece.path, error)
    return jsonl_documents(data, piece, text_field)


def jsonl_documents(data, piece, text_field):
    """The --text_field of each JSON line of `data`; blank lines are skipped."""
    texts, offset, surrogates, first_surrogate = [], piece.start, 0, None
    for line in data.split(b"\n"):
        where = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        text = line_text(line, piece, where, text_field)
        if text is None:
            continue  # a null text: an empty row, as parquet's nulls
        if not text.isascii() and LONE_SURROGATE.search(text):
            text, count = LONE_SURROGATE.subn("\ufffd", text)
            surrogates += count
            first_surrogate = first_surrogate or f"{piece.path}, {line_name(piece, where)}"
        texts.append(text)
    return PieceText(texts, surrogates, first_surrogate)


def line_name(piece, offset):
    return f"the line at byte {offset}{' (decompressed)' * bool(piece.payload)}"


def line_text(line, piece, where, text_field):
    """The text of one JSON line (None for a null text); anything else is one line naming it."""
    try:
        document = json.loads(line)
    except ValueError as error:  # a UnicodeDecodeError is a ValueError too
        fail(f"{piece.path}: {line_name(piece, where)} is not a JSON object in UTF-8: "
             f"{first_line(error)}")
    text = document.get(text_field) if isinstance(document, dict) else None
    if text is None and isinstance(document, dict) and text_field in document:
        return None
    if not isinstance(text, str):
        keys = ", ".join(map(repr, list(document)[:8])) if isinstance(document, dict) else ""
        fail(f"{piece.path}: {line_name(piece, where)} has no text under {text_field!r} "
             f"(--text_field){f'; its keys: {keys}' if keys else ''}")
    return text


def parquet_documents(piece, text_field):
    parquet_file = open_parquet(piece.path)
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        fail(f"{piece.path} has no column {text_field!r} (--text_field); its columns: "
             f"{', '.join(columns[:12])}")
    texts = []
    try:
        for batch in parquet_file.iter_batches(batch_size=4096, columns=[text_field],
                                               row_groups=range(piece.start, piece.stop)):
            column = batch.column(0).to_pylist()  # (dictionary-encoded strings are strings too)
            if any(not isinstance(text, str) for text in column if text is not None):
                fail(f"{piece.path}: the column {text_field!r} (--text_field) holds "
                     f"{batch.schema.field(0).type}, not text")
            texts.extend(text for text in column if text is not None)
    except (OSError, ValueError) as error:  # a damaged page (pyarrow's ArrowInvalid: ValueError)
        fail(f"{piece.path} is damaged: row groups {piece.start} to {piece.stop - 1} cannot be "
             f"read: {first_line(error)}")
    return texts
