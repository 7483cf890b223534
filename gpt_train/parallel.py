"""How the model is spread over the ranks: --parallel ddp (each rank holds all of it) or fsdp.

- `ddp`, the default: every rank holds the whole model, its gradients and the optimizer state,
  and DistributedDataParallel all-reduces the gradients (under torchrun; alone, nothing to do);
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each block, then the root (embeddings,
  final norm, head), becomes one group whose parameters, gradients and optimizer state are cut
  into one slice per rank: a group is gathered whole just for its forward and backward, and its
  gradients are reduce-scattered back into slices. The head shares the embedding matrix, which
  the root group holds once. With --dtype bfloat16 the gathered weights are bfloat16 and the
  gradients are reduced in float32 (`MixedPrecisionPolicy`); the slices stay float32.
- `pause_gradient_sync`: accumulation micro-steps before the last one reduce nothing (DDP's
  `no_sync`, FSDP's `set_requires_gradient_sync`);
- `clip_gradients`: the norm over every rank's slices (FSDP's is a DTensor), as a plain tensor;
- `memory_line`: the start line saying what each rank holds, against DDP's figure.
What is saved from a sharded model, and how, is sharded_checkpoint.py's business.
"""

import contextlib
import itertools
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from config import fail
from gpt_train.runtime import format_bytes

ADAMW_MOMENTS = 2  # float32 tensors AdamW keeps per parameter: the mean and the mean square


def uses_fsdp(train_config):
    return train_config.parallel == "fsdp"


def wrap_model(model, train_config, runtime):
    """The module that trains: `model` compiled and/or DDP-wrapped, or sharded in place (FSDP).

    Under FSDP the model itself becomes the sharded module: the same object is returned.
    """
    if uses_fsdp(train_config):
        return shard_model(model, train_config, runtime)
    wrapped_model = torch.compile(model) if train_config.compile else model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped_model = DistributedDataParallel(wrapped_model, device_ids=device_ids)
    return wrapped_model


def shard_model(model, train_config, runtime):
    """fully_shard each block, then the root; --compile compiles each block first.

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
        if train_config.compile:
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


def pause_gradient_sync(wrapped_model):
    """A context for a micro-step whose gradients only accumulate: no reduce until the last."""
    if isinstance(wrapped_model, FSDPModule):
        return _fsdp_sync_paused(wrapped_model)
    if isinstance(wrapped_model, DistributedDataParallel):
        return wrapped_model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync_paused(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(parameters, max_norm):
    """Clip to `max_norm` (0: only measure); return the norm before clipping, a plain tensor.

    Sharded gradients are DTensors: torch sums the squares of every rank's slices into one norm,
    the same on every rank.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_tensor(tensor):
    """This rank's part of a tensor: its slice if it is sharded, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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


def memory_line(model, runtime):
    """The start line of an FSDP run: what rank 0 holds, against what DDP would hold."""
    parameters, gradients, state, ddp_total = bytes_per_rank(model)
    total = parameters + gradients + state
    return (f"memory per rank (--parallel fsdp, {runtime.world_size} process"
            f"{'es' if runtime.world_size > 1 else ''}): parameters {format_bytes(parameters)} + "
            f"gradients {format_bytes(gradients)} + optimizer state {format_bytes(state)} = "
            f"{format_bytes(total)}; --parallel ddp holds {format_bytes(ddp_total)} on every rank")
