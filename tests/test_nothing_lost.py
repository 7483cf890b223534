"""Nothing the user has is ever lost, and every mistake gets one clear line.

Each command runs the way its `__main__` block does (in-process, through `run_main`), mostly on a
private copy of a finished tiny run, and must end with exit status 2, one `error: ` line naming
the flag or file, and every file of the run directory byte-identical afterwards. Training
commands that must fail say `--overwrite true` where that makes the check stronger: even a run
allowed to replace the directory's files must not have touched them when it fails before its
first steps. Only start-up itself and signals sent to a process group need a real subprocess.
"""

import contextlib
import errno
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib

import pytest
import torch

import evaluate
import export
import plot
import sample
import train
from gpt_train.checkpoint import model_from_checkpoint, save_checkpoint
from config import GPTConfig, config_to_dict
from conftest import (REPO, assert_same_weights, exit_status, metrics_records, one_error_line,
                      read_checkpoint, snapshot, tiny_argv, write_corpus)
from model import build_model
from robust_helpers import PAUSED_LINE, poison_training_losses
from gpt_train.cachefiles import CacheSettings
from gpt_train.tokencache import cached_tokens

SUBPROCESS_SECONDS = 90  # a bound for a hung run; a healthy one takes a few seconds


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A private copy of the finished tiny run: gpt_step4.pt, gpt_step8.pt, gpt_final.pt, metrics."""
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture
def corpus(trained_run):
    return trained_run.parent / "corpus.txt"


def refused(capsys, main, argv, directory, *fragments, status=2):
    """Run `main(argv)`: exit status 2 (the user's input; 1: the machine), one error line holding
    `fragments`, `directory` unchanged."""
    before = snapshot(directory)
    assert exit_status(main, [str(arg) for arg in argv]) == status
    line = one_error_line(capsys.readouterr().err, *fragments)
    assert snapshot(directory) == before
    return line


# --- exports, plots, recipes, loading ---

def status_of(main, *argv):
    """The exit status of `main` run as its script runs it, with `argv` (paths and all)."""
    return exit_status(main, [str(arg) for arg in argv])


def export_into(checkpoint_path, out, *flags):
    """export.py's exit status for `checkpoint_path` into `out`."""
    return status_of(export.main, "--checkpoint", checkpoint_path, "--out", out, *flags)


@pytest.fixture
def exported(run_dir, tmp_path):
    """An export of run_dir's step 4, beside it."""
    pytest.importorskip("safetensors")
    assert export_into(run_dir / "gpt_step4.pt", tmp_path / "hf") == 0
    return tmp_path / "hf"


def test_an_export_of_another_run_or_of_no_known_run_is_replaced_only_with_overwrite(
        exported, run_dir, tmp_path, capsys):
    other_run = shutil.copytree(run_dir, tmp_path / "other")
    final = read_checkpoint(other_run / "gpt_final.pt")
    torch.save({**final, "run_id": "another run's id"}, other_run / "gpt_final.pt")
    refused(capsys, export.main, ["--checkpoint", other_run / "gpt_final.pt", "--out", exported],
            exported, "holds an export of another run", "--overwrite true")
    del final["run_id"]  # a checkpoint of an older version
    torch.save(final, tmp_path / "old.pt")
    refused(capsys, export.main, ["--checkpoint", tmp_path / "old.pt", "--out", exported],
            exported, "does not say which run it is of", "--overwrite true")
    (exported / "export_source.json").unlink()  # as an export by an older version
    refused(capsys, export.main, ["--checkpoint", run_dir / "gpt_final.pt", "--out", exported],
            exported, "does not say which run", "--overwrite true")
    assert export_into(other_run / "gpt_final.pt", exported, "--overwrite", "true") == 0
    assert json.loads((exported / "export_source.json").read_text())["run"] == \
        str(other_run.resolve())


def test_the_same_runs_export_is_replaced_by_a_later_model_of_it(exported, run_dir):
    step4 = snapshot(exported)
    killed, users = exported.parent / ".tmp-hf.999999999", exported.parent / ".tmp-hf.12"
    retired = exported.parent / ".tmp-hf.999999998.old"  # an export caught mid-swap: evidence
    for leftover, name in ((killed, "config.json"), (users, "notes.txt"), (retired, "config.json")):
        leftover.mkdir()
        (leftover / name).write_text("{}")
    assert export_into(run_dir / "gpt_final.pt", exported) == 0
    assert snapshot(exported).keys() == step4.keys()
    assert snapshot(exported)["model.safetensors"] != step4["model.safetensors"]
    # what a killed export left goes; a user's directory of a name like it stays
    assert sorted(p.name for p in exported.parent.iterdir() if p.name.startswith(".tmp-")) == \
        [users.name, retired.name]


@pytest.mark.parametrize("failure", ["SafetensorError", "OSError"])
def test_an_export_onto_a_full_disk_leaves_the_earlier_export_whole(failure, exported, run_dir,
                                                                    monkeypatch, capsys):
    import safetensors
    import safetensors.torch

    def fill_the_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 1000)  # part of the file, then no room left
        if failure == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                          'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", fill_the_disk)
    refused(capsys, export.main, ["--checkpoint", run_dir / "gpt_final.pt", "--out", exported],
            exported.parent, "No space left on device", f"{exported} is as it was", status=1)


@pytest.mark.parametrize("recipe_text", ["overwrite = true\n", "\ufeffn_layer = 1\n"],
                         ids=["overwrite", "bom"])
def test_a_recipe_never_turns_overwrite_on_and_may_start_with_a_bom(recipe_text, run_dir, corpus,
                                                                    tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text, encoding="utf-8")
    argv = ["--config", recipe, *tiny_argv(run_dir, corpus)]
    if "overwrite" in recipe_text:
        refused(capsys, train.train, argv, run_dir, "overwrite = true is refused in a recipe",
                "--overwrite true")
        return
    assert status_of(train.train, *argv, "--print_config") == 0
    assert tomllib.loads(capsys.readouterr().out)["n_layer"] == 1


def test_print_config_never_writes_overwrite_true_into_the_recipe(run_dir, corpus, capsys):
    argv = [*tiny_argv(run_dir, corpus), "--overwrite", "true", "--print_config"]
    assert exit_status(train.train, argv) == 0
    printed = capsys.readouterr().out
    assert "overwrite" not in tomllib.loads(printed) and "overwrite = true" not in printed


@pytest.mark.slow
def test_plot_replaces_only_its_own_plot_of_the_same_metrics(run_dir, tmp_path, monkeypatch,
                                                             capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run_dir, tmp_path / "checkpoints")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 the user's own report")
    refused(capsys, plot.main, ["--out", "report.pdf"], tmp_path, "did not write",
            "--overwrite true")
    assert exit_status(plot.main, []) == 0  # a bare plot.py: ./loss.png of ./checkpoints
    assert exit_status(plot.main, []) == 0  # its own plot, drawn again
    other = tmp_path / "other" / "metrics.jsonl"
    other.parent.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", other)
    refused(capsys, plot.main, [other], tmp_path, "another metrics file", "--overwrite true")
    assert status_of(plot.main, other, "--overwrite", "true") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_sample_into_a_pipe_that_closes_ends_quietly_with_sigpipes_status(run_dir):
    process = subprocess.Popen(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(run_dir / "gpt_final.pt"),
         "--max_new_tokens", "100000", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each token reaches the pipe as it comes
    assert len(process.stdout.read(100)) == 100  # `| head -c 100`
    process.stdout.close()
    _, stderr = process.communicate(timeout=SUBPROCESS_SECONDS)
    assert (process.returncode, stderr) == (141, b"")


def test_plot_into_a_closed_pipe_ends_quietly(run_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    argv = [run_dir / "metrics.jsonl", "--out", tmp_path / "loss.png"]
    assert status_of(plot.main, *argv) == 141
    assert capsys.readouterr().err == ""


def test_a_token_cache_of_the_right_size_but_garbage_content_is_one_line(corpus, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    cached_tokens(CacheSettings(corpus, "char", cache_dir))
    (cache,) = cache_dir.glob("*.bin")
    cache.write_bytes(bytes(range(256)) * (cache.stat().st_size // 256) +
                      b"\xff" * (cache.stat().st_size % 256))
    argv = tiny_argv(tmp_path / "run", corpus, cache_dir=cache_dir)
    line = refused(capsys, train.train, argv, tmp_path, "token cache", "delete it")
    assert str(cache) in line


@pytest.fixture
def lora_run(run_dir, corpus, tmp_path):
    """A LoRA run from run_dir's model: gpt_step2.pt and gpt_step4.pt hold the adapters apart."""
    directory = tmp_path / "lora"
    train.train(tiny_argv(directory, corpus, init_from=run_dir / "gpt_final.pt", lora_rank=2,
                          lora_alpha=8, max_iters=4, save_iter=2, eval_iter=4))
    assert any(name.endswith("lora_A") for name in
               read_checkpoint(directory / "gpt_step4.pt")["model_state_dict"])
    return directory


def test_every_command_reads_a_lora_runs_step_checkpoints(lora_run, corpus, tmp_path, capsys):
    step4, final = lora_run / "gpt_step4.pt", lora_run / "gpt_final.pt"
    merged, _, _ = model_from_checkpoint(step4)
    assert_same_weights(merged.state_dict(), final)  # the adapters merged as training merges them
    before = snapshot(lora_run)
    assert status_of(sample.main, "--checkpoint", step4, "--max_new_tokens", 5) == 0
    assert status_of(evaluate.main, "--checkpoint", step4, "--data", corpus) == 0
    assert status_of(evaluate.main, "--checkpoint", final, "--data", corpus) == 0
    scores = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss ")]
    assert len(scores) == 2 and scores[0] == scores[1]
    if importlib.util.find_spec("safetensors"):
        assert export_into(lora_run / "gpt_step2.pt", tmp_path / "hf") == 0
    argv = tiny_argv(tmp_path / "tuned", corpus, init_from=lora_run / "gpt_step2.pt", max_iters=2,
                     eval_iter=2, save_iter=2)
    assert exit_status(train.train, argv) == 0
    assert snapshot(lora_run) == before


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_our_llama_and_qwen3_exports_read_back_as_the_model_they_came_from(family, run_dir,
                                                                          corpus, tmp_path,
                                                                          capsys):
    pytest.importorskip("safetensors")
    saved = read_checkpoint(run_dir / "gpt_final.pt")
    qwen3 = family == "Qwen3ForCausalLM"
    gpt_config = GPTConfig(vocab_size=saved["gpt_config"]["vocab_size"], block_size=16, n_layer=1,
                           n_head=2, n_embd=32, pos="rope", norm="rmsnorm", mlp="swiglu",
                           qk_norm=qwen3, bias=not qwen3, tie_embeddings=qwen3)
    torch.manual_seed(0)
    model = build_model(gpt_config)
    with torch.no_grad():  # away from the initialisation: norms and biases are not 1 and 0
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    original = tmp_path / "model.pt"
    save_checkpoint({"model_state_dict": model.state_dict(), "step": 0, "tokenizer":
                     saved["tokenizer"], "gpt_config": config_to_dict(gpt_config)}, original)
    assert export_into(original, tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [family]
    back, _, _ = model_from_checkpoint(tmp_path / "hf")
    assert_same_weights(back.state_dict(), original)

    def loss_and_text(checkpoint):
        capsys.readouterr()
        assert status_of(evaluate.main, "--checkpoint", checkpoint, "--data", corpus) == 0
        loss = capsys.readouterr().out.splitlines()[-1]
        assert status_of(sample.main, "--checkpoint", checkpoint, "--max_new_tokens", 8) == 0
        return loss, capsys.readouterr().out

    assert loss_and_text(original) == loss_and_text(tmp_path / "hf")


def test_a_broken_gpt_best_falls_back_to_gpt_final_in_one_line(run_dir, capsys):
    final = (run_dir / "gpt_final.pt").read_bytes()
    (run_dir / "gpt_best.pt").write_bytes(final[:len(final) // 2])  # truncated
    before = snapshot(run_dir)
    argv = ["--checkpoint_dir", str(run_dir), "--max_new_tokens", "5"]
    assert exit_status(sample.main, argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "note: gpt_best.pt is unreadable (corrupt or truncated); using gpt_final.pt",
        f"sampling from {run_dir / 'gpt_final.pt'}"]
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------- the run directory

@pytest.mark.parametrize("run_file", ["gpt_step4.pt", "gpt_final.pt", "gpt_best.pt",
                                      "metrics.jsonl"])
def test_a_new_run_into_a_directory_that_holds_a_run_stops_before_touching_it(
        run_file, trained_run, corpus, tmp_path, capsys):
    directory = tmp_path / "run"
    directory.mkdir()
    shutil.copy(trained_run / run_file.replace("best", "final"), directory / run_file)
    (directory / "notes.txt").write_text("the user's own file")
    line = refused(capsys, train.train, tiny_argv(directory, corpus), directory,
                   run_file, "another --checkpoint_dir", "--overwrite true")
    assert ("--resume latest" in line) == (run_file == "gpt_step4.pt")  # only a step file resumes


def test_a_resume_into_another_directory_that_holds_a_run_stops_too(run_dir, trained_run,
                                                                    capsys):
    argv = ["--resume", trained_run / "gpt_step4.pt", "--checkpoint_dir", run_dir]
    refused(capsys, train.train, argv, run_dir, "already holds a run", "--overwrite true")


def test_resume_auto_sets_aside_an_attempt_that_saved_nothing_but_never_replaces_a_model(
        trained_run, corpus, tmp_path, capsys):
    attempt = tmp_path / "attempt"  # killed before its first checkpoint: records and a best model
    attempt.mkdir()
    (attempt / "metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "lo')
    shutil.copy(trained_run / "gpt_final.pt", attempt / "gpt_best.pt")
    before = snapshot(attempt)
    argv = tiny_argv(attempt, corpus, resume="auto", max_iters=4, save_iter=4)
    assert exit_status(train.train, argv) == 0
    assert "sets them aside" in capsys.readouterr().err
    assert [r["step"] for r in metrics_records(attempt)] == [2, 4]
    assert metrics_records(attempt)[0]["loss"] != 9.0
    [aside] = (attempt / "superseded").iterdir()  # byte for byte, under their own names
    assert aside.name.endswith("-attempt-without-checkpoint")
    assert snapshot(aside) == before
    model = tmp_path / "model"  # a gpt_final.pt and no step checkpoint: not an attempt's
    model.mkdir()
    shutil.copy(trained_run / "gpt_final.pt", model / "gpt_final.pt")
    refused(capsys, train.train, tiny_argv(model, corpus, resume="auto"), model,
            "already holds a run", "--overwrite true")


def test_overwrite_replaces_the_old_run_and_nothing_else(run_dir, corpus):
    (run_dir / "notes.txt").write_text("the user's own file")
    argv = tiny_argv(run_dir, corpus, overwrite="true", max_iters=4, save_iter=2, keep_last=1)
    assert exit_status(train.train, argv) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["gpt_best.pt", "gpt_final.pt",
                                                          "gpt_step4.pt", "metrics.jsonl",
                                                          "notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "the user's own file"
    assert [r["step"] for r in metrics_records(run_dir)] == [2, 4]  # the new history only
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 4


def test_a_run_that_fails_at_its_first_steps_has_deleted_nothing(run_dir, corpus, monkeypatch,
                                                                   capsys):
    poison_training_losses(monkeypatch, {1})
    argv = tiny_argv(run_dir, corpus, overwrite="true", grad_clip=0)
    # the advice names the update flags that differ from their defaults, not only the rate
    refused(capsys, train.train, argv, run_dir, "diverged at step 1", "--learning_rate",
            "--grad_clip 0.0", "--warmup_iters 2")


def test_keep_last_prunes_only_the_runs_own_step_files(run_dir, monkeypatch, capsys):
    later = run_dir / "gpt_step100.pt"
    later.write_bytes(b"not this run's checkpoint")  # --resume latest skips it, then sets it aside
    copied = run_dir / "gpt_step2.pt"  # an earlier step, copied in from another run
    damage_checkpoint(run_dir / "gpt_step4.pt", copied, lambda c: c.update(run_id="another run"))
    copied_bytes = copied.read_bytes()
    real_unlink = type(copied).unlink

    def unlink_except_step4(path, *args, **kwargs):  # as a file of another owner
        if path.name == "gpt_step4.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(copied), "unlink", unlink_except_step4)
    argv = ["--resume", "latest", "--checkpoint_dir", run_dir, "--max_iters", 10,
            "--save_iter", 1, "--keep_last", 1]
    assert exit_status(train.train, [str(arg) for arg in argv]) == 0
    notes = capsys.readouterr().err
    assert "skipping gpt_step100.pt" in notes
    assert notes.count("--keep_last 1 could not delete") == 1  # one line, and training went on
    assert sorted(p.name for p in run_dir.glob("gpt_step*.pt")) == ["gpt_step10.pt",
                                                                     "gpt_step2.pt",
                                                                     "gpt_step4.pt"]
    assert copied.read_bytes() == copied_bytes
    [aside] = (run_dir / "superseded").iterdir()
    assert (aside / "gpt_step100.pt").read_bytes() == b"not this run's checkpoint"


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_fine_tuning_never_overwrites_the_model_it_starts_from(run_dir, corpus, overwrite, capsys):
    argv = tiny_argv(run_dir, corpus, init_from=run_dir / "gpt_final.pt", overwrite=overwrite)
    refused(capsys, train.train, argv, run_dir, "--init_from", "another --checkpoint_dir")


@pytest.mark.parametrize("resume, max_iters", [("gpt_step4.pt", 3), ("gpt_step4.pt", 4),
                                               ("latest", None)])
def test_a_resume_with_nothing_left_to_train_changes_nothing_and_says_what_to_type(
        run_dir, resume, max_iters, capsys):
    argv = ["--resume", run_dir / resume if resume != "latest" else resume,
            "--checkpoint_dir", run_dir] + (["--max_iters", max_iters] if max_iters else [])
    refused(capsys, train.train, argv, run_dir, "nothing is left to train", "--max_iters")


def test_the_designs_three_commands_rewind_a_finished_run_and_keep_every_file(run_dir, capsys):
    before = snapshot(run_dir)  # after `python train.py ...`: steps 4 and 8, final, best, metrics
    assert exit_status(train.train, ["--resume", str(run_dir / "gpt_step4.pt")]) == 0
    assert exit_status(sample.main, ["--checkpoint_dir", str(run_dir),
                                     "--max_new_tokens", "5"]) == 0
    [aside] = (run_dir / "superseded").iterdir()
    assert aside.name.endswith("-after-step4")
    assert f"moved aside to {aside}/: gpt_best.pt, gpt_final.pt, gpt_step8.pt, metrics.jsonl" \
        in capsys.readouterr().out
    for name, content in before.items():  # every earlier file, byte for byte, in one place
        assert (run_dir / name if name == "gpt_step4.pt" else aside / name).read_bytes() == content
    records = metrics_records(run_dir)  # the kept history, the resume, the new records
    assert [r["step"] for r in records] == [2, 4, 4, 6, 8] and records[2]["event"] == "resume"
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 8


def test_resume_latest_tolerates_the_torn_last_line_a_kill_leaves_in_metrics(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "lo')  # a kill in the middle of a write
    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "10"]
    assert exit_status(train.train, argv) == 0
    records = metrics_records(run_dir)  # every line parses
    assert {"step": 8, "event": "resume"} in records and records[-1]["step"] == 10


def test_the_quick_start_run_twice_says_exactly_what_to_type(run_dir, corpus, capsys):
    first_run = tiny_argv(run_dir, corpus, seed=1)
    refused(capsys, train.train, first_run, run_dir, "Continue it with --resume latest "
            "--max_iters 16,")  # the run finished at step 8
    resume = ["--resume", "latest", "--checkpoint_dir", run_dir]
    refused(capsys, train.train, resume, run_dir, "--max_iters 16")
    assert exit_status(train.train, [str(arg) for arg in resume + ["--max_iters", 16]]) == 0


# ------------------------------------------------------------------------------ flag values

# (flags, what the one line must name): each value passed validation or argparse misread it
TRAIN_FLAGS = [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "-1e-3"], "--learning_rate must be positive"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (["--grad_clip", "nan"], "--grad_clip must be a finite number"),
    (["--peak_flops", "nan"], "--peak_flops must be a finite number"),
    (["--weight_decay", "1e4"], "--weight_decay"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--device", "cpu:abc"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--checkpoint_dir", ""], "--checkpoint_dir"),
    (["--data", "/dev/null"], "not a regular file"),
]


@pytest.mark.parametrize("flags, named", TRAIN_FLAGS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_a_bad_train_flag_is_one_line_naming_it(run_dir, corpus, flags, named, capsys):
    argv = tiny_argv(run_dir, corpus, overwrite="true") + flags
    refused(capsys, train.train, argv, run_dir, named)


SIZES = [
    (["--n_embd", "2000000"], "--n_embd 2000000"),
    (["--batch_size", "2000000000"], "--batch_size 2000000000"),
    (["--eval_batches", str(10**12)], f"--eval_batches {10**12}"),
    (["--sample_tokens", str(10**14)], f"--sample_tokens {10**14}"),
]


@pytest.mark.parametrize("flags, named", SIZES, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_a_size_that_cannot_fit_is_one_line_before_anything_is_allocated(
        run_dir, corpus, flags, named, capsys):
    argv = tiny_argv(run_dir, corpus, overwrite="true") + flags
    refused(capsys, train.train, argv, run_dir, named, "available", status=1)


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory."),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")],
                         ids=["MemoryError", "OutOfMemoryError", "CPU allocator"])
def test_an_allocation_failure_is_one_line(run_dir, corpus, error, monkeypatch, capsys):
    def build_model_that_does_not_fit(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "build_model", build_model_that_does_not_fit)
    refused(capsys, train.train, tiny_argv(run_dir, corpus, overwrite="true"), run_dir,
            "out of memory", status=1)


SAMPLE_FLAGS = [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--max_new_tokens", "-5"], "--max_new_tokens"),
    (["--top_k", "-3"], "--top_k"),
    (["--num_samples", "0"], "--num_samples"),
    (["--prompt", "caf\udce9"], "--prompt"),  # how Python receives the bytes caf\xe9
    (["--seed", "-1"], "--seed"),
    (["--device", "cpu:abc"], "--device"),
    (["--max_new_tokens", str(10**14)], "--max_new_tokens"),  # more than the machine holds: 1
]


@pytest.mark.parametrize("flags, named", SAMPLE_FLAGS, ids=lambda v: v[0] if isinstance(v, list)
                         else None)
def test_a_bad_sample_flag_is_one_line_naming_it_alone(run_dir, flags, named, capsys):
    status = 1 if flags[1] == str(10**14) else 2
    line = refused(capsys, sample.main, ["--checkpoint_dir", run_dir] + flags, run_dir, named,
                   status=status)
    others = {"--max_new_tokens", "--top_k", "--num_samples"} - {named}
    assert not [flag for flag in others if flag in line]


@pytest.mark.parametrize("flags, named", [(["--device", "cuda:x"], "--device"),
                                          (["--stride", "-1"], "--stride"),
                                          (["--batch_size", "0"], "--batch_size")],
                         ids=["device", "stride", "batch_size"])
def test_a_bad_evaluate_flag_is_one_line_naming_it_alone(run_dir, flags, named, capsys):
    line = refused(capsys, evaluate.main, ["--checkpoint_dir", run_dir] + flags, run_dir, named)
    assert not [flag for flag in {"--stride", "--batch_size"} - {named} if flag in line]


# ----------------------------------------------------------------------- defaults that adapt

@pytest.mark.parametrize("flags, field, value", [
    (["--max_iters", "30"], "warmup_iters", 3),
    (["--n_embd", "30"], "n_head", 3),
    (["--n_head", "3"], "n_embd", 129),
])
def test_a_default_that_conflicts_with_a_flag_given_adapts_and_says_so(flags, field, value,
                                                                        tmp_path, capsys):
    gpt_config, train_config, _ = train.configure(flags + ["--checkpoint_dir", str(tmp_path)])
    config = gpt_config if hasattr(gpt_config, field) else train_config
    assert getattr(config, field) == value
    assert f"note: --{field}" in capsys.readouterr().err


# ----------------------------------------------------------------- files that are not right

def damage_checkpoint(source, destination, damage):
    checkpoint = read_checkpoint(source)
    damage(checkpoint)
    torch.save(checkpoint, destination)
    return destination


DAMAGES = {
    "empty char vocabulary": (lambda c: c["tokenizer"].update(chars=""), "chars"),
    "vocabulary longer than the model's": (
        lambda c: c["tokenizer"].update(chars="".join(sorted(set(c["tokenizer"]["chars"]) | {
            chr(0x4E00 + i) for i in range(64)}))), "vocabulary"),
    "betas 'ab'": (lambda c: c["train_config"].update(betas="ab"), "betas"),
    "n_head 'two'": (lambda c: c["gpt_config"].update(n_head="two"), "n_head"),
}


@pytest.mark.parametrize("entry_point", ["sample", "train --resume"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_config_is_checked_as_strictly_as_a_flag(
        run_dir, tmp_path, damage, entry_point, capsys):
    change, named = DAMAGES[damage]
    damaged = damage_checkpoint(run_dir / "gpt_step8.pt", tmp_path / "damaged.pt", change)
    if entry_point == "sample":
        main, argv = sample.main, ["--checkpoint", damaged]
    else:
        main, argv = train.train, ["--resume", damaged, "--max_iters", 12,
                                   "--checkpoint_dir", tmp_path / "resumed"]
    refused(capsys, main, argv, run_dir, "damaged.pt", named)


@pytest.mark.parametrize("main, argv_of, named", [
    (sample.main, lambda d, text: ["--checkpoint", text], "is not a checkpoint"),
    (sample.main, lambda d, text: ["--checkpoint", d], "is a directory"),
    (train.train, lambda d, text: ["--resume", d], "is a directory"),
], ids=["text file", "directory to sample", "directory to resume"])
def test_a_file_that_is_not_a_checkpoint_is_called_what_it_is(run_dir, tmp_path, main, argv_of,
                                                               named, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes\n")  # 19 bytes
    refused(capsys, main, argv_of(run_dir, text), run_dir, named)


def test_a_corpus_of_one_repeated_character_samples_with_no_prompt(tmp_path, capsys):
    gpt_config = GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=1, n_embd=8)
    checkpoint = {"step": 1, "loss": 0.0, "model_state_dict": build_model(gpt_config).state_dict(),
                  "gpt_config": config_to_dict(gpt_config), "tokenizer": {"kind": "char",
                                                                           "chars": "a"}}
    save_checkpoint(checkpoint, tmp_path / "gpt_final.pt")
    assert exit_status(sample.main, ["--checkpoint_dir", str(tmp_path),
                                     "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out == "aaaaa\n"


# ------------------------------------------------------------------------------------ plot.py

@pytest.mark.parametrize("content, named", [
    (bytes(range(256)) * 4, "not UTF-8"),
    (b'{"step": 1, "loss": 2.0}\n{"step": Infinity, "loss": 1.0}\n', "line 2"),
], ids=["random bytes", "step Infinity"])
def test_plot_names_a_file_that_is_not_metrics(tmp_path, content, named, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(content)
    refused(capsys, plot.main, [metrics, "--out", tmp_path / "loss.png"], tmp_path, named)


@pytest.mark.parametrize("metrics, out, named", [
    ("metrics.jsonl", "DIR", "--out"), ("metrics.jsonl", "", "--out must not be empty"),
    ("/dev/null", "loss.png", "not a regular file")], ids=["out a directory", "out empty",
                                                          "metrics /dev/null"])
def test_plot_names_the_argument_that_is_wrong(run_dir, tmp_path, metrics, out, named, capsys):
    argv = [run_dir / metrics, "--out", tmp_path if out == "DIR" else out and tmp_path / out]
    refused(capsys, plot.main, argv, tmp_path, named)


def test_plot_tolerates_a_torn_last_line_and_names_the_file_it_wrote(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "lo')
    assert exit_status(plot.main, [str(run_dir / "metrics.jsonl"), "--out",
                                   str(tmp_path / "loss")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'loss.png'}\n"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("number, status, line", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGHUP, 129, "hung up")],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_set_up_is_one_line_and_its_exit_status(run_dir, corpus, number, status,
                                                                line, monkeypatch, capfd):
    def signalled_while_loading(*args):
        os.kill(os.getpid(), number)

    monkeypatch.setattr(train, "load_corpus", signalled_while_loading)
    before = snapshot(run_dir)
    assert exit_status(train.train, tiny_argv(run_dir, corpus, overwrite="true")) == status
    assert capfd.readouterr().err == f"{line}\n"  # written to the file descriptor itself
    assert snapshot(run_dir) == before


# Runs train.py as `python train.py` does, but delivers the signal while `import torch` runs.
SIGNAL_DURING_IMPORT = """
import importlib.abc, os, runpy, sys
class SignalWhenTorchIsImported(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {number})
sys.meta_path.insert(0, SignalWhenTorchIsImported())
sys.path.insert(0, {repo!r})
sys.argv = ["train.py"]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("number, status, line", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_torch_is_imported_is_one_line_not_a_traceback(number, status, line,
                                                                      tmp_path):
    code = SIGNAL_DURING_IMPORT.format(number=int(number), repo=str(REPO),
                                       script=str(REPO / "train.py"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=SUBPROCESS_SECONDS)
    assert (result.returncode, result.stderr) == (status, f"{line}\n")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_a_worker_saves_and_exits_143(tmp_path):
    data = write_corpus(tmp_path)
    checkpoint_dir = tmp_path / "checkpoints"
    argv = tiny_argv(checkpoint_dir, data, max_iters=50, save_iter=2, log_iter=1, num_workers=1)
    # after gpt_step2.pt is saved the run waits for a signal, its DataLoader worker alive
    command = [sys.executable, str(REPO / "tests" / "robust_helpers.py"), "pause-after-save", "2",
               *argv]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
                                   text=True, start_new_session=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            for line in process.stdout:
                if line.startswith(PAUSED_LINE):
                    os.killpg(process.pid, signal.SIGTERM)  # what `timeout` and schedulers do
                    break
            output, _ = process.communicate(timeout=SUBPROCESS_SECONDS)  # bounded, unlike read()
            status = process.returncode
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.stdout.close()
    errors = (tmp_path / "stderr.txt").read_text()
    assert status == 143, errors
    assert "stopped by SIGTERM after step 3" in output
    assert read_checkpoint(checkpoint_dir / "gpt_step3.pt")["step"] == 3
    for sign_of_trouble in ("Traceback", "Exception ignored", "killed by signal", "Error"):
        assert sign_of_trouble not in errors


# --- the run directory ---

def test_overwrite_on_a_rewind_deletes_the_later_files_and_never_the_set_aside_ones(run_dir,
                                                                                    corpus):
    assert exit_status(train.train, ["--resume", str(run_dir / "gpt_step4.pt")]) == 0
    set_aside = snapshot(run_dir / "superseded")
    rewind = ["--resume", str(run_dir / "gpt_step4.pt"), "--overwrite", "true"]
    assert exit_status(train.train, rewind) == 0  # --overwrite: the later files go, not aside
    assert exit_status(train.train, tiny_argv(run_dir, corpus, overwrite="true")) == 0
    assert snapshot(run_dir / "superseded") == set_aside  # a whole new run leaves them too


def test_resume_auto_refuses_when_every_step_checkpoint_is_unreadable(run_dir, corpus, capsys):
    (run_dir / "gpt_final.pt").unlink()
    (run_dir / "gpt_step8.pt").write_bytes((run_dir / "gpt_step8.pt").read_bytes()[:1000])
    (run_dir / "gpt_step4.pt").write_bytes(b"PK\x03\x04 written by another version")
    refused(capsys, train.train, tiny_argv(run_dir, corpus, resume="auto"), run_dir,
            "none can be read (gpt_step4.pt, gpt_step8.pt)", "--overwrite true")


def test_resume_latest_past_an_unreadable_newest_step_sets_the_later_files_aside(run_dir,
                                                                                  capsys):
    (run_dir / "gpt_step8.pt").write_bytes(b"PK\x03\x04 torn")
    later = {name: (run_dir / name).read_bytes() for name in ("gpt_step8.pt", "gpt_final.pt",
                                                              "gpt_best.pt")}
    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "6"]
    assert exit_status(train.train, argv) == 0
    [aside] = (run_dir / "superseded").iterdir()
    assert {name: (aside / name).read_bytes() for name in later} == later
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 6


def test_a_kill_while_metrics_are_trimmed_leaves_the_old_file(run_dir, monkeypatch, capsys):
    from gpt_train import loggers

    real_atomic_write = loggers.atomic_write

    @contextlib.contextmanager
    def killed_in_the_middle(path):
        with real_atomic_write(path) as handle:
            yield handle
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loggers, "atomic_write", killed_in_the_middle)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "loss": 1.0}\n')  # a record to drop: the file is rewritten
    before = snapshot(run_dir)
    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "12",
            "--log_iter", "1"]  # the first record, at step 9, trims the file
    assert exit_status(train.train, argv) == 1
    one_error_line(capsys.readouterr().err, "metrics.jsonl", "No space left on device")
    assert snapshot(run_dir) == before


def test_only_the_tools_own_leftovers_are_removed_and_a_foreign_train_lock_is_refused(
        tmp_path, corpus, capsys):
    directory = tmp_path / "run"
    (directory / ".tmp-build").mkdir(parents=True)
    (directory / ".tmp-build" / "object.o").write_text("the user's build")
    (directory / ".tmp-notes").write_text("the user's notes")
    for name in (".tmp-gpt_final.pt.bak", ".tmp-metrics.jsonl.old", ".tmp-gpt_step8.sharded/x",
                 ".tmp-replaced.old/x", ".tmp-gpt_step8.pt.12345.part"):  # like ours, not ours
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_text("the user's")
    killed = [".tmp-gpt_step2.pt.12345", ".tmp-gpt_step8.4194305/__0_0.distcp",
              ".tmp-replaced.4194305/gpt_final.pt"]  # what a killed run leaves, in our one form
    for name in killed:
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_bytes(b"half a checkpoint")
    (directory / "train.lock").write_text("the user's own train.lock")
    argv = tiny_argv(directory, corpus, max_iters=2, save_iter=2, eval_iter=2)
    refused(capsys, train.train, argv, directory, "train.lock", "not a lock of this tool's")
    (directory / "train.lock").unlink()
    users = {name: content for name, content in snapshot(directory).items() if name not in killed}
    assert exit_status(train.train, argv) == 0
    after = snapshot(directory)
    assert {name: after[name] for name in users} == users
    assert not [name for name in after if name.split("/")[0] in
                {leftover.split("/")[0] for leftover in killed}]


def test_overwrite_deletes_nothing_when_one_file_cannot_be_deleted(run_dir, corpus, monkeypatch,
                                                                    capsys):
    from gpt_train.rundir import moves

    real_rename = os.rename

    def rename_except_final(source, destination):  # as a file of another owner
        if os.path.basename(source) == "gpt_final.pt":
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        return real_rename(source, destination)

    monkeypatch.setattr(moves.os, "rename", rename_except_final)
    refused(capsys, train.train, tiny_argv(run_dir, corpus, overwrite="true"), run_dir,
            "gpt_final.pt", "Permission denied", "no file of the old run was deleted")


@pytest.mark.parametrize("in_the_way, named", [
    ("metrics.jsonl/", "metrics.jsonl is not a file"),
    ("tensorboard", "tensorboard is a file"),
    ("CHECKPOINT_DIR", "is a file, not a directory"),
])
def test_a_path_in_the_way_of_a_runs_files_is_one_line(tmp_path, corpus, in_the_way, named,
                                                       capsys):
    directory = tmp_path / "root" / "run"
    directory.parent.mkdir()
    if in_the_way == "CHECKPOINT_DIR":
        directory.write_text("a file")
    else:
        directory.mkdir()
        target = directory / in_the_way.rstrip("/")
        target.mkdir() if in_the_way.endswith("/") else target.write_text("a file")
    argv = tiny_argv(directory, corpus, log_to="jsonl,tensorboard", cache_dir=tmp_path / "cache")
    refused(capsys, train.train, argv, directory.parent, named)


@pytest.mark.parametrize("flags, named", [
    (["--config", "RECIPE"], ["recipe.toml", "--n_layer 2 contradicts"]),
    (["--lora_rank", "4"], ["--lora_rank 4 contradicts", "leave out --lora_rank"]),
    (["--optimizer", "muon"], ["--optimizer muon contradicts", "--init_from"]),
], ids=["recipe", "lora_rank", "optimizer"])
def test_a_resume_that_cannot_apply_a_setting_names_where_it_came_from(run_dir, tmp_path, flags,
                                                                       named, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("n_layer = 2\n")
    flags = [str(recipe) if flag == "RECIPE" else flag for flag in flags]
    argv = ["--resume", run_dir / "gpt_step8.pt", "--max_iters", 12] + flags
    refused(capsys, train.train, argv, run_dir, *named)


def test_a_resume_names_the_checkpoints_data_when_it_is_missing_or_changed(run_dir, corpus,
                                                                            tmp_path, capsys):
    moved = damage_checkpoint(run_dir / "gpt_step8.pt", run_dir / "gpt_step9.pt",
                              lambda c: c["train_config"].update(data="input.txt"))
    refused(capsys, train.train, ["--resume", moved, "--max_iters", 12], run_dir,
            "trained on --data input.txt, which is not found", "give --data")
    moved.unlink()
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.read_text() + "a new character: \u20ac\n")
    argv = ["--resume", run_dir / "gpt_step8.pt", "--max_iters", 12, "--data", edited]
    line = refused(capsys, train.train, argv, run_dir, "is not the data the checkpoint",
                   "\u20ac")
    assert "tokenizer" not in line.split(":")[0]


def test_a_disk_full_stop_and_the_next_resume_ask_for_the_same_room(run_dir, monkeypatch,
                                                                     capsys):
    from gpt_train import checkpoint
    from gpt_train.rundir import rules

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "10"]
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", disk_full)
        assert exit_status(train.train, argv) == 1
    stop = one_error_line(capsys.readouterr().err, "No space left on device")
    free = shutil.disk_usage(run_dir)._replace(free=1)
    monkeypatch.setattr(rules.shutil, "disk_usage", lambda path: free)
    assert exit_status(train.train, argv) == 1
    start = one_error_line(capsys.readouterr().err, "MiB free")
    needed = [re.search(r"two checkpoints of this model need about ([\d.]+) MiB", line).group(1)
              for line in (stop, start)]
    assert needed[0] == needed[1]


def test_checkpoints_get_the_users_umask_like_every_other_file(trained_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("gpt_step4.pt", "gpt_final.pt", "gpt_best.pt", "metrics.jsonl"):
        assert (trained_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_sighup_saves_and_stops_like_sigterm(run_dir, monkeypatch, capsys):
    real_log_step = train.log_step

    def log_step_then_hang_up(run, *args):
        if run.step == 9:
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed
        return real_log_step(run, *args)

    monkeypatch.setattr(train, "log_step", log_step_then_hang_up)
    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "20",
            "--log_iter", "1"]
    assert exit_status(train.train, argv) == 129
    assert "stopped by SIGHUP after step 10" in capsys.readouterr().out
    assert read_checkpoint(run_dir / "gpt_step10.pt")["step"] == 10


def test_a_reader_that_goes_away_drops_the_output_not_the_training(run_dir, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has read its lines and exited: every write now fails
    stdout = open(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["--resume", "latest", "--checkpoint_dir", str(run_dir), "--max_iters", "10"]
    try:
        assert exit_status(train.train, argv) == 0
        stdout.write("later output is dropped too\n")  # as Python's own flush at exit
        stdout.flush()
    finally:
        stdout.close()
    assert read_checkpoint(run_dir / "gpt_final.pt")["step"] == 10
