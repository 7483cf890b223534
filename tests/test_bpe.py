"""The byte-level BPE tokenizer: exact round trips, its saved state, streaming, and BPE runs.

A BPE run pads the model's vocabulary to a multiple of 64 (train.py); sampling must never draw
one of the padded ids, which no tokenizer piece stands for (sample.py passes vocab_limit).
"""

import io
import json
import os
import select
import signal
import sys
import threading

import pytest
import torch

from gpt_train import tokencache
from gpt_train.cachefiles import CacheSettings
from gpt_train import generation
import sample
import train
from config import UserError
from conftest import TINY_TEXT, exit_status, one_error_line, tiny_argv, write_corpus
from gpt_train.tokenizer import (BPETokenizer, StreamDecoder, even_sample, off_the_main_thread,
                       split_at_line_starts, tokenizer_from_state)

pytest.importorskip("tokenizers")

CHINESE = "机器学习是人工智能的一个分支。深度学习使用多层神经网络。\n"
MIXED_CORPUS = TINY_TEXT + CHINESE * 40

TEXTS = {
    "ascii": "Hello, world! It's 3.14 -- isn't it?",
    "chinese": "你好，世界！机器学习很有趣。",
    "emoji": "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "mixed": "The 模型 learns 😀 from bytes: naïve café, Ωμέγα, Привет, 日本語, 한국어.",
    "whitespace runs": "a  b   c\t\td    \t e     ",
    "newlines": "one\ntwo\n\nthree\r\nfour\n\n\n  \n five\n",
    "unusual characters": "\x00\x01\x7f \u200b\ufeff \u00a0 \u2028 \U0010ffff combining e\u0301",
    "empty": "",
}


@pytest.fixture(scope="module")
def english_bpe():
    """Trained on English only: Chinese and emoji reach it as bytes it never merged."""
    return BPETokenizer.train([TINY_TEXT], 300)


@pytest.fixture(scope="module")
def mixed_bpe():
    """Trained on English and Chinese: it has merged pieces of multi-byte characters."""
    return BPETokenizer.train([MIXED_CORPUS], 400)


# ----------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("which", ["english_bpe", "mixed_bpe"])
def test_any_utf8_text_round_trips_exactly(name, which, request):
    tokenizer = request.getfixturevalue(which)
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert ids.dtype == "int64"
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    # the pieces are the text's exact bytes, not merely something that decodes to it
    assert b"".join(tokenizer.pieces[i] for i in ids) == text.encode("utf-8")


def test_the_first_256_pieces_of_the_vocabulary_cover_every_byte(english_bpe):
    single_bytes = {piece for piece in english_bpe.pieces if len(piece) == 1}
    assert single_bytes == {bytes([b]) for b in range(256)}
    assert len(set(english_bpe.pieces)) == english_bpe.vocab_size  # no two ids share a piece


def test_each_piece_is_what_the_library_decodes_its_id_to(mixed_bpe):
    checked = 0
    for index, piece in enumerate(mixed_bpe.pieces):
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: the library would print a replacement character
        assert mixed_bpe.backend.decode([index]) == text
        checked += 1
    assert checked > 128  # the ASCII bytes, and merged pieces too


def test_the_vocabulary_has_the_requested_size_when_the_text_allows(mixed_bpe):
    assert mixed_bpe.vocab_size == 400


def test_a_vocabulary_smaller_than_the_256_bytes_is_a_clear_error():
    with pytest.raises(UserError, match="bpe_vocab_size must be at least 256"):
        BPETokenizer.train([TINY_TEXT], 200)


def test_training_twice_on_the_same_text_gives_the_same_tokenizer():
    assert BPETokenizer.train([MIXED_CORPUS], 350).state_dict() == \
        BPETokenizer.train([MIXED_CORPUS], 350).state_dict()


def test_encoding_in_pieces_gives_the_ids_of_the_whole_text(mixed_bpe):
    # cut points next to whitespace runs, blank lines, CRLF and Chinese: none may change a word
    text = "".join(f"{TEXTS[name]}\n{i}  \n\nword\r\nline {i}\n 你好\n" for i in range(30)
                   for name in TEXTS)
    pieces = split_at_line_starts(text, 40)
    assert len(pieces) > 50 and "".join(pieces) == text
    whole = mixed_bpe.backend.encode(text, add_special_tokens=False).ids
    in_pieces = [i for piece in pieces for i in mixed_bpe.backend.encode(piece).ids]
    assert in_pieces == whole
    assert mixed_bpe.encode(text).tolist() == whole


def test_an_even_sample_stays_within_its_budget_and_spans_the_whole_stream():
    pieces = [f"{i:05d}" for i in range(1000)]  # 5 bytes each
    kept = even_sample(iter(pieces), budget_bytes=500)
    assert 250 <= 5 * len(kept) <= 500
    indices = [int(piece) for piece in kept]
    stride = indices[1] - indices[0]
    assert indices == list(range(0, 1000, stride))  # evenly spaced, first to last
    assert indices[-1] >= 1000 - stride
    assert even_sample(iter(pieces), budget_bytes=10**6) == pieces  # small text: all of it


# --------------------------------------------------------------------------- state and streaming

def test_the_saved_state_is_plain_json_text_that_rebuilds_an_identical_tokenizer(mixed_bpe,
                                                                                   tmp_path):
    state = mixed_bpe.state_dict()
    assert set(state) == {"kind", "json"} and isinstance(state["json"], str)
    json.loads(state["json"])
    torch.save({"tokenizer": state}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["tokenizer"]
    rebuilt = tokenizer_from_state(json.loads(json.dumps(loaded)))
    assert rebuilt.pieces == mixed_bpe.pieces
    assert rebuilt.state_dict() == state
    text = TEXTS["mixed"] + CHINESE
    assert rebuilt.encode(text).tolist() == mixed_bpe.encode(text).tolist()


def test_a_damaged_saved_state_is_a_clear_error():
    with pytest.raises(UserError, match="BPE tokenizer is damaged"):
        tokenizer_from_state({"kind": "bpe", "json": json.dumps({"model": "nonsense"})})


def test_the_stream_decoder_yields_the_same_text_as_decode_for_a_mixed_language_string(mixed_bpe):
    text = TEXTS["mixed"] + CHINESE + TEXTS["emoji"] + "龘龘 𝄞"  # the last two: never seen
    ids = mixed_bpe.encode(text)
    # the stream must hold back incomplete characters: some ids here are parts of one
    partial = [i for i in ids if not _is_utf8(mixed_bpe.pieces[i])]
    assert partial
    decoder = StreamDecoder(mixed_bpe)
    outputs = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(outputs) == mixed_bpe.decode(ids) == text
    assert not any("\ufffd" in output for output in outputs)


def _is_utf8(piece):
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------------- BPE runs

@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-run")
    data = write_corpus(root, MIXED_CORPUS)
    checkpoint_dir = root / "checkpoints"
    train.train(tiny_argv(checkpoint_dir, data, tokenizer="bpe", bpe_vocab_size=300, max_iters=4))
    return checkpoint_dir


def test_a_bpe_run_pads_the_model_vocabulary_to_a_multiple_of_64(bpe_run):
    checkpoint = torch.load(bpe_run / "gpt_final.pt", weights_only=True)
    tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    vocab_size = checkpoint["gpt_config"]["vocab_size"]
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == 300
    assert vocab_size % 64 == 0 and tokenizer.vocab_size <= vocab_size < tokenizer.vocab_size + 64
    assert checkpoint["model_state_dict"]["token_embedding.weight"].shape[0] == vocab_size


def padded_ids_made_likeliest(checkpoint_path, destination):
    """A copy of a checkpoint whose padded ids outscore every real id at every position.

    ln_f's gain is zeroed, so the final hidden state is its bias (all ones), and each logit is
    the sum of its (tied) embedding row: 10 per entry for the padded rows, about 0 for the rest.
    """
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    state = checkpoint["model_state_dict"]
    real = tokenizer_from_state(checkpoint["tokenizer"]).vocab_size
    state["ln_f.weight"].zero_()
    state["ln_f.bias"].fill_(1.0)
    state["token_embedding.weight"][real:] = 10.0
    state["lm_head.weight"] = state["token_embedding.weight"]
    torch.save(checkpoint, destination)
    return destination


def test_sampling_never_emits_a_padded_id_even_when_padded_ids_are_likeliest(
        bpe_run, tmp_path, monkeypatch, capsys):
    path = padded_ids_made_likeliest(bpe_run / "gpt_final.pt", tmp_path / "padded.pt")
    model, tokenizer, _ = sample.model_from_checkpoint(path)
    assert model.config.vocab_size > tokenizer.vocab_size
    # the edit works: the padded ids hold nearly all of the model's probability
    logits = model(torch.zeros((1, 1), dtype=torch.long)).logits[0, -1]
    assert logits.softmax(dim=-1)[tokenizer.vocab_size:].sum() > 0.99

    emitted = []

    class RecordingDecoder(StreamDecoder):
        def push(self, token_id):
            emitted.append(int(token_id))
            return super().push(token_id)

    monkeypatch.setattr(generation, "StreamDecoder", RecordingDecoder)
    sample.main(["--checkpoint", str(path), "--max_new_tokens", "300", "--temperature", "1.0",
                 "--device", "cpu", "--prompt", "the"])
    assert len(emitted) == 300
    assert max(emitted) < tokenizer.vocab_size
    assert capsys.readouterr().out.startswith("the")


def test_sample_streams_what_the_bpe_model_generates(bpe_run):
    model, tokenizer, _ = sample.model_from_checkpoint(bpe_run / "gpt_final.pt")
    stream = io.StringIO()
    generator = torch.Generator().manual_seed(0)
    text = generation.generate_text(model, tokenizer, "机器", 200, generator=generator, stream=stream)
    assert stream.getvalue() == text and len(text) > 0


# ------------------------------------------------------------------ the training split, the package

def test_bpe_never_learns_a_word_that_only_the_validation_split_contains(tmp_path):
    training_text = "the cat sat on the mat. " * 400
    validation_text = "zyxwvu " * 100  # 700 of 10,300 characters: inside the last 10%
    path = write_corpus(tmp_path, training_text + validation_text)
    tokenizer, _ = tokencache.cached_tokens(CacheSettings(str(path), "bpe", tmp_path / "cache",
                                                          val_fraction=0.1, bpe_vocab_size=300))
    assert not any(b"zyx" in piece for piece in tokenizer.pieces)


def test_without_the_tokenizers_package_a_bpe_run_names_it_and_exits_2(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    data = write_corpus(tmp_path)
    status = exit_status(train.train, tiny_argv(tmp_path / "checkpoints", data, tokenizer="bpe"))
    assert status == 2
    one_error_line(capsys.readouterr().err, "'tokenizers' package", "pip install tokenizers")


def test_without_the_tokenizers_package_sampling_a_bpe_checkpoint_names_it(bpe_run, monkeypatch,
                                                                           capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    status = exit_status(sample.main, ["--checkpoint", str(bpe_run / "gpt_final.pt"),
                                       "--device", "cpu"])
    assert status == 2
    one_error_line(capsys.readouterr().err, "pip install tokenizers")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_documents_are_encoded_off_the_main_thread_with_the_same_ids_and_errors():
    """encode_documents runs the library on a helper thread (faster there): the ids are those of
    encoding each document alone, an error comes back to the caller, and a forked child (a
    preparation worker) gets a helper thread of its own rather than waiting on its parent's."""
    tokenizer = BPETokenizer.train([MIXED_CORPUS], 300, end_of_text=True)
    texts = ["Hello, world!", CHINESE, "", "isn't it?"]
    expected = []
    for text in texts:
        expected += [*tokenizer.encode(text).tolist(), tokenizer.end_of_text]
    assert tokenizer.encode_documents(texts).tolist() == expected
    assert off_the_main_thread(lambda: threading.current_thread()) is not threading.main_thread()
    with pytest.raises(ZeroDivisionError):
        off_the_main_thread(lambda: 1 / 0)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child writes what it encoded, then leaves without pytest's cleanup
        os.write(writer, json.dumps(tokenizer.encode_documents(texts).tolist()).encode())
        os._exit(0)
    os.close(writer)
    ready, _, _ = select.select([reader], [], [], 60)
    if not ready:  # the child waits on a thread it does not have
        os.kill(child, signal.SIGKILL)
    with os.fdopen(reader, "rb") as pipe:
        written = pipe.read() if ready else b"null"
    os.waitpid(child, 0)
    assert json.loads(written) == expected
