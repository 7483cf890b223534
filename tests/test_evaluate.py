"""evaluate.py: every token scored once, loss equal to the model's own, and honest bits per byte."""

import io
import math
import re

import numpy as np
import pytest
import torch

import evaluate
import train
from gpt_train import progress
from gpt_train.checkpoint import model_from_checkpoint
from conftest import TINY_TEXT, exit_status, one_error_line, tiny_argv, write_corpus
from dataset import builtin_corpus, split_tokens
from config import GPTConfig
from model import build_model
from gpt_train.tokenizer import CharTokenizer

SHORT_TEXT = TINY_TEXT[:61]  # 61 tokens: not a multiple of the block size (16)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A tiny byte-level run on text with multi-byte characters."""
    root = tmp_path_factory.mktemp("byte-run")
    data = write_corpus(root, TINY_TEXT.replace("fox", "föx").replace("dog", "dög €"))
    checkpoint_dir = root / "checkpoints"
    train.train(tiny_argv(checkpoint_dir, data, tokenizer="byte", max_iters=2, eval_iter=2,
                          save_iter=2))
    return checkpoint_dir


@pytest.fixture(scope="module")
def char_model(trained_run):
    model, tokenizer, _ = model_from_checkpoint(trained_run / "gpt_final.pt")
    return model, tokenizer


@torch.no_grad()
def reference_total(model, ids, block_size, stride):
    """Window by window with the model's own mean loss: the recipe evaluate_tokens batches.

    A window starts every `stride` tokens and predicts the tokens after it; only those not
    predicted by an earlier window count.
    """
    total, scored, previous_end = 0.0, 0, 0
    for start in range(0, len(ids), stride):
        end = min(start + block_size, len(ids) - 1)  # the last token this window predicts
        x = torch.tensor(ids[start:end])[None]
        labels = torch.tensor(ids[start + 1:end + 1])[None]
        new = end - previous_end
        labels[:, :labels.size(1) - new] = -100
        total += model(x, labels=labels).loss.item() * new
        scored += new
        previous_end = end
        if end == len(ids) - 1:
            break
    return total, scored


def test_non_overlapping_windows_give_the_models_own_loss_on_every_token(char_model):
    model, tokenizer = char_model
    ids = tokenizer.encode(SHORT_TEXT)
    block_size = model.config.block_size
    total, count, _ = evaluate.evaluate_tokens(model, tokenizer, ids, batch_size=3)
    # non-overlapping windows, computed directly: ids[s:s+16] predicts ids[s+1:s+17]
    expected = 0.0
    for start in range(0, len(ids) - 1, block_size):
        x = torch.tensor(ids[start:start + block_size])
        y = torch.tensor(ids[start + 1:start + block_size + 1])
        x = x[:len(y)]
        with torch.no_grad():
            expected += model(x[None], labels=y[None]).loss.item() * len(y)
    assert count == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stride", [1, 5, 15, 16])
def test_a_stride_scores_each_token_once_with_its_windows_context(char_model, stride):
    model, tokenizer = char_model
    ids = tokenizer.encode(SHORT_TEXT)
    total, count, _ = evaluate.evaluate_tokens(model, tokenizer, ids, stride, batch_size=4)
    expected_total, expected_count = reference_total(model, ids, model.config.block_size, stride)
    assert count == expected_count == len(ids) - 1
    assert total == pytest.approx(expected_total, rel=1e-5)


def test_the_result_does_not_depend_on_the_batch_size(char_model):
    model, tokenizer = char_model
    ids = tokenizer.encode(SHORT_TEXT)
    one = evaluate.evaluate_tokens(model, tokenizer, ids, 5, batch_size=1)
    many = evaluate.evaluate_tokens(model, tokenizer, ids, 5, batch_size=64)
    assert many[1:] == one[1:]
    assert many[0] == pytest.approx(one[0], rel=1e-6)


@pytest.mark.parametrize("stride", [3, 16])
def test_scored_bytes_are_the_utf8_bytes_of_all_but_the_first_character(stride):
    text = "€aé€b" * 7
    tokenizer = CharTokenizer(text)
    model = build_model(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1,
                                  n_head=2, n_embd=32)).eval()
    _, _, num_bytes = evaluate.evaluate_tokens(model, tokenizer, tokenizer.encode(text), stride)
    assert num_bytes == len(text[1:].encode("utf-8"))


def test_bits_per_byte_of_a_byte_level_model_is_its_loss_over_ln2(byte_run, tmp_path):
    text = "naïve föx, dög € 42\n" * 3
    data = write_corpus(tmp_path, text, "eval.txt")
    result = evaluate.main(["--checkpoint", str(byte_run / "gpt_final.pt"), "--data", str(data),
                            "--device", "cpu"])
    assert result["tokens"] == result["bytes"] == len(text.encode("utf-8")) - 1
    by_definition = result["loss"] * result["tokens"] / math.log(2) / result["bytes"]
    assert result["bits_per_byte"] == pytest.approx(by_definition, rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_without_data_the_validation_split_of_the_training_text_is_scored(trained_run, capsys):
    result = evaluate.main(["--checkpoint", str(trained_run / "gpt_final.pt"), "--device", "cpu"])
    model, tokenizer, checkpoint = model_from_checkpoint(trained_run / "gpt_final.pt")
    val_fraction = checkpoint["train_config"]["val_fraction"]
    _, val_tokens = split_tokens(tokenizer.encode(TINY_TEXT), val_fraction, model.config.block_size)
    assert result["tokens"] == len(val_tokens) - 1
    assert result["bytes"] == len(tokenizer.decode(val_tokens[1:]).encode("utf-8"))
    printed = capsys.readouterr().out
    assert "validation split" in printed and f"{result['bits_per_byte']:.4f}" in printed


def test_a_run_on_the_builtin_corpus_is_scored_on_its_validation_split(byte_run, tmp_path):
    checkpoint = torch.load(byte_run / "gpt_final.pt", weights_only=True)
    checkpoint["train_config"]["data"] = ""  # as if it had been trained on the built-in corpus
    path = tmp_path / "builtin.pt"
    torch.save(checkpoint, path)
    result = evaluate.main(["--checkpoint", str(path), "--device", "cpu", "--batch_size", "256"])
    corpus = np.frombuffer(builtin_corpus().encode("utf-8"), dtype=np.uint8)
    _, val_tokens = split_tokens(corpus, checkpoint["train_config"]["val_fraction"], 16)
    assert result["tokens"] == result["bytes"] == len(val_tokens) - 1


def test_text_the_char_vocabulary_never_saw_is_one_clear_line(trained_run, tmp_path, capsys):
    data = write_corpus(tmp_path, "the quick € fox\n", "unknown.txt")
    status = exit_status(evaluate.main, ["--checkpoint", str(trained_run / "gpt_final.pt"),
                                         "--data", str(data), "--device", "cpu"])
    assert status == 2
    one_error_line(capsys.readouterr().err, "never seen", "'€'")


@pytest.mark.parametrize("flags, named", [
    (["--stride", "17"], "--stride 17 exceeds the model's block_size 16"),
    (["--stride", "-1"], "--stride must not be negative"),
    (["--batch_size", "0"], "--batch_size must be positive"),
])
def test_a_stride_beyond_the_block_or_an_empty_batch_is_refused(trained_run, capsys, flags, named):
    status = exit_status(evaluate.main, ["--checkpoint", str(trained_run / "gpt_final.pt"),
                                         "--device", "cpu", *flags])
    assert status == 2
    one_error_line(capsys.readouterr().err, named)


def test_a_one_token_text_cannot_be_scored(trained_run, tmp_path, capsys):
    data = write_corpus(tmp_path, "t", "one.txt")
    status = exit_status(evaluate.main, ["--checkpoint", str(trained_run / "gpt_final.pt"),
                                         "--data", str(data), "--device", "cpu"])
    assert status == 2
    one_error_line(capsys.readouterr().err, "too short")


def test_evaluate_writes_progress_lines_where_no_terminal_shows_a_bar(trained_run, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.0)  # a line after every batch
    evaluate.main(["--checkpoint_dir", str(trained_run), "--batch_size", "16", "--device", "cpu"])
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is no terminal, as a log file
    total = len(lines)  # a line after each batch but the last, and one at the end
    assert total >= 3
    for done, line in enumerate(lines[:-1], 1):
        assert re.fullmatch(rf"evaluating: {done}/{total} batches \(\d+%\), \d+ s, about \d+ s "
                            rf"left", line), line
    assert re.fullmatch(rf"evaluating: {total} batches in \d+ s", lines[-1]), lines[-1]


def test_progress_counts_what_each_item_holds(monkeypatch):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.0)
    log = io.StringIO()  # a log file: no terminal
    sizes = [3, 4, 5]  # task_scoring.py's batches hold several items each
    shown = progress.progress(iter(sizes), 12, "scoring tasks", "items", size=int, file=log)
    assert list(shown) == sizes
    first, second, last = log.getvalue().splitlines()
    assert first.startswith("scoring tasks: 3/12 items (25%), 0 s, about ")
    assert second.startswith("scoring tasks: 7/12 items (58%), 0 s, about ")
    assert re.fullmatch(r"scoring tasks: 12 items in \d+ s", last)
