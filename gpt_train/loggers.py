"""A run's records: measured on the device, printed, and sent where --log_to says.

- `LossMeter`: the training loss and gradient norm summed on the device between logs and read at
  log time, so the loop never waits for the device; it also keeps the first non-finite step;
- `format_record`: the line a record prints (`step 100 | loss 2.4 | ...`);
- `Loggers`: metrics.jsonl, TensorBoard and Weights & Biases. Every destination receives the same
  records at the same steps, and only rank 0 writes. TensorBoard and W&B are optional packages,
  imported only when asked for. A resumed run continues the same curves: metrics.jsonl drops the
  records after the resumed step (at its first record, so a resume that fails before then
  changes nothing; the file is rewritten whole and renamed into place, so a kill then leaves the
  old file or the new), TensorBoard purges its points after it (`purge_step`), and W&B resumes
  the same run, whose id is kept in the checkpoint directory (rundir/names.py names the files). A
  destination that cannot be written (a metrics.jsonl that is a directory or read-only, a
  `tensorboard` that is a file) is one line before the first step.
What goes into a record, and when one is logged, is train.py's business.
"""

import html
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from config import config_to_dict, fail
from gpt_train.atomic import atomic_write
from gpt_train.cli import ResourceError
from gpt_train.rundir.names import TENSORBOARD_NAME, WANDB_RUN_ID_NAME, metrics_path

class LossMeter:
    """The training loss and gradient norm summed on the device between logs, and the first
    non-finite step.

    All stay on the device until `first_bad_step` and `read`, at log time: the loop never waits
    for the device. The gradients, hence their norm, are the same on every rank.
    """

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.finite_grad_norms = torch.zeros((), device=device)
        self.steps = 0
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.last_loss, self.last_grad_norm = math.nan, None
        self.clock = time.perf_counter()

    def add(self, step, loss, grad_norm, bad):
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.loss_sum += loss
        finite = torch.isfinite(grad_norm)  # float16: the scaler skips steps whose norm overflowed
        self.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
        self.finite_grad_norms += finite
        self.steps += 1

    def first_bad_step(self, runtime):
        """The first step whose loss or gradient norm was not finite, on any rank, or None."""
        if runtime.distributed:  # every rank stops at the first bad step of any rank
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        step = int(self.first_bad)
        return step if step >= 0 else None

    def read(self, runtime):
        """(mean loss since the last read, mean gradient norm or None, steps, seconds)."""
        if runtime.distributed:  # the mean over every rank's micro-batches
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= runtime.world_size
        if self.steps:
            norms = self.finite_grad_norms.clamp(min=1)
            self.last_loss, grad_norm, finite = torch.stack(
                [self.loss_sum / self.steps, self.grad_norm_sum / norms, self.finite_grad_norms]
            ).tolist()
            self.last_grad_norm = grad_norm if finite else None
        steps, seconds = self.steps, time.perf_counter() - self.clock
        for total in (self.loss_sum, self.grad_norm_sum, self.finite_grad_norms):
            total.zero_()
        self.steps, self.clock = 0, time.perf_counter()
        return self.last_loss, self.last_grad_norm, steps, seconds

    def restart_clock(self):
        """Evaluation and sampling time is not training throughput."""
        self.clock = time.perf_counter()


# The learning rates a record holds, by name: AdamW's, and with --optimizer muon, Muon's.
RATE_NAMES = ("lr", "muon_lr")


def format_record(record):
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f} ({record['val_bpb']:.3f} bits/byte)")
    parts += [f"{name} {record[name]:.2e}" for name in RATE_NAMES if name in record]
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


# record key -> the chart it is drawn in (TensorBoard tag, W&B key); other numbers keep their key
CHARTS = {"loss": "train/loss", "lr": "train/lr", "muon_lr": "train/muon_lr",
          "grad_norm": "train/grad_norm",
          "tokens_per_sec": "speed/tokens_per_sec", "mfu": "speed/mfu",
          "val_loss": "val/loss", "val_bpb": "val/bits_per_byte"}


def scalars(record):
    """The record's numbers under their chart names (the step is the x axis, not a chart)."""
    return {CHARTS.get(key, key): value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Loggers:
    """The destinations --log_to names, fed the same records; on ranks other than 0, none.

    Used as a context manager around the loop: W&B starts its run on entry, so a problem with it
    shows before the first step, and everything closes on exit. Files already in the run directory
    change only from the first record on, so a run that fails before then has replaced nothing.
    """

    def __init__(self, gpt_config, train_config, runtime):
        directory = Path(train_config.checkpoint_dir)
        self.path = metrics_path(directory)  # metrics.jsonl, written or not
        names = train_config.log_to.split(",") if runtime.is_main else []
        self.destinations = []
        if "jsonl" in names:
            check_writable_file(self.path)
            self.destinations.append(MetricsLog(self.path))
        if "tensorboard" in names:
            check_folder(directory / TENSORBOARD_NAME)
            self.destinations.append(TensorBoardLog(directory / TENSORBOARD_NAME))
        if "wandb" in names:
            configs = {**config_to_dict(gpt_config), **config_to_dict(train_config)}
            self.destinations.append(WandbLog(directory, configs))

    def resume(self, step):
        """The run continues after `step`: what was logged after it is dropped."""
        for destination in self.destinations:
            destination.resume(step)

    def write(self, record):
        for destination in self.destinations:
            destination.write(record)

    def write_sample(self, step, text):
        for destination in self.destinations:
            destination.write_sample(step, text)

    def __enter__(self):
        for destination in self.destinations:
            destination.open()
        return self

    def __exit__(self, error_type, error, traceback):
        for destination in self.destinations:
            destination.close(failed=error_type is not None)


def check_writable_file(path):
    """A log file is a file, or missing, and can be appended to."""
    if path.exists() and not path.is_file():
        fail(f"{path} is not a file (a directory?), where --log_to jsonl writes the run's metrics; "
             f"move it away, or leave jsonl out of --log_to")
    if path.exists() and not os.access(path, os.W_OK):
        fail(f"{path} is read-only, where --log_to jsonl writes the run's metrics; make it "
             f"writable, or leave jsonl out of --log_to")


def check_folder(path):
    if path.exists() and not path.is_dir():
        fail(f"{path} is a file, where --log_to tensorboard writes its event files; move it "
             f"away, or leave tensorboard out of --log_to")


class MetricsLog:
    """One JSON object per line in checkpoint_dir/metrics.jsonl."""

    def __init__(self, path):
        self.path = path
        self.resumed_step = None  # set on resume: the records after it go at the first write

    def write(self, record):
        if self.resumed_step is not None:  # only a run that got this far may change the history
            self.trim_after(self.resumed_step)
            self.resumed_step = None
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise ResourceError(f"could not write {self.path}: {error.strerror or error}; the "
                                f"checkpoints saved so far are intact") from error

    def trim_after(self, step):
        """Drop records after `step` so the file tells one consistent history; mark the resume.

        A line that is not a record (the torn last line a kill during a write leaves) goes too.
        """
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(errors="replace").splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= step]
        kept.append(json.dumps({"step": step, "event": "resume"}))
        try:
            with atomic_write(self.path) as handle:  # whole, then renamed: a kill loses nothing
                handle.write(("\n".join(kept) + "\n").encode())
        except OSError as error:
            raise ResourceError(f"could not rewrite {self.path}: {error.strerror or error}; it "
                                f"is as it was") from error

    def resume(self, step):
        self.resumed_step = step

    def write_sample(self, step, text):
        pass  # samples are printed; metrics.jsonl keeps numbers

    def open(self):
        pass  # the file is opened for each record, so a crash loses nothing written

    def close(self, failed=False):
        pass


class TensorBoardLog:
    """Event files under checkpoint_dir/tensorboard: `tensorboard --logdir CHECKPOINT_DIR`."""

    def __init__(self, directory):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--log_to tensorboard needs the tensorboard package: pip install tensorboard")
        self.make_writer, self.directory = SummaryWriter, directory
        self.writer, self.start_step = None, 0

    def resume(self, step):
        self.start_step = step

    def open(self):
        pass  # at the first record: see _writer

    def _writer(self):
        if self.writer is None:
            # points after the start step, left by an earlier attempt, are hidden from every reader
            self.writer = self.make_writer(str(self.directory), purge_step=self.start_step + 1,
                                           flush_secs=10)
        return self.writer

    def write(self, record):
        for chart, value in scalars(record).items():
            self._writer().add_scalar(chart, value, record["step"])

    def write_sample(self, step, text):
        code_block = "\n".join("    " + line for line in text.splitlines())  # Markdown: verbatim
        self._writer().add_text("sample", code_block, step)

    def close(self, failed=False):
        if self.writer is not None:
            self.writer.close()


class WandbLog:
    """A Weights & Biases run: the configs, the scalars and the samples.

    Its files go under WANDB_DIR/wandb where that is set (W&B's own convention), else under
    checkpoint_dir/wandb (WANDB_MODE=offline: for a later `wandb sync`); WANDB_PROJECT (default
    gpt-train) and WANDB_ENTITY choose where it goes.
    """

    def __init__(self, directory, configs):
        try:
            import wandb
        except ImportError:
            fail("--log_to wandb needs the wandb package: pip install wandb")
        self.wandb, self.directory, self.configs = wandb, Path(directory), configs
        self.run, self.resumed, self.id_saved = None, False, False

    def resume(self, step):
        self.resumed = True

    def open(self):
        id_path = self.directory / WANDB_RUN_ID_NAME
        run_id = id_path.read_text().strip() if self.resumed and id_path.exists() else None
        try:
            self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "gpt-train"),
                                       id=run_id, resume="allow",
                                       dir=os.environ.get("WANDB_DIR") or str(self.directory),
                                       settings=self.wandb.Settings(console="off"))
        except self.wandb.errors.Error as error:
            fail(f"W&B could not start a run ({' '.join(str(error).split())}); "
                 f"WANDB_MODE=offline logs locally")
        self.run.config.update(self.configs, allow_val_change=True)  # a resume may change some

    def _log(self, values, step):
        if not self.id_saved:  # the first record: from now on a resume continues this W&B run
            with atomic_write(self.directory / WANDB_RUN_ID_NAME) as handle:
                handle.write(f"{self.run.id}\n".encode())
            self.id_saved = True
        self.run.log(values, step=step)

    def write(self, record):
        self._log(scalars(record), record["step"])

    def write_sample(self, step, text):
        self._log({"sample": self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step)

    def close(self, failed=False):
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


def _record(line):
    """The metrics record on `line`, or None for a line that is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
        return None
    return record
