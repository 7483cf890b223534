"""The training step: the run it belongs to, one optimizer step eager or replayed as a CUDA graph,
and the loss it reports.

- `Run`: everything a training run is made of (configs, data, model, optimizer, schedule, scaler,
  loggers, best model, run directory), built by train.py and read by the loop, resume, checkpoints
  and the step below;
- `optimizer_step`: one optimizer step and one schedule step, eager or graphed; with
  --skip_nonfinite a non-finite batch is skipped instead;
- `LossMeter`: the loss and gradient norm summed on the device between logs, read at log time,
  where a non-finite step stops the run (`stop_nonfinite`);
- `forward_backward`: forward and backward over a step's micro-batches, then gradient clipping;
  the loss, the gradient norm and a non-finite flag stay on the device. The eager step and the
  recorded one both run it.
- `GraphedStep`: for a small model a step is mostly Python and kernel launches, so the whole step
  (every micro-batch, clipping, AdamW) is recorded once as a CUDA graph and replayed, one launch
  per step. Each step's batch is copied into static input buffers; the loss, gradient norm and
  non-finite flag are static tensors each replay overwrites. The first steps after a start or a
  resume run eagerly (they are real steps, taken once) to warm up, then the next step is
  recorded and replayed. A recording holds tensors by address, so it is recorded again whenever
  the optimizer's state or a learning-rate tensor is replaced (a resume loads new ones).
- Recorders record a step and return its replay: `CUDAGraphRecorder` on CUDA, and
  `CallRecorder`, whose replay calls the step again. With it the CPU tests run all of the above.
- `graphed_step_for` says why a run cannot use graphs (float16's scaler, DDP, FSDP,
  --skip_nonfinite, Muon) and returns None then; the eager step runs instead.
When to log, evaluate, save and stop is train.py's business; the optimizer and its schedule are
optim.py's; how gradients are reduced across ranks (DDP or FSDP) and clipped is parallel.py's.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_train.best_model import BestModel
from gpt_train.cli import fail
from config import GPTConfig, TrainConfig
from gpt_train.loggers import Loggers
from gpt_train.optim import current_learning_rates
from gpt_train.parallel import clip_gradients, pause_gradient_sync, uses_fsdp
from gpt_train.rundir.names import step_checkpoints, step_of
from gpt_train.rundir.rules import RunDirectory
from gpt_train.runtime import Runtime, print0
from gpt_train.tokenizer import Tokenizer

WARMUP_STEPS = 3  # eager steps before a recording: lazy optimizer state, cuBLAS and autograd set up


@dataclass
class Run:
    """Everything a training run is made of: what the loop, resume and checkpoints read."""

    gpt_config: GPTConfig
    train_config: TrainConfig
    runtime: Runtime
    tokenizer: Tokenizer
    loader: torch.utils.data.DataLoader
    val_set: list  # fixed (input_ids, labels) batches: this rank's share of the validation split
    model: torch.nn.Module  # the plain model: checkpoints hold its weights
    wrapped_model: torch.nn.Module  # the same model compiled and/or DDP-wrapped: what trains
    # (under --parallel fsdp, model and wrapped_model are one module, sharded in place)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps completed
    graphed_step: "GraphedStep | None" = None  # where the step replays as a CUDA graph
    data_fingerprint: str | None = None  # of --data, kept in step checkpoints (tokencache.py)
    tasks: "TaskSuite | None" = None  # --eval_tasks, scored at each evaluation (task_scoring.py)
    loggers: Loggers = field(init=False)  # metrics.jsonl, TensorBoard, W&B: --log_to
    best: BestModel = field(init=False)  # the best validation loss so far, and early stopping
    directory: RunDirectory = field(init=False)  # --checkpoint_dir, and what the run replaces

    def __post_init__(self):
        t = self.train_config
        self.loggers = Loggers(self.gpt_config, t, self.runtime)
        self.best = BestModel(t.early_stop_patience, t.early_stop_min_delta)
        self.directory = RunDirectory(Path(t.checkpoint_dir))  # train.py notes what it replaces

    @property
    def tokens_per_step(self):
        t = self.train_config
        return t.batch_size * self.gpt_config.block_size * t.grad_accum_steps * \
            self.runtime.world_size


class LossMeter:
    """The training loss and gradient norm summed on the device between logs, and the first
    non-finite step.

    All stay on the device until `read`, at log time: the loop never waits for the device.
    """

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.finite_grad_norms = torch.zeros((), device=device)
        self.steps = 0
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.last_loss, self.last_grad_norm = math.nan, None
        self.clock = time.perf_counter()

    def add(self, step, loss, grad_norm, bad):
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step,
                                          self.first_bad_step)
        self.loss_sum += loss
        finite = torch.isfinite(grad_norm)  # float16: the scaler skips steps whose norm overflowed
        self.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
        self.finite_grad_norms += finite
        self.steps += 1

    def read(self, run):
        """(mean loss since the last read, mean gradient norm or None, steps, seconds); stops the
        run at a non-finite step. The gradients, hence their norm, are the same on every rank."""
        if run.runtime.distributed:  # every rank stops at the first bad step of any rank
            dist.all_reduce(self.first_bad_step, op=dist.ReduceOp.MAX)
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            stop_nonfinite(bad_step, run)
        if run.runtime.distributed:  # the mean over every rank's micro-batches
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= run.runtime.world_size
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


def optimizer_step(run, data, meter, skipped):
    """One optimizer step and one schedule step; returns the learning rates the step used (by
    record name: `lr`, and `muon_lr` with Muon) and the number of batches skipped so far
    (--skip_nonfinite)."""
    t = run.train_config
    step_rates = current_learning_rates(run.scheduler)
    if run.graphed_step is not None:  # the whole step, optimizer included, as one replay
        step_loss, grad_norm, bad = run.graphed_step(data)
        meter.add(run.step + 1, step_loss, grad_norm, bad)
    else:
        step_loss, grad_norm, bad = forward_backward(run, device_micro_batches(run, data))
        if t.skip_nonfinite and bool(bad):  # opt-in: costs a host sync every step
            skipped += 1
            if skipped > t.skip_nonfinite:
                stop_nonfinite(run.step + 1, run, f"more than {t.skip_nonfinite} skipped batches")
            print0(f"step {run.step + 1}: non-finite loss or gradient, batch skipped "
                   f"({skipped} of at most {t.skip_nonfinite})")
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.update()
        else:
            meter.add(run.step + 1, step_loss, grad_norm, bad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return step_rates, skipped


# Flags that shape each update: when one of them differs from its default, it may be the cause.
UPDATE_FLAGS = ("weight_decay", "grad_clip", "betas", "warmup_iters", "muon_momentum")


def stop_nonfinite(step, run, reason="the loss or gradient norm is not finite"):
    """End a diverged run in one line: what was kept, and the flags worth changing."""
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
    fail(f"training diverged at step {step}: {reason}. No checkpoint of this state was written; "
         f"{kept}. Try a lower {rates}{suspects}, or {skip}")


def last_good_checkpoint(run, bad_step):
    """The newest step checkpoint this run can go back to before `bad_step`, or None: one it
    wrote, else the one it resumed from (the files of a run it replaces do not count)."""
    t = run.train_config
    if run.directory.changed or not run.runtime.is_main:  # only rank 0 knows when it changed
        saved = [path for path in step_checkpoints(t.checkpoint_dir) if step_of(path) < bad_step]
        if saved:
            return saved[-1]
    return Path(t.resume) if t.resume else None


def forward_backward(run, micro_batches, autocast=None):
    """Gradients of one optimizer step's (x, y) micro-batches, unscaled and clipped; no host sync.

    Returns (the step's loss, the gradient norm before clipping, whether either is non-finite)
    as device tensors.
    """
    runtime, accumulation = run.runtime, run.train_config.grad_accum_steps
    autocast = autocast or runtime.autocast
    step_loss = torch.zeros((), device=runtime.device)
    for micro_step, (x, y) in enumerate(micro_batches):
        # under DDP or FSDP, only the last micro-step reduces the accumulated gradients
        if micro_step < accumulation - 1:
            sync = pause_gradient_sync(run.wrapped_model)
        else:
            sync = contextlib.nullcontext()
        with sync:
            with autocast():
                output = run.wrapped_model(input_ids=x, labels=y,
                                           return_logits=not run.train_config.fused_loss)
                loss = output.loss / accumulation
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(run.model.parameters(), run.train_config.grad_clip)
    if run.scaler.is_enabled():  # float16: the scaler itself skips steps whose gradients overflowed
        return step_loss, grad_norm, ~torch.isfinite(step_loss)
    return step_loss, grad_norm, ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))


def device_micro_batches(run, data):
    """The next grad_accum_steps (x, y) batches of `data`, on their way to the device."""
    device = run.runtime.device
    return [tuple(part.to(device, non_blocking=True) for part in next(data))
            for _ in range(run.train_config.grad_accum_steps)]


def graph_fallback(train_config, runtime):
    """Why this run's step cannot be a recorded graph, or "" when it can."""
    if not train_config.cuda_graphs:
        return "--cuda_graphs false"
    if runtime.dtype == torch.float16:
        return "float16's gradient scaler checks its scale on the host every step"
    if uses_fsdp(train_config):
        return "FSDP's gathers and reduce-scatters are not recorded"
    if runtime.distributed:
        return "DistributedDataParallel's all-reduce is not recorded"
    if train_config.skip_nonfinite:
        return "--skip_nonfinite reads every step's loss on the host"
    if train_config.optimizer != "adamw":
        return "Muon counts its steps and computes its rates on the host"
    return ""


def graphed_step_for(run, recorder):
    """The run's GraphedStep, or None where the step runs eagerly (with a note saying why)."""
    if recorder is None:
        return None
    reason = graph_fallback(run.train_config, run.runtime)
    if reason:
        if run.train_config.cuda_graphs:
            print0(f"note: the training step runs without CUDA graphs: {reason}")
        return None
    return GraphedStep(run, recorder)


class GraphedStep:
    """The whole optimizer step of a run, recorded once and replayed: call it with the data."""

    def __init__(self, run, recorder):
        self.run, self.recorder = run, recorder
        shape = (run.train_config.batch_size, run.gpt_config.block_size)
        self.micro_batches = [
            tuple(torch.zeros(shape, dtype=torch.long, device=run.runtime.device) for _ in "xy")
            for _ in range(run.train_config.grad_accum_steps)]
        self.replay = None  # the recorded step, once there is one
        self.held = ()  # the replaceable objects the recording holds
        self.warmup_left = WARMUP_STEPS

    def __call__(self, data):
        """One optimizer step on the next micro-batches of `data`.

        Returns (loss, gradient norm, non-finite flag) as device tensors, valid until the next call.
        """
        for buffers in self.micro_batches:
            for buffer, part in zip(buffers, next(data)):
                buffer.copy_(part, non_blocking=True)
        if self.replay is not None and not self._holds_current_tensors():
            self.release()
        if self.replay is None:
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return self.recorder.warmup(self._step)
            self._record()
        return self.replay()

    def release(self):
        """Drop the recording; the next steps warm up and record the step anew."""
        self.replay, self.held = None, ()
        self.warmup_left = WARMUP_STEPS
        self.run.optimizer.zero_grad(set_to_none=True)  # they lived in the recording's memory

    def _step(self):
        run = self.run
        # A recording writes fresh gradients: with none at the start of the recording, every
        # replay overwrites them instead of adding to the last step's.
        run.optimizer.zero_grad(set_to_none=True)
        outputs = forward_backward(run, self.micro_batches, autocast=self._autocast)
        run.optimizer.step()  # the scaler is off: float16 does not get here
        return outputs

    def _autocast(self):
        runtime = self.run.runtime
        # torch's rule for graphs: autocast must not keep cast weights across a recording
        return torch.autocast(runtime.device.type, dtype=runtime.dtype,
                              enabled=runtime.dtype != torch.float32, cache_enabled=False)

    def _held_objects(self):
        optimizer = self.run.optimizer
        return (optimizer.state, *(group["lr"] for group in optimizer.param_groups))

    def _holds_current_tensors(self):
        current = self._held_objects()
        return len(current) == len(self.held) and all(a is b for a, b in zip(current, self.held))

    def _record(self):
        try:
            if not all(isinstance(group["lr"], torch.Tensor)
                       for group in self.run.optimizer.param_groups):
                raise TypeError("a float learning rate would be recorded as a constant")
            self.replay = self.recorder.record(self._step)
        except Exception as error:  # torch raises many kinds; each means: not recordable
            self.run.optimizer.zero_grad(set_to_none=True)
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            print0(f"note: the training step could not be recorded as a CUDA graph "
                   f"({type(error).__name__}: {reason}); it runs eagerly from here on")
            self.recorder = CallRecorder()
            self.replay = self.recorder.record(self._step)
        self.held = self._held_objects()


class CUDAGraphRecorder:
    """Records a step as a CUDA graph. Warm-up steps run on the side stream the recording uses, as
    torch's docs ask: cuBLAS and the autograd engine set up their per-stream state there first."""

    def __init__(self, device):
        torch.cuda.set_device(device)  # a replay launches on the current device's stream
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.recordings = 0

    def warmup(self, step):
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            outputs = step()
        current.wait_stream(self.stream)
        return outputs

    def record(self, step):
        """Record `step` (recording runs nothing); return a function that runs it and returns its
        outputs: the same tensors each time, overwritten by each replay."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate while the step records
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outputs = step()
        self.recordings += 1

        def replay():
            graph.replay()
            return outputs

        return replay


class CallRecorder:
    """A recorder whose replay calls the step again: eager execution with a recorder's interface.

    The CPU tests use it to run GraphedStep's logic (static buffers, warm-up, recording again after
    a resume) without a GPU; a step that fails to record as a CUDA graph falls back to it.
    """

    def __init__(self):
        self.recordings = 0

    def warmup(self, step):
        return step()

    def record(self, step):
        self.recordings += 1
        return step


def recorder_for(device):
    """What records a training step on `device`: CUDA graphs on CUDA, nothing elsewhere."""
    return CUDAGraphRecorder(device) if device.type == "cuda" else None
