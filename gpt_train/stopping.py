"""How a training run ends before its last step: the signal the ranks agree on, and the line each
ending prints. Whether to end is decided in train.py's loop, where every way out is seen.

- `StopRequest`: Ctrl-C, SIGTERM or SIGHUP becomes a request to stop after the current optimizer
  step, agreed by every rank (so all save the same step);
- `stop_line`: the one line of a stop by signal: the step, the checkpoint, and the command that
  resumes it, the torchrun command under torchrun (`resume_command`);
- `divergence_line`: a non-finite loss, or more than --skip_nonfinite skipped batches: what was
  kept, and the flags worth changing;
- `early_stop_line`: --early_stop_patience evaluations without improvement.
Exit statuses are cli.py's; the files named are rundir/names.py's.
"""

import os
import shlex
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from config import TrainConfig
from gpt_train.cli import EXIT_STATUS
from gpt_train.rundir.names import step_checkpoints, step_of


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGHUP into a request to stop after the current optimizer step.

    The handler only records the signal, so a second Ctrl-C while a checkpoint is being written
    cannot interrupt the write. Under torchrun the ranks agree on stopping through a small
    all-reduce on a CPU (gloo) group, so every rank stops at the same step.
    """

    EXIT_STATUS = EXIT_STATUS

    def __init__(self, runtime):
        self.signal_number = 0
        self.group = dist.new_group(backend="gloo") if runtime.distributed else None
        self.previous = {}

    def __enter__(self):
        for number in self.EXIT_STATUS:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        self.signal_number = self.signal_number or number

    def pending_signal(self):
        """The signal that asked this run (any rank of it) to stop, or 0."""
        if self.group is None:
            return self.signal_number
        flag = torch.tensor([self.signal_number])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signal_number = int(flag)
        return self.signal_number


def stop_line(signal_number, step, path):
    """The last line of a run stopped by a signal after `step`, its checkpoint at `path`."""
    return (f"stopped by {signal.Signals(signal_number).name} after step {step}; checkpoint "
            f"{path}; resume with: {resume_command(path)}")


def resume_command(path):
    """The command that resumes the checkpoint at `path`, as this process was started: `python
    train.py --resume PATH`, or under torchrun the torchrun command its environment tells of
    (processes per node, nodes, restarts). The checkpoint holds every other setting."""
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    resume = f"{shlex.quote(script)} --resume {shlex.quote(str(path))}"
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun in every process it starts
        return f"python {resume}"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    # one node: --standalone finds its own port; several: their rendezvous is not in the environment
    launcher = ["torchrun", f"--nnodes {nodes}" if nodes > 1 else "--standalone",
                f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '1')}"]
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts:
        launcher.append(f"--max-restarts {restarts}")
    if nodes > 1:
        launcher.append("(and the rendezvous flags you started it with, on every node)")
    return f"{' '.join(launcher)} {resume}"


# Flags that shape each update: when one of them differs from its default, it may be the cause.
UPDATE_FLAGS = ("weight_decay", "grad_clip", "betas", "warmup_iters", "muon_momentum")


def divergence_line(run, step, reason="the loss or gradient norm is not finite"):
    """A diverged run in one line: the step, what was kept, and the flags worth changing."""
    t, defaults = run.train_config, TrainConfig()
    names = [name for name in UPDATE_FLAGS
             if t.optimizer == "muon" or not name.startswith("muon_")]
    changed = [f"--{name} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
               for name in names if (value := getattr(t, name)) != getattr(defaults, name)]
    suspects = f" or check {', '.join(changed)}" if changed else ""
    rates = f"--learning_rate (now {t.learning_rate:g})"
    if t.optimizer == "muon":  # either optimizer's rate may be the one that diverged
        rates = (f"--muon_learning_rate (now {t.muon_learning_rate:g}, Muon's) or "
                 f"--learning_rate (now {t.learning_rate:g}, AdamW's)")
    last_good = last_good_checkpoint(run, step)
    kept = (f"the last good one, {last_good}, is intact" if last_good else
            "this run had saved none before it")
    skip = (f"a --skip_nonfinite above {t.skip_nonfinite}" if t.skip_nonfinite else
            "--skip_nonfinite N")
    return (f"training diverged at step {step}: {reason}. No checkpoint of this state was "
            f"written; {kept}. Try a lower {rates}{suspects}, or {skip}")


def last_good_checkpoint(run, bad_step):
    """The newest step checkpoint this run can go back to before `bad_step`, or None: one it
    wrote, else the one it resumed from (the files of a run it replaces do not count)."""
    t = run.train_config
    if run.directory.changed or not run.runtime.is_main:  # only rank 0 knows when it changed
        saved = [path for path in step_checkpoints(t.checkpoint_dir) if step_of(path) < bad_step]
        if saved:
            return saved[-1]
    return Path(t.resume) if t.resume else None


def early_stop_line(run):
    best, min_delta = run.best, run.train_config.early_stop_min_delta
    by = f" by more than {min_delta:g}" if min_delta else ""
    return (f"early stop after step {run.step}: the validation loss did not improve{by} in "
            f"{best.stale_evaluations} evaluations in a row; best {best.best_loss:.4f} at step "
            f"{best.best_step}")
