"""The README's commands, run in the README's own order on a fresh copy of the repository.

A newcomer follows README.md top to bottom; so does this test, and it fails when a command the
README shows fails. The rules it follows (the README's last section says the same):

- The commands are the lines of the README's ```bash and ```sh blocks, in order. A trailing
  backslash continues a line, `&&` separates two commands, `#` outside quotes starts a comment,
  `NAME=value` before a command sets an environment variable, and `> FILE` sends its output to FILE.
- Skipped, each with its reason: installs (`pip`), downloads (`curl`, `wget`, and any command whose
  comment says it downloads), what needs several processes or a server (`torchrun`, `tensorboard`,
  anything with `wandb`), lm-evaluation-harness (`lm_eval`, an optional package), the test suite
  itself (`python -m pytest`), a command whose optional package is not installed
  (OPTIONAL_PACKAGES, --log_to's), and any command that reads what a skipped command would have
  written (its --checkpoint_dir or --out).
- Made up first: the file a skipped download writes (curl -o FILE), and a --data file or directory
  that does not exist yet (the user's own text): a small text with English and Chinese lines.
- Shrunk: a training command runs on the CPU without torch.compile, with a tiny model (TINY_MODEL;
  not with --resume or --init_from, whose model comes from the checkpoint) and step counts divided
  by STEP_SCALE (`--max_iters 3000` runs 12 steps, `gpt_step1000.pt` becomes `gpt_step4.pt`);
  sampling makes at most MAX_SAMPLED_TOKENS tokens.
- train.py, sample.py, evaluate.py, export.py and plot.py run in this process through their entry
  point, as their `__main__` block runs it (cli.run_main), in the fresh copy as the working
  directory; anything else runs as a subprocess there.
- Afterwards git sees no untracked file in the copy: what the README has the user create, and
  what its commands write, is in .gitignore.
"""

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, exit_status

# Entry points run in this process: script -> (module, function).
ENTRY_POINTS = {"train.py": ("train", "train"), "sample.py": ("sample", "main"),
                "evaluate.py": ("evaluate", "main"), "export.py": ("export", "main"),
                "plot.py": ("plot", "main")}

SKIPPED_PROGRAMS = {"pip": "installs packages", "curl": "downloads", "wget": "downloads",
                    "torchrun": "starts several processes, on GPUs or machines",
                    "tensorboard": "starts a server", "wandb": "uploads to W&B",
                    "lm_eval": "lm-evaluation-harness, an optional package the tests do not install"}
# The optional packages (requirements-dev.txt) a command needs: without one, it is skipped.
OPTIONAL_PACKAGES = {"export.py": ("safetensors", "tokenizers"), "plot.py": ("matplotlib",)}

# A training command's model and batch, whatever the README gives (the model's shape is not
# set with --resume or --init_from: it comes from the checkpoint).
TINY_MODEL = {"n_layer": "1", "n_head": "2", "n_embd": "32", "block_size": "16"}
TINY_RUN = {"batch_size": "4", "grad_accum_steps": "1", "eval_batches": "1",
            "device": "cpu", "compile": "false"}
# Flags counted in optimizer steps: divided by STEP_SCALE (at least 1, at most MAX_STEPS).
STEP_FLAGS = ("max_iters", "warmup_iters", "save_iter", "eval_iter", "log_iter")
STEP_SCALE = 250
MAX_STEPS = 40
MAX_SAMPLED_TOKENS = 16

# The user's own text, where a command reads a file this repository does not have.
USER_TEXT = "".join(f"ROMEO: Dear diary, line {i}; the quick brown fox jumps over the lazy dog "
                    f"{i * 7 % 13}. THE FIVE BOXING WIZARDS JUMP QUICKLY!\n宝玉笑道：第{i}回。\n"
                    for i in range(150))


@dataclasses.dataclass
class Command:
    text: str  # the command as the README shows it (continuations joined)
    argv: list
    comment: str = ""
    environment: dict = dataclasses.field(default_factory=dict)
    stdout_path: str = ""


# ----------------------------------------------------------------------- reading the README

def split_comment(line):
    """(code, comment) of one shell line: `#` starts a comment outside quotes, after a space."""
    quote = None
    for index, character in enumerate(line):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index], line[index + 1:].strip()
    return line, ""


def parse_line(line):
    """The commands of one shell line, split at `&&`."""
    code, comment = split_comment(line)
    lexer = shlex.shlex(code, posix=True, punctuation_chars="&|;<>")
    lexer.whitespace_split = True
    tokens, commands = list(lexer), []
    while tokens:
        end = tokens.index("&&") if "&&" in tokens else len(tokens)
        words, tokens = tokens[:end], tokens[end + 1:]
        command = Command(text=line.strip(), argv=[], comment=comment)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            command.environment[name] = value
        if ">" in words:
            at = words.index(">")
            command.stdout_path, words = words[at + 1], words[:at] + words[at + 2:]
        unsupported = set(words) & {"|", ";", "<", "&", "||", ">>"}
        assert not unsupported, f"the README test cannot run {unsupported} in: {line}"
        command.argv = words
        commands.append(command)
    return commands


def readme_commands(text):
    """Every command of the ```bash and ```sh blocks of a README's text, in order."""
    commands = []
    for block in re.finditer(r"^```(?:bash|sh)[ \t]*\n(.*?)^```", text, re.M | re.S):
        for line in block.group(1).replace("\\\n", " ").splitlines():
            if split_comment(line)[0].strip():
                commands += parse_line(line)
    return commands


# ----------------------------------------------------------------------- flags of a command

def flag_value(argv, name):
    """The value of `--name VALUE` in argv (the last one given), or None."""
    value = None
    for index, word in enumerate(argv[:-1]):
        if word == f"--{name}":
            value = argv[index + 1]
    return value


def with_flag(argv, name, value):
    """argv with `--name value`, replacing every value given before."""
    result, index = [], 0
    while index < len(argv):
        if argv[index] == f"--{name}" and index + 1 < len(argv):
            index += 2
            continue
        result.append(argv[index])
        index += 1
    return result + [f"--{name}", str(value)]


def optional_packages(argv):
    """The optional packages a command needs: its script's, and --log_to's destinations'."""
    script = Path(argv[1]).name if argv[0] == "python" and len(argv) > 1 else ""
    destinations = (flag_value(argv, "log_to") or "").split(",")
    return [*OPTIONAL_PACKAGES.get(script, ()),
            *[name for name in ("tensorboard", "wandb") if name in destinations]]


def effective_value(argv, name):
    """train.py's value of a field: the flag, else its --config recipe's, else its default."""
    given = flag_value(argv, name)
    if given is not None:
        return given
    recipe_path = flag_value(argv, "config")
    if recipe_path and Path(recipe_path).is_file():
        recipe = tomllib.loads(Path(recipe_path).read_text(encoding="utf-8"))
        if name in recipe:
            return str(recipe[name])
    from config import TrainConfig
    return str({f.name: f.default for f in dataclasses.fields(TrainConfig)}[name])


def scaled_steps(steps):
    return max(1, min(MAX_STEPS, round(int(steps) / STEP_SCALE)))


def tiny_training(argv):
    """A train.py command line with the README's choices but tiny sizes (see the module's rules)."""
    argv = [re.sub(r"gpt_step(\d+)\.pt", lambda m: f"gpt_step{scaled_steps(m.group(1))}.pt", word)
            for word in argv]
    resume = flag_value(argv, "resume")
    checkpoint_dir = Path(effective_value(argv, "checkpoint_dir"))
    continues = resume is not None and (resume != "auto"
                                        or any(checkpoint_dir.glob("gpt_step*.pt")))
    for name in STEP_FLAGS:
        if not continues or flag_value(argv, name) is not None:  # a resumed run keeps its own
            argv = with_flag(argv, name, scaled_steps(effective_value(argv, name)))
    model = {} if continues or flag_value(argv, "init_from") is not None else TINY_MODEL
    for name, value in {**model, **TINY_RUN}.items():
        argv = with_flag(argv, name, value)
    return argv


def tiny_sampling(argv):
    tokens = min(int(flag_value(argv, "max_new_tokens") or MAX_SAMPLED_TOKENS), MAX_SAMPLED_TOKENS)
    return with_flag(with_flag(argv, "max_new_tokens", tokens), "device", "cpu")


# ----------------------------------------------------------------------- running the commands

class ReadmeRun:
    """The state of a walk through the README: what skipped commands would have written."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.skipped_outputs = []
        self.ran, self.skipped = [], []

    def skip_reason(self, command):
        argv = command.argv
        program = Path(argv[0]).name
        if program in SKIPPED_PROGRAMS:
            return SKIPPED_PROGRAMS[program]
        if argv[:3] == ["python", "-m", "pytest"]:
            return "the test suite itself"
        if "download" in command.comment.lower():
            return "downloads"
        if any("wandb" in word for word in argv):
            return "W&B starts a service process"
        missing = [package for package in optional_packages(argv)
                   if importlib.util.find_spec(package) is None]
        if missing:
            return f"needs {', '.join(missing)}, which is not installed"
        for word in argv:
            for output in self.skipped_outputs:
                if word == output or word.startswith(output.rstrip("/") + "/"):
                    return f"reads {output}, written by a skipped command"
        return None

    def outputs_of(self, command):
        """The run directory or export directory a command writes."""
        argv = command.argv
        if "train.py" in argv[1:4]:  # python train.py, or torchrun [options] train.py
            return [effective_value(argv, "checkpoint_dir")]
        out = flag_value(argv, "out")
        return [out] if out else []

    def make_user_files(self, command):
        argv = command.argv
        if Path(argv[0]).name in ("curl", "wget"):
            option = "-o" if Path(argv[0]).name == "curl" else "-O"  # curl -O: the URL's name
            named = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == option]
            Path(named[-1] if named else Path(argv[-1]).name).write_text(USER_TEXT, "utf-8")
        data = flag_value(argv, "data")
        if data and not Path(data).exists() and not any(c in data for c in "*?["):  # not a glob
            if data.endswith("/") or not Path(data).suffix:
                Path(data).mkdir(parents=True)
                (Path(data) / "notes.txt").write_text(USER_TEXT, encoding="utf-8")
            else:
                Path(data).write_text(USER_TEXT, encoding="utf-8")

    def run(self, command):
        self.make_user_files(command)
        reason = self.skip_reason(command)
        if reason:
            self.skipped.append((command.text, reason))
            # What exists already (an earlier command wrote it) stays readable.
            self.skipped_outputs += [out for out in self.outputs_of(command)
                                     if not Path(out).exists()]
            return
        status = self.status_of(command)
        assert status == 0, f"the README's command exited with status {status}: {command.text}"
        self.ran.append(command.text)

    def status_of(self, command):
        argv = command.argv
        script = argv[1] if argv[0] == "python" and len(argv) > 1 else ""
        if script not in ENTRY_POINTS:
            program = [sys.executable] if argv[0] == "python" else [argv[0]]
            with self.output_to(command.stdout_path) as stdout:
                return subprocess.run(program + argv[1:],
                                      env={**os.environ, **command.environment},
                                      stdout=stdout, timeout=120).returncode
        module, function = ENTRY_POINTS[script]
        main = getattr(importlib.import_module(module), function)
        arguments = argv[2:]
        if script == "train.py":
            arguments = tiny_training(arguments)
        elif script == "sample.py":
            arguments = tiny_sampling(arguments)
        with self.monkeypatch.context() as patch, self.output_to(command.stdout_path) as stdout:
            for name, value in command.environment.items():
                patch.setenv(name, value)
            with contextlib.redirect_stdout(stdout) if stdout else contextlib.nullcontext():
                status = exit_status(main, arguments)
        return 0 if status is None else status  # sys.exit() with no status is success

    @contextlib.contextmanager
    def output_to(self, path):
        if not path:
            yield None
            return
        with open(path, "w", encoding="utf-8") as handle:
            yield handle


def fresh_copy(destination):
    """The repository's tracked files, as a fresh clone has them (with this work tree's edits)."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in listing.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


def run_readme(text, directory, monkeypatch):
    """Run every command of a README's text in `directory`; return the walk."""
    monkeypatch.chdir(directory)
    walk = ReadmeRun(monkeypatch)
    for command in readme_commands(text):
        walk.run(command)
    return walk


# ----------------------------------------------------------------------- the tests

@pytest.mark.slow
def test_every_command_of_the_readme_runs_in_order_on_a_fresh_copy(tmp_path, monkeypatch):
    copy = fresh_copy(tmp_path / "repository")
    git = functools.partial(subprocess.run, cwd=copy, capture_output=True, text=True, check=True)
    git(["git", "init", "-q"])
    git(["git", "add", "-A"])  # what a clone holds
    walk = run_readme((copy / "README.md").read_text(encoding="utf-8"), copy, monkeypatch)
    assert len(walk.ran) >= 20, walk.ran
    # what the README had the user create or the commands wrote, git ignores (.gitignore)
    untracked = git(["git", "status", "--porcelain", "--untracked-files=all"]).stdout
    assert [line for line in untracked.splitlines() if line.startswith("??")] == []
    assert ("python sample.py --checkpoint_dir runs/hongloumeng --prompt \"宝玉\" "
            "--max_new_tokens 200") in walk.ran
    skipped = dict(walk.skipped)
    assert all(not text.startswith("python train.py") or "download" in text or "wandb" in text
               or reason.startswith("needs ") for text, reason in skipped.items()), skipped


def test_a_command_that_fails_fails_the_readme_test(tmp_path, monkeypatch):
    text = "```bash\npython sample.py --checkpoint_dir nowhere   # nothing trained there\n```\n"
    with pytest.raises(AssertionError, match="exited with status 2"):
        run_readme(text, tmp_path, monkeypatch)


def test_commands_are_read_as_a_shell_reads_them():
    text = ("```bash\n"
            "python train.py --data 红楼梦.txt \\\n    --prompt \"a # b\"  # a comment\n"
            "pip install -r requirements-dev.txt && python -m pytest -q tests\n"
            "X=1 python train.py --print_config > my_recipe.toml\n"
            "```\n```python\nprint('not a command')\n```\n")
    commands = readme_commands(text)
    assert [c.argv for c in commands] == [
        ["python", "train.py", "--data", "红楼梦.txt", "--prompt", "a # b"],
        ["pip", "install", "-r", "requirements-dev.txt"],
        ["python", "-m", "pytest", "-q", "tests"],
        ["python", "train.py", "--print_config"]]
    assert commands[0].comment == "a comment"
    assert commands[3].environment == {"X": "1"} and commands[3].stdout_path == "my_recipe.toml"


def test_training_commands_shrink_in_proportion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh = tiny_training(["--max_iters", "5000", "--device", "cuda", "--n_embd", "384"])
    assert flag_value(fresh, "max_iters") == "20" and flag_value(fresh, "save_iter") == "4"
    assert flag_value(fresh, "device") == "cpu" and flag_value(fresh, "n_embd") == "32"
    resumed = tiny_training(["--resume", "checkpoints/gpt_step1000.pt"])
    assert resumed[:2] == ["--resume", "checkpoints/gpt_step4.pt"]
    assert flag_value(resumed, "max_iters") is None and flag_value(resumed, "n_embd") is None


def test_the_designs_three_commands_in_order(tmp_path, monkeypatch):
    """As the design types them, into the default checkpoints/ (the README gives them their own
    --checkpoint_dir, as every example that trains does)."""
    text = ("```bash\n"
            "python train.py --max_iters 5000 --device cuda\n"
            "python train.py --resume checkpoints/gpt_step1000.pt\n"
            "python sample.py\n"
            "```\n")
    run_readme(text, tmp_path, monkeypatch)
    [aside] = (tmp_path / "checkpoints" / "superseded").iterdir()  # the later files, kept
    assert {"gpt_step8.pt", "gpt_step20.pt", "gpt_final.pt", "metrics.jsonl"} <= \
        {path.name for path in aside.iterdir()}
