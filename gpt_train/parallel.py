"""How the model is spread over the ranks: one `Parallel` object per run, asked, never branched on.

`make_parallel(train_config, runtime)` picks one of three, once:
- `Parallel` itself: one process holds the whole model (a plain `python train.py`);
- `DataParallel` (--parallel ddp under torchrun): every rank holds the whole model, its gradients
  and the optimizer state, and DistributedDataParallel all-reduces the gradients;
- `FullySharded` (--parallel fsdp, any number of processes, one included): FSDP2
  (`torch.distributed.fsdp.fully_shard`). Each block, then the root (embeddings, final norm,
  head), becomes one group whose parameters, gradients and optimizer state are cut into one slice
  per rank: a group is gathered whole just for its forward and backward, and its gradients are
  reduce-scattered back into slices. The head shares the embedding matrix, which the root group
  holds once. With --dtype bfloat16 the gathered weights are bfloat16 and the gradients are
  reduced in float32 (`MixedPrecisionPolicy`); the slices stay float32.
What each answers, `Parallel` stating the interface (a new way of spreading the model overrides
it; an optimizer that works on slices, such as a distributed Muon, asks it):
- `wrap(model)`: the model on its device and the module that trains (compiled and/or wrapped;
  under FSDP the model itself, sharded in place);
- `pause_gradient_sync(wrapped_model)`: a context for the accumulation micro-steps before the
  last, which reduce nothing; `clip_gradients(parameters, max_norm)`: the norm over every rank's
  gradients, as a plain tensor;
- `sharded`: whether each rank holds only a slice of the weights; then a forward needs every rank
  (`every_rank_runs_forward`), a step checkpoint is a directory of every rank's slices
  (`step_checkpoint_path`, `save_step_checkpoint`; sharded_checkpoint.py), the whole weights are
  gathered for gpt_final.pt (`final_weights`), and the memory a rank holds is its share
  (`held_per_rank`, `memory_line`);
- `graph_fallback`: why its step cannot be recorded as a CUDA graph, or "".
What a step checkpoint holds is step_checkpoint.py's; the file names are rundir/names.py's.
"""

import contextlib
import itertools
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from config import fail
from gpt_train.checkpoint import save_checkpoint
from gpt_train.lora import merged_state_dict
from gpt_train.muon import local_tensor
from gpt_train.rundir.names import sharded_step_path, sharded_temporary_path, step_path
from gpt_train.runtime import format_bytes
from gpt_train.sharded_checkpoint import gathered_weights, save_sharded_checkpoint

ADAMW_MOMENTS = 2  # float32 tensors AdamW keeps per parameter: the mean and the mean square


def make_parallel(train_config, runtime):
    """The run's way of spreading the model: --parallel fsdp, else DDP under torchrun, else one."""
    if train_config.parallel == "fsdp":
        return FullySharded(runtime, train_config.compile)
    if runtime.distributed:
        return DataParallel(runtime, train_config.compile)
    return Parallel(runtime, train_config.compile)


class Parallel:
    """The interface, answered for one process holding the whole model: nothing to reduce, and a
    step checkpoint is one file."""

    sharded = False
    every_rank_runs_forward = False  # rank 0 alone may sample
    graph_fallback = ""

    def __init__(self, runtime, compile=False):
        self.runtime, self.compile = runtime, compile

    def wrap(self, model):
        model.to(self.runtime.device)
        return torch.compile(model) if self.compile else model

    def pause_gradient_sync(self, wrapped_model):
        return contextlib.nullcontext()

    def clip_gradients(self, parameters, max_norm):
        """Clip to `max_norm` (0: only measure); return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)

    def held_per_rank(self, size):
        """What one rank holds of a whole-model quantity of `size` bytes."""
        return size

    def memory_line(self, model):
        """The start line saying what each rank holds, or None where it is the whole model."""
        return None

    def step_checkpoint_path(self, directory, step):
        return step_path(directory, step)

    def save_step_checkpoint(self, state, model, optimizer, path, room_needed):
        """Every rank calls it: rank 0 writes `state` (which holds the weights) to one file."""
        if self.runtime.is_main:
            save_checkpoint(state, path, room_needed)

    def final_weights(self, model):
        """The whole model's plain weights (LoRA adapters merged in); every rank calls it."""
        return merged_state_dict(model)


class DataParallel(Parallel):
    """Every rank holds the whole model; DistributedDataParallel all-reduces the gradients."""

    graph_fallback = "DistributedDataParallel's all-reduce is not recorded"

    def wrap(self, model):
        wrapped_model = super().wrap(model)
        device = self.runtime.device
        return DistributedDataParallel(wrapped_model,
                                       device_ids=[device.index] if device.type == "cuda" else None)

    def pause_gradient_sync(self, wrapped_model):
        return wrapped_model.no_sync()


class FullySharded(Parallel):
    """Each rank holds one slice of every parameter, gradient and optimizer state (FSDP2).

    FSDP shards through a process group even in one process: made here, where torchrun made none.
    """

    sharded = True
    every_rank_runs_forward = True  # each forward gathers every rank's slices
    graph_fallback = "FSDP's gathers and reduce-scatters are not recorded"

    def __init__(self, runtime, compile=False):
        super().__init__(runtime, compile)
        if not dist.is_initialized():
            if runtime.device.type == "cuda":
                torch.cuda.set_device(runtime.device)
            dist.init_process_group(backend="nccl" if runtime.device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=runtime.device if runtime.device.type == "cuda"
                                    else None)

    def wrap(self, model):
        return shard_model(model, self.compile, self.runtime)

    def pause_gradient_sync(self, wrapped_model):
        return _fsdp_sync_paused(wrapped_model)

    def clip_gradients(self, parameters, max_norm):
        """Sharded gradients are DTensors: torch sums the squares of every rank's slices into one
        norm, the same on every rank."""
        norm = super().clip_gradients(parameters, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def held_per_rank(self, size):
        return size // self.runtime.world_size

    def memory_line(self, model):
        parameters, gradients, state, ddp_total = bytes_per_rank(model)
        total, processes = parameters + gradients + state, self.runtime.world_size
        return (f"memory per rank (--parallel fsdp, {processes} process"
                f"{'es' if processes > 1 else ''}): parameters {format_bytes(parameters)} + "
                f"gradients {format_bytes(gradients)} + optimizer state {format_bytes(state)} = "
                f"{format_bytes(total)}; --parallel ddp holds {format_bytes(ddp_total)} on every "
                f"rank")

    def step_checkpoint_path(self, directory, step):
        return sharded_step_path(directory, step)

    def save_step_checkpoint(self, state, model, optimizer, path, room_needed):
        """Every rank writes its slices into a directory; rank 0 adds `state` (the run state)."""
        save_sharded_checkpoint(state, model, optimizer, path, sharded_temporary_path(path))

    def final_weights(self, model):
        """Every rank: the whole model gathered onto rank 0's CPU (other ranks get {})."""
        return gathered_weights(model)


def shard_model(model, compile, runtime):
    """fully_shard each block, then the root; `compile` compiles each block first.

    `model` is still on the CPU: one block at a time goes to the device whole, takes rank 0's
    weights (as DDP does at its start: the ranks were seeded apart) and is cut into slices, so
    the device never holds the whole model.
    """
    if runtime.dtype == torch.float16:  # --dtype auto on a GPU without bfloat16
        fail("--parallel fsdp needs bfloat16 or float32: this GPU has no bfloat16 and "
             "float16's gradient scaler does not work on sharded gradients; use --parallel ddp")
    policy = mixed_precision_policy(runtime.dtype)
    for block in model.blocks:
        take_rank_0_weights(block.to(runtime.device))
        if compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    take_rank_0_weights(model.to(runtime.device))  # the rest: embeddings, final norm, head
    fully_shard(model, mp_policy=policy)
    return model


@torch.no_grad()
def take_rank_0_weights(module):
    """Overwrite `module`'s unsharded parameters and buffers with rank 0's."""
    if dist.get_world_size() == 1:
        return
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if not isinstance(tensor, DTensor):
            dist.broadcast(tensor, src=0)


def mixed_precision_policy(dtype):
    """--dtype: compute in the gathered weights' dtype, reduce gradients in float32."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


@contextlib.contextmanager
def _fsdp_sync_paused(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def bytes_per_rank(model):
    """(parameters, gradients, optimizer state) bytes this rank holds, and what DDP's ranks hold.

    Counted from the parameters: a sharded one counts this rank's slice. Gradients have the
    parameters' dtype, and AdamW keeps two float32 moments of each trainable parameter.
    """
    parameters = trainable = whole = whole_trainable = 0
    for p in model.parameters():
        part = local_tensor(p)
        parameters += part.numel() * part.element_size()
        whole += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += part.numel() * part.element_size()
            whole_trainable += p.numel() * p.element_size()
    # the parameters are float32, as the moments are
    return (parameters, trainable, ADAMW_MOMENTS * trainable,
            whole + (1 + ADAMW_MOMENTS) * whole_trainable)


def measured_bytes(model, optimizer):
    """The bytes this rank holds now in parameters, gradients and optimizer state tensors."""
    def held(tensors):
        return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)

    parameters = list(model.parameters())
    state = [value for per_parameter in optimizer.state.values()
             for value in per_parameter.values() if isinstance(value, torch.Tensor)]
    return held(parameters), held(p.grad for p in parameters if p.grad is not None), held(state)
