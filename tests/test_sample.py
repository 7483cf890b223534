"""sample.py on a tiny trained checkpoint: the command, seeds, checkpoint choice and prompts."""

import io
import shutil

import pytest
import torch

from gpt_train import generation
import sample
from gpt_train.checkpoint import model_from_checkpoint
from conftest import exit_status, one_error_line, run_cli
from gpt_train.rundir.reading import find_sampling_checkpoint


def sampled_text(capsys, *argv):
    assert exit_status(sample.main, list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_sample_py_prints_the_prompt_and_max_new_tokens_characters(trained_run):
    final = trained_run / "gpt_final.pt"
    result = run_cli("sample.py", "--checkpoint", final, "--max_new_tokens", 20)
    assert result.returncode == 0, result.stderr
    _, tokenizer, _ = model_from_checkpoint(final)
    # the default prompt is a newline; a char-level token is one character; a newline ends it
    assert result.stdout.startswith("\n") and result.stdout.endswith("\n")
    generated = result.stdout[1:-1]
    assert len(generated) == 20
    assert set(generated) <= set(tokenizer.chars)
    assert "Traceback" not in result.stderr


def test_the_same_seed_gives_the_same_text(trained_run, capsys):
    argv = ["--checkpoint", str(trained_run / "gpt_final.pt"), "--max_new_tokens", "60"]
    first = sampled_text(capsys, *argv, "--seed", "7")
    again = sampled_text(capsys, *argv, "--seed", "7")
    other = sampled_text(capsys, *argv, "--seed", "8")
    assert first == again
    assert other != first


def test_temperature_zero_is_greedy_and_ignores_the_seed(trained_run, capsys):
    argv = ["--checkpoint", str(trained_run / "gpt_final.pt"), "--max_new_tokens", "30",
            "--temperature", "0"]
    assert sampled_text(capsys, *argv, "--seed", "1") == sampled_text(capsys, *argv, "--seed", "2")


def test_samples_continue_the_prompt(trained_run, capsys):
    text = sampled_text(capsys, "--checkpoint", str(trained_run / "gpt_final.pt"), "--prompt",
                        "the quick", "--max_new_tokens", "10", "--num_samples", "2")
    samples = text.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 2
    assert all(s.startswith("the quick") and len(s) == len("the quick") + 10 for s in samples)


def test_streamed_text_is_the_generated_text(trained_run):
    model, tokenizer, _ = model_from_checkpoint(trained_run / "gpt_final.pt")
    stream = io.StringIO()
    text = generation.generate_text(model, tokenizer, "line", 25, stream=stream,
                                    generator=torch.Generator().manual_seed(0))
    assert stream.getvalue() == text and len(text) == 25


def test_gpt_final_is_preferred_over_step_checkpoints(tmp_path):
    for name in ("gpt_step9.pt", "gpt_step10.pt", "gpt_final.pt", "notes.pt"):
        (tmp_path / name).write_bytes(b"")
    assert find_sampling_checkpoint(tmp_path).name == "gpt_final.pt"
    (tmp_path / "gpt_final.pt").unlink()
    assert find_sampling_checkpoint(tmp_path).name == "gpt_step10.pt"  # by step, not by name
    for name in ("gpt_step9.pt", "gpt_step10.pt"):
        (tmp_path / name).unlink()
    assert find_sampling_checkpoint(tmp_path) is None


def test_sample_uses_the_final_checkpoint_of_a_directory(trained_run, tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    shutil.copytree(trained_run, directory)
    argv = ["--max_new_tokens", "40", "--seed", "3"]
    from_directory = sampled_text(capsys, "--checkpoint_dir", str(directory), *argv)
    from_final = sampled_text(capsys, "--checkpoint", str(directory / "gpt_final.pt"), *argv)
    from_step4 = sampled_text(capsys, "--checkpoint", str(directory / "gpt_step4.pt"), *argv)
    assert from_directory == from_final != from_step4
    (directory / "gpt_final.pt").unlink()
    (directory / "gpt_step8.pt").rename(directory / "gpt_step10.pt")  # newest by step number
    shutil.copy(directory / "gpt_step4.pt", directory / "gpt_step9.pt")
    assert sampled_text(capsys, "--checkpoint_dir", str(directory), *argv) == from_final


@pytest.mark.slow
def test_without_any_checkpoint_sample_py_says_to_train_first(tmp_path):
    result = run_cli("sample.py", cwd=tmp_path)  # `python sample.py` in a fresh directory
    assert result.returncode == 2
    one_error_line(result.stderr, "train")
    assert result.stdout == ""


def test_prompt_characters_missing_from_the_vocabulary_are_named(trained_run, capsys):
    final = trained_run / "gpt_final.pt"
    _, tokenizer, _ = model_from_checkpoint(final)
    prompt = "the fox 中文 ☃"
    missing = sorted(set(prompt) - set(tokenizer.chars))
    assert missing  # the tiny corpus is plain ASCII
    status = exit_status(sample.main, ["--checkpoint", str(final), "--prompt", prompt])
    assert status == 2
    line = one_error_line(capsys.readouterr().err, *map(repr, missing))
    assert "'t'" not in line  # characters it knows are not blamed


def test_a_rejected_prompt_prints_nothing_to_stdout(trained_run, capsys):
    status = exit_status(sample.main, ["--checkpoint", str(trained_run / "gpt_final.pt"),
                                       "--prompt", "snow ☃"])
    assert status == 2
    assert capsys.readouterr().out == ""
