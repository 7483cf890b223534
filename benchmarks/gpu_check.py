"""One row of benchmarks/gpu_check.sh, or its final table.

`python benchmarks/gpu_check.py row --name NAME --kind train|bench|pytest [--timeout S] -- ARGS`
runs `python train.py ARGS`, `python benchmarks/bench_train.py ARGS` or `python -m pytest ARGS` in
a subprocess with a wall-clock limit (start-up included), keeps its whole output in
$OUT_DIR/rows/, prints a summary and appends one JSON record to $OUT_DIR/rows.jsonl:
- train: wall seconds, steps/s (the median of the logged intervals, so start-up and the first
  interval's warm-up do not count), the final validation loss; the run's checkpoints go to a
  temporary directory (--checkpoint_dir is added);
- bench: wall seconds, the loop's ms/step, tokens/s and MFU, peak memory allocated and reserved;
- pytest: the summary line.
Every row also keeps the output's `note:` and `error:` lines (a fallback from CUDA graphs says so).
A row that fails or runs out of time is recorded as such; the script goes on with the next one.
`python benchmarks/gpu_check.py table` prints the table of every row so far (markdown), also
written to $OUT_DIR/gpu_check.md. The deadline (GPU_CHECK_DEADLINE, seconds since the epoch)
shortens a row's limit so the whole script ends in time.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"([\d,]+(?:\.\d+)?)"


def out_dir():
    path = Path(os.environ.get("OUT_DIR") or tempfile.gettempdir() + "/gpu_check")
    (path / "rows").mkdir(parents=True, exist_ok=True)
    return path


def run_limited(command, timeout, log_path):
    """(exit status or "timeout", output, wall seconds) of `command`; its output goes to log_path."""
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "inf"))
    timeout = max(1.0, min(timeout, deadline - time.time()))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the run and any workers it started
            process.wait()
            status = "timeout"
    wall = time.perf_counter() - start
    return status, Path(log_path).read_text(errors="replace"), wall


def figure(pattern, text):
    match = re.findall(pattern, text)
    return float(match[-1].replace(",", "")) if match else None


def train_figures(output, checkpoint_dir):
    tokens_per_step = figure(r"tokens per optimizer step: " + NUMBER, output)
    figures = {"val_loss": figure(r"final validation loss: " + NUMBER, output)}
    metrics = Path(checkpoint_dir) / "metrics.jsonl"
    if tokens_per_step and metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rates = [record["tokens_per_sec"] for record in records if record.get("tokens_per_sec")]
        if rates:
            figures["steps_per_s"] = statistics.median(rates[1:] or rates) / tokens_per_step
    return figures


def bench_figures(output):
    loop = re.search(rf"loop: {NUMBER} ms/step \| {NUMBER} tokens/s(?: \| MFU {NUMBER}%)?", output)
    figures = {}
    if loop:
        figures["ms_per_step"] = float(loop.group(1).replace(",", ""))
        figures["tokens_per_s"] = float(loop.group(2).replace(",", ""))
        if loop.group(3):
            figures["mfu_percent"] = float(loop.group(3))
    for key, pattern in (("peak_gib", r"peak memory: " + NUMBER + " MiB"),
                         ("reserved_gib", r"peak memory reserved: " + NUMBER + " MiB")):
        mib = figure(pattern, output)
        if mib is not None:
            figures[key] = mib / 1024
    return figures


def run_row(args, extra):
    directory = out_dir()
    slug = re.sub(r"[^a-z0-9]+", "-", args.name.lower()).strip("-")[:60]
    log_path = directory / "rows" / f"{slug}.log"
    print(f"== {args.name}", flush=True)
    checkpoint_dir = tempfile.mkdtemp(prefix="gpu_check-")
    if args.kind == "train":
        command = [sys.executable, "train.py", *extra, "--checkpoint_dir", checkpoint_dir]
    elif args.kind == "bench":
        command = [sys.executable, "benchmarks/bench_train.py", *extra]
    else:
        command = [sys.executable, "-m", "pytest", *extra]
    print("   $ " + " ".join(command[1:]), flush=True)
    status, output, wall = run_limited(command, args.timeout, log_path)
    record = {"name": args.name, "kind": args.kind, "status": status, "wall_s": round(wall, 1),
              "today": args.today, "log": str(log_path)}
    if args.kind == "train":
        record.update(train_figures(output, checkpoint_dir))
    elif args.kind == "bench":
        record.update(bench_figures(output))
    else:
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        record["summary"] = summary[-1].strip("= ") if summary else ""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    record["notes"] = [line.strip()[:300] for line in output.splitlines()
                       if line.startswith(("note:", "error:", "FAILED"))][:8]
    if status not in (0, "timeout") and not record["notes"]:
        record["notes"] = [line[:300] for line in output.strip().splitlines()[-3:]]
    with open(directory / "rows.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print("   " + format_summary(record), flush=True)
    for note in record["notes"]:
        print(f"   {note}", flush=True)
    return 0


def format_summary(record, separator=" | "):
    status = {0: "ok", "timeout": "TIMED OUT"}.get(record["status"], f"FAILED ({record['status']})")
    parts = [status, f"{record['wall_s']:.1f} s wall"]
    for key, text in (("steps_per_s", "{:.0f} steps/s"), ("ms_per_step", "{:.2f} ms/step"),
                      ("tokens_per_s", "{:,.0f} tokens/s"), ("mfu_percent", "MFU {:.1f}%"),
                      ("peak_gib", "peak {:.2f} GiB"), ("reserved_gib", "reserved {:.2f} GiB"),
                      ("val_loss", "val loss {:.4f}")):
        if record.get(key) is not None:
            parts.append(text.format(record[key]))
    if record.get("summary"):
        parts.append(record["summary"])
    return separator.join(parts)


def table(args, extra):
    path = out_dir() / "rows.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    lines = ["| what | result | reported before the GPU work |", "| --- | --- | --- |"]
    for record in records:
        result = "; ".join([format_summary(record, ", "), *record["notes"]])
        lines.append(f"| {record['name']} | {result.replace('|', '/')} | {record['today']} |")
    text = "\n".join(lines)
    print(text)
    (out_dir() / "gpu_check.md").write_text(text + "\n")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    row = commands.add_parser("row")
    row.add_argument("--name", required=True)
    row.add_argument("--kind", choices=("train", "bench", "pytest"), required=True)
    row.add_argument("--timeout", type=float, default=300)
    row.add_argument("--today", default="", help="the figure before this work, for the table")
    commands.add_parser("table")
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    return run_row(args, extra) if args.command == "row" else table(args, extra)


if __name__ == "__main__":
    sys.exit(main())
