"""Tokenizers: text <-> integer ids, saved inside every checkpoint as plain data.

Three kinds share one small interface (`encode`, `decode`, `vocab_size`, `state_dict`):
- `CharTokenizer`: one id per distinct character of the corpus, in sorted order.
- `ByteTokenizer`: the 256 UTF-8 byte values; encodes any text.
- `BPETokenizer`: byte-level BPE trained with the optional `tokenizers` package; any text
  encodes, and a large corpus is sampled evenly so training takes seconds. A pretrained
  byte-level BPE (GPT-2's `tokenizer.json`, say) is one too; a `tokenizers` file of another kind
  (WordLevel, WordPiece, Unigram, a BPE over words) is refused naming it, as is one whose ids do
  not decode to the text they came from (`check_byte_level_bpe`, `ROUND_TRIP`).
The end-of-text token. A corpus of documents (jsonl, parquet) keeps them apart with an id that no
text encodes to, `end_of_text`; a tokenizer built from plain text has none (None), so a text run
and every tokenizer saved before it existed stay exactly as they were. The id comes after the
vocabulary (char: len(chars), byte: 256, trained BPE: its size, written into its JSON as the
special token `<|endoftext|>`), except in a pretrained BPE, which names its own (GPT-2's 50256).
The state dict carries the key only when the id is set. Its piece is empty: it stands for no
text, so bits per byte count only the documents' own bytes.
Every tokenizer also knows the bytes of each id (`pieces`), so decoding is one rule for all three
and a stream of ids can be printed as it is generated (`StreamDecoder`), and can write itself as a
`tokenizers` JSON file that encodes to the same ids (`hugging_face_json`, for export.py). This
module is shared by dataset.py (encoding corpora), sample.py and evaluate.py (decoding); it reads
no files.
"""

import codecs
import json
import os
import queue
import re
import threading

import numpy as np

from config import fail


class CharTokenizer:
    kind = "char"

    def __init__(self, chars, end_of_text=False):
        self.chars = "".join(sorted(set(chars)))
        self.code_points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.pieces = [c.encode("utf-8") for c in self.chars]
        self.end_of_text = len(self.chars) if end_of_text else None
        if end_of_text:
            self.pieces.append(b"")

    @property
    def vocab_size(self):
        return len(self.pieces)

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
        return "".join(self.chars[i] for i in ids if i != self.end_of_text)

    def state_dict(self):
        return with_end_of_text_key({"kind": self.kind, "chars": self.chars}, self.end_of_text)

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
        return json_with_end_of_text(backend, self.end_of_text)


class ByteTokenizer:
    kind = "byte"

    def __init__(self, end_of_text=False):
        self.pieces = [bytes([i]) for i in range(256)] + ([b""] if end_of_text else [])
        self.end_of_text = 256 if end_of_text else None

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):
        return bytes(int(i) for i in ids if i != self.end_of_text).decode("utf-8", errors="replace")

    def state_dict(self):
        return with_end_of_text_key({"kind": self.kind}, self.end_of_text)

    def hugging_face_json(self):
        """A `tokenizers` JSON file with our ids: byte-level BPE with no merges, so each UTF-8 byte
        is one token and the id of byte b is b, whatever the text."""
        tokenizers = import_tokenizers("exporting a byte-level tokenizer")
        from tokenizers import decoders, models, pre_tokenizers

        backend = tokenizers.Tokenizer(models.BPE(_byte_level_alphabet(), merges=[]))
        # without merges there is nothing to keep apart, so the text need not be split into words
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return json_with_end_of_text(backend, self.end_of_text)


END_OF_TEXT = "<|endoftext|>"  # the end-of-text token's name, as GPT-2's
# what pretrained tokenizers call theirs (GPT-2 and most byte-level BPEs, Llama 3, Llama 2, Gemma)
END_OF_TEXT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def with_end_of_text_key(state, end_of_text):
    """A tokenizer's state, with the end-of-text id only where there is one: a tokenizer without
    it saves exactly what it saved before the token existed."""
    return state if end_of_text is None else {**state, "end_of_text": end_of_text}


def json_with_end_of_text(backend, end_of_text):
    """The `tokenizers` JSON of `backend`, with `<|endoftext|>` added as a special token at our id
    (the next free one, after the vocabulary) where the tokenizer has one."""
    if end_of_text is not None:
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
        if backend.token_to_id(END_OF_TEXT) != end_of_text:
            raise ValueError(f"{END_OF_TEXT} took id {backend.token_to_id(END_OF_TEXT)}, "
                             f"not {end_of_text}")
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


# Text a byte-level BPE must give back byte for byte: spaces (runs of them), a tab, capitals
ROUND_TRIP = "Two  spaces, a\ttab, CAPITALS and\nnew lines.\n"
NOT_SUPPORTED = ("only byte-level BPE tokenizers (as GPT-2's tokenizer.json) are supported: their "
                 "ids decode to the text's own bytes; or train with --tokenizer char, byte or bpe")


def check_byte_level_bpe(backend, tokenizer_json):
    """Refuse, in one line naming it, a `tokenizers` file of another kind: a WordLevel,
    WordPiece or Unigram model, or a BPE over words rather than bytes, would drop the spaces
    between its tokens and count the wrong bytes."""
    model = type(backend.model).__name__
    if model != "BPE":
        fail(f"the tokenizer is a {model} model, not a byte-level BPE; {NOT_SUPPORTED}")
    pre_tokenizer = json.loads(tokenizer_json).get("pre_tokenizer")
    if "ByteLevel" not in pre_tokenizer_types(pre_tokenizer):
        kinds = " + ".join(map(str, pre_tokenizer_types(pre_tokenizer))) or "none"
        fail(f"the tokenizer is a BPE over words, not bytes (its pre-tokenizer: {kinds}); "
             f"{NOT_SUPPORTED}")


def pre_tokenizer_types(pre_tokenizer):
    """The types of a pre-tokenizer's JSON, those inside a Sequence included."""
    if not isinstance(pre_tokenizer, dict):
        return []
    inner = pre_tokenizer.get("pretokenizers") or []
    return [pre_tokenizer.get("type")] if not inner else \
        [kind for part in inner for kind in pre_tokenizer_types(part)]


class BPETokenizer:
    """Byte-level BPE, as GPT-2: text becomes UTF-8 bytes, the 256 bytes are ids, and learned
    merges of frequent neighbours add the rest. Any text encodes, and decodes back exactly.

    The trained tokenizer is the `tokenizers` library's JSON text, which is what a checkpoint
    stores. Training and encoding run in the library's Rust code, on all cores.
    """

    kind = "bpe"

    def __init__(self, tokenizer_json, end_of_text=None, source=None):
        """`end_of_text`: the id that ends each document, if any; `source`: where a pretrained
        tokenizer came from (a --tokenizer value), saved so a resumed run can be given it again."""
        tokenizers = import_tokenizers()
        self.tokenizer_json, self.end_of_text, self.source = tokenizer_json, end_of_text, source
        try:
            self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # the library raises a bare Exception for a malformed file
            fail(f"the saved BPE tokenizer is damaged: {error}")
        check_byte_level_bpe(self.backend, tokenizer_json)
        byte_of = _byte_level_alphabet()
        vocab = self.backend.get_vocab()
        if sorted(vocab.values()) != list(range(len(vocab))) or \
                any(c not in byte_of for token in vocab for c in token):
            fail("the saved BPE tokenizer is not a byte-level BPE vocabulary")
        # pieces[id] is the bytes the id stands for: decoding joins them, streaming feeds them
        self.pieces = [b""] * len(vocab)
        for token, index in vocab.items():
            self.pieces[index] = bytes(byte_of[c] for c in token)
        if end_of_text is not None:
            if not 0 <= end_of_text < len(vocab):
                fail(f"the saved BPE tokenizer's end-of-text id {end_of_text} is outside its "
                     f"vocabulary of {len(vocab)}")
            self.pieces[end_of_text] = b""  # it stands for no text
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20)
        self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.literal_backend = None  # for documents: made on first use (see encode_documents)
        probe = self.backend.encode(ROUND_TRIP, add_special_tokens=False).ids
        if b"".join(self.pieces[i] for i in probe) != ROUND_TRIP.encode():
            fail(f"the BPE tokenizer does not read text back as it was ({ROUND_TRIP!r} comes back "
                 f"as {b''.join(self.pieces[i] for i in probe).decode(errors='replace')!r}): "
                 f"a normalizer or a prefix space changes the text, which this tool's bits per "
                 f"byte and decoding cannot follow")

    @classmethod
    def train(cls, chunks, vocab_size, sample_bytes=SAMPLE_BYTES, end_of_text=False):
        """Learn `vocab_size` - 256 merges from the text `chunks` (an iterable of str); with
        `end_of_text`, one merge fewer, and `<|endoftext|>` is the last of the `vocab_size` ids.

        A corpus larger than `sample_bytes` is sampled evenly (`even_sample`), so training on
        100 MB takes about as long as training on `sample_bytes`.
        """
        if vocab_size < 256 + end_of_text:
            fail(f"--bpe_vocab_size must be at least {256 + end_of_text} (the 256 byte values"
                 f"{' and the end-of-text token' if end_of_text else ''}), got {vocab_size}")
        vocab_size -= end_of_text
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
        if not end_of_text:
            return cls(backend.to_str())
        end_of_text_id = backend.get_vocab_size()
        return cls(json_with_end_of_text(backend, end_of_text_id), end_of_text_id)

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        """Ids of `text` as an int64 array; a long text is encoded as pieces, in parallel."""
        encodings = self._encode_batch(split_at_line_starts(text), add_special_tokens=False)
        return np.concatenate([np.array(e.ids, dtype=np.int64) for e in encodings])

    def encode_documents(self, texts):
        """The ids of each text followed by the end-of-text id, as one int64 array. The text is
        read literally: a document that contains `<|endoftext|>` does not end there."""
        if self.literal_backend is None:
            self.literal_backend = type(self.backend).from_str(self.tokenizer_json)
            self.literal_backend.encode_special_tokens = True
        encode = getattr(self.literal_backend, "encode_batch_fast",
                         self.literal_backend.encode_batch)
        documents = off_the_main_thread(
            lambda: [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)])
        ids = np.empty(sum(map(len, documents)) + len(documents), dtype=np.int64)
        position = 0
        for document in documents:  # one copy per document, not per token
            ids[position:position + len(document)] = document
            ids[position + len(document)] = self.end_of_text
            position += len(document) + 1
        return ids

    def decode(self, ids):
        return b"".join(self.pieces[int(i)] for i in ids).decode("utf-8", errors="replace")

    def state_dict(self):
        state = with_end_of_text_key({"kind": self.kind, "json": self.tokenizer_json},
                                     self.end_of_text)
        return state if self.source is None else {**state, "source": self.source}

    def known_end_of_text(self):
        """The id of a special token that conventionally ends a document (GPT-2's
        `<|endoftext|>`, Llama's `</s>`, ...), or None: what a document corpus uses when this
        tokenizer was saved without an end-of-text id of its own."""
        special = {token.content for token in self.backend.get_added_tokens_decoder().values()
                   if token.special}
        for name in END_OF_TEXT_NAMES:
            if name in special:
                return self.backend.token_to_id(name)
        return None

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
            return CharTokenizer(chars, end_of_text=saved_end_of_text(state, len(chars)))
        if kind == "byte":
            return ByteTokenizer(end_of_text=saved_end_of_text(state, 256))
        if kind == "bpe":
            json.loads(state["json"])
            end_of_text = state.get("end_of_text")
            if end_of_text is not None and (type(end_of_text) is not int):
                raise TypeError(f"'end_of_text' must be an id, got {end_of_text!r}")
            return BPETokenizer(state["json"], end_of_text, state.get("source"))
    except (KeyError, TypeError, ValueError) as error:
        fail(f"the checkpoint's {kind} tokenizer is damaged: {type(error).__name__}: {error}")
    fail(f"unknown tokenizer in checkpoint: {kind!r}")


def saved_end_of_text(state, expected):
    """Whether a char or byte state has the end-of-text id, which is always the one after the
    vocabulary (`expected`)."""
    if "end_of_text" not in state:
        return False
    if state["end_of_text"] != expected:
        raise ValueError(f"'end_of_text' must be {expected}, the id after the vocabulary, "
                         f"got {state['end_of_text']!r}")
    return True


def tokenizer_for_documents(tokenizer):
    """`tokenizer` with an end-of-text id to keep documents apart: its own, or the special token a
    pretrained BPE has for it (GPT-2's, whose saved state predates ours). A vocabulary without one
    cannot grow one under a model trained with it."""
    if tokenizer.end_of_text is not None:
        return tokenizer
    if tokenizer.kind == "bpe" and tokenizer.known_end_of_text() is not None:
        return BPETokenizer(tokenizer.tokenizer_json, tokenizer.known_end_of_text(),
                            tokenizer.source)
    origin = f" (--tokenizer {tokenizer.source})" if getattr(tokenizer, "source", None) else ""
    fail(f"this {tokenizer.kind} tokenizer{origin} has no end-of-text token to keep the documents "
         f"of --data apart, and a model trained with it cannot grow one: give plain text as "
         f"--data, or train a new model with a tokenizer that has one")


ENCODER = {}  # this process's encoding thread: {"pid": ..., "jobs": its queue}


def off_the_main_thread(function):
    """`function()`, called on a thread of this process's own (one, kept for later calls) where
    this is the main thread. The `tokenizers` library's sequential encoder (the one a process
    without the library's own threads runs) took about 1.4 times the CPU time on the main thread as
    on another on this project's machine (Linux, Python 3.11, tokenizers 0.23: 9.2 against 6.4 s
    for three 8 MB pieces); the ids are the same."""
    if threading.current_thread() is not threading.main_thread():
        return function()
    if ENCODER.get("pid") != os.getpid():  # none yet, or the parent's (a forked worker has none)
        jobs = queue.SimpleQueue()
        threading.Thread(target=serve_encoding, args=(jobs,), name="encode", daemon=True).start()
        ENCODER.update(pid=os.getpid(), jobs=jobs)
    done = queue.SimpleQueue()
    ENCODER["jobs"].put((function, done))
    succeeded, value = done.get()
    if not succeeded:
        raise value
    return value


def serve_encoding(jobs):
    while True:
        function, done = jobs.get()
        try:
            done.put((True, function()))
        except BaseException as error:  # raised again on the calling thread
            done.put((False, error))


def encode_documents(tokenizer, texts):
    """The ids of each text followed by the tokenizer's end-of-text id, as one int64 array: how a
    corpus of documents is tokenized. The documents are encoded as one text where that gives the
    same ids (char and byte), and the end-of-text ids put in between."""
    if tokenizer.kind == "bpe":
        return tokenizer.encode_documents(texts)
    texts = list(texts)
    if tokenizer.kind == "char":
        lengths = [len(text) for text in texts]
        ids = tokenizer.encode("".join(texts))
    else:  # bytes: the text's UTF-8 encoding is its ids
        encoded = [text.encode("utf-8") for text in texts]
        lengths = [len(text) for text in encoded]
        ids = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64)
    return np.insert(ids, np.cumsum(lengths, dtype=np.int64), tokenizer.end_of_text)


class StreamDecoder:
    """Turns ids into text one at a time, holding back a UTF-8 character until it is complete."""

    def __init__(self, tokenizer):
        self.pieces = tokenizer.pieces
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.decoder.decode(self.pieces[int(token_id)])

    def flush(self):
        return self.decoder.decode(b"", final=True)
