"""`--help` of every command: it answers before torch loads, and every option in it has a help text
that ends with its default, as a user types it.

Each command runs in a fresh interpreter, as `python COMMAND --help` does, which reports at exit
whether torch was ever imported. The help is read as the user sees it, one option at a time.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

COMMANDS = ("train.py", "sample.py", "evaluate.py", "export.py", "plot.py")
TORCH_LINE = "help-test: torch imported:"


def help_of(command):
    """(the help text, whether torch was imported) of `python command --help`."""
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: print({TORCH_LINE!r}, 'torch' in sys.modules, "
            "file=sys.stderr))\n"
            f"sys.argv = [{command!r}, '--help']\n"
            f"runpy.run_path({command!r}, run_name='__main__')\n")
    # wide enough that argparse puts each option's help on its own lines, unwrapped
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "400"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout, f"{TORCH_LINE} True" in result.stderr


def options_of(help_text):
    """{the option as listed ("--out OUT"): its help text}, for every option and argument."""
    options, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):  # an option starts, its help beside it or on the next line
            invocation, _, text = line.strip().partition("  ")
            current = invocation
            options[current] = text.strip()
        elif current and line.startswith("    "):
            options[current] = f"{options[current]} {line.strip()}".strip()
        else:
            current = None  # a group's title or description
    return options


@pytest.fixture(scope="module")
def helps():
    return {command: help_of(command) for command in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_loading_torch(helps, command):
    text, torch_imported = helps[command]
    assert text.startswith(f"usage: {command}")
    assert not torch_imported


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_help_text_that_ends_with_its_default(helps, command):
    options = options_of(helps[command][0])
    del options["-h, --help"]
    assert len(options) >= 3, options
    for option, text in options.items():
        assert text and not text.startswith("(default"), f"{command} {option} has no help"
        switch = re.fullmatch(r"--\w+", option)  # a flag without a value, e.g. --print_config
        if not switch:
            assert re.search(r"\(default: [^)\s][^)]*\)$", text), f"{command} {option}: {text}"
            assert text.count("(default") == 1, f"{command} {option}: {text}"
        assert not re.search(r"\(default: (None|True|False|'')\)", text), f"{command} {option}"

