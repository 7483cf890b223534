"""The training step recorded once as a CUDA graph and replayed: the alternative to the eager step.

For a small model a step is mostly Python and kernel launches, so the whole step (every
micro-batch, clipping, AdamW) is recorded once and replayed, one launch per step. `GraphedStep`
records the step function it is given (train.py's eager step with the optimizer's step) and knows
nothing else of training:
- each step's batch is copied into static input buffers; the loss, gradient norm and non-finite
  flag are static tensors each replay overwrites;
- the first steps after a start or a resume run eagerly (real steps, taken once) to warm up, then
  the next step is recorded and replayed;
- a recording holds tensors by address, so it is recorded again whenever the optimizer's state or
  a learning-rate tensor is replaced (a resume loads new ones);
- a step that cannot be recorded runs eagerly from then on, with a note.
Recorders record a step and return its replay: `CUDAGraphRecorder` on CUDA, and `CallRecorder`,
whose replay calls the step again, so the CPU tests run all of the above. `graph_fallback` says
why a run cannot use graphs (float16's scaler, DDP, FSDP, --skip_nonfinite, Muon); the eager step
runs then. What one step computes is train.py's.
"""

import torch

from gpt_train.runtime import note

WARMUP_STEPS = 3  # eager steps before a recording: lazy optimizer state, cuBLAS and autograd set up


def graph_fallback(train_config, runtime, parallel):
    """Why this run's step cannot be a recorded graph, or "" when it can."""
    if not train_config.cuda_graphs:
        return "--cuda_graphs false"
    if runtime.dtype == torch.float16:
        return "float16's gradient scaler checks its scale on the host every step"
    if parallel.graph_fallback:
        return parallel.graph_fallback
    if train_config.skip_nonfinite:
        return "--skip_nonfinite reads every step's loss on the host"
    if train_config.optimizer != "adamw":
        return "Muon counts its steps and computes its rates on the host"
    return ""


class GraphedStep:
    """A training step recorded once and replayed: call it with the data.

    `step(micro_batches, autocast)` takes one optimizer step on a list of (x, y) batches and
    returns device tensors; `optimizer` is the one it steps (its state and learning-rate tensors
    are what a recording holds); `micro_batches` is (count, batch_size, block_size).
    """

    def __init__(self, step, optimizer, runtime, micro_batches, recorder):
        self.step, self.optimizer, self.runtime, self.recorder = step, optimizer, runtime, recorder
        count, *shape = micro_batches
        self.micro_batches = [
            tuple(torch.zeros(shape, dtype=torch.long, device=runtime.device) for _ in "xy")
            for _ in range(count)]
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
        self.optimizer.zero_grad(set_to_none=True)  # they lived in the recording's memory

    def _step(self):
        # A recording writes fresh gradients: with none at the start of the recording, every
        # replay overwrites them instead of adding to the last step's.
        self.optimizer.zero_grad(set_to_none=True)
        return self.step(self.micro_batches, self._autocast)

    def _autocast(self):
        runtime = self.runtime
        # torch's rule for graphs: autocast must not keep cast weights across a recording
        return torch.autocast(runtime.device.type, dtype=runtime.dtype,
                              enabled=runtime.dtype != torch.float32, cache_enabled=False)

    def _held_objects(self):
        return (self.optimizer.state, *(group["lr"] for group in self.optimizer.param_groups))

    def _holds_current_tensors(self):
        current = self._held_objects()
        return len(current) == len(self.held) and all(a is b for a, b in zip(current, self.held))

    def _record(self):
        try:
            if not all(isinstance(group["lr"], torch.Tensor)
                       for group in self.optimizer.param_groups):
                raise TypeError("a float learning rate would be recorded as a constant")
            self.replay = self.recorder.record(self._step)
        except Exception as error:  # torch raises many kinds; each means: not recordable
            self.optimizer.zero_grad(set_to_none=True)
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            note(f"the training step could not be recorded as a CUDA graph "
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
