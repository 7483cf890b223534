"""Tokenizers: text <-> integer ids, saved inside every checkpoint as plain data.

Three kinds share one small interface (`encode`, `decode`, `vocab_size`, `state_dict`):
- `CharTokenizer`: one id per distinct character of the corpus, in sorted order.
- `ByteTokenizer`: the 256 UTF-8 byte values; encodes any text.
- `BPETokenizer`: byte-level BPE trained with the optional `tokenizers` package; any text
  encodes, and a large corpus is sampled evenly so training takes seconds.
Every tokenizer also knows the bytes of each id (`pieces`), so decoding is one rule for all three
and a stream of ids can be printed as it is generated (`StreamDecoder`), and can write itself as a
`tokenizers` JSON file that encodes to the same ids (`hugging_face_json`, for export.py). This
module is shared by dataset.py (encoding corpora), sample.py and evaluate.py (decoding); it reads
no files.
"""

import codecs
import json
import re

import numpy as np

from cli import fail


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.code_points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.pieces = [c.encode("utf-8") for c in self.chars]

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        """Ids of `text` as an int64 array; characters outside the vocabulary are a UserError."""
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self.code_points, code_points)
        ids = np.minimum(ids, len(self.code_points) - 1)
        unknown = self.code_points[ids] != code_points
        if unknown.any():
            missing = sorted({chr(c) for c in code_points[unknown]})
            shown = " ".join(repr(c) for c in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            fail(f"the text has {len(missing)} character(s) that this char-level vocabulary has "
                 f"never seen: {shown}{more}; a char-level model reads only the characters of the "
                 f"text it was built from, a model trained with --tokenizer byte or bpe reads any text")
        return ids.astype(np.int64)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state_dict(self):
        return {"kind": self.kind, "chars": self.chars}

    def hugging_face_json(self):
        """A `tokenizers` JSON file with our ids: a word-level model whose words are characters.

        Every code point is split off as a word of its own (`[\\s\\S]` matches any one, newlines
        included) with no normalizer, so whitespace and combining marks stay characters as they are
        here. The unknown token is left out of the vocabulary, so a character outside it is refused
        ("Missing [UNK] token"), as `encode` refuses it, rather than read as some other id.
        """
        tokenizers = import_tokenizers("exporting a char-level tokenizer")
        from tokenizers import Regex, decoders, models, pre_tokenizers

        vocabulary = {character: index for index, character in enumerate(self.chars)}
        backend = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()  # characters join with nothing between them
        return backend.to_str()


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256
    pieces = [bytes([i]) for i in range(256)]

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def state_dict(self):
        return {"kind": self.kind}

    def hugging_face_json(self):
        """A `tokenizers` JSON file with our ids: byte-level BPE with no merges, so each UTF-8 byte
        is one token and the id of byte b is b, whatever the text."""
        tokenizers = import_tokenizers("exporting a byte-level tokenizer")
        from tokenizers import decoders, models, pre_tokenizers

        backend = tokenizers.Tokenizer(models.BPE(_byte_level_alphabet(), merges=[]))
        # without merges there is nothing to keep apart, so the text need not be split into words
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return backend.to_str()


def _byte_level_alphabet():
    """GPT-2's map from the 256 bytes to printable characters, as byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = {}
    shift = 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + shift)
            shift += 1
    return {character: byte for byte, character in characters.items()}


def import_tokenizers(purpose="the BPE tokenizer"):
    try:
        import tokenizers
    except ImportError:
        fail(f"{purpose} needs the 'tokenizers' package, which is not installed: "
             f"pip install tokenizers")
    return tokenizers


# The byte-level pre-tokenizer splits text into words and BPE never merges across them. A lone
# newline between two non-space characters is a word of its own whether or not the text ends
# after it (a longer whitespace run would split differently at the end of a text), so text cut
# just after it encodes to the same ids as the whole: pieces can be encoded in parallel.
_LINE_START = re.compile(r"(?<=\S)\n(?=\S)")
PIECE_CHARS = 1 << 17  # the size pieces are cut to, in characters
SAMPLE_BYTES = 16 << 20  # BPE learns its merges from at most this much of the training text


def split_at_line_starts(text, size=PIECE_CHARS):
    """`text` as pieces of at least `size` characters (the last may be shorter), cut only at
    line starts (see above); a text without one is a single piece."""
    pieces, start = [], 0
    while len(text) - start > size:
        line_start = _LINE_START.search(text, start + size)
        if line_start is None:
            break
        pieces.append(text[start:line_start.end()])
        start = line_start.end()
    pieces.append(text[start:])
    return pieces


def even_sample(pieces, budget_bytes):
    """Every stride-th piece of a stream, the stride doubling whenever the kept pieces exceed
    `budget_bytes` of UTF-8: a sample spread evenly over a stream of unknown length.

    Merges are ranked by pair counts, and counts from an even sample rank the frequent pairs
    a vocabulary is made of the same way the whole text would, at a fraction of the time.
    """
    kept, kept_bytes, stride = [], 0, 1
    for index, piece in enumerate(pieces):
        if index % stride:
            continue
        size = len(piece.encode("utf-8"))
        kept.append((index, piece, size))
        kept_bytes += size
        while kept_bytes > budget_bytes and len(kept) > 1:
            stride *= 2
            kept = [entry for entry in kept if entry[0] % stride == 0]
            kept_bytes = sum(entry[2] for entry in kept)
    return [entry[1] for entry in kept]


class BPETokenizer:
    """Byte-level BPE, as GPT-2: text becomes UTF-8 bytes, the 256 bytes are ids, and learned
    merges of frequent neighbours add the rest. Any text encodes, and decodes back exactly.

    The trained tokenizer is the `tokenizers` library's JSON text, which is what a checkpoint
    stores. Training and encoding run in the library's Rust code, on all cores.
    """

    kind = "bpe"

    def __init__(self, tokenizer_json):
        tokenizers = import_tokenizers()
        self.tokenizer_json = tokenizer_json
        try:
            self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # the library raises a bare Exception for a malformed file
            fail(f"the saved BPE tokenizer is damaged: {error}")
        byte_of = _byte_level_alphabet()
        vocab = self.backend.get_vocab()
        if sorted(vocab.values()) != list(range(len(vocab))) or \
                any(c not in byte_of for token in vocab for c in token):
            fail("the saved BPE tokenizer is not a byte-level BPE vocabulary")
        # pieces[id] is the bytes the id stands for: decoding joins them, streaming feeds them
        self.pieces = [b""] * len(vocab)
        for token, index in vocab.items():
            self.pieces[index] = bytes(byte_of[c] for c in token)
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20)
        self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)

    @classmethod
    def train(cls, chunks, vocab_size, sample_bytes=SAMPLE_BYTES):
        """Learn `vocab_size` - 256 merges from the text `chunks` (an iterable of str).

        A corpus larger than `sample_bytes` is sampled evenly (`even_sample`), so training on
        100 MB takes about as long as training on `sample_bytes`.
        """
        if vocab_size < 256:
            fail(f"--bpe_vocab_size must be at least 256 (the 256 byte values), got {vocab_size}")
        tokenizers = import_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        pieces = (piece for chunk in chunks for piece in split_at_line_starts(chunk))
        backend.train_from_iterator(even_sample(pieces, sample_bytes), trainer=trainer)
        return cls(backend.to_str())

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        """Ids of `text` as an int64 array; a long text is encoded as pieces, in parallel."""
        encodings = self._encode_batch(split_at_line_starts(text), add_special_tokens=False)
        return np.concatenate([np.array(e.ids, dtype=np.int64) for e in encodings])

    def decode(self, ids):
        return b"".join(self.pieces[int(i)] for i in ids).decode("utf-8", errors="replace")

    def state_dict(self):
        return {"kind": self.kind, "json": self.tokenizer_json}

    def hugging_face_json(self):
        return self.tokenizer_json


# Any of the three: what a run, a checkpoint and generation hold.
Tokenizer = CharTokenizer | ByteTokenizer | BPETokenizer


def tokenizer_from_state(state):
    """Rebuild a tokenizer from the plain dict saved in a checkpoint; a damaged one is a UserError."""
    kind = state.get("kind") if isinstance(state, dict) else None
    try:
        if kind == "char":
            chars = state["chars"]
            # saved as the sorted distinct characters: anything else would renumber the ids
            if not isinstance(chars, str) or not chars or chars != "".join(sorted(set(chars))):
                raise ValueError(f"'chars' must be the sorted distinct characters of the corpus, "
                                 f"got {str(chars)[:40]!r}")
            return CharTokenizer(chars)
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            json.loads(state["json"])
            return BPETokenizer(state["json"])
    except (KeyError, TypeError, ValueError) as error:
        fail(f"the checkpoint's {kind} tokenizer is damaged: {type(error).__name__}: {error}")
    fail(f"unknown tokenizer in checkpoint: {kind!r}")


class StreamDecoder:
    """Turns ids into text one at a time, holding back a UTF-8 character until it is complete."""

    def __init__(self, tokenizer):
        self.pieces = tokenizer.pieces
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.decoder.decode(self.pieces[int(token_id)])

    def flush(self):
        return self.decoder.decode(b"", final=True)
