"""The learning-rate schedule across runs: an extended run keeps its decay, WSD extends exactly,
each optimizer's rate under its own name, the advice after a divergence, --print_config's notes."""

import math
import tomllib

import pytest

import plot
import train
from config import TrainConfig
from conftest import (assert_same_weights, exit_status, metrics_records, one_error_line,
                      run_stopped_after, tiny_argv, write_corpus)
from gpt_train.optim import Schedule, resumed_decay_iters
from robust_helpers import poison_training_losses

PEAK, FLOOR = TrainConfig().learning_rate, TrainConfig().learning_rate * TrainConfig().min_lr_ratio


def rates_by_step(checkpoint_dir, name="lr"):
    return {r["step"]: r[name] for r in metrics_records(checkpoint_dir) if name in r}


def test_wsd_warms_up_holds_the_peak_then_decays_as_one_minus_sqrt_to_the_floor():
    schedule = Schedule("wsd", warmup_iters=10, decay_iters=100, min_lr_ratio=0.1,
                        decay_fraction=0.2)
    rates = [schedule(step) for step in range(120)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10:80] == [1.0] * 70  # the decay is the last 20 of the 100 steps
    assert rates[80:101] == pytest.approx([0.1 + 0.9 * (1 - math.sqrt(k / 20)) for k in range(21)])
    assert rates[100:] == [pytest.approx(0.1)] * 20  # past the horizon: the floor


@pytest.mark.parametrize("schedule, step, max_iters, expected", [
    ("cosine", 500, 1000, 0),  # the same length: the decay ends at --max_iters as it did
    ("cosine", 50, 2000, 1000),  # even in warmup, a cosine keeps its end
    ("wsd", 700, 2000, 0),  # before the decay (800-1000): it moves to the end (1600-2000)
    ("wsd", 900, 2000, 1000),  # in the decay: it keeps its end
    ("wsd", 700, 750, 1000),  # shortened past the new decay's start (600): nothing moves
])
def test_a_resume_keeps_the_end_of_a_decay_unless_a_wsd_run_has_not_begun_it(
        schedule, step, max_iters, expected):
    saved = TrainConfig(lr_schedule=schedule, max_iters=1000, warmup_iters=100)
    resumed = TrainConfig(lr_schedule=schedule, max_iters=max_iters, warmup_iters=100)
    assert resumed_decay_iters(saved, resumed, step) == expected


def test_an_extended_cosine_run_keeps_its_decay_end_and_runs_the_extra_steps_at_the_floor(
        tmp_path, capsys):
    data = write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    train.train(tiny_argv(run_dir, data, log_iter=1))
    assert rates_by_step(run_dir)[8] > FLOOR
    train.train(["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "12"])
    assert [rates_by_step(run_dir)[step] for step in range(9, 13)] == pytest.approx([FLOOR] * 4)
    assert ("learning rate for steps 9-12: the minimum, 2.00e-04, to step 12; the decay ends at "
            "step 8 as in the run it resumes (give --lr_decay_iters 12 to end it at --max_iters "
            "instead)") in capsys.readouterr().out
    # the horizon is saved: a second extension keeps it; giving the flag re-shapes the decay
    extended = train.configure(["--resume", "latest", "--checkpoint_dir", str(run_dir),
                                "--max_iters", "16"])[1]
    stretched = train.configure(["--resume", "latest", "--checkpoint_dir", str(run_dir),
                                 "--max_iters", "16", "--lr_decay_iters", "16"])[1]
    assert (extended.lr_decay_iters, stretched.lr_decay_iters) == (8, 16)


def test_a_wsd_run_extended_before_its_decay_ends_bit_identical_to_one_started_longer(
        tmp_path, monkeypatch):
    data = write_corpus(tmp_path)
    wsd = dict(lr_schedule="wsd", decay_fraction=0.25, log_iter=1, eval_iter=100, dropout=0.1)
    short = tiny_argv(tmp_path / "short", data, max_iters=8, **wsd)  # decays over steps 7-8
    assert run_stopped_after(monkeypatch, 4, short) == 130
    train.train(["--resume", str(tmp_path / "short" / "gpt_step4.pt"), "--max_iters", "12"])
    train.train(tiny_argv(tmp_path / "long", data, max_iters=12, **wsd))  # decays over 10-12

    assert_same_weights(tmp_path / "short" / "gpt_final.pt", tmp_path / "long" / "gpt_final.pt")
    extended, started_long = (
        [(r["step"], r["loss"], r["lr"]) for r in metrics_records(tmp_path / name) if "loss" in r]
        for name in ("short", "long"))
    assert extended == started_long
    assert [rates_by_step(tmp_path / "long")[step] for step in (9, 10)] == [PEAK, PEAK]


def test_under_muon_each_optimizers_rate_is_logged_and_shown_under_its_own_name(tmp_path, capsys):
    data = write_corpus(tmp_path)
    run_dir = tmp_path / "muon"
    train.train(tiny_argv(run_dir, data, optimizer="muon", muon_learning_rate=0.05,
                          learning_rate=0.004, max_iters=4, warmup_iters=4, save_iter=100))
    output = capsys.readouterr().out
    records = metrics_records(run_dir)
    # warmup: step s runs at s / 4 of each peak
    assert [r["lr"] for r in records] == pytest.approx([0.004 * s / 4 for s in (2, 4)])
    assert [r["muon_lr"] for r in records] == pytest.approx([0.05 * s / 4 for s in (2, 4)])
    assert "| lr 2.00e-03 | muon_lr 2.50e-02 |" in output
    series = plot.read_metrics(run_dir / "metrics.jsonl")
    assert [rate for _, rate in series["muon_lr"]] == pytest.approx([0.025, 0.05])


def test_a_diverged_muon_run_names_both_rates_and_the_checkpoint_it_kept(tmp_path, monkeypatch,
                                                                         capsys):
    data = write_corpus(tmp_path)
    poison_training_losses(monkeypatch, {3})
    argv = tiny_argv(tmp_path / "run", data, optimizer="muon", save_iter=2, log_iter=1,
                     skip_nonfinite=0)
    assert exit_status(train.train, argv) == 2
    one_error_line(capsys.readouterr().err, "diverged at step 3", "the last good one, ",
                   "gpt_step2.pt, is intact", "--muon_learning_rate (now 0.02, Muon's)",
                   "--learning_rate (now 0.002, AdamW's)", "--skip_nonfinite N")


def test_a_run_that_diverges_before_its_first_checkpoint_does_not_claim_one(tmp_path, monkeypatch,
                                                                           capsys):
    data = write_corpus(tmp_path)
    poison_training_losses(monkeypatch, {2, 3})
    argv = tiny_argv(tmp_path / "run", data, log_iter=1, skip_nonfinite=1)
    assert exit_status(train.train, argv) == 2
    line = one_error_line(capsys.readouterr().err, "more than 1 skipped", "had saved none",
                          "a --skip_nonfinite above 1")
    assert "intact" not in line and "--skip_nonfinite N" not in line


@pytest.mark.parametrize("max_iters, relation", [(30, "exceeds"),
                                                 (100, "equals")])
def test_print_config_writes_only_the_recipe_to_stdout_and_its_notes_to_stderr(
        tmp_path, capsys, max_iters, relation):
    # --max_iters at or below the default --warmup_iters 100: a note that the warmup adapts
    assert exit_status(train.train, ["--max_iters", str(max_iters), "--print_config"]) == 0
    captured = capsys.readouterr()
    assert f"note: --warmup_iters 100 (the default) {relation} --max_iters {max_iters}, leaving " \
           f"no step to decay the learning rate; using --warmup_iters {max_iters // 10}, a " \
           f"tenth of the run" in captured.err
    recipe = tmp_path / "r.toml"
    recipe.write_text(captured.out)
    assert tomllib.loads(captured.out)["warmup_iters"] == max_iters // 10
    assert exit_status(train.train, ["--config", str(recipe), "--print_config"]) == 0
    assert capsys.readouterr().out == captured.out


@pytest.mark.parametrize("flags, message", [
    (["--lr_schedule", "linear"], "unknown --lr_schedule 'linear'; choose one of cosine, wsd"),
    (["--decay_fraction", "0"], "--decay_fraction must be in (0, 1]"),
    (["--lr_decay_iters", "50"], "--lr_decay_iters (50) must be 0 (= --max_iters) or at least "
                                 "--warmup_iters (100)"),
])
def test_a_bad_schedule_flag_is_one_line_and_exit_status_2(flags, message, capsys):
    assert exit_status(train.train, [*flags, "--print_config"]) == 2
    one_error_line(capsys.readouterr().err, message)
