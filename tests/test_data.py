"""Tokenizers, corpora, the token cache and the resumable DataLoader."""

import random

import numpy as np
import pytest
import torch

from config import TrainConfig, UserError
from conftest import TINY_TEXT, write_corpus
from dataset import (RandomWindows, build_dataloader, get_dataset, split_tokens,
                     validation_batches)
from gpt_train.cachefiles import CacheSettings
from gpt_train.tokencache import cached_tokens
from gpt_train.tokenizer import ByteTokenizer, CharTokenizer, StreamDecoder, tokenizer_from_state

ASCII_TEXT = "Hello, world!\n\tdef f(x): return x ** 2  # ~`|{}[]\n"
EMOJI_TEXT = "snakes 🐍 and rockets 🚀, flags 🇫🇷, family 👩‍👩‍👧 é ß"


def chinese_text(num_distinct=3000, length=20000, seed=0):
    """Text over `num_distinct` CJK ideographs plus Chinese punctuation, in a fixed random order."""
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(num_distinct)] + list("，。！？「」\n")
    body = [rng.choice(alphabet) for _ in range(length)]
    return "".join(alphabet) + "".join(body)  # every character occurs at least once


# ---------------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("text", [ASCII_TEXT, chinese_text(), EMOJI_TEXT],
                         ids=["ascii", "chinese", "emoji"])
def test_char_tokenizer_round_trips_exactly(text):
    tokenizer = CharTokenizer(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_char_vocabulary_is_the_sorted_distinct_characters():
    tokenizer = CharTokenizer("banana split")
    assert tokenizer.chars == "".join(sorted(set("banana split")))
    assert tokenizer.vocab_size == len(set("banana split"))
    assert list(tokenizer.encode("ab")) == [tokenizer.chars.index("a"), tokenizer.chars.index("b")]


def test_a_chinese_corpus_with_thousands_of_distinct_characters_gets_one_id_each():
    text = chinese_text(num_distinct=3000)
    tokenizer = CharTokenizer(text)
    assert tokenizer.vocab_size == len(set(text)) > 3000
    ids = tokenizer.encode(text)
    assert ids.min() == 0 and ids.max() == tokenizer.vocab_size - 1


@pytest.mark.parametrize("text", [ASCII_TEXT, chinese_text(num_distinct=500, length=2000),
                                  EMOJI_TEXT], ids=["ascii", "chinese", "emoji"])
def test_byte_tokenizer_round_trips_any_text_as_utf8_bytes(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == 256
    assert list(ids) == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_char_tokenizer_names_the_characters_it_has_never_seen():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(UserError) as error:
        tokenizer.encode("abcdé")
    assert "'d'" in str(error.value) and "'é'" in str(error.value)


@pytest.mark.parametrize("tokenizer", [CharTokenizer(EMOJI_TEXT + ASCII_TEXT), ByteTokenizer()],
                         ids=["char", "byte"])
def test_a_tokenizer_rebuilt_from_its_plain_state_encodes_the_same(tokenizer):
    state = tokenizer.state_dict()
    assert all(isinstance(value, str) for value in state.values())  # plain data for weights_only
    rebuilt = tokenizer_from_state(state)
    assert list(rebuilt.encode(EMOJI_TEXT)) == list(tokenizer.encode(EMOJI_TEXT))


@pytest.mark.parametrize("tokenizer", [CharTokenizer(EMOJI_TEXT), ByteTokenizer()],
                         ids=["char", "byte"])
def test_stream_decoding_one_id_at_a_time_gives_the_whole_text(tokenizer):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in tokenizer.encode(EMOJI_TEXT)] + [decoder.flush()]
    assert "".join(pieces) == EMOJI_TEXT
    assert "\ufffd" not in "".join(pieces)  # never half a character


# ------------------------------------------------------------------------------------- corpora

def corpus_text(tmp_path, data=""):
    tokenizer, ids = get_dataset(TrainConfig(data=data, cache_dir=str(tmp_path / "cache")))
    return tokenizer.decode(ids)


def test_the_builtin_corpus_is_the_python_reference_joined_in_sorted_key_order(tmp_path):
    from pydoc_data.topics import topics
    corpus = corpus_text(tmp_path)
    assert corpus == "\n".join(topics[key] for key in sorted(topics))
    assert len(corpus) > 300_000


def test_a_data_file_is_read_as_utf8(tmp_path):
    text = "naïve café 中文\n" * 3
    path = write_corpus(tmp_path, text)
    assert corpus_text(tmp_path, str(path)) == text


def test_a_data_directory_joins_its_txt_files_in_sorted_order(tmp_path):
    contents = {"b.txt": "second ", "a.txt": "first ", "c.txt": "third", "notes.md": "skipped"}
    for name, text in contents.items():  # written out of order on purpose
        (tmp_path / name).write_text(text, encoding="utf-8")
    expected = "".join(contents[name] for name in sorted(contents) if name.endswith(".txt"))
    assert corpus_text(tmp_path, str(tmp_path)) == expected == "first second third"


def test_the_token_cache_is_rebuilt_when_the_file_changes(tmp_path):
    path = write_corpus(tmp_path, "abcabc")
    _, first = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    _, again = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    assert list(again) == list(first) == [0, 1, 2, 0, 1, 2]
    path.write_text("cabbage!", encoding="utf-8")
    tokenizer, changed = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    assert tokenizer.decode(changed) == "cabbage!"


def test_a_chinese_file_round_trips_through_the_token_cache(tmp_path):
    text = chinese_text(num_distinct=3000, length=5000)
    path = write_corpus(tmp_path, text)
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    assert tokenizer.vocab_size == len(set(text))
    assert tokenizer.decode(np.asarray(ids)) == text


# ----------------------------------------------------------------------------- splits, batches

def test_the_last_val_fraction_of_the_tokens_is_the_validation_split():
    tokens = np.arange(100)
    train_tokens, val_tokens = split_tokens(tokens, 0.1, block_size=8)
    assert list(train_tokens) == list(range(90)) and list(val_tokens) == list(range(90, 100))


@pytest.mark.parametrize("val_fraction, short_split", [(0.05, "validation"), (0.95, "training")])
def test_a_split_shorter_than_block_size_plus_one_is_a_user_error(val_fraction, short_split):
    with pytest.raises(UserError, match=short_split):
        split_tokens(np.arange(100), val_fraction, block_size=8)


def test_batches_are_int64_windows_with_targets_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position: windows are visible
    x, y = next(iter(build_dataloader(RandomWindows(tokens, 16, 4, seed=0), stop=1)))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the stream
    assert torch.equal(y, x + 1)


def test_batches_of_real_text_have_y_equal_to_x_shifted_left():
    tokens = CharTokenizer(TINY_TEXT).encode(TINY_TEXT)
    for x, y in build_dataloader(RandomWindows(tokens, 16, 4, seed=3), stop=5):
        assert torch.equal(x[:, 1:], y[:, :-1])


def batches(loader):
    return [torch.cat([x, y], dim=1) for x, y in loader]


def test_the_same_seed_and_index_give_the_same_batch():
    windows = RandomWindows(np.arange(5000), 16, 4, seed=7)
    whole_run = batches(build_dataloader(windows, start=0, stop=10))
    resumed = batches(build_dataloader(windows, start=6, stop=10))
    assert all(torch.equal(a, b) for a, b in zip(whole_run[6:], resumed, strict=True))
    other_seed = batches(build_dataloader(RandomWindows(np.arange(5000), 16, 4, seed=8), stop=10))
    assert not any(torch.equal(a, b) for a, b in zip(whole_run, other_seed))
    assert len({tuple(b[:, 0].tolist()) for b in whole_run}) == 10  # each step a new batch


def test_worker_processes_produce_the_same_batches_in_the_same_order():
    windows = RandomWindows(np.arange(5000), 16, 4, seed=7)
    in_process = batches(build_dataloader(windows, start=3, stop=11))
    with_workers = batches(build_dataloader(windows, start=3, stop=11, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))


def test_drawing_batches_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    batches(build_dataloader(RandomWindows(np.arange(5000), 16, 4, seed=7), stop=3))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_validation_batches_are_fixed_and_leave_the_random_state_alone():
    tokens = np.arange(3000)
    torch.manual_seed(0)
    torch_state = torch.get_rng_state()
    first = validation_batches(tokens, block_size=16, batch_size=4, num_batches=5)
    torch.manual_seed(123)
    np.random.seed(123)
    second = validation_batches(tokens, block_size=16, batch_size=4, num_batches=5)
    assert len(first) == 5
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 16) and torch.equal(y1, x1 + 1)
    torch.manual_seed(0)
    validation_batches(tokens, 16, 4, 5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == len(tokens) - 17  # spread over the whole split
