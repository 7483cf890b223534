"""Fine-tuning: `--init_from` starts a new run from a checkpoint's weights, architecture, tokenizer.

Unlike --resume it keeps nothing of the old run's progress: optimizer, schedule and step count
start afresh. The architecture is fixed by the checkpoint, except that the context may shrink.
"""

import pytest
import torch

import evaluate
import train
from config import ARCHITECTURE_FIELDS
from conftest import (TINY_TEXT, assert_same_weights, exit_status, one_error_line, read_checkpoint,
                      tiny_argv, write_corpus)
from gpt_train.runtime import setup_runtime
from gpt_train.tokenizer import CharTokenizer, tokenizer_from_state

# Corpus B says new things with the characters of corpus A (TINY_TEXT), so a char model reads it.
CORPUS_B = "".join(f"dog {i % 17}: a lazy fox sleeps in the quiet box then jumps {i * 3 % 11}.\n"
                   for i in range(200))
BASE_STEPS, FINE_TUNE_STEPS = 40, 40


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny char-level model trained on corpus A; returns (gpt_final.pt, root directory)."""
    root = tmp_path_factory.mktemp("base")
    data = write_corpus(root, TINY_TEXT, "corpus_a.txt")
    train.train(tiny_argv(root / "base", data, max_iters=BASE_STEPS, warmup_iters=5,
                          save_iter=BASE_STEPS, eval_iter=BASE_STEPS, log_iter=BASE_STEPS))
    return root / "base" / "gpt_final.pt", root


@pytest.fixture
def corpus_b(tmp_path):
    return write_corpus(tmp_path, CORPUS_B, "corpus_b.txt")


def test_the_new_corpus_is_encoded_with_the_checkpoints_vocabulary_not_one_of_its_own(
        base_run, corpus_b, tmp_path):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path)
    gpt_config, train_config, checkpoint = train.configure(argv)
    tokenizer, ids = train.load_corpus(gpt_config, train_config, checkpoint)
    base_tokenizer = tokenizer_from_state(read_checkpoint(base_path)["tokenizer"])
    assert tokenizer.state_dict() == base_tokenizer.state_dict()
    assert ids.tolist() == base_tokenizer.encode(CORPUS_B).tolist()
    assert gpt_config.vocab_size == base_tokenizer.vocab_size
    # corpus B has fewer distinct characters, so a vocabulary of its own would number them apart
    assert CharTokenizer(CORPUS_B).encode(CORPUS_B).tolist() != ids.tolist()


def test_fine_tuning_lowers_the_loss_on_the_new_corpus_and_keeps_tokenizer_and_architecture(
        base_run, corpus_b, tmp_path):
    base_path, _ = base_run
    # corpus B's validation split (a char tokenizer: one token per character), as its own file
    held_out = write_corpus(tmp_path, CORPUS_B[int(len(CORPUS_B) * 0.9):], "b_validation.txt")

    def loss_on_b(checkpoint):
        return evaluate.main(["--checkpoint", str(checkpoint), "--data", str(held_out),
                              "--device", "cpu"])["loss"]

    train.train(tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path,
                          max_iters=FINE_TUNE_STEPS, warmup_iters=5, save_iter=FINE_TUNE_STEPS,
                          eval_iter=FINE_TUNE_STEPS, log_iter=FINE_TUNE_STEPS))
    tuned_path = tmp_path / "tuned" / "gpt_final.pt"
    assert loss_on_b(tuned_path) < loss_on_b(base_path) - 0.1

    base, tuned = read_checkpoint(base_path), read_checkpoint(tuned_path)
    assert tuned["tokenizer"] == base["tokenizer"]
    for name in ARCHITECTURE_FIELDS:
        assert tuned["gpt_config"][name] == base["gpt_config"][name], name
    assert {k: v.shape for k, v in tuned["model_state_dict"].items()} == \
        {k: v.shape for k, v in base["model_state_dict"].items()}


def test_fine_tuning_starts_from_the_checkpoints_weights_with_a_fresh_step_count(
        base_run, corpus_b, tmp_path, capsys):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path, max_iters=4, save_iter=2)
    gpt_config, train_config, checkpoint = train.configure(argv)
    setup_runtime(train_config)  # seeds every random source, as train() does
    model = train.prepare_model(gpt_config, train_config, checkpoint)
    assert_same_weights(model.state_dict(), base_path)
    assert f"initialized from {base_path} (step {BASE_STEPS} of its run)" in capsys.readouterr().out

    record = train.train(argv)
    assert record["step"] == 4  # not BASE_STEPS + 4
    step_files = sorted(p.name for p in (tmp_path / "tuned").glob("gpt_step*.pt"))
    assert step_files == ["gpt_step2.pt", "gpt_step4.pt"]
    first = read_checkpoint(tmp_path / "tuned" / "gpt_step2.pt")
    assert first["step"] == 2
    assert first["scheduler_state_dict"]["last_epoch"] == 2  # the new run's own schedule
    assert all(int(state["step"]) == 2 for state in first["optimizer_state_dict"]["state"].values())


@pytest.mark.parametrize("flag, value", [("n_layer", 2), ("n_embd", 64), ("n_head", 4),
                                          ("bias", "false")])
def test_an_architecture_flag_with_init_from_exits_2_and_writes_nothing(
        base_run, corpus_b, tmp_path, capsys, flag, value):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path, **{flag: value})
    assert exit_status(train.train, argv) == 2
    assert f"--{flag}" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "tuned").exists()


def test_a_smaller_block_size_crops_the_position_embeddings(base_run, corpus_b, tmp_path):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path, block_size=8, max_iters=2,
                     save_iter=2, eval_iter=2)
    gpt_config, train_config, checkpoint = train.configure(argv)
    setup_runtime(train_config)  # seeds every random source, as train() does
    model = train.prepare_model(gpt_config, train_config, checkpoint)
    base_positions = read_checkpoint(base_path)["model_state_dict"]["position_embedding.weight"]
    assert torch.equal(model.position_embedding.weight.detach(), base_positions[:8])

    train.train(argv)
    tuned = read_checkpoint(tmp_path / "tuned" / "gpt_final.pt")
    assert tuned["gpt_config"]["block_size"] == 8
    assert tuned["model_state_dict"]["position_embedding.weight"].shape == (8, 32)


def test_a_larger_block_size_exits_2(base_run, corpus_b, tmp_path, capsys):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path, block_size=32)
    assert exit_status(train.train, argv) == 2
    assert "--block_size 32" in one_error_line(capsys.readouterr().err)


def test_text_with_characters_the_char_vocabulary_never_saw_names_them_and_suggests_byte_or_bpe(
        base_run, tmp_path, capsys):
    base_path, _ = base_run
    data = write_corpus(tmp_path, CORPUS_B + "café 你好 ü\n" * 20, "corpus_c.txt")
    argv = tiny_argv(tmp_path / "tuned", data, init_from=base_path)
    assert exit_status(train.train, argv) == 2
    error = one_error_line(capsys.readouterr().err)
    for character in "é你好üC":
        assert repr(character) in error or character == "C", error
    assert "byte" in error and "bpe" in error
    assert not (tmp_path / "tuned").exists()


def test_a_tokenizer_flag_that_contradicts_the_checkpoint_exits_2(base_run, corpus_b, tmp_path,
                                                                  capsys):
    base_path, _ = base_run
    argv = tiny_argv(tmp_path / "tuned", corpus_b, init_from=base_path, tokenizer="byte")
    assert exit_status(train.train, argv) == 2
    assert "--tokenizer" in one_error_line(capsys.readouterr().err)


def test_a_bpe_model_fine_tunes_on_text_with_characters_its_corpus_never_had(tmp_path):
    pytest.importorskip("tokenizers")
    data_a = write_corpus(tmp_path, TINY_TEXT, "corpus_a.txt")
    train.train(tiny_argv(tmp_path / "base", data_a, tokenizer="bpe", bpe_vocab_size=300,
                          max_iters=2, save_iter=2, eval_iter=2))
    data_b = write_corpus(tmp_path, CORPUS_B + "机器学习 😀 café\n" * 20, "corpus_b.txt")
    train.train(tiny_argv(tmp_path / "tuned", data_b, init_from=tmp_path / "base" / "gpt_final.pt",
                          max_iters=2, save_iter=2, eval_iter=2))
    base = read_checkpoint(tmp_path / "base" / "gpt_final.pt")
    tuned = read_checkpoint(tmp_path / "tuned" / "gpt_final.pt")
    assert tuned["tokenizer"] == base["tokenizer"] and tuned["tokenizer"]["kind"] == "bpe"
    assert tuned["gpt_config"]["vocab_size"] == base["gpt_config"]["vocab_size"]
