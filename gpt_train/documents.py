"""Documents: what a --data path names, cut into pieces, and the texts of a piece's documents.

A --data path is plain text (a UTF-8 file, or a directory of *.txt: one stream, as it always was,
which tokencache.py's text cache reads) or a corpus of documents:
- `.jsonl` or `.jsonl.gz`: one JSON object per line, its text under the key --text_field;
- `.parquet`: one document per row, its text in the column --text_field (needs `pyarrow`);
- a directory or a glob (`shards/*.parquet`) of such shards, all of one kind, in sorted order.
A document corpus is cut into pieces that processes tokenize independently, and that a killed
preparation need not repeat: byte ranges of a .jsonl ending at line ends, a few row groups of a
.parquet, and consecutive lines of a .jsonl.gz (which cannot be entered in the middle, so its
pieces are read here, in one pass, and handed over as bytes). How the tokens are cached is
tokencache.py's business; which tokenizer encodes them, tokenizer.py's.
"""

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from config import fail

DOCUMENT_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".parquet": "parquet"}
PIECE_BYTES = 8 << 20  # the source text a piece holds: a few seconds of one core's work
READ_BYTES = 1 << 20  # how much of a .jsonl.gz is decompressed at a time


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


def document_files(path):
    """(kind, files) of a document corpus, or None where `path` is plain text (a text file or a
    directory of *.txt, read as before documents existed)."""
    source = Path(path)
    if source.is_file():
        kind = document_kind(source)
        return None if kind is None else (kind, [source])
    if source.is_dir():
        if any(p.is_file() for p in source.glob("*.txt")):
            return None
        files = sorted(p for p in source.iterdir() if p.is_file() and document_kind(p))
        if not files:
            fail(f"data directory {path} has no *.txt, *.jsonl, *.jsonl.gz or *.parquet files")
        return one_kind(files, path)
    if not source.exists() and glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            fail(f"--data {path} matches no files")
        return one_kind(files, path)
    return None  # a missing file and the like: the text cache says what is wrong


def one_kind(files, path):
    kinds = sorted({document_kind(f) for f in files}, key=str)
    if kinds == [None]:
        fail(f"--data {path}: a glob names shards of documents (*.jsonl, *.jsonl.gz or "
             f"*.parquet); for *.txt give their directory")
    if len(kinds) > 1:
        shown = ", ".join(f"*.{kind}" if kind else "other files" for kind in kinds)
        fail(f"--data {path} holds shards of several kinds ({shown}); keep one kind together")
    return kinds[0], files


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
    with open(path, "rb") as handle:
        while start < size:
            handle.seek(min(start + piece_bytes, size))
            handle.readline()  # on to the end of the line the cut falls in
            stop = min(handle.tell(), size)
            yield Piece(file_index, index, "jsonl", str(path), start, stop, stop - start)
            start, index = stop, index + 1


def gzip_pieces(file_index, path, piece_bytes):
    """Consecutive lines of at least `piece_bytes` decompressed bytes (the last may be shorter)."""
    with open(path, "rb") as raw:
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


def piece_documents(piece, text_field):
    """The texts of the documents in `piece`, in order."""
    if piece.kind == "parquet":
        return parquet_documents(piece, text_field)
    if piece.payload is not None:
        return jsonl_documents(piece.payload, piece, text_field)
    with open(piece.path, "rb") as handle:
        handle.seek(piece.start)
        return jsonl_documents(handle.read(piece.stop - piece.start), piece, text_field)


def jsonl_documents(data, piece, text_field):
    """The --text_field of each JSON line of `data`; blank lines are skipped."""
    texts, offset = [], piece.start
    for line in data.split(b"\n"):
        where = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError as error:  # a UnicodeDecodeError is a ValueError too
            fail(f"{piece.path}: the line at byte {where}{' (decompressed)' * bool(piece.payload)}"
                 f" is not a JSON object in UTF-8: {first_line(error)}")
        text = document.get(text_field) if isinstance(document, dict) else None
        if text is None and isinstance(document, dict) and text_field in document:
            continue  # a null text: an empty row, as parquet's nulls
        if not isinstance(text, str):
            keys = ", ".join(map(repr, list(document)[:8])) if isinstance(document, dict) else ""
            fail(f"{piece.path}: the line at byte {where} has no text under {text_field!r} "
                 f"(--text_field){f'; its keys: {keys}' if keys else ''}")
        texts.append(text)
    return texts


def parquet_documents(piece, text_field):
    parquet_file = open_parquet(piece.path)
    names = parquet_file.schema_arrow.names
    if text_field not in names:
        fail(f"{piece.path} has no column {text_field!r} (--text_field); its columns: "
             f"{', '.join(names[:12])}")
    texts = []
    for batch in parquet_file.iter_batches(batch_size=4096, columns=[text_field],
                                           row_groups=range(piece.start, piece.stop)):
        column = batch.column(0).to_pylist()  # (dictionary-encoded strings are strings too)
        if any(not isinstance(text, str) for text in column if text is not None):
            fail(f"{piece.path}: the column {text_field!r} (--text_field) holds "
                 f"{batch.schema.field(0).type}, not text")
        texts.extend(text for text in column if text is not None)
    return texts
