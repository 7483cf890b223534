"""Soak a long run: `python benchmarks/soak.py [train.py flags] [--warmup_fraction F]`.

By default 20,000 steps of a tiny model on the built-in corpus, evaluated every 1,000 steps, with
a checkpoint every 500 and --keep_last 2: the whole of `train.train`, in this process. A thread
reads the resident memory (RSS, from /proc: Linux) twice a second. Two checks, printed with their
figures:
- memory is flat: the largest RSS after the warm-up (the first F of the run's time) exceeds the
  RSS at the end of the warm-up by less than 5%;
- the checkpoint directory holds exactly the expected files: the newest --keep_last step
  checkpoints, gpt_best.pt, gpt_final.pt and metrics.jsonl with one record per log line.
Any train.py flag overrides the defaults. Exit status 1 if a check fails. It takes minutes, so it
is not part of the test suite. Checkpoints go to a temporary directory unless --checkpoint_dir
is given.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

from gpt_train.rundir.names import BEST_NAME, FINAL_NAME, METRICS_NAME, step_path  # noqa: E402
from gpt_train.cli import run_main  # noqa: E402
from config import GPTConfig, TrainConfig, apply_args_to_configs, fail, parse_args  # noqa: E402
import train  # noqa: E402

DEFAULTS = dict(max_iters=20_000, save_iter=500, keep_last=2, eval_iter=1000, eval_batches=4,
                log_iter=250, warmup_iters=100, n_layer=1, n_head=2, n_embd=32, block_size=32,
                batch_size=8, device="cpu")
GROWTH_LIMIT = 0.05


class MemorySampler(threading.Thread):
    """Reads this process's resident memory every `interval` seconds until stopped."""

    def __init__(self, interval=0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def resident_bytes(self):
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page_size

    def run(self):
        while not self.stopped.wait(self.interval):
            self.samples.append((time.perf_counter(), self.resident_bytes()))


def expected_files(train_config):
    """The step checkpoints --keep_last leaves, gpt_best.pt, gpt_final.pt and metrics.jsonl."""
    t = train_config
    saved = sorted({*range(t.save_iter, t.max_iters + 1, t.save_iter), t.max_iters})
    kept = saved[-t.keep_last:] if t.keep_last else saved
    return sorted([step_path("", step).name for step in kept] + [BEST_NAME, FINAL_NAME, METRICS_NAME])


def expected_logged_steps(train_config):
    """The steps a run of these flags logs: each --log_iter, --eval_iter, --save_iter, the last."""
    t = train_config
    return sorted({*range(t.log_iter, t.max_iters + 1, t.log_iter),
                   *range(t.eval_iter, t.max_iters + 1, t.eval_iter),
                   *range(t.save_iter, t.max_iters + 1, t.save_iter), t.max_iters})


def memory_figures(samples, start, end, warmup_fraction):
    """(RSS at the end of the warm-up, largest RSS after it, last RSS, growth), in bytes."""
    boundary = start + warmup_fraction * (end - start)
    warm = [rss for moment, rss in samples if moment <= boundary]
    after = [rss for moment, rss in samples if moment > boundary]
    if not warm or not after:
        fail("the run was too short to sample its memory before and after the warm-up")
    baseline, largest = warm[-1], max(after)
    return baseline, largest, after[-1], largest / baseline - 1


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--warmup_fraction", type=float, default=0.1)
    soak_args, train_flags = parser.parse_known_args(argv)
    if not 0 < soak_args.warmup_fraction < 1:
        fail(f"--warmup_fraction must be in (0, 1), got {soak_args.warmup_fraction}")
    argv = [item for name, value in DEFAULTS.items() for item in (f"--{name}", str(value))]
    temporary = None
    if "--checkpoint_dir" not in train_flags:
        temporary = tempfile.TemporaryDirectory(prefix="soak-")
        argv += ["--checkpoint_dir", temporary.name]
    argv += train_flags  # the last occurrence of a flag wins: the user's
    _, train_config = apply_args_to_configs(parse_args(argv), GPTConfig(), TrainConfig())
    directory = Path(train_config.checkpoint_dir)

    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    train.train(argv)
    end = time.perf_counter()
    sampler.stopped.set()
    sampler.join()

    baseline, largest, last, growth = memory_figures(sampler.samples, start, end,
                                                     soak_args.warmup_fraction)
    files = sorted(p.name for p in directory.iterdir())
    records = [json.loads(line) for line in (directory / METRICS_NAME).read_text().splitlines()]
    files_ok = files == expected_files(train_config)
    records_ok = [record["step"] for record in records] == expected_logged_steps(train_config)
    memory_ok = growth < GROWTH_LIMIT
    mib = 2**20
    print(f"soak: {train_config.max_iters:,} steps in {end - start:,.0f} s "
          f"({1000 * (end - start) / train_config.max_iters:.2f} ms/step), "
          f"{len(sampler.samples)} memory samples")
    print(f"resident memory: {baseline / mib:.1f} MiB after the warm-up (first "
          f"{soak_args.warmup_fraction:.0%} of the time), at most {largest / mib:.1f} MiB after it, "
          f"{last / mib:.1f} MiB at the end: growth {100 * growth:+.2f}% "
          f"({'flat' if memory_ok else 'NOT flat'}: the limit is {100 * GROWTH_LIMIT:.0f}%)")
    print(f"files: {', '.join(files)} ({'as expected' if files_ok else 'NOT as expected'})")
    print(f"metrics.jsonl: {len(records):,} records "
          f"({'one per log line' if records_ok else 'NOT one per log line'})")
    if temporary is not None:
        temporary.cleanup()
    return 0 if memory_ok and files_ok and records_ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
