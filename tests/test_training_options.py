"""Training options whose effect is only visible from outside: compiled runs, samples, MFU."""

import functools
import os
import re

import pytest
import torch

import sample
import train
from gpt_train.checkpoint import model_from_checkpoint
from config import GPTConfig, config_from_dict
from conftest import exit_status, metrics_records, read_checkpoint, tiny_argv, write_corpus
from gpt_train.generation import generate_text
from model import build_model, flops_per_token


@pytest.mark.slow
def test_a_compiled_run_saves_plain_keys_that_sample_and_an_uncompiled_resume_load(
        tmp_path, monkeypatch, capsys):
    # Dynamo's tracing and the compiled wrapper are real; only code generation is skipped
    # (the "eager" backend), which keeps the test fast on a CPU without a compiler warm-up.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    data = write_corpus(tmp_path)
    compiled_dir = tmp_path / "compiled"
    train.train(tiny_argv(compiled_dir, data, compile="true", max_iters=4, save_iter=2))
    checkpoint = read_checkpoint(compiled_dir / "gpt_step2.pt")
    plain_keys = set(build_model(config_from_dict(GPTConfig, checkpoint["gpt_config"])).state_dict())
    saved_keys = set(checkpoint["model_state_dict"])
    assert saved_keys == plain_keys  # no "_orig_mod." prefix from the compiled wrapper

    capsys.readouterr()  # the training's output
    assert exit_status(sample.main, ["--checkpoint", str(compiled_dir / "gpt_final.pt"),
                                     "--max_new_tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\n") and len(out[1:].removesuffix("\n")) == 10  # prompt, 10 characters

    monkeypatch.undo()
    record = train.train(["--resume", str(compiled_dir / "gpt_step2.pt"), "--compile", "false",
                          "--overwrite", "true"])  # it goes back to step 2: replaces step 4
    assert record["step"] == 4


def test_sample_tokens_prints_a_sample_at_each_evaluation(tmp_path, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    train.train(tiny_argv(checkpoint_dir, data, sample_tokens=25, max_iters=4, eval_iter=2,
                          save_iter=2))
    samples = re.findall(r"^--- sample ---\n(.*?)\n--------------$", capsys.readouterr().out,
                         re.DOTALL | re.MULTILINE)
    assert len(samples) == 2  # evaluations at steps 2 and 4
    for text, step in zip(samples, (2, 4)):
        # what the model of that step generates from the empty prompt with generator seed 0
        model, tokenizer, _ = model_from_checkpoint(checkpoint_dir / f"gpt_step{step}.pt")
        expected = generate_text(model, tokenizer, "", 25,
                                 generator=torch.Generator().manual_seed(0))
        assert len(tokenizer.encode(text)) == 25 and text == expected


def test_a_known_peak_adds_mfu_to_the_log_and_metrics(tmp_path, capsys):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "run"
    peak = 1e9
    train.train(tiny_argv(checkpoint_dir, data, peak_flops=peak, max_iters=4))
    gpt_config = config_from_dict(GPTConfig,
                                  read_checkpoint(checkpoint_dir / "gpt_final.pt")["gpt_config"])
    per_token = flops_per_token(build_model(gpt_config))
    records = metrics_records(checkpoint_dir)
    assert records
    logged = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    for record in records:
        expected = per_token * record["tokens_per_sec"] / peak
        assert abs(record["mfu"] - expected) <= 1e-4 + 1e-3 * expected
        assert f" | mfu {100 * record['mfu']:.1f}%" in logged[f"step {record['step']}"]


def test_without_a_known_peak_only_tokens_per_second_is_reported(tmp_path, capsys):
    data = write_corpus(tmp_path)
    train.train(tiny_argv(tmp_path / "run", data, max_iters=2))
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "tokens_per_sec" in records and "mfu" not in records
    assert "mfu" not in capsys.readouterr().out


def test_threads_sets_torchs_threads_and_busy_cores_get_one_line_of_advice(monkeypatch, capsys):
    from config import TrainConfig
    from gpt_train.runtime import setup_runtime
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 0.9))  # another process: one core
    try:
        torch.set_num_threads(2)  # torch's own choice on 2 cores
        setup_runtime(TrainConfig(device="cpu"))
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note")]
        assert len(notes) == 1
        assert "this machine's 2 cores are busy with other work (load average 1.2)" in notes[0]
        assert notes[0].endswith("--threads 1 avoids that")

        monkeypatch.setattr(os, "getloadavg", lambda: (0.8, 0.5, 0.4))  # less than a core's worth
        setup_runtime(TrainConfig(device="cpu"))
        assert "note" not in capsys.readouterr().err

        setup_runtime(TrainConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == 1 and "note" not in capsys.readouterr().err

        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))  # the cores are free
        setup_runtime(TrainConfig(device="cpu"))
        assert "note" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)  # what conftest set for the whole suite
