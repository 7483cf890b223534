"""Nothing lost, round three, in the run directory and the export: a damaged step checkpoint is
set aside, never deleted; an export is replaced only by one of the same run, known by its id; a
file in the way is one line before training starts.

Runs are tiny and reused: a one-process FSDP run (a process group of one, in-process) for the
sharded step directories, the shared `trained_run` for the rest. Every refusal ends with exit
status 2, one `error: ` line, and the directory byte for byte as it was.
"""

import json
import shutil

import pytest

import export
import sample
import train
from conftest import exit_status, one_error_line, snapshot, tiny_argv, write_corpus
from gpt_train.checkpoint import saved_value
from test_nothing_lost import refused

SHARDED = dict(parallel="fsdp")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A finished one-process FSDP run: gpt_step4/ and gpt_step8/ directories, final, best."""
    root = tmp_path_factory.mktemp("sharded")
    data = write_corpus(root)
    train.train(tiny_argv(root / "run", data, **SHARDED))
    return root / "run", data


def damage(step_directory, how):
    """Damage an FSDP step checkpoint as a disk or an interrupted copy would."""
    if how == "without its run state":
        (step_directory / "run_state.pt").unlink()
    elif how == "with a truncated slice":
        [slices] = step_directory.glob("*.distcp")
        slices.write_bytes(slices.read_bytes()[:1000])
    else:  # the index of its slices lost
        (step_directory / ".metadata").unlink()


@pytest.mark.parametrize("how", ["without its run state", "with a truncated slice"])
def test_a_damaged_sharded_step_is_skipped_said_and_set_aside_never_deleted(sharded_run, tmp_path,
                                                                            capsys, how):
    run, data = sharded_run
    directory = shutil.copytree(run, tmp_path / "run")
    damage(directory / "gpt_step8", how)
    evidence = snapshot(directory / "gpt_step8")
    train.train(tiny_argv(directory, data, resume="latest", **SHARDED))
    said = capsys.readouterr()
    out = said.out + said.err  # notes go to stderr, results to stdout
    assert "skipping gpt_step8" in out and f"resumed from {directory / 'gpt_step4'}" in out
    [aside] = (directory / "superseded").iterdir()
    assert f"moved aside to {aside}/" in out
    assert snapshot(aside / "gpt_step8") == evidence  # byte for byte, under its own name
    assert saved_value(directory / "gpt_step8", "step") == 8  # the resumed run's own step 8


@pytest.mark.parametrize("how", ["without its run state", "with a truncated slice",
                                 "without its index"])
def test_a_damaged_sharded_step_given_by_name_is_one_line_and_changes_nothing(
        sharded_run, tmp_path, capsys, how):
    run, data = sharded_run
    directory = shutil.copytree(run, tmp_path / "run")
    damage(directory / "gpt_step8", how)
    argv = tiny_argv(directory, data, resume=directory / "gpt_step8", max_iters=12, **SHARDED)
    refused(capsys, train.train, argv, directory, "gpt_step8", "incomplete")
    refused(capsys, sample.main, ["--checkpoint", directory / "gpt_step8"], directory,
            "gpt_step8", "incomplete")


def test_resume_auto_with_every_sharded_step_damaged_refuses_naming_them(sharded_run, tmp_path,
                                                                          capsys):
    run, data = sharded_run
    directory = shutil.copytree(run, tmp_path / "run")
    (directory / "gpt_final.pt").unlink()  # an attempt that never finished
    damage(directory / "gpt_step4", "with a truncated slice")
    damage(directory / "gpt_step8", "without its run state")
    refused(capsys, train.train, tiny_argv(directory, data, resume="auto", **SHARDED), directory,
            "none can be read", "gpt_step4, gpt_step8")


@pytest.mark.parametrize("in_the_way", ["file", "dangling link"])
def test_a_superseded_file_in_the_way_of_a_rewind_is_one_line_before_training(
        trained_run, tmp_path, capsys, in_the_way):
    directory = shutil.copytree(trained_run, tmp_path / "run")
    if in_the_way == "file":
        (directory / "superseded").write_text("the user's notes")
    else:
        (directory / "superseded").symlink_to(tmp_path / "gone")
    argv = tiny_argv(directory, trained_run.parent / "corpus.txt",
                     resume=directory / "gpt_step4.pt")
    line = refused(capsys, train.train, argv, directory, f"{directory / 'superseded'} is ",
                   "gpt_step8.pt", "nothing was changed")
    assert "--checkpoint_dir" not in line  # a flag that was never given
    assert "training:" not in capsys.readouterr().err


def test_a_new_run_in_the_same_directory_does_not_replace_the_first_runs_export(
        trained_run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    directory = shutil.copytree(trained_run, tmp_path / "run")
    hf = tmp_path / "hf"
    assert exit_status(export.main, ["--checkpoint_dir", str(directory), "--out", str(hf)]) == 0
    first = json.loads((hf / "export_source.json").read_text())
    assert first["run_id"] == saved_value(directory / "gpt_best.pt", "run_id") == \
        saved_value(directory / "gpt_step4.pt", "run_id")
    # run B: the same --checkpoint_dir, replaced on purpose
    train.train(tiny_argv(directory, trained_run.parent / "corpus.txt", overwrite="true",
                          max_iters=2, save_iter=2, eval_iter=2))
    assert saved_value(directory / "gpt_final.pt", "run_id") not in (None, first["run_id"])
    refused(capsys, export.main, ["--checkpoint_dir", directory, "--out", hf], hf,
            "holds an export of another run", first["run_id"][:12], "--overwrite true")
    assert exit_status(export.main, ["--checkpoint_dir", str(directory), "--out", str(hf),
                                     "--overwrite", "true"]) == 0
    assert json.loads((hf / "export_source.json").read_text())["run_id"] == \
        saved_value(directory / "gpt_final.pt", "run_id")


def test_a_missing_checkpoint_dir_is_named_with_a_command_that_trains_there(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    for main in (sample.main, export.main):
        assert exit_status(main, ["--checkpoint_dir", "runs/gpu"]) == 2
        one_error_line(capsys.readouterr().err, "--checkpoint_dir runs/gpu does not exist",
                       "`python train.py --checkpoint_dir runs/gpu`")
    (tmp_path / "runs" / "gpu").mkdir(parents=True)
    assert exit_status(sample.main, ["--checkpoint_dir", "runs/gpu"]) == 2
    one_error_line(capsys.readouterr().err, "no checkpoint in runs/gpu/",
                   "`python train.py --checkpoint_dir runs/gpu`")
    assert list(tmp_path.rglob("*")) == [tmp_path / "runs", tmp_path / "runs" / "gpu"]


def test_a_new_runs_tokenizer_without_an_end_of_text_is_named_not_called_the_checkpoints(
        tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(["the quick brown fox"] * 20, tokenizers.trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=alphabet, show_progress=False))
    backend.save(str(tmp_path / "mine.json"))
    documents = tmp_path / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    argv = tiny_argv(tmp_path / "run", documents, tokenizer=tmp_path / "mine.json")
    line = refused(capsys, train.train, argv, tmp_path, "no end-of-text token",
                   f"--tokenizer {tmp_path / 'mine.json'}")
    assert "checkpoint" not in line
