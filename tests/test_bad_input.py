"""Every bad input of the issue ends with exit status 2, exactly one line on stderr, no traceback,
and the existing checkpoints untouched.

The training commands say --overwrite true, so they would otherwise delete the run already in
their checkpoint directory and write gpt_step4.pt, gpt_step8.pt and gpt_final.pt in its place: a
run that fails before it starts must not have deleted or written anything. Three cases (a flag,
the data, a checkpoint to sample) run `python train.py ...` or `python sample.py ...` in a
subprocess, the real command line; these run concurrently (each but the flag's costs a Python
start-up and a torch import). The rest run in-process through the same `run_main` wrapper that
the scripts' `__main__` blocks use.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import sample
import train
from conftest import (UnsafePayload, exit_status, run_cli, snapshot, stderr_lines, tiny_argv,
                      write_corpus)


def build_cases(root, trained_run):
    """{name: (script, args, checkpoint_dir, a phrase the error line must contain)}."""
    corrupt = root / "corrupt.pt"
    step4 = (trained_run / "gpt_step4.pt").read_bytes()
    corrupt.write_bytes(step4[:len(step4) // 2])  # a checkpoint cut off half way
    unsafe = root / "unsafe.pt"
    torch.save({"step": 4, "model_state_dict": {}, "gpt_config": {}, "tokenizer": {},
                "optimizer_state_dict": UnsafePayload()}, unsafe)
    data = {
        "good": write_corpus(root, name="good.txt"),
        "empty": write_corpus(root, "", name="empty.txt"),
        "latin1": root / "latin1.txt",
        "short": write_corpus(root, "0123456789abcdef" * 10, name="short.txt"),  # 160 chars
    }
    data["latin1"].write_bytes("café au lait\n".encode("latin-1") * 100)
    (root / "no-text-here").mkdir()
    (root / "no-text-here" / "notes.md").write_text("markdown is not read")

    def train_case(data_path, *flags, expect):
        checkpoint_dir = root / f"checkpoints-{len(cases)}"
        shutil.copytree(trained_run, checkpoint_dir)
        argv = tiny_argv(checkpoint_dir, data_path, overwrite="true") + list(flags)
        return ("train.py", argv, checkpoint_dir, expect)

    def sample_case(*args, expect):
        return ("sample.py", ["--checkpoint_dir", trained_run, *args], trained_run, expect)

    cases = {}
    cases["missing data file"] = train_case(root / "no-such-file.txt", expect="not found")
    cases["empty data file"] = train_case(data["empty"], expect="empty")
    cases["non-UTF-8 data file"] = train_case(data["latin1"], expect="UTF-8")
    # 160 tokens: 144 train, 16 validation; each split needs block_size + 1 = 17
    cases["validation split too short"] = train_case(data["short"], expect="validation")
    cases["training split too short"] = train_case(data["short"], "--val_fraction", "0.95",
                                                   expect="training")
    cases["unknown device"] = train_case(data["good"], "--device", "tpu", expect="device")
    cases["cuda without CUDA"] = train_case(data["good"], "--device", "cuda", expect="CUDA")
    cases["missing resume file"] = train_case(data["good"], "--resume", root / "gone.pt",
                                              expect="not found")
    cases["corrupt resume file"] = train_case(data["good"], "--resume", corrupt,
                                              expect="corrupt")
    cases["batch_size 0"] = train_case(data["good"], "--batch_size", "0", expect="batch_size")
    cases["learning_rate abc"] = train_case(data["good"], "--learning_rate", "abc",
                                            expect="learning_rate")
    cases["sample missing checkpoint"] = sample_case("--checkpoint", root / "gone.pt",
                                                     expect="not found")
    cases["sample corrupt checkpoint"] = sample_case("--checkpoint", corrupt, expect="corrupt")
    cases["sample unsafe checkpoint"] = sample_case("--checkpoint", unsafe, expect="unsafe")
    # further cases, run in-process
    cases["data directory without txt"] = train_case(root / "no-text-here", expect="*.txt")
    cases["unsafe resume file"] = train_case(data["good"], "--resume", unsafe, expect="unsafe")
    cases["resume latest with only corrupt checkpoints"] = train_case(
        data["good"], "--resume", "latest", expect="no readable")
    for step_file in cases["resume latest with only corrupt checkpoints"][2].glob("gpt_step*.pt"):
        step_file.write_bytes(step_file.read_bytes()[:1000])
    cases["sample an unsafe file found in a directory"] = sample_case(
        "--checkpoint_dir", unsafe_directory(root, unsafe), expect="unsafe")
    return cases


def unsafe_directory(root, unsafe):
    directory = root / "unsafe-checkpoints"
    directory.mkdir()
    shutil.copy(unsafe, directory / "gpt_final.pt")
    return directory


CLI_CASES = ["learning_rate abc", "missing data file", "sample unsafe checkpoint"]
IN_PROCESS_CASES = ["empty data file", "non-UTF-8 data file", "validation split too short",
                    "training split too short", "unknown device", "cuda without CUDA",
                    "missing resume file", "corrupt resume file",
                    "batch_size 0", "sample missing checkpoint", "sample corrupt checkpoint",
                    "data directory without txt", "unsafe resume file",
                    "resume latest with only corrupt checkpoints",
                    "sample an unsafe file found in a directory"]


@pytest.fixture(scope="module")
def cases(trained_run, tmp_path_factory):
    return build_cases(tmp_path_factory.mktemp("bad-input"), trained_run)


@pytest.fixture(scope="module")
def cli_outcomes(cases):
    """{case: (the finished subprocess, the checkpoint directory's files before, and after)}."""
    before = {name: snapshot(cases[name][2]) for name in CLI_CASES}

    def run(name):
        script, args, _, _ = cases[name]
        return run_cli(script, *args)

    with ThreadPoolExecutor(max_workers=len(CLI_CASES)) as pool:
        results = dict(zip(CLI_CASES, pool.map(run, CLI_CASES)))
    return {name: (results[name], before[name], snapshot(cases[name][2])) for name in CLI_CASES}


def assert_one_clear_line(status, stdout, stderr, phrase):
    lines = [line for line in stderr_lines(stderr) if not line.startswith("note: ")]  # notes first
    assert status == 2, stderr
    assert "Traceback" not in stderr + stdout
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and phrase in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_input_ends_in_one_line_exit_status_2_and_no_checkpoint_overwritten(
        cases, cli_outcomes, case):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, files_before, files_after = cli_outcomes[case]
    assert_one_clear_line(result.returncode, result.stdout, result.stderr, cases[case][3])
    assert files_after == files_before


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_more_bad_input_ends_the_same_way_in_process(cases, case, capsys):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script, args, checkpoint_dir, phrase = cases[case]
    files_before = snapshot(checkpoint_dir)
    status = exit_status(train.train if script == "train.py" else sample.main, list(map(str, args)))
    captured = capsys.readouterr()
    assert_one_clear_line(status, captured.out, captured.err, phrase)
    assert snapshot(checkpoint_dir) == files_before


def test_every_case_is_checked(cases):
    assert sorted(cases) == sorted(CLI_CASES + IN_PROCESS_CASES)
