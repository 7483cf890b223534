"""A dead worker never hangs a run, and every bad input of the data path is one line.

Worker processes are killed for real, with SIGKILL or SIGTERM: a preparation worker, one of the
char vocabulary pass, a DataLoader worker (each forked by this process), and the main process of
a subprocess under its own workers. Each run ends in one line and exit status 1 with what was
finished kept, no process left behind, and the rerun goes on (to the same bytes, or to the same
final step). The bad inputs (a directory mixing text and shards, a tokenizer that is not
byte-level BPE, lone surrogates, an unreadable or damaged shard, a corpus without documents, a
bad line) are one line naming the file, and leave nothing in the cache.
"""

import fcntl
import functools
import io
import json
import multiprocessing
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data

import dataset
import evaluate
import train
from conftest import REPO, exit_status, one_error_line, read_checkpoint, tiny_argv, write_corpus
from gpt_train import documentcache, preparation
from gpt_train.cachefiles import CacheSettings
from gpt_train.documents import corpus_files, file_pieces
from gpt_train.tokencache import cached_tokens, data_fingerprint
from gpt_train.tokenizer import ByteTokenizer, encode_documents

BOUND = 60  # seconds: a hung subprocess fails its test, not the suite
DOCUMENTS = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 4)
             for i in range(200)]


def write_jsonl(path, documents=DOCUMENTS):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return path


def run_script(script, **values):
    """`python -c script` (formatted with `values` and the repository's path), its output piped;
    returns (status, stdout, stderr) once every process holding the pipes is gone."""
    code = textwrap.dedent(script).format(repo=str(REPO), **values)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    stdout, stderr = read_to_the_end(process)
    return process.wait(), stdout, stderr


def read_to_the_end(process, bound=BOUND):
    """Both pipes of `process` read until closed, which happens once every process that holds
    them (workers included) has ended; a test fails if that takes longer than `bound`."""
    selector, output = selectors.DefaultSelector(), {}
    for stream in (process.stdout, process.stderr):
        selector.register(stream, selectors.EVENT_READ)
        output[stream] = b""
    deadline = time.monotonic() + bound
    while selector.get_map():
        events = selector.select(timeout=max(deadline - time.monotonic(), 0))
        if not events:
            process.kill()
            pytest.fail(f"processes still hold the output after {bound} s: "
                        f"{output[process.stderr].decode()[-2000:]}")
        for key, _ in events:
            data = os.read(key.fileobj.fileno(), 1 << 16)
            output[key.fileobj] += data
            if not data:
                selector.unregister(key.fileobj)
    return output[process.stdout].decode(), output[process.stderr].decode()


def error_line(stderr, *fragments):
    """The one `error: ...` line of stderr, which holds nothing else but progress lines."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith(("tokenizing:", "reading its characters:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------- preparation workers that die

def die_at_piece(job, signal_number, victim, work):
    """`job` (a function of preparation.py), except that the worker given piece `victim` is
    killed with `signal_number` (no handler, no cleanup: as the OOM killer kills)."""
    if work["piece"].index == victim:
        os.kill(os.getpid(), signal_number)
    return getattr(preparation, job)(work)


@pytest.mark.parametrize("job, kind, signal_number", [
    ("tokenize_piece", "byte", signal.SIGKILL), ("tokenize_piece", "char", signal.SIGTERM),
    ("piece_characters", "char", signal.SIGKILL)])
def test_a_preparation_worker_that_dies_ends_the_run_in_one_line_and_the_rerun_goes_on(
        tmp_path, monkeypatch, capsys, job, kind, signal_number):
    path, cache = str(write_jsonl(tmp_path / "corpus.jsonl")), tmp_path / "cache"
    settings = CacheSettings(path, kind, cache, num_proc=2, piece_bytes=1000)
    children = set(multiprocessing.active_children())
    with monkeypatch.context() as patch:  # the pool sends the job to its workers by name
        patch.setattr(documentcache, job, functools.partial(die_at_piece, job, signal_number, 6))
        assert exit_status(lambda argv: cached_tokens(settings), []) == 1
    error_line(capsys.readouterr().err, "preparation worker process died",
               "run the same command again")
    assert set(multiprocessing.active_children()) <= children  # no worker left behind
    finished = sorted(p.name for p in cache.glob("*.parts/*.bin"))
    if job == "piece_characters":  # the vocabulary pass keeps nothing: no pieces directory
        assert finished == [] and not list(cache.glob("*.parts"))
    else:
        assert 0 < len(finished) < len(list(file_pieces(0, "jsonl", Path(path), 1000)))
    assert not list(cache.glob("*.lock"))
    # the rerun goes on from the pieces finished, to the bytes a build never interrupted writes
    _, resumed = cached_tokens(settings)
    if finished:
        assert f"{len(finished)} piece(s) finished by an earlier preparation are kept" in \
            capsys.readouterr().out
    _, fresh = cached_tokens(CacheSettings(path, kind, tmp_path / "fresh", piece_bytes=1000))
    assert np.asarray(resumed).tobytes() == np.asarray(fresh).tobytes()


# The main process holds a flock on the run directory's train.lock, as train.py does
# (rundir/lock.py), and is killed with SIGKILL while its workers are in the middle of
# pieces that never end by themselves.
KILLED_MAIN = """
    import fcntl, os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from gpt_train import documentcache
    from gpt_train.cachefiles import CacheSettings
    from gpt_train.tokencache import cached_tokens

    def endless(work):
        os.write(1, f"worker {{os.getpid()}}\\n".encode())  # one write: whole lines in the pipe
        os.close(os.open(os.path.join({run!r}, f"busy-{{os.getpid()}}"), os.O_CREAT))
        if len([name for name in os.listdir({run!r}) if name.startswith("busy-")]) == 2:
            os.kill(os.getppid(), signal.SIGKILL)  # the second worker to start: both are busy
        time.sleep(600)

    documentcache.tokenize_piece = endless
    os.makedirs({run!r})
    with open(os.path.join({run!r}, "train.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached_tokens(CacheSettings({path!r}, "byte", {cache!r}, num_proc=2, piece_bytes=1000))
"""


def test_workers_end_with_a_killed_main_process_and_release_the_run_directory(tmp_path):
    path = str(write_jsonl(tmp_path / "corpus.jsonl"))
    run = tmp_path / "run"
    status, stdout, _ = run_script(KILLED_MAIN, run=str(run), path=path,
                                   cache=str(tmp_path / "cache"))
    assert status == -signal.SIGKILL
    # both workers were in the middle of a piece that never ends, and the pipes they inherited
    # are closed: they have ended (a process's files are closed as it dies)
    assert len([line for line in stdout.splitlines() if line.startswith("worker ")]) == 2
    # the run directory is free at once: a requeued run would take its lock
    with open(run / "train.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --------------------------------------------------------------------- DataLoader workers

@pytest.mark.slow
def test_a_dataloader_worker_that_dies_ends_the_run_in_one_line_keeping_its_checkpoints(
        tmp_path, monkeypatch, capsys):
    data, run = write_corpus(tmp_path), tmp_path / "run"
    real = dataset.RandomWindows.__getitem__

    def dying(self, index):  # the worker that assembles micro-batch 7 is killed
        if index == 7 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, index)

    argv = tiny_argv(run, data, max_iters=12, save_iter=2, log_iter=2, eval_iter=100,
                     num_workers=2)
    with monkeypatch.context() as patch:
        patch.setattr(dataset.RandomWindows, "__getitem__", dying)
        assert exit_status(train.train, argv) == 1
    one_error_line(capsys.readouterr().err, "DataLoader worker", "--resume latest")
    saved = sorted(run.glob("gpt_step*.pt"))
    assert saved and read_checkpoint(saved[-1])["step"] <= 6
    resume = ["--resume", "latest", "--checkpoint_dir", str(run), "--num_workers", "0"]
    assert exit_status(train.train, resume) == 0
    assert read_checkpoint(run / "gpt_final.pt")["step"] == 12


# ------------------------------------------------------------------------------ bad input

def test_a_directory_of_shards_and_text_files_is_refused_in_one_line_naming_both(tmp_path,
                                                                                   capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(2):
        write_jsonl(corpus / f"shard-{index}.jsonl", DOCUMENTS[index::2])
    (corpus / "README.txt").write_text("How these shards were made.\n" * 50)
    status = exit_status(train.train, tiny_argv(tmp_path / "run", corpus))
    assert status == 2
    line = one_error_line(capsys.readouterr().err, "README.txt", "shard-0.jsonl", "*.jsonl")
    assert "both" in line
    assert not (tmp_path / "run").exists()
    # what the line proposes: the shards named with a glob
    assert corpus_files(str(corpus / "*.jsonl")) == ("jsonl", sorted(corpus.glob("*.jsonl")))
    # files of neither kind are never read, beside shards or beside text
    (corpus / "README.txt").rename(corpus / "README.md")
    assert corpus_files(corpus) == ("jsonl", sorted(corpus.glob("*.jsonl")))


def tokenizer_files(directory):
    """tokenizer.json files of the kinds that are not byte-level BPE."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = {"the": 0, "quick": 1, "brown": 2, "fox": 3, "[UNK]": 4}
    made = {"WordLevel": tokenizers.Tokenizer(models.WordLevel(words, unk_token="[UNK]")),
            "WordPiece": tokenizers.Tokenizer(models.WordPiece(words, unk_token="[UNK]")),
            "Whitespace": tokenizers.Tokenizer(models.BPE())}
    for backend in made.values():
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    for name, backend in made.items():
        backend.save(str(directory / f"{name}.json"))
    return made


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused_naming_its_kind(tmp_path, capsys):
    data = write_corpus(tmp_path)
    for name in tokenizer_files(tmp_path):
        argv = tiny_argv(tmp_path / f"run-{name}", data, tokenizer=tmp_path / f"{name}.json")
        assert exit_status(train.train, argv) == 2
        one_error_line(capsys.readouterr().err, f"{name}.json", name, "byte-level BPE")
        assert not (tmp_path / f"run-{name}").exists()


def test_lone_surrogates_in_jsonl_are_replaced_and_counted_in_one_note(tmp_path, capsys):
    documents = ["clean text", "half a pair \ud800 here", "two \udfff and \ud83d", "é ok"]
    path = tmp_path / "scraped.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    assert "\\ud800" in path.read_text()  # as scraped web text has it: valid JSON
    replaced = [text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd")
                .replace("\ud83d", "\ufffd") for text in documents]
    for kind in ("char", "byte", "bpe"):
        if kind == "bpe":
            pytest.importorskip("tokenizers")
        tokenizer, ids = cached_tokens(CacheSettings(str(path), kind, tmp_path / kind,
                                                     bpe_vocab_size=300))
        assert np.array_equal(ids, encode_documents(tokenizer, replaced))
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note")]
        assert len(notes) == 1 and "3 lone surrogate" in notes[0], notes
        assert f"{path}, the line at byte " in notes[0]


def test_an_unreadable_shard_is_one_line_naming_it_never_the_cache(tmp_path, monkeypatch,
                                                                     capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        write_jsonl(shards / f"part-{index}.jsonl", DOCUMENTS[index::2])
    locked = shards / "part-1.jsonl"

    def refusing_open(file, *args, **kwargs):  # as a file without read permission, even for root
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr("gpt_train.documents.open", refusing_open, raising=False)
    assert exit_status(train.train, tiny_argv(tmp_path / "run", shards)) == 2
    line = one_error_line(capsys.readouterr().err, str(locked), "Permission denied")
    assert "--cache_dir" not in line


def test_a_damaged_parquet_shard_is_blamed_not_the_cache(tmp_path, capsys):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "shard.parquet"
    parquet.write_table(pyarrow.table({"text": DOCUMENTS * 5}), path, row_group_size=250,
                        compression="none")
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 4, len(data) // 2, 7):  # the pages of the second row group
        data[offset] ^= 0x55
    path.write_bytes(bytes(data))
    assert exit_status(train.train, tiny_argv(tmp_path / "run", path, num_proc=2)) == 2
    line = one_error_line(capsys.readouterr().err, str(path), "damaged", "row group")
    assert "--cache_dir" not in line


def test_a_corpus_without_documents_says_so_and_leaves_nothing_in_the_cache(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text('\n{"text": null}\n\n{"text": null, "id": 3}\n')
    cache = tmp_path / "cache"
    assert exit_status(train.train, tiny_argv(tmp_path / "run", path, tokenizer="byte",
                                              cache_dir=cache)) == 2
    line = one_error_line(capsys.readouterr().err, str(path), "no documents")
    assert "single document" not in line
    assert not cache.exists()


def test_a_bad_line_leaves_no_lock_no_pieces_and_no_cache_directory(tmp_path, capsys):
    path = write_jsonl(tmp_path / "corpus.jsonl")
    path.write_text(path.read_text() + "{not json\n")
    cache = tmp_path / "cache"
    assert exit_status(train.train, tiny_argv(tmp_path / "run", path, cache_dir=cache)) == 2
    one_error_line(capsys.readouterr().err, str(path), "not a JSON object")
    assert not cache.exists()


# ---------------------------------------------------------------------- the cache and its notes

def test_an_edit_that_keeps_size_and_time_is_seen_by_the_cache_as_by_the_resume_note(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl")
    settings = CacheSettings(str(path), "byte", tmp_path / "cache")
    tokenizer, before = cached_tokens(settings)
    fingerprint, stat = data_fingerprint(path), path.stat()
    path.write_text(path.read_text().replace("quick", "QUICK"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time (a copy with -p, rsync)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert data_fingerprint(path) != fingerprint  # the resume's note says the text changed...
    tokenizer, after = cached_tokens(settings)  # ...and the run does use the changed text
    ids = np.asarray(after)
    assert b"QUICK" in bytes(ids[ids < 256].astype(np.uint8))
    assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_the_same_bytes_with_the_same_tokenizer_hit_one_cache_whatever_the_settings(
        tmp_path, monkeypatch):
    path = write_corpus(tmp_path, "validation text, held out.\n" * 100)
    tokenizer = ByteTokenizer()
    _, first = cached_tokens(CacheSettings(str(path), "bpe", tmp_path / "cache", val_fraction=0.2,
                                           bpe_vocab_size=300), tokenizer)

    def no_build(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("gpt_train.tokencache.build_text_cache", no_build)
    for kind, vocabulary in (("byte", 4096), ("gpt2", 50257), ("bpe", 1000)):
        _, again = cached_tokens(CacheSettings(str(path), kind, tmp_path / "cache",
                                               bpe_vocab_size=vocabulary), tokenizer)
        assert again.filename == first.filename


def test_evaluate_reads_the_validation_cache_the_training_run_wrote(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    data, held_out = write_corpus(tmp_path), write_corpus(tmp_path, name="held-out.txt")
    run = tmp_path / "run"
    argv = tiny_argv(run, data, val_data=held_out, tokenizer="bpe", bpe_vocab_size=300,
                     val_fraction=0.25, max_iters=2, eval_iter=2, save_iter=2)
    assert exit_status(train.train, argv) == 0
    cache = tmp_path / "token-cache"
    written = sorted(p.name for p in cache.iterdir())

    def no_build(*args):
        raise AssertionError("evaluate.py tokenized the corpus again")

    monkeypatch.setattr("gpt_train.tokencache.build_text_cache", no_build)
    assert exit_status(evaluate.main, ["--checkpoint_dir", str(run), "--data",
                                       str(held_out)]) == 0
    assert sorted(p.name for p in cache.iterdir()) == written


# --------------------------------------------------------------------------- progress in a log

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_counts_megabytes_as_megabytes():
    stream = Terminal()
    with preparation.Progress(100_000_000, "tokenizing", stream=stream) as progress:
        progress.update(19_000_000)
    assert "19.0MB/100MB" in stream.getvalue()  # not "19.0k" (of MiB)


def test_preparation_writes_progress_lines_with_mb_per_second_and_time_left_to_a_log(
        tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "corpus.jsonl")
    monkeypatch.setattr(preparation, "PROGRESS_SECONDS", 0.0)  # a line at every piece
    for processes in (1, 2):
        cached_tokens(CacheSettings(str(path), "byte", tmp_path / f"cache{processes}",
                                    num_proc=processes, piece_bytes=2000))
        lines = capsys.readouterr().err.splitlines()  # not a terminal: lines, not a bar
        progress = [line for line in lines if line.startswith("tokenizing: ")]
        assert len(progress) >= 5, lines
        assert all("MB/s" in line and " MB (" in line for line in progress)
        assert all(" left" in line for line in progress[:-1])
        assert any(line.endswith(" left") for line in progress)  # once known, how long
        assert progress[-1].startswith("tokenizing: done, ") and "100%" in progress[-1]
        assert "\r" not in "".join(lines)

