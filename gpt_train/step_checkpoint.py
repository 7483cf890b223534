"""What a step checkpoint holds: `training_state` writes it, `restore` reads it back, side by side.

A step checkpoint, gpt_step{N}.pt (under --parallel fsdp the run state of a gpt_step{N}
directory, whose tensors lie in every rank's files: sharded_checkpoint.py), is everything a run
needs to continue after step N exactly. Its keys:

  step, loss              optimizer steps completed; the training loss logged last
  gpt_config, train_config  the two dataclasses as plain dicts
  tokenizer               the tokenizer's state_dict
  model_state_dict        the model's weights, a LoRA run's adapters apart (not when sharded)
  optimizer_state_dict    the optimizer's state_dict (sharded: its param_groups only, by name)
  scheduler_state_dict    the learning-rate schedule's state
  scaler_state_dict       float16's gradient scaler's state (only with float16)
  random_states           every rank's random generators, a list by rank
  data_state              {"position": micro-batches drawn}: where the sampler continues
  world_size              the processes that wrote it
  early_stopping          the best validation loss so far and its count (best_model.py)
  run_id                  the run's id: --keep_last deletes only the run's own step checkpoints,
                          and export.py knows an earlier export of the same run
  data_fingerprint        of --data (tokencache.py), when the run read a --data
  sharded                 True in the run state of an FSDP run

gpt_final.pt and gpt_best.pt hold `weights_state`: the first five keys, run_id and the whole
model's plain weights (gpt_best.pt adds val_loss). The compatibility rule: keys are never renamed or
given another meaning, and a key added later is read with a default where an older checkpoint
lacks it (early_stopping, run_id, data_fingerprint, world_size, sharded), so every step
checkpoint ever written resumes. Everything that reads one of these keys asks here
(`resumable_step`, `saved_run_id`, `run_id_of`, `saved_best_model`, `data_change`). How a
checkpoint file is written and read is checkpoint.py's; where it lies, rundir/names.py's; whether it is
one file or every rank's slices, the run's `parallel` object's (parallel.py).
"""

import torch.distributed as dist

from config import config_to_dict, fail
from gpt_train.best_model import BestModel
from gpt_train.checkpoint import load_model_state, saved_value
from gpt_train.optim import load_optimizer_state, rebase_schedule
from gpt_train.runtime import note, random_states, restore_random_states
from gpt_train.sharded_checkpoint import (load_full_training_state, load_sharded_training_state,
                                          optimizer_settings, resharding_note)


def run_summary(run, loss):
    """The step, loss, configs, tokenizer and run id: what every checkpoint says about its run."""
    return {"step": run.step, "loss": loss, "gpt_config": config_to_dict(run.gpt_config),
            "train_config": config_to_dict(run.train_config),
            "tokenizer": run.tokenizer.state_dict(), "run_id": run.directory.run_id}


def weights_state(run, loss):
    """What gpt_final.pt holds: the summary and the whole model's plain weights (LoRA merged).

    Every rank calls it: under --parallel fsdp the ranks gather the whole model onto rank 0.
    """
    return {**run_summary(run, loss), "model_state_dict": run.parallel.final_weights(run.model)}


def training_state(run, loss):
    """Everything needed to continue the run after run.step, as plain data; every rank calls it
    (the random states are gathered)."""
    rank_states = [random_states(run.runtime.device)]
    if run.runtime.distributed:  # every rank's, in rank order
        own, rank_states = rank_states[0], [None] * run.runtime.world_size
        dist.all_gather_object(rank_states, own)
    state = run_summary(run, loss)
    if run.parallel.sharded:  # the tensors go into every rank's files (sharded_checkpoint.py)
        state["optimizer_state_dict"] = {"param_groups": optimizer_settings(run.model,
                                                                            run.optimizer)}
        state["sharded"] = True
    else:  # LoRA: the adapters apart from the weights they adapt, to resume exactly
        state["model_state_dict"] = run.model.state_dict()
        state["optimizer_state_dict"] = run.optimizer.state_dict()
    state.update({
        "scheduler_state_dict": run.scheduler.state_dict(),
        "random_states": rank_states,
        "data_state": {"position": run.step * run.train_config.grad_accum_steps},
        "world_size": run.runtime.world_size,
        "early_stopping": run.best.state_dict(),
    })
    if run.data_fingerprint:
        state["data_fingerprint"] = run.data_fingerprint
    if run.scaler.is_enabled():
        state["scaler_state_dict"] = run.scaler.state_dict()
    return state


def save(run, loss):
    """Every rank: write the step checkpoint of run.step (a file, or FSDP's directory of every
    rank's slices); returns its path."""
    state = training_state(run, loss)
    path = run.parallel.step_checkpoint_path(run.train_config.checkpoint_dir, run.step)
    run.parallel.save_step_checkpoint(state, run.model, run.optimizer, path,
                                      run.directory.room_needed)
    return path


def restore(run, checkpoint):
    """Every rank: put back everything `training_state` saved; afterwards run.step is its step.

    A sharded checkpoint, or any checkpoint into a sharded model, is resharded to this run's
    ranks, with a note that the run continues but not bit-exactly (sharded_checkpoint.py).
    """
    path = run.train_config.resume
    if not (checkpoint.get("sharded", False) or run.parallel.sharded):
        load_model_state(run.model, checkpoint["model_state_dict"], path)
    try:
        restore_optimizer(run, checkpoint, path)
        run.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if "scaler_state_dict" in checkpoint and run.scaler.is_enabled():
            run.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        run.step = int(checkpoint["step"])
        saved_world_size = int(checkpoint.get("world_size", 1))
        rank_states = checkpoint["random_states"]
        run.loader.sampler.seek(int(checkpoint["data_state"]["position"]))
        if "early_stopping" in checkpoint:
            run.best.load_state_dict(checkpoint["early_stopping"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} cannot be resumed: {type(error).__name__}: {error}")
    rebase_schedule(run.optimizer, run.scheduler, run.train_config, run.step)
    restore_rank_states(run, checkpoint, saved_world_size, rank_states)


def restore_optimizer(run, checkpoint, path):
    """The optimizer's state (and, where either side is sharded, the model's); the optimizer keeps
    its own form of the learning rate (optim.py)."""
    saved = checkpoint["optimizer_state_dict"]
    load = None  # the optimizer's own load_state_dict
    if checkpoint.get("sharded", False):  # a gpt_step{N} directory, into any number of ranks

        def load(_):
            load_sharded_training_state(run.model, run.optimizer, path, saved["param_groups"])
    elif run.parallel.sharded:  # a whole-model checkpoint into FSDP's slices

        def load(_):
            load_full_training_state(run.model, run.optimizer, checkpoint["model_state_dict"],
                                     saved)
    load_optimizer_state(run.optimizer, saved, load=load)


def restore_rank_states(run, checkpoint, saved_world_size, rank_states):
    """This rank's random states, where the checkpoint has this run's number of ranks; otherwise
    they restart from the seed, and a note says so (once for FSDP on either side)."""
    runtime, path = run.runtime, run.train_config.resume
    resharding = resharding_note(saved_world_size, checkpoint.get("sharded", False),
                                 runtime.world_size, run.train_config.parallel)
    try:
        if saved_world_size == runtime.world_size:
            restore_random_states(rank_states[runtime.rank], runtime.device)
        elif resharding is None:
            note(f"the checkpoint was written by {saved_world_size} process(es) and this run "
                 f"has {runtime.world_size}: random states restart from the seed and the data "
                 f"order changes")
        if resharding:
            note(resharding)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} has damaged random states: {type(error).__name__}: {error}")


def resumable_step(checkpoint, path):
    """The step a checkpoint continues after; a UserError if it is not a step checkpoint."""
    if "optimizer_state_dict" not in checkpoint:
        fail(f"{path} holds weights only (a final, best or pretrained model); resume from a "
             f"gpt_step*.pt, or start a new run from it with --init_from")
    step = checkpoint.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        fail(f"checkpoint {path} cannot be resumed: its 'step' is missing or damaged ({step!r})")
    return step


def saved_run_id(checkpoint):
    """The run id a loaded step checkpoint holds, or None."""
    run_id = checkpoint.get("run_id")
    return run_id if isinstance(run_id, str) else None


def run_id_of(path):
    """The run id of the step checkpoint at `path`, read without loading its tensors, or None."""
    return saved_run_id({"run_id": saved_value(path, "run_id")})


def saved_best_model(checkpoint, train_config):
    """The early stopping a step checkpoint holds, with this run's settings (a fresh one if the
    checkpoint has none or a damaged one: a resume reports the damage)."""
    best = BestModel(train_config.early_stop_patience, train_config.early_stop_min_delta)
    try:
        best.load_state_dict(checkpoint["early_stopping"])
    except (KeyError, TypeError, ValueError):
        return BestModel(train_config.early_stop_patience, train_config.early_stop_min_delta)
    return best


def data_change(train_config, checkpoint, fingerprint):
    """On a resume, what changed in --data since the checkpoint was written (one note), or None."""
    saved = checkpoint.get("data_fingerprint") if checkpoint and train_config.resume else None
    if not saved or not fingerprint or saved == fingerprint:
        return None
    data, path = train_config.data, train_config.resume
    saved_data = checkpoint.get("train_config", {}).get("data")
    if saved_data == data:
        change = f"--data {data} changed since the checkpoint {path} was written"
    else:
        change = f"--data {data} is not the data the checkpoint {path} was trained on ({saved_data})"
    note(f"{change}; the run goes on with this text, so its batches differ from the original "
         f"run's")
    return change
