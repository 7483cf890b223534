"""Tokenizers: text <-> integer ids, saved inside every checkpoint as plain data.

Three kinds share one small interface (`encode`, `decode`, `vocab_size`, `state_dict`):
- `CharTokenizer`: one id per distinct character of the corpus, in sorted order.
- `ByteTokenizer`: the 256 UTF-8 byte values; encodes any text.
- `BPETokenizer`: byte-level BPE trained with the optional `tokenizers` package.
Every tokenizer also knows the bytes of each id (`pieces`), so decoding is one rule for all three
and a stream of ids can be printed as it is generated (`StreamDecoder`). This module is shared
by dataset.py (encoding corpora), sample.py and evaluate.py (decoding); it reads no files.
"""

import codecs
import json

import numpy as np

from config import fail


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.code_points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.pieces = [c.encode("utf-8") for c in self.chars]

    @classmethod
    def train(cls, chunks):
        seen = set()
        for chunk in chunks:
            seen.update(chunk)
        return cls("".join(seen))

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
            fail(f"the text has {len(missing)} character(s) that this char-level vocabulary has never "
                 f"seen: {shown}{more}; use --tokenizer byte (or bpe), which encodes any text")
        return ids.astype(np.int64)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state_dict(self):
        return {"kind": self.kind, "chars": self.chars}


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


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        fail("--tokenizer bpe needs the 'tokenizers' package: pip install tokenizers")
    return tokenizers


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tokenizer_json):
        tokenizers = _import_tokenizers()
        self.tokenizer_json = tokenizer_json
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        byte_of = _byte_level_alphabet()
        vocab = self.backend.get_vocab()
        self.pieces = [b""] * len(vocab)
        for token, index in vocab.items():
            self.pieces[index] = bytes(byte_of[c] for c in token)

    @classmethod
    def train(cls, chunks, vocab_size):
        tokenizers = _import_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        backend.train_from_iterator(chunks, trainer=trainer)
        return cls(backend.to_str())

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        return np.array(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids):
        return b"".join(self.pieces[int(i)] for i in ids).decode("utf-8", errors="replace")

    def state_dict(self):
        return {"kind": self.kind, "json": self.tokenizer_json}


def tokenizer_from_state(state):
    """Rebuild a tokenizer from the plain dict saved in a checkpoint."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        json.loads(state["json"])  # a damaged string fails here with a clear error upstream
        return BPETokenizer(state["json"])
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
