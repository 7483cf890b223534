"""The benchmark scripts run on tiny settings and print figures that agree with each other.

These are smoke tests, not timings: no speed is asserted, only that each script finishes, prints
its figures, and that the figures follow from their definitions (tokens/s from ms/step, MFU from
FLOPs per token and the peak, the overhead from the two step times). Each printed figure is
rounded, so each comparison allows exactly the rounding of the figures it compares.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import evaluate
from conftest import (REPO, exit_status, metrics_records, one_error_line, run_cli, tiny_model,
                      write_corpus)
from model import flops_per_token

TINY_MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
              "--batch_size", "4", "--device", "cpu"]
pytestmark = pytest.mark.slow  # every test here starts processes
NUMBER = r"([\d,]+(?:\.\d+)?)"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the scripts run in subprocesses; a second thread only adds contention on a shared 2-core box
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def figure(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return [float(group.replace(",", "")) for group in match.groups()]


def assert_bench_train_figures_agree(stdout, model, tokens_per_step, peak, rounds):
    """bench_train.py's loop and bare-step lines follow from each other and from `model`."""
    step_times = {}
    for name in ("loop", "bare"):
        times = figure(rf"{name} ms/step of each round: " + ", ".join([NUMBER] * rounds) + "\n",
                       stdout)
        ms, tokens_per_second, mfu = figure(
            rf"{name}: {NUMBER} ms/step \| {NUMBER} tokens/s \| MFU {NUMBER}%", stdout)
        assert ms == min(times)  # the best round is the one reported
        # ms/step is printed to 2 decimals, tokens/s to 0, MFU to 1
        expected = tokens_per_step / (ms / 1000)
        assert abs(tokens_per_second - expected) <= expected * 0.005 / ms + 0.5
        expected = 100 * flops_per_token(model) * tokens_per_second / peak
        assert abs(mfu - expected) <= 0.05 + expected * 0.5 / tokens_per_second + 1e-9
        step_times[name] = ms
    (overhead,) = figure(r"loop overhead over the bare step: ([+-]?\d+\.\d)%", stdout)
    ratio = step_times["loop"] / step_times["bare"]
    tolerance = 100 * ratio * (0.005 / step_times["loop"] + 0.005 / step_times["bare"]) + 0.05
    assert overhead == pytest.approx(100 * (ratio - 1), abs=tolerance)
    (memory,) = figure(rf"peak memory: {NUMBER} MiB \(process max RSS\)", stdout)
    assert memory > 100  # this process imported torch and ran a model


def test_bench_train_prints_loop_and_bare_step_figures_that_agree_with_each_other():
    peak = 1e9
    result = run_cli("benchmarks/bench_train.py", *TINY_MODEL, "--synthetic_vocab", "64",
                     "--warmup_steps", "1", "--bench_steps", "2", "--repeats", "2",
                     "--peak_flops", peak)
    assert result.returncode == 0, result.stderr
    model = tiny_model(vocab_size=64, n_layer=1)
    assert_bench_train_figures_agree(result.stdout, model, 4 * 16, peak, rounds=2)


def test_bench_train_on_a_corpus_without_the_bare_step_prints_the_loop_only(tmp_path):
    data = write_corpus(tmp_path)
    result = run_cli("benchmarks/bench_train.py", *TINY_MODEL, "--data", data,
                     "--cache_dir", tmp_path / "cache", "--grad_accum_steps", "2",
                     "--warmup_steps", "0", "--bench_steps", "2", "--repeats", "1", "--bare", "false")
    assert result.returncode == 0, result.stderr
    assert "1 x 2 timed steps, 128 tokens/step" in result.stdout  # batch 4 x block 16 x 2 micro-steps
    figure(rf"loop: {NUMBER} ms/step \| {NUMBER} tokens/s\n", result.stdout)  # and no MFU
    assert "bare:" not in result.stdout and "overhead" not in result.stdout
    assert "MFU: peak FLOP/s of this device unknown" in result.stdout


def test_bench_train_refuses_zero_timed_steps_with_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_train  # in this process, as its __main__ block runs it: no torch start-up
    assert exit_status(bench_train.main, ["--bench_steps", "0"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: --bench_steps and --repeats must be positive and --warmup_steps must not be "
        "negative")


def test_bench_sample_prints_both_rates_their_ratio_and_identical_greedy_tokens():
    # 40 new tokens in a 32-token block: the window slides, and both paths must still agree
    result = run_cli("benchmarks/bench_sample.py", "--n_layer", "1", "--n_head", "2",
                     "--n_embd", "32", "--block_size", "32", "--max_new_tokens", "40",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    (cached,) = figure(rf"with KV cache: {NUMBER} tokens/s", result.stdout)
    (full,) = figure(rf"without cache: {NUMBER} tokens/s", result.stdout)
    (ratio,) = figure(rf"speed-up of the cache: {NUMBER}x", result.stdout)
    assert ratio == pytest.approx(cached / full, rel=0.01, abs=0.01)
    assert "greedy tokens: identical with and without the cache" in result.stdout


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_cpu_speedrun_reports_wall_time_and_the_evaluated_loss_of_its_final_model(tmp_path):
    data = write_corpus(tmp_path)
    out_dir = tmp_path / "out"
    quick = ["--max_iters", "4", "--warmup_iters", "1", "--n_layer", "1", "--n_head", "2",
             "--n_embd", "32", "--block_size", "16", "--eval_batches", "2", "--eval_iter", "4"]
    script = str(REPO / "benchmarks" / "cpu_speedrun.sh")
    result = subprocess.run(["bash", script, str(data), str(out_dir), *quick],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (wall_time,) = figure(r"wall time: (\d+\.\d) s \(start-up included\)", result.stdout)
    assert wall_time > 0
    records = metrics_records(out_dir)
    (estimate,) = figure(r"in-run validation estimate: (\d+\.\d+) at step 4", result.stdout)
    assert estimate == pytest.approx(records[-1]["val_loss"], abs=5e-5)
    (val_loss,) = figure(r"final validation loss: (\d+\.\d+) \(whole validation split",
                         result.stdout)
    scored = evaluate.main(["--checkpoint", str(out_dir / "gpt_final.pt"), "--device", "cpu",
                            "--dtype", "float32"])
    assert val_loss == pytest.approx(scored["loss"], abs=5e-5)

    again = subprocess.run(["bash", script, str(data), str(out_dir), *quick],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2  # a second run would mix its metrics into the first one's
    assert "already holds a metrics.jsonl" in again.stderr


@needs_bash
def test_gpu_check_dry_run_tabulates_a_chosen_row_with_figures_that_agree(tmp_path):
    # --dry_run: the CPU and a tiny shape; --only: the one row that times the plain loss
    name = "124M batch 16, plain loss (--fused_loss false)"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry_run",
                             "--only", "plain loss"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=str(tmp_path)))
    assert result.returncode == 0, result.stderr

    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["name"] == name and row["kind"] == "bench" and row["status"] == 0
    assert row["tokens_per_s"] == pytest.approx(2 * 64 / (row["ms_per_step"] / 1000), rel=0.01)
    bench_output = Path(row["log"]).read_text()
    assert "--fused_loss false" in result.stdout and "compile False, device cpu" in bench_output
    table = (tmp_path / "gpu_check.md").read_text()
    assert f"| {name} | ok, " in table and f"{row['ms_per_step']:.2f} ms/step" in table
    assert table in (tmp_path / "gpu_check.log").read_text()


def test_compare_recipes_tabulates_each_entry_with_the_loss_evaluate_gives_its_final_model(
        tmp_path):
    data = write_corpus(tmp_path)
    tiny = ("--max_iters 3 --warmup_iters 1 --n_layer 1 --n_head 2 --n_embd 32 --block_size 16 "
            "--eval_batches 1 --eval_iter 3")
    entries = [tiny, tiny + " --optimizer muon"]
    out = tmp_path / "runs"
    result = run_cli("benchmarks/compare_recipes.py", "--data", data, "--out", out, *entries)
    assert result.returncode == 0, result.stderr
    for index, entry in enumerate(entries):
        row = figure(rf"\| `{re.escape(entry)}` \| {NUMBER} \| {NUMBER} s \| {NUMBER} s "
                     rf"\| {NUMBER} \|", result.stdout)
        scored = evaluate.main(["--checkpoint", str(out / f"entry{index}-round0" / "gpt_final.pt"),
                                "--device", "cpu", "--dtype", "float32"])
        assert row[0] == row[1] == row[2] > 0  # one round: it is the fastest and the median
        assert row[3] == pytest.approx(scored["loss"], abs=5e-5)
    again = run_cli("benchmarks/compare_recipes.py", "--out", out, tiny)
    assert again.returncode == 2  # a second comparison would mix its runs into the first one's
    one_error_line(again.stderr, f"--out {out} is not empty")


def test_bench_muon_times_each_round_and_reports_the_fastest():
    result = run_cli("benchmarks/bench_muon.py", "--n_layer", "1", "--n_head", "2", "--n_embd",
                     "32", "--steps", "2", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    # the speedrun recipe's block, one layer 32 wide: attention's qkv and projection, SwiGLU's
    # gate+value and projection; float32 everywhere at this width
    assert ("Muon's step over 4 matrices, 3 rounds of 2 steps" in result.stdout
            and "float32 for 32 x 32, float32 for 32 x 96, float32 for 96 x 32, float32 for "
                "192 x 32" in result.stdout), result.stdout
    names = ["ours \\(muon.py\\)"] + (["torch.optim.Muon"] if hasattr(torch.optim, "Muon") else [])
    for name in names:
        fastest, *rounds = figure(rf"{name}: {NUMBER} ms/step \(rounds: "
                                  + ", ".join([NUMBER] * 3) + r"\)", result.stdout)
        assert fastest == min(rounds) > 0
