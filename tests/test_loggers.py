"""--log_to: TensorBoard and W&B hold the same values as metrics.jsonl at the same steps, across a
resume; the gradient norm is the one before clipping; a missing package is one line."""

import html
import json
import re
import sys

import pytest
import torch

import train
from config import GPTConfig, TrainConfig
from conftest import exit_status, metrics_records, one_error_line, tiny_argv
from gpt_train.loggers import CHARTS, Loggers
from gpt_train.runtime import Runtime, setup_runtime


def records(checkpoint_dir):
    return [record for record in metrics_records(checkpoint_dir) if "loss" in record]


def curves(checkpoint_dir):
    """metrics.jsonl as {chart: [(step, value), ...]}: what every destination must show."""
    series = {}
    for record in records(checkpoint_dir):
        for key, chart in CHARTS.items():
            if key in record:
                series.setdefault(chart, []).append((record["step"], record[key]))
    return series


def train_and_resume(checkpoint_dir, data, log_to, **flags):
    """8 steps logged every 2, then the run resumed from step 4 and trained to 8 again: the
    points at steps 6 and 8 are written twice and must be shown once."""
    argv = tiny_argv(checkpoint_dir, data, log_to=log_to, **flags)
    train.train(argv)
    train.train([*argv, "--resume", str(checkpoint_dir / "gpt_step4.pt"), "--overwrite", "true"])


@pytest.mark.slow
def test_tensorboard_shows_the_metrics_at_their_steps_once_across_a_resume(tmp_path, corpus_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoint_dir = tmp_path / "run"
    train_and_resume(checkpoint_dir, corpus_file, "jsonl,tensorboard")
    events = EventAccumulator(str(checkpoint_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = curves(checkpoint_dir)
    assert set(events.Tags()["scalars"]) == set(expected)
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6, 8]
    for chart, points in expected.items():
        shown = [(event.step, event.value) for event in events.Scalars(chart)]
        assert shown == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], chart


def wandb_records(run_file):
    """The records of a W&B transaction log (.wandb): LevelDB's log format, after a 7-byte header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, pending, block = run_file.read_bytes(), 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_directory):
    """(run id, config, {chart: [(step, value)]}, samples) of one offline run directory."""
    (run_file,) = run_directory.glob("run-*.wandb")
    config, series, samples = {}, {}, []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            for chart, value in items.items():
                if chart in CHARTS.values():
                    series.setdefault(chart, []).append((items["_step"], value))
            if "sample/path" in items:
                samples.append((items["_step"], (run_directory / "files" / items["sample/path"])
                                .read_text()))
    return run_file.stem.removeprefix("run-"), config, series, samples


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_config_metrics_and_samples_and_resumes_by_id(
        tmp_path, corpus_file, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    checkpoint_dir = tmp_path / "run"
    argv = tiny_argv(checkpoint_dir, corpus_file, log_to="jsonl,wandb", sample_tokens=12, n_layer=2)
    train.train(argv)  # without WANDB_DIR, W&B's files go under the run directory
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # W&B's convention: it wins
    train.train([*argv, "--resume", str(checkpoint_dir / "gpt_step4.pt"), "--overwrite", "true"])
    (first,) = (checkpoint_dir / "wandb").glob("offline-run-*")
    (resumed,) = (tmp_path / "elsewhere" / "wandb").glob("offline-run-*")
    run_id, config, series, samples = wandb_run(first)
    assert (checkpoint_dir / "wandb_run_id").read_text().strip() == run_id
    assert config["n_layer"] == 2 and config["log_to"] == "jsonl,wandb"
    expected = curves(checkpoint_dir)
    timed = {chart for chart in expected if chart.startswith("speed/")}  # differ between attempts
    assert {chart: series[chart] for chart in set(expected) - timed} == \
        {chart: expected[chart] for chart in set(expected) - timed}  # steps 2 to 8
    printed = re.findall(r"--- sample ---\n(.*?)\n-{14}\n", capsys.readouterr().out, re.S)
    assert [step for step, _ in samples] == [4, 8]
    for (_, page), text in zip(samples, printed, strict=False):  # the first attempt's two
        assert page.endswith(f"<pre>{html.escape(text)}</pre>")
    resumed_id, _, resumed_series, _ = wandb_run(resumed)
    assert resumed_id == run_id  # the same W&B run continues, from step 5
    assert resumed_series == {chart: [(step, value) for step, value in points if step > 4]
                              for chart, points in expected.items()}


def test_the_logged_gradient_norm_is_the_norm_before_clipping(tmp_path, corpus_file):
    argv = tiny_argv(tmp_path / "run", corpus_file, max_iters=1, warmup_iters=0, log_iter=1,
                     eval_iter=1, save_iter=1, grad_clip=1e-3)
    gpt_config, train_config, _ = train.configure(argv)  # before the run fills the directory
    train.train(argv)
    (record,) = records(tmp_path / "run")
    # the same first step by hand: same seed, same initial weights, same first batch
    run = train.build_run(gpt_config, train_config, setup_runtime(train_config))
    input_ids, labels = next(iter(run.loader))
    run.model(input_ids=input_ids, labels=labels).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters()]))
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert record["grad_norm"] > 1e-2  # not the clipped norm


@pytest.mark.parametrize("destination, module", [("tensorboard", "torch.utils.tensorboard"),
                                                 ("wandb", "wandb")])
def test_a_missing_logging_package_is_one_line_naming_it(destination, module, tmp_path,
                                                        corpus_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import` fail as if not installed
    checkpoint_dir = tmp_path / "run"
    status = exit_status(train.train, tiny_argv(checkpoint_dir, corpus_file, log_to=destination))
    assert status == 2
    one_error_line(capsys.readouterr().err, f"pip install {destination}")
    assert not checkpoint_dir.exists()


def test_only_rank_0_logs(tmp_path):
    train_config = TrainConfig(checkpoint_dir=str(tmp_path), log_to="jsonl,tensorboard,wandb")
    other_rank = Runtime(torch.device("cpu"), torch.float32, rank=1, world_size=2)
    with Loggers(GPTConfig(), train_config, other_rank) as loggers:
        loggers.write({"step": 1, "loss": 2.0, "lr": 1e-3})
        loggers.write_sample(1, "text")
    assert list(tmp_path.iterdir()) == []
