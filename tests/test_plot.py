"""plot.py: a tiny resumed run's metrics become a PNG with the resume marked."""

import json
import sys

import pytest

import plot
import train
from conftest import exit_status, one_error_line, tiny_argv, write_corpus

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """8 tiny steps, stopped after step 4 and resumed from its checkpoint."""
    root = tmp_path_factory.mktemp("resumed")
    data = write_corpus(root)
    checkpoint_dir = root / "checkpoints"
    train.train(tiny_argv(checkpoint_dir, data, log_iter=1))
    train.train(["--resume", str(checkpoint_dir / "gpt_step4.pt"), "--overwrite", "true"])
    return checkpoint_dir


def test_a_resumed_runs_metrics_give_every_series_and_the_resume_step(resumed_run):
    series = plot.read_metrics(resumed_run / "metrics.jsonl")
    assert [step for step, _ in series["train"]] == list(range(1, 9))  # one history, no repeats
    assert [step for step, _ in series["lr"]] == list(range(1, 9))
    assert [step for step, _ in series["val"]] == [4, 8]
    assert series["resumes"] == [4]


def test_plot_writes_a_png_that_decodes(resumed_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    plot.main([str(resumed_run / "metrics.jsonl"), "--out", str(out)])
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE)
    assert str(out) in capsys.readouterr().out
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(out) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0


def test_smoothing_follows_a_constant_and_weights_the_past():
    assert plot.smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    # bias-corrected average of two points: (0.9 * 0.1 * a + 0.1 * b) / (1 - 0.9 ** 2)
    assert plot.smooth([1.0, 2.0], 0.9)[1] == pytest.approx((0.09 * 1.0 + 0.1 * 2.0) / 0.19)


def test_non_finite_losses_are_left_out(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": NaN, "lr": 0.1}\n{"step": 2, "loss": 2.5, "lr": 0.2}\n')
    assert plot.read_metrics(metrics)["train"] == [(2, 2.5)]


def test_plot_without_matplotlib_says_which_package_to_install(tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 1e-3}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "loss.png"
    status = exit_status(plot.main, [str(metrics), "--out", str(out)])
    assert status == 2
    one_error_line(capsys.readouterr().err, "pip install matplotlib")
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "no loss records"),
    ('{"step": 1, "loss": 3.0}\nnot json\n', "line 2"),
])
def test_a_missing_empty_or_damaged_metrics_file_is_one_line(tmp_path, capsys, content, message):
    metrics = tmp_path / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    status = exit_status(plot.main, [str(metrics), "--out", str(tmp_path / "loss.png")])
    assert status == 2
    one_error_line(capsys.readouterr().err, message)
