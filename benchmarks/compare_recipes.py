"""Compare training recipes side by side: `python benchmarks/compare_recipes.py [--data DATA]
[--rounds N] [--out DIR] "ARGS" "ARGS" ...`, each ARGS the train.py arguments of one entry
(`"--config recipes/cpu_speedrun.toml"`, `"--config recipes/cpu_speedrun_gpt2.toml"`, or `""` for
the default run).

Each round runs every entry once, in turn, so that a burst of load on a shared machine falls on
all of them; every other round goes in reverse order, so that none always runs first. For each
run it measures what the CPU speedrun measures (benchmarks/cpu_speedrun.sh):
- wall time: the whole `python train.py` process, start-up included, with an empty token cache;
- validation loss: evaluate.py on gpt_final.pt, float32, every token of the validation split
  scored once (after the clock stops).
It prints every round's wall time, the fastest (load only ever adds time), the median, and the
loss (a run is deterministic, so the loss is the same in every round; the table shows the
first). Runs go to --out (default: a new temporary directory), which must be new or empty.
"""

import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's modules

from gpt_train.cli import run_main  # noqa: E402
from config import ArgumentParser, fail


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="+", metavar="ARGS",
                        help='train.py arguments of one entry, quoted ("" = the default run)')
    parser.add_argument("--data", default="", help="the corpus (default: the built-in one)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each entry (default: 1)")
    parser.add_argument("--out", default="", help="directory for the runs (default: a new one)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        fail(f"--rounds must be at least 1, got {args.rounds}")
    return args


def train_and_evaluate(arguments, data, run_dir):
    """(wall seconds of train.py, evaluated validation loss) of one run into `run_dir`."""
    command = [sys.executable, str(REPO / "train.py"), *shlex.split(arguments),
               "--checkpoint_dir", str(run_dir), "--cache_dir", str(run_dir / "token-cache")]
    if data:
        command += ["--data", data]
    print("running:", shlex.join(command), flush=True)
    start = time.perf_counter()
    training = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if training.returncode:  # the progress bar is left out; the error is the stream's last line
        last_line = (training.stderr.strip().splitlines() or [""])[-1]
        sys.exit(f"train.py failed with exit status {training.returncode}: {last_line}")
    evaluation = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(run_dir / "gpt_final.pt"),
         "--device", "cpu", "--dtype", "float32"],
        check=True, capture_output=True, text=True).stdout
    loss = float(re.search(r"^loss (\d+\.\d+)", evaluation, re.MULTILINE).group(1))
    print(f"  {wall:.1f} s wall, validation loss {loss:.4f}", flush=True)
    return wall, loss


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="compare_recipes-"))
    if out.exists() and any(out.iterdir()):
        fail(f"--out {out} is not empty; give a new or empty directory")
    walls = {entry: [] for entry in args.entries}
    losses = {}
    for round_ in range(args.rounds):
        order = list(enumerate(args.entries))
        for index, entry in order if round_ % 2 == 0 else reversed(order):
            wall, loss = train_and_evaluate(entry, args.data, out / f"entry{index}-round{round_}")
            walls[entry].append(wall)
            losses.setdefault(entry, loss)

    print("\n| train.py arguments | wall time of each round (s) | fastest | median "
          "| validation loss |")
    print("| --- | --- | --- | --- | --- |")
    for entry in args.entries:
        rounds = ", ".join(f"{wall:.1f}" for wall in walls[entry])
        print(f"| `{entry or '(default run)'}` | {rounds} | {min(walls[entry]):.1f} s "
              f"| {statistics.median(walls[entry]):.1f} s | {losses[entry]:.4f} |")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    run_main(main)
