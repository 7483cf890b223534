"""The token cache for corpora larger than memory, and datasets that cross process boundaries.

The cache is built in small chunks here (`chunk_bytes` of a few bytes), so that characters of
two, three and four UTF-8 bytes are cut by chunk edges many times over.
"""

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import TrainConfig, UserError
from conftest import REPO, TINY_TEXT, write_corpus
from dataset import RandomWindows, StepSampler, build_dataloader, get_dataset, split_tokens
from gpt_train.cachefiles import CacheSettings, default_cache_dir
from gpt_train.textcache import iter_text_chunks
from gpt_train.tokencache import cached_tokens
from gpt_train.tokenizer import CharTokenizer

# ASCII, 2-byte (é, ß), 3-byte (Chinese) and 4-byte (emoji) characters, mixed on every line
MIXED_TEXT = "".join(f"line {i}: naïve café Straße 数据训练 {'🙂🚀'[i % 2]} 模型{i % 7}\n"
                     for i in range(120))


def cut_characters(text, chunk_bytes):
    """How many characters of `text` straddle a multiple of `chunk_bytes` in its UTF-8 bytes."""
    position, cut = 0, 0
    for character in text:
        size = len(character.encode("utf-8"))
        cut += (position // chunk_bytes) != ((position + size - 1) // chunk_bytes)
        position += size
    return cut


def cache_files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ---------------------------------------------------------------------------- streaming the text

@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64])
def test_text_read_in_chunks_never_splits_a_character(tmp_path, chunk_bytes):
    path = write_corpus(tmp_path, MIXED_TEXT)
    assert cut_characters(MIXED_TEXT, chunk_bytes) > 0 or chunk_bytes == 1
    chunks = list(iter_text_chunks(path, chunk_bytes))
    assert "".join(chunks) == MIXED_TEXT
    assert all(len(chunk.encode("utf-8")) <= chunk_bytes + 3 for chunk in chunks)


def test_a_bad_utf8_byte_is_reported_at_its_offset_in_the_file(tmp_path):
    good = "数据".encode("utf-8")  # 6 bytes; with 4-byte chunks the second character is cut
    path = tmp_path / "broken.txt"
    path.write_bytes(good + "训".encode("utf-8")[:2] + b"x tail")  # a 3-byte character, cut short
    with pytest.raises(UserError, match=rf"not UTF-8 text \(bad byte at offset {len(good)}\)"):
        list(iter_text_chunks(path, chunk_bytes=4))


# --------------------------------------------------------------------------------- the token cache

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("chunk_bytes", [3, 7])
def test_a_corpus_cached_in_many_small_chunks_round_trips_exactly(tmp_path, kind, chunk_bytes):
    if kind == "bpe":
        pytest.importorskip("tokenizers")
    path = write_corpus(tmp_path, MIXED_TEXT)
    assert cut_characters(MIXED_TEXT, chunk_bytes) > 100
    tokenizer, ids = cached_tokens(CacheSettings(str(path), kind, tmp_path / "cache",
                                                 bpe_vocab_size=300, chunk_bytes=chunk_bytes))
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert tokenizer.decode(ids) == MIXED_TEXT


def test_the_char_vocabulary_from_the_streaming_pass_equals_one_built_from_the_whole_text(tmp_path):
    # the rarest characters first turn up near the end, so the ids are renumbered after the pass
    text = MIXED_TEXT + "the end: ΩЖ€\n"
    path = write_corpus(tmp_path, text)
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache",
                                                 chunk_bytes=5))
    whole = CharTokenizer(text)
    assert tokenizer.chars == whole.chars
    assert np.array_equal(np.asarray(ids), whole.encode(text))


def test_a_corpus_of_more_than_65536_distinct_characters_is_cached_as_uint32(tmp_path):
    characters = [chr(0x20000 + i) for i in range(70_000)]  # CJK extension planes: 4 UTF-8 bytes
    text = "abc\n" + "".join(characters) + "\nabc"
    path = write_corpus(tmp_path, text)
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache",
                                                 chunk_bytes=4096))
    assert ids.dtype == np.uint32 and tokenizer.vocab_size == 70_000 + 4
    assert tokenizer.decode(ids) == text
    assert Path(ids.filename).stat().st_size == 4 * len(text)


def test_a_directory_of_files_is_cached_as_their_text_in_sorted_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data, "second 第二\n", name="b.txt")
    write_corpus(data, "first 🙂\n", name="a.txt")
    tokenizer, ids = cached_tokens(CacheSettings(str(data), "char", tmp_path / "cache",
                                                 chunk_bytes=3))
    assert tokenizer.decode(ids) == "first 🙂\nsecond 第二\n"


def test_an_unmodified_source_reuses_the_cache_without_writing_it_again(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    _, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    written = {name: (cache / name).stat() for name in cache_files(cache)}
    tokenizer, again = cached_tokens(CacheSettings(str(path), "char", cache))
    assert tokenizer.decode(again) == MIXED_TEXT
    for name, before in written.items():  # a rebuild renames a new file (a new inode) into place
        after = (cache / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cache_files(cache) == sorted(written)


@pytest.mark.parametrize("change", ["same size, new mtime", "new size, same mtime"])
def test_a_modified_source_file_rebuilds_the_cache(tmp_path, change):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    cached_tokens(CacheSettings(str(path), "char", cache))
    before = path.stat()
    if change == "same size, new mtime":
        modified = MIXED_TEXT.replace("naïve", "NAÏVE")  # the same number of bytes
        mtime_ns = before.st_mtime_ns + 10**9
    else:
        modified = MIXED_TEXT + "one more line ✓\n"
        mtime_ns = before.st_mtime_ns
    path.write_text(modified, encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, mtime_ns))
    after = path.stat()
    assert (after.st_size == before.st_size) == change.startswith("same size")
    assert (after.st_mtime_ns == before.st_mtime_ns) == change.endswith("same mtime")
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    assert tokenizer.decode(ids) == modified
    assert len([n for n in cache_files(cache) if n.endswith(".bin")]) == 1  # replaced, not added


def test_by_default_the_cache_goes_under_xdg_cache_home_and_never_beside_the_data(
        tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    data.mkdir()
    path = write_corpus(data, TINY_TEXT)
    tokenizer, ids = get_dataset(TrainConfig(data=str(path)))  # --cache_dir not given
    assert tokenizer.decode(ids) == TINY_TEXT
    assert sorted(p.name for p in data.iterdir()) == ["corpus.txt"]
    assert Path(ids.filename).parent == tmp_path / "xdg" / "gpt-train" / "tokens"


def test_a_relative_xdg_cache_home_is_ignored_for_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(default_cache_dir()) == tmp_path / "home" / ".cache" / "gpt-train" / "tokens"


def test_a_failed_build_leaves_neither_a_cache_nor_temporary_files_nor_a_lock(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    too_small = CharTokenizer("line 0123456789:\n")  # lacks most of the corpus's characters
    with pytest.raises(UserError, match="never seen"):
        cached_tokens(CacheSettings(str(path), "char", cache, chunk_bytes=64), tokenizer=too_small)
    assert not cache.exists()  # the directory it created, too
    cache.mkdir()
    with pytest.raises(UserError, match="never seen"):
        cached_tokens(CacheSettings(str(path), "char", cache, chunk_bytes=64), tokenizer=too_small)
    assert list(cache.iterdir()) == []  # one that was there stays, empty


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    _, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    bin_path = Path(ids.filename)
    del ids
    leftover = cache / f".tmp-{bin_path.name}.4194305"  # a killed process's id
    leftover.write_bytes(b"half a cache")
    bin_path.with_suffix(".json").unlink()  # as if the build had been killed before its JSON
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    assert tokenizer.decode(ids) == MIXED_TEXT
    assert not leftover.exists()
    assert not [name for name in cache_files(cache) if name.startswith(".tmp-")]


def test_a_resume_with_the_runs_own_tokenizer_reuses_its_cache(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    tokenizer, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    files = cache_files(cache)
    saved = CharTokenizer(tokenizer.chars)  # as rebuilt from a checkpoint
    _, resumed = cached_tokens(CacheSettings(str(path), "char", cache), tokenizer=saved)
    assert resumed.filename == ids.filename and cache_files(cache) == files


def test_a_run_with_another_tokenizer_gets_its_own_cache(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT)
    cache = tmp_path / "cache"
    _, ids = cached_tokens(CacheSettings(str(path), "char", cache))
    wider = CharTokenizer(MIXED_TEXT + "ABCDEFGH")  # a fine-tuning run's larger vocabulary
    tokenizer, other = cached_tokens(CacheSettings(str(path), "char", cache), tokenizer=wider)
    assert other.filename != ids.filename
    assert tokenizer.chars == wider.chars and tokenizer.decode(other) == MIXED_TEXT
    _, first_again = cached_tokens(CacheSettings(str(path), "char", cache))
    assert first_again.filename == ids.filename and np.array_equal(first_again, ids)


# ----------------------------------------------------------- datasets in other processes

def memmapped_train_split(tmp_path, block_size=16):
    path = write_corpus(tmp_path, MIXED_TEXT * 20)  # about 70,000 tokens
    _, ids = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    train_tokens, _ = split_tokens(ids, 0.1, block_size)
    return train_tokens


def test_a_dataset_over_a_memmapped_split_pickles_its_file_name_not_its_tokens(tmp_path):
    train_tokens = memmapped_train_split(tmp_path)
    dataset = RandomWindows(train_tokens, block_size=16, batch_size=4, seed=3)
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 1000 < train_tokens.nbytes
    copy = pickle.loads(pickled)
    for index in (0, 1, 99):
        for mine, theirs in zip(dataset[index], copy[index]):
            assert torch.equal(mine, theirs)


def test_a_dataset_over_the_validation_split_reads_from_the_right_offset(tmp_path):
    path = write_corpus(tmp_path, MIXED_TEXT * 5)
    _, ids = cached_tokens(CacheSettings(str(path), "char", tmp_path / "cache"))
    _, val_tokens = split_tokens(ids, 0.5, 16)  # starts half-way into the file
    in_memory = RandomWindows(np.array(val_tokens), 16, 8, seed=0)[5]
    from_file = RandomWindows(val_tokens, 16, 8, seed=0)
    for dataset in (from_file, pickle.loads(pickle.dumps(from_file))):
        x, y = dataset[5]
        assert torch.equal(x, in_memory[0]) and torch.equal(y, in_memory[1])


@pytest.mark.slow
def test_a_spawned_worker_yields_the_same_batches_as_the_main_process(tmp_path):
    train_tokens = memmapped_train_split(tmp_path)
    loader = build_dataloader(RandomWindows(train_tokens, 16, 4, seed=5), stop=6)
    in_process = list(loader)
    spawned = DataLoader(loader.dataset, batch_size=None, sampler=StepSampler(0, 6), num_workers=1,
                         multiprocessing_context="spawn")
    batches = list(spawned)
    assert len(batches) == len(in_process) == 6
    for (x, y), (x_worker, y_worker) in zip(in_process, batches):
        assert torch.equal(x, x_worker) and torch.equal(y, y_worker)


# ------------------------------------------------------------------------------------ benchmark

@pytest.mark.slow
def test_the_data_benchmark_prints_tokenize_throughput_and_peak_memory(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_data
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    bench_data.main(["--size_mb", "0.3", "--steps", "2", "--dir", str(tmp_path), "--keep"])
    out = capsys.readouterr().out
    (corpus,) = tmp_path.glob("bench-data-*/corpus.txt")
    text = corpus.read_text(encoding="utf-8")
    throughput = re.search(r"tokenize: ([\d,]+) tokens \(\w+\), vocabulary (\d+), "
                           r"(\d+\.\d) s = (\d+\.\d) MB/s", out)
    assert throughput, out
    tokens, vocabulary, seconds, rate = (float(group.replace(",", ""))
                                         for group in throughput.groups())
    assert tokens == len(text) and vocabulary == len(set(text))  # one token per character
    megabytes = corpus.stat().st_size / 1e6
    # the seconds are printed to 1 decimal, the rate too
    assert megabytes / (seconds + 0.05) - 0.05 <= rate
    assert seconds < 0.05 or rate <= megabytes / (seconds - 0.05) + 0.05
    peak = re.search(r"peak RSS: (\d+) MB for a 0.3 MB corpus", out)
    assert peak and int(peak.group(1)) > 100, out  # this process has torch loaded
