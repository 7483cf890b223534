"""Step checkpoints of an FSDP run: one directory per step, each rank writing its own slices.

A gpt_step{N} directory holds what `torch.distributed.checkpoint` (DCP) writes, the model's
and the optimizer's tensors in one file per rank plus a .metadata index, and run_state.pt, which
rank 0 writes with everything else a resume needs (step, configs, tokenizer, schedule, every
rank's random states, the optimizer's settings) as a plain torch.save file. Notable details:
- no rank ever holds the whole model to save it; a load reshards, so a checkpoint resumes with
  any number of ranks, or into an unsharded (DDP or single-process) model;
- the ranks write into rank 0's temporary directory (.tmp-gpt_step{N}.PID), which rank 0 renames
  to gpt_step{N} only once every rank has finished: the directory appears complete or not at all,
  and never in place of one already there (the run set its later steps aside when it started);
- `damage` is the cheap look a reader takes before choosing one: the run state, the index, and
  every file of slices the index names at the length it says (a truncated slice does not read);
- only tensors go through DCP, which would unpickle anything else without `weights_only`;
- `gathered_weights` collects the whole model on rank 0 once, for gpt_final.pt and gpt_best.pt,
  which stay plain weights-only files;
- `load_sharded_training_state` resumes a sharded checkpoint into any number of ranks, sharded
  or not, and `load_full_training_state` a DDP run's gpt_step{N}.pt into a sharded model;
  `resharding_note` is the line that says such a resume is not bit-exact.
What the run state holds, and which of these a resume calls, is step_checkpoint.py's; where the
directory lives and what it is called, rundir/names.py's.
"""

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from gpt_train.atomic import fsync_directory
from gpt_train.cli import ResourceError
from config import fail

RUN_STATE_NAME = "run_state.pt"  # rank 0's part: everything but the model's and optimizer's tensors
INDEX_NAME = ".metadata"  # DCP's index of every rank's slices
MODEL_PREFIX = "model."  # DCP flattens nested keys with dots: model.<name>, optimizer.<name>.<state>


def is_sharded_checkpoint(path):
    """Whether `path` is a step checkpoint directory of an FSDP run, whole or damaged: a directory
    holding either half (the run state, the index of the slices)."""
    path = Path(path)
    return path.is_dir() and ((path / RUN_STATE_NAME).is_file() or (path / INDEX_NAME).is_file())


def save_sharded_checkpoint(state, model, optimizer, path, temporary):
    """Every rank: write `state` (the run state) and the sharded model and optimizer to `path`.

    The ranks write into rank 0's `temporary`; rank 0 adds the run state and renames it to `path`.
    A write that fails on any rank removes `temporary` and raises ResourceError on every rank,
    leaving earlier checkpoints as they were.
    """
    path, is_main = Path(path), dist.get_rank() == 0
    shared = [str(temporary)]
    dist.broadcast_object_list(shared, src=0)  # its name holds rank 0's process id
    temporary = Path(shared[0])
    resharded(model)
    tensors = {"model": get_model_state_dict(model),
               "optimizer": get_optimizer_state_dict(model, optimizer)["state"]}
    try:
        dcp.save(tensors, checkpoint_id=temporary)  # returns once every rank has written
        error = _finish_on_rank_0(state, path, temporary) if is_main else None
    except CheckpointException as failure:  # raised on every rank, whichever rank failed
        error = _first_failure(failure)
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0] is not None or error is not None:
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise ResourceError(f"could not save checkpoint {path}: {errors[0] or error}; earlier "
                            f"checkpoints are intact")


def optimizer_settings(model, optimizer):
    """The optimizer's param_groups, keyed by parameter name: what the run state keeps of a
    sharded optimizer (its tensors are in DCP's files)."""
    return get_optimizer_state_dict(resharded(model), optimizer)["param_groups"]


def _finish_on_rank_0(state, path, temporary):
    """Write the run state and rename the directory into place; the error's text, or None."""
    try:
        with open(temporary / RUN_STATE_NAME, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists() or path.is_symlink():  # the run set its later steps aside at its start
            return f"a {path.name} this run did not write is in the way (it is kept as it is)"
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        return _reason(error)
    return None


def _first_failure(failure):
    """The first rank's error of a failed DCP save, as one line of text."""
    for rank, (error, _) in sorted(failure.failures.items()):
        return f"rank {rank}: {_reason(error)}"
    return "unknown error"


def _reason(error):
    """What went wrong, in a few words: the OSError's message behind `error` where there is one."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return cause.strerror or str(cause)


def damage(path):
    """What is missing from the sharded checkpoint `path`, in a few words, or None if nothing is:
    its run state, its index, and each file of slices the index names, as long as the index says
    (no tensor is read)."""
    path = Path(path)
    for name, what in ((RUN_STATE_NAME, "the run state"), (INDEX_NAME, "the index of its slices")):
        if not (path / name).is_file():
            return f"{what} ({name}) is missing"
    try:
        ends = {}
        for where in FileSystemReader(str(path)).read_metadata().storage_data.values():
            end = where.offset + where.length
            ends[where.relative_path] = max(ends.get(where.relative_path, 0), end)
    except Exception as error:  # torch raises many types for a damaged index
        return f"the index of its slices ({INDEX_NAME}) is unreadable: {type(error).__name__}"
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None:
            return f"its file of slices {name} is missing"
        if size < end:
            return f"its file of slices {name} is truncated ({size:,} of {end:,} bytes)"
    return None


def read_sharded_weights(path):
    """The whole model's weights from a sharded checkpoint, as plain CPU tensors, in this process
    alone: for sampling, evaluation, export and --init_from, which need the whole model anyway."""
    try:
        reader = FileSystemReader(str(path))
        metadata = reader.read_metadata()
        weights = {name: torch.empty(entry.size, dtype=entry.properties.dtype)
                   for name, entry in metadata.state_dict_metadata.items()
                   if name.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)}
        with warnings.catch_warnings():  # DCP warns that one process loads alone: it is meant
            warnings.simplefilter("ignore")
            dcp.load(weights, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as error:  # torch raises many types for damage
        fail(f"checkpoint {path} is unreadable (corrupt or truncated): {type(error).__name__}")
    return {name.removeprefix(MODEL_PREFIX): tensor for name, tensor in weights.items()}


def load_sharded_training_state(model, optimizer, path, param_groups):
    """Every rank: fill `model` and `optimizer` from a sharded checkpoint, resharded to this
    run's ranks (or unsharded, for a DDP run); `param_groups` are the saved settings."""
    model_state = get_model_state_dict(resharded(model))
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates the state to fill
    try:
        with warnings.catch_warnings():  # a process without a group (DDP alone) is warned so
            warnings.simplefilter("ignore")
            dcp.load({"model": model_state, "optimizer": optimizer_state["state"]},
                     checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except CheckpointException as failure:  # raised on every rank, whichever rank read the damage
        rank, (error, _) = min(failure.failures.items())
        fail(f"checkpoint {path} is unreadable (corrupt): rank {rank} read "
             f"{type(error).__name__} from its slices")
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, {"state": optimizer_state["state"],
                                                "param_groups": param_groups})


def load_full_training_state(model, optimizer, model_state, saved):
    """Every rank: fill a sharded `model` and its `optimizer` from a whole model's state and its
    optimizer's `saved` state (a DDP run's gpt_step{N}.pt), each rank keeping its slices."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(resharded(model), model_state, options=options)
    # the saved optimizer numbers parameters in the order of its groups, as this one does
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[index]: value for index, value in saved["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def resharding_note(saved_world_size, saved_sharded, world_size, parallel):
    """The line saying a resume with FSDP on either side is not bit-exact, or None where it is
    exact or FSDP plays no part."""
    saved_parallel = "fsdp" if saved_sharded else "ddp"
    if saved_parallel == parallel == "ddp" or (saved_world_size, saved_parallel) == \
            (world_size, parallel):
        return None
    changes = ("random states restart from the seed and the data order changes"
               if saved_world_size != world_size else "gradients are summed in another order")
    return (f"the checkpoint was written by {saved_world_size} process(es) with --parallel "
            f"{saved_parallel} and this run has {world_size} with --parallel {parallel}: its "
            f"weights and optimizer state are resharded, {changes}; the run continues, but not "
            f"bit-exactly")


def gathered_weights(model):
    """Every rank: the whole model's weights, gathered onto rank 0's CPU (other ranks get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(resharded(model), options=options)


def resharded(model):
    """`model` with every group's parameters back in their slices. The root group keeps its
    gathered weights after a forward (FSDP expects a backward next), so after an evaluation or
    a sample its parameters are not the sharded ones the optimizer holds."""
    if isinstance(model, FSDPModule):
        model.reshard()
    return model
