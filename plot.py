"""Draw a run's loss curve: `python plot.py [checkpoints/metrics.jsonl] [--out loss.png]`.

Reads the metrics.jsonl that train.py writes (one JSON object per line) and draws, against the
optimizer step:
- top: the training loss, its smoothed line (an exponential moving average, bias-corrected so it
  does not start near zero), and the validation loss;
- bottom: the learning rate (with --optimizer muon, AdamW's `lr` on the left axis and Muon's
  `muon_lr`, ten times larger by default, on the right);
- with --eval_tasks, a panel between them: each task's accuracy (acc_norm where it has one, else
  acc) and their centered mean (`tasks/centered_accuracy`).
A dashed vertical line marks each point where the run was resumed (records {"event": "resume"}).
The picture is drawn on a matplotlib `Figure` with the Agg (file-only) canvas: no window and no
global pyplot state. matplotlib is optional; only this script needs it. What the records mean
is train.py's business.

No file a user has is overwritten: a PNG, PDF or SVG this script writes carries a mark in its
metadata (`plot_mark`: a digest of the metrics file's full path), and an existing --out is
replaced only if it carries the mark of the same metrics file, so a bare `plot.py` redraws its
own loss.png but never a user's report.pdf nor another run's loss.png; anything else needs
--overwrite true. The image is written whole and renamed into place (atomic.py).
"""

from gpt_train.cli import exit_on_signals

if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while the imports load: one line, not a traceback

import hashlib
import json
import math
import re
from pathlib import Path

from gpt_train.atomic import atomic_write
from gpt_train.cli import raise_os_failure, run_main
from config import ArgumentParser, fail, parse_bool
from gpt_train.rundir.names import metrics_path

# the formats whose metadata carries `plot_mark` as plain text, and the key it goes under
MARK_KEYS = {"png": "Subject", "pdf": "Subject", "svg": "Description"}
MARK_PATTERN = re.compile(rb"written by plot\.py from metrics ([0-9a-f]{16})")
LARGEST_IMAGE = 64 << 20  # bytes read looking for the mark; a larger file is not one of ours


def parse_plot_args(argv=None):
    parser = ArgumentParser(description="Plot training loss, validation loss and learning rate.")
    default = str(metrics_path("checkpoints"))
    parser.add_argument("metrics", nargs="?", default=default,
                        help=f"train.py's metrics file (default: {default})")
    parser.add_argument("--out", default="loss.png", help="image file to write; its suffix picks "
                        "the format: png, svg, pdf, ... (default: loss.png)")
    parser.add_argument("--smoothing", type=float, default=0.6,
                        help="weight of the past in the smoothed training loss, in [0, 1)")
    parser.add_argument("--overwrite", type=parse_bool, default=False, metavar="true|false",
                        help="replace an existing --out that is not this script's plot of the "
                        "same metrics file (default: false)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0:  # also rejects nan
        fail(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if not args.out.strip():
        fail("--out must not be empty; give an image file, such as loss.png")
    if Path(args.out).is_dir() or args.out.endswith(("/", "\\")) or not Path(args.out).name:
        fail(f"--out {args.out} is a directory; give an image file, such as "
             f"{Path(args.out) / 'loss.png'}")
    return args


def read_metrics(path):
    """The series in a metrics file: {"train": [(step, loss)], "val": [...], "lr": [...],
    "muon_lr": [...], "resumes": [step, ...]}. Non-finite losses (a log with no steps behind it)
    are left out, and so is a torn last line (what a run killed while writing it leaves)."""
    path = Path(path)
    if path.is_dir():
        fail(f"{path} is a directory; give the metrics file in it: {metrics_path(path)}")
    if not path.exists():
        fail(f"metrics file not found: {path} (train.py writes it into --checkpoint_dir)")
    if not path.is_file():
        fail(f"{path} is not a regular file; give the metrics.jsonl that train.py writes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not a metrics file: it is not UTF-8 text (train.py writes JSON lines)")
    lines = text.splitlines()
    series = {"train": [], "val": [], "lr": [], "muon_lr": [], "resumes": [], "tasks": {}}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError, OverflowError):  # int(inf): OverflowError
            if number == len(lines) and not text.endswith("\n"):
                break  # the torn last line of a killed run
            fail(f"{path}, line {number}: not a metrics record")
        if record.get("event") == "resume":
            series["resumes"].append(step)
        for key, name in (("loss", "train"), ("val_loss", "val"), ("lr", "lr"),
                          ("muon_lr", "muon_lr")):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series[name].append((step, float(value)))
        for key, value in record.items():  # --eval_tasks: "hellaswag/acc_norm", ...
            if key.endswith(("/acc", "/acc_norm", "/centered_accuracy")) and \
                    isinstance(value, (int, float)) and math.isfinite(value):
                series["tasks"].setdefault(key, []).append((step, float(value)))
    if not series["train"] and not series["val"]:
        fail(f"{path} has no loss records yet")
    for key in [key for key in series["tasks"] if key.endswith("/acc")]:
        if key + "_norm" in series["tasks"]:  # a task is drawn by acc_norm where it has one
            del series["tasks"][key]
    return series


def draw_tasks(axes, tasks):
    """Each task's accuracy against the step, in percent, and the centered mean dashed."""
    for key, points in sorted(tasks.items()):
        steps, values = zip(*points)
        centered = key.startswith("tasks/")
        axes.plot(steps, [100 * value for value in values], marker="o", markersize=3,
                  linestyle="--" if centered else "-", linewidth=1.5 if centered else 1,
                  color="black" if centered else None, label=key)
    axes.set_ylabel("task accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")


def smooth(values, weight):
    """Exponential moving average, divided by (1 - weight^n) so early points are not pulled to 0."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight ** count))
    return smoothed


def _import_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        fail("plot.py needs the 'matplotlib' package: pip install matplotlib")
    return Figure


def draw(series, out, smoothing=0.6, title="", mark=""):
    """Render the curves to the image file `out` (its suffix picks the format: png, svg, pdf),
    with `mark` (`plot_mark`) in its metadata."""
    Figure = _import_figure()
    tasks = series.get("tasks")
    figure = Figure(figsize=(9, 9 if tasks else 6), layout="constrained")
    if tasks:
        loss_axes, task_axes, lr_axes = figure.subplots(3, 1, sharex=True,
                                                        height_ratios=(3, 2, 1))
        draw_tasks(task_axes, tasks)
    else:
        loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if series["train"]:
        steps, losses = zip(*series["train"])
        loss_axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        loss_axes.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2,
                       label=f"train loss (smoothed {smoothing:g})")
    if series["val"]:
        steps, losses = zip(*series["val"])
        loss_axes.plot(steps, losses, color="tab:orange", marker="o", markersize=4,
                       linewidth=1.5, label="validation loss")
    if series["lr"]:
        steps, rates = zip(*series["lr"])
        lr_axes.plot(steps, rates, color="tab:green", linewidth=1.5, label="lr (AdamW)")
    if series.get("muon_lr"):  # its own scale: Muon's rate is an order of magnitude larger
        muon_axes = lr_axes.twinx()
        steps, rates = zip(*series["muon_lr"])
        muon_axes.plot(steps, rates, color="tab:purple", linewidth=1.5, linestyle="--",
                       label="muon_lr (Muon)")
        muon_axes.set_ylabel("muon_lr", color="tab:purple")
        lr_axes.legend(handles=[*lr_axes.get_lines(), *muon_axes.get_lines()], loc="upper right")
    for index, step in enumerate(series["resumes"]):
        for axes in (loss_axes, lr_axes):
            axes.axvline(step, color="gray", linestyle="--", linewidth=1,
                         label="resumed" if index == 0 and axes is loss_axes else None)
    loss_axes.set_ylabel("loss (nats per token)")
    loss_axes.set_title(title)
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    image_format = out.suffix[1:].lower()
    metadata = {MARK_KEYS[image_format]: mark} if image_format in MARK_KEYS else None
    try:
        with atomic_write(out) as handle:
            figure.savefig(handle, format=image_format, dpi=100, metadata=metadata)
    except (OSError, ValueError) as error:
        raise_os_failure(f"could not write {out}: {error}", error)
    return out


def image_path(out):
    """The file --out names: without a suffix, a PNG (what savefig would write; say so, by name)."""
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".png")


def plot_mark(metrics):
    """What this script writes into an image's metadata: which metrics file it drew."""
    digest = hashlib.sha256(str(Path(metrics).resolve()).encode("utf-8", "surrogateescape"))
    return f"written by plot.py from metrics {digest.hexdigest()[:16]}"


def check_out(out, mark, overwrite):
    """Refuse to replace a file at `out` unless it is this script's plot of the same metrics."""
    if overwrite or not out.exists():
        return
    found = None
    try:
        if out.is_file() and out.stat().st_size <= LARGEST_IMAGE:
            found = MARK_PATTERN.search(out.read_bytes())
    except OSError as error:
        fail(f"cannot read --out {out}: {error.strerror or error}")
    if found and found.group(0).decode() == mark:
        return
    whose = "plot.py's plot of another metrics file" if found else "a file plot.py did not write"
    fail(f"--out {out} is {whose}: choose another --out, or pass --overwrite true to replace it")


def main(argv=None):
    args = parse_plot_args(argv)
    out, mark = image_path(args.out), plot_mark(args.metrics)
    series = read_metrics(args.metrics)
    check_out(out, mark, args.overwrite)
    out = draw(series, out, args.smoothing, title=str(args.metrics), mark=mark)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main)
