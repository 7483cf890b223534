"""Corpora of documents: jsonl, jsonl.gz and parquet shards, the end-of-text token, a pretrained
tokenizer, and preparation in pieces on several processes that a kill does not set back."""

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import sample
from gpt_train import documentcache, tokencache
from gpt_train.cachefiles import CacheSettings
from conftest import (REPO, TINY_TEXT, assert_same_weights, exit_status, one_error_line,
                      read_checkpoint, tiny_argv, write_corpus)
from dataset import split_tokens
from gpt_train.tokenizer import (END_OF_TEXT, ByteTokenizer, CharTokenizer, encode_documents,
                       tokenizer_from_state)

DOCUMENTS = [f"Document {i}: " + "the quick brown fox jumps. " * (i % 5 + 1) + "é中🙂"[: i % 4]
             + "\n" * (i % 3) for i in range(120)]


def write_jsonl(path, documents=DOCUMENTS, field="text", compress=False):
    lines = "".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(documents))
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path, documents=DOCUMENTS, row_group_size=16):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet
    table = pyarrow.table({"id": list(range(len(documents))), "text": documents})
    parquet.write_table(table, path, row_group_size=row_group_size)
    return path


def reference_ids(tokenizer, documents=DOCUMENTS):
    """Each document encoded on its own, the end-of-text id after it: what the cache must hold."""
    return np.concatenate([np.append(tokenizer.encode(text), tokenizer.end_of_text)
                           for text in documents])


@pytest.mark.parametrize("kind", ["char", "byte"])
@pytest.mark.parametrize("form", ["jsonl", "jsonl.gz", "parquet"])
def test_every_form_caches_each_document_followed_by_the_end_of_text_id(tmp_path, kind, form):
    path = tmp_path / f"corpus.{form}"
    if form == "parquet":
        write_parquet(path)
    else:
        write_jsonl(path, compress=form == "jsonl.gz")
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(path), kind, tmp_path / "cache",
                                                            num_proc=1, piece_bytes=1000))
    assert tokenizer.end_of_text == tokenizer.vocab_size - 1
    assert np.array_equal(ids, reference_ids(tokenizer))
    assert tokenizer_from_state(tokenizer.state_dict()).state_dict() == tokenizer.state_dict()


def test_two_processes_write_the_same_bytes_as_one_and_bpe_learns_an_end_of_text(tmp_path):
    pytest.importorskip("tokenizers")
    path = write_jsonl(tmp_path / "corpus.jsonl")
    built = [tokencache.cached_tokens(CacheSettings(str(path), "bpe", tmp_path / f"cache{n}",
                                                    bpe_vocab_size=300, num_proc=n,
                                                    piece_bytes=700)) for n in (1, 2)]
    (one_tokenizer, one), (two_tokenizer, two) = built
    assert one_tokenizer.state_dict() == two_tokenizer.state_dict()
    assert np.array_equal(one, two) and np.array_equal(one, reference_ids(one_tokenizer))
    assert one_tokenizer.end_of_text == one_tokenizer.vocab_size - 1  # after the learned ones
    # text that spells the token out is text: only the cache's own ids end documents
    assert END_OF_TEXT.encode() not in b"".join(one_tokenizer.pieces[int(i)] for i in one)
    assert (np.asarray(one) == one_tokenizer.end_of_text).sum() == len(DOCUMENTS)


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from gpt_train import documentcache, preparation, tokencache
from gpt_train.cachefiles import CacheSettings
pieces = iter(range(10**6))
real = preparation.tokenize_piece
def dying(job):
    if next(pieces) == 3:  # SIGKILL: no handler, no cleanup, as a crash or the OOM killer
        open(job["part"] + ".99.tmp", "wb").write(b"half a piece")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(job)
documentcache.tokenize_piece = dying
tokencache.cached_tokens(CacheSettings({path!r}, "byte", {cache!r}, num_proc=1, piece_bytes=1000))
"""


def test_a_build_killed_midway_resumes_from_its_pieces_to_the_same_bytes(tmp_path, monkeypatch):
    path = str(write_jsonl(tmp_path / "corpus.jsonl"))
    cache = str(tmp_path / "cache")
    script = KILLED_BUILD.format(repo=str(REPO), path=path, cache=cache)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    done = [p for p in (tmp_path / "cache").glob("*.parts/*.bin")]
    assert len(done) == 3  # the pieces finished before the kill
    calls = []
    real = documentcache.tokenize_piece
    monkeypatch.setattr(documentcache, "tokenize_piece", lambda job: calls.append(job) or real(job))
    _, resumed = tokencache.cached_tokens(CacheSettings(path, "byte", cache, num_proc=1,
                                                        piece_bytes=1000))
    assert calls and all(job["piece"].index >= 3 for job in calls)
    _, whole = tokencache.cached_tokens(CacheSettings(path, "byte", tmp_path / "fresh", num_proc=1,
                                                      piece_bytes=1000))
    assert np.asarray(resumed).tobytes() == np.asarray(whole).tobytes()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".json"]


def test_a_shard_added_to_a_directory_is_the_only_one_tokenized(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        write_jsonl(shards / f"part-{index}.jsonl", DOCUMENTS[index * 40:(index + 1) * 40])
    tokencache.cached_tokens(CacheSettings(str(shards), "byte", tmp_path / "cache", num_proc=1))
    write_jsonl(shards / "part-2.jsonl", DOCUMENTS[80:])
    calls = []
    real = documentcache.tokenize_piece
    monkeypatch.setattr(documentcache, "tokenize_piece", lambda job: calls.append(job) or real(job))
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(shards), "byte",
                                                            tmp_path / "cache", num_proc=1))
    assert [job["piece"].path for job in calls] == [str(shards / "part-2.jsonl")]
    assert np.array_equal(ids, reference_ids(tokenizer))
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1  # the old stream is gone


def test_a_glob_of_shards_reads_them_in_sorted_order(tmp_path):
    for index in range(3):
        write_jsonl(tmp_path / f"shard-{index}.jsonl.gz", DOCUMENTS[index::3], compress=True)
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(tmp_path / "shard-*.jsonl.gz"),
                                                            "byte", tmp_path / "cache", num_proc=1))
    in_order = DOCUMENTS[0::3] + DOCUMENTS[1::3] + DOCUMENTS[2::3]
    assert np.array_equal(ids, reference_ids(tokenizer, in_order))


def test_a_plain_text_cache_keeps_its_name_and_its_tokens(tmp_path, corpus_file):
    """A cache an earlier version wrote is found again: its key is made of the same settings."""
    tokenizer, ids = tokencache.cached_tokens(CacheSettings(str(corpus_file), "char",
                                                            tmp_path / "cache"))
    settings = {"source": str(corpus_file.resolve()), "kind": "char", "bpe_vocab_size": None,
                "val_fraction": None}  # the key as the earlier version made it, written out here
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    assert (tmp_path / "cache" / f"{key}.bin").is_file()
    text = corpus_file.read_text()
    assert tokenizer.end_of_text is None
    assert tokenizer.state_dict() == CharTokenizer(text).state_dict()
    assert np.array_equal(ids, CharTokenizer(text).encode(text))


def test_the_validation_split_starts_at_a_document_and_plain_text_splits_as_before():
    tokenizer = ByteTokenizer(end_of_text=True)
    ids = encode_documents(tokenizer, DOCUMENTS)
    train, val = split_tokens(ids, 0.1, 16, tokenizer.end_of_text)
    assert train[-1] == tokenizer.end_of_text and len(train) >= int(len(ids) * 0.9)
    assert len(train) + len(val) == len(ids) and val[0] != tokenizer.end_of_text
    plain_train, _ = split_tokens(ids, 0.1, 16)
    assert len(plain_train) == int(len(ids) * 0.9)


def test_sampling_stops_at_the_end_of_text_unless_told_to_go_on():
    from gpt_train.generation import generate_text

    class Scripted:  # a model that writes "ab", ends the document, then writes "c"
        def parameters(self):
            import torch
            yield torch.zeros(1)

        def generate_stream(self, ids, max_new_tokens, vocab_limit, **sampling):
            import torch
            assert ids.tolist() == [[256]]  # an empty prompt starts a document
            for token in (97, 98, 256, 99):
                yield torch.tensor([token])

    tokenizer = ByteTokenizer(end_of_text=True)
    assert generate_text(Scripted(), tokenizer, "", 4) == "ab"
    assert generate_text(Scripted(), tokenizer, "", 4, stop_at_end_of_text=False) == \
        f"ab{END_OF_TEXT}c"


def write_pretrained_tokenizer(path):
    """A byte-level BPE with GPT-2's `<|endoftext|>`, built here (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(DOCUMENTS, trainer=trainer)
    backend.save(str(path))
    return path


@pytest.mark.slow
def test_a_pretrained_tokenizer_trains_resumes_samples_and_exports_with_its_end_of_text(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    import export
    import train
    tokenizer_file = write_pretrained_tokenizer(tmp_path / "tokenizer.json")
    data = write_jsonl(tmp_path / "corpus.jsonl")
    checkpoint_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    train.train(tiny_argv(checkpoint_dir, data, tokenizer=tokenizer_file, max_iters=4,
                          eval_iter=2, save_iter=2, num_proc=1))
    state = read_checkpoint(checkpoint_dir / "gpt_final.pt")["tokenizer"]
    assert state["json"] == tokenizer_file.read_text() and state["end_of_text"] == 0
    # resuming over the document cache, with the same --tokenizer given again, is exact
    resumed_dir.mkdir()
    shutil.copy(checkpoint_dir / "gpt_step2.pt", resumed_dir)
    train.train(["--resume", str(resumed_dir / "gpt_step2.pt"), "--tokenizer", str(tokenizer_file),
                 "--checkpoint_dir", str(resumed_dir)])
    assert_same_weights(resumed_dir / "gpt_step4.pt", checkpoint_dir / "gpt_step4.pt")
    tokenizer_file.unlink()  # the checkpoint carries it: sampling and export need no file
    assert exit_status(sample.main, ["--checkpoint", str(checkpoint_dir / "gpt_final.pt"),
                                     "--max_new_tokens", "5", "--device", "cpu"]) == 0
    out = export.export(checkpoint_dir / "gpt_final.pt", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == END_OF_TEXT
    assert (out / "tokenizer.json").read_text() == state["json"]
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 0


def test_an_exported_byte_tokenizer_has_the_end_of_text_at_our_id():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tokenizer = ByteTokenizer(end_of_text=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.hugging_face_json()))
    assert fast.convert_tokens_to_ids(END_OF_TEXT) == 256
    assert fast.encode("é a", add_special_tokens=False) == tokenizer.encode("é a").tolist()


def test_val_data_is_the_validation_set_and_all_of_data_trains(tmp_path):
    from config import TrainConfig
    from dataset import get_dataset, training_and_validation
    data, held_out = write_jsonl(tmp_path / "train.jsonl"), write_jsonl(
        tmp_path / "val.jsonl", DOCUMENTS[:30])
    config = TrainConfig(data=str(data), val_data=str(held_out), tokenizer="byte",
                         cache_dir=str(tmp_path / "cache"), num_proc=1)
    tokenizer, ids = get_dataset(config)
    train, val = training_and_validation(ids, tokenizer, config, 16)
    assert len(train) == len(ids)
    assert np.array_equal(val, reference_ids(tokenizer, DOCUMENTS[:30]))


@pytest.mark.parametrize("val_data", [False, True])
def test_the_data_line_counts_the_tokens_it_trains_and_validates_on(tmp_path, capsys, val_data):
    import train
    held_out_text = TINY_TEXT[:3000]
    flags = {"val_data": write_corpus(tmp_path, held_out_text, "held_out.txt")} if val_data else {}
    train.train(tiny_argv(tmp_path / "run", write_corpus(tmp_path), max_iters=2, warmup_iters=1,
                          **flags))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: "))
    total, trained, validated = (int(figure.replace(",", "")) for figure in re.match(
        r"data: ([\d,]+) tokens \(([\d,]+) train, ([\d,]+) validation", line).groups())
    assert total == trained + validated  # one token per character (char tokenizer)
    if val_data:
        assert (trained, validated) == (len(TINY_TEXT), len(held_out_text))
        assert "validation (--val_data)" in line
    else:
        assert total == len(TINY_TEXT)


@pytest.mark.parametrize("case, fragments", [
    ("missing field", ["no text under 'text'", "--text_field", "'body'"]),
    ("bad json", ["not a JSON object"]),
    ("no pyarrow", ["pyarrow", "pip install pyarrow"]),
    ("unknown tokenizer", ["--tokenizer no-such-tokenizer", "Hugging Face cache"]),
    ("mixed shards", ["several kinds"]),
])
def test_a_corpus_mistake_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys, case,
                                                        fragments):
    import train
    data = tmp_path / "corpus.jsonl"
    flags = {}
    if case == "missing field":
        write_jsonl(data, field="body")
    elif case == "bad json":
        data.write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "no pyarrow":
        data = tmp_path / "corpus.parquet"
        data.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    elif case == "unknown tokenizer":
        pytest.importorskip("huggingface_hub")  # without it, the line names that package instead
        write_jsonl(data)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        flags["tokenizer"] = "no-such-tokenizer"
    else:
        data = tmp_path / "shards"
        data.mkdir()
        write_jsonl(data / "a.jsonl")
        write_jsonl(data / "b.jsonl.gz", compress=True)
    argv = tiny_argv(tmp_path / "run", data, num_proc=1, **flags)
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, *fragments)
    assert not os.path.exists(tmp_path / "run" / "gpt_final.pt")


def test_plain_text_with_a_pretrained_tokenizer_splits_where_plain_text_always_did(tmp_path,
                                                                                   corpus_file):
    pytest.importorskip("tokenizers")
    from config import TrainConfig
    from dataset import get_dataset, training_and_validation
    config = TrainConfig(data=str(corpus_file), cache_dir=str(tmp_path / "cache"),
                         tokenizer=str(write_pretrained_tokenizer(tmp_path / "tokenizer.json")))
    tokenizer, ids = get_dataset(config)
    assert tokenizer.end_of_text == 0 and tokenizer.source == config.tokenizer
    train, _ = training_and_validation(ids, tokenizer, config, 16)
    assert len(train) == int(len(ids) * 0.9)
