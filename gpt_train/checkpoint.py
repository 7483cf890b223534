"""The checkpoint file: how it is written and read, and what a reader makes of it.

Shared by train.py (save, resume), configure.py (a resumed or fine-tuned run's configs), sample.py,
evaluate.py and export.py (load), so there is one place that decides how a checkpoint is written
and what counts as a readable one:
- a save is atomic (atomic.py): a crash never leaves a truncated file under a checkpoint's name;
- a save that fails (a full disk) leaves the earlier files as they were and stops the run with
  one line saying how much room a checkpoint needs;
- every load uses `torch.load(weights_only=True)`: a file that would run code is refused;
- a checkpoint holds only plain data (tensors, numbers, strings, lists, dicts);
- wherever a checkpoint file is accepted, a Hugging Face GPT-2 (a model id or a directory) is too:
  pretrained.py turns it into the same plain dict;
- `configs_from_checkpoint`, `tokenizer_from_checkpoint`, `model_from_checkpoint`: a checkpoint's
  configs, tokenizer and model, each checked, each problem one UserError;
- `plain_weights`: the weights every reader loads; a LoRA run's step checkpoint (adapters apart,
  so that it resumes exactly) has its adapters merged here, and nowhere else, so sample.py,
  evaluate.py, export.py and --init_from take every checkpoint train.py writes;
- `is_readable`: a cheap look (a memory map, no tensor read) for choosing among a run's files.
A sharded step checkpoint (--parallel fsdp, a directory) is written and read by
sharded_checkpoint.py; `load_checkpoint` reads it as it reads a file.
What a step checkpoint holds beyond this is step_checkpoint.py's; the names of the files in a run
directory, and which of them to load, are rundir/'s (names.py, reading.py).
"""

import errno
import pickle
import shutil
from pathlib import Path

import torch

from gpt_train.atomic import atomic_write
from gpt_train.cli import ResourceError
from config import GPTConfig, TrainConfig, UserError, config_from_dict, fail
from config import validate as validate_configs
from gpt_train.lora import merge_adapters
from model import build_model
from gpt_train.pretrained import checkpoint_from_pretrained, is_pretrained
from gpt_train.sharded_checkpoint import (INDEX_NAME, RUN_STATE_NAME, damage,
                                          is_sharded_checkpoint, read_sharded_weights)
from gpt_train.tokenizer import tokenizer_from_state

REQUIRED_KEYS = ("model_state_dict", "gpt_config", "tokenizer")


def save_checkpoint(state, path, room_needed=None):
    """Write `state` to `path` atomically; on failure the previous file at `path` is untouched.

    A failed write is not the user's mistake: it is a ResourceError (exit status 1), and a full
    disk says how much room is needed: `room_needed` bytes where the caller knows (a training run:
    the figure its start-up check asks for), else this checkpoint's size.
    """
    path = Path(path)
    try:
        with atomic_write(path) as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free / 2**20
            needed = (f"two checkpoints of this model need about {room_needed / 2**20:.1f} MiB"
                      if room_needed else
                      f"a checkpoint needs about {_tensor_bytes(state) / 2**20:.1f} MiB")
            reason += f": {needed} and {free:.1f} MiB are free"
        raise ResourceError(f"could not save checkpoint {path}: {reason}; earlier checkpoints "
                            f"are intact") from error


def _os_error(error):
    """The OSError behind a failed save: torch.save reports a failed write as a RuntimeError
    whose context is the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _tensor_bytes(value):
    """The bytes of every tensor in a (nested) checkpoint: about the size of its file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


# The first bytes of what torch.save writes: a zip archive, or (before PyTorch 1.6) a pickle.
SAVED_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def load_checkpoint(path, map_location="cpu", weights=True):
    """Read a checkpoint safely; every problem with the file is one clear UserError.

    A Hugging Face GPT-2, a model id or a directory, is imported as a checkpoint (on the CPU).
    A sharded step checkpoint (a gpt_step{N} directory of an FSDP run) gives its run state and,
    with `weights`, the whole model's weights, gathered in this process.
    """
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(Path(path), weights)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        fail(f"checkpoint {path} is a directory that holds no checkpoint: neither an FSDP run's "
             f"step (run_state.pt, {INDEX_NAME}) nor a Hugging Face model (config.json); give one "
             f"of those, or a checkpoint file such as {Path(path) / 'gpt_final.pt'}")
    if is_pretrained(path):
        return checkpoint_from_pretrained(path)
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint not found: {path}" if not path.exists() else
             f"checkpoint {path} is not a regular file")
    checkpoint = read_saved_file(path, map_location)
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        fail(f"checkpoint {path} is missing {', '.join(repr(k) for k in missing)}")
    return checkpoint


def load_sharded_checkpoint(path, weights=True):
    """A gpt_step{N} directory's run state; with `weights`, the whole model's weights too."""
    problem = damage(path)
    if problem:
        fail(f"checkpoint {path} is incomplete: {problem}")
    checkpoint = read_saved_file(path / RUN_STATE_NAME)
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint and key != "model_state_dict"]
    if missing:
        fail(f"checkpoint {path} is incomplete: it is missing {', '.join(map(repr, missing))}")
    if weights:
        checkpoint["model_state_dict"] = read_sharded_weights(path)
    return checkpoint


def read_saved_file(path, map_location="cpu"):
    """A torch.save file's dict, loaded weights-only; every problem is one UserError."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith(SAVED_FILE_STARTS):
        fail(f"{path} is not a checkpoint: train.py writes checkpoints with torch.save "
             f"(gpt_step*.pt, gpt_final.pt), and this file is something else")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Weights only" not in str(error):
            fail(f"checkpoint {path} is unreadable (corrupt or truncated): {error}")
        fail(f"checkpoint {path} is refused as unsafe: it holds objects that could run code "
             f"when loaded (only plain tensors and data are accepted)")
    except Exception as error:  # torch raises many types for a damaged file; all mean the same
        fail(f"checkpoint {path} is unreadable (corrupt or truncated): {type(error).__name__}")
    if not isinstance(checkpoint, dict):
        fail(f"checkpoint {path} is not a checkpoint of this project (not a dict)")
    return checkpoint


def is_readable(path):
    """Whether `path` opens as a checkpoint of this project, read through a memory map without
    loading its tensors: a truncated or overwritten file does not. (A sharded one: its run state,
    and its slices as long as their index says.)"""
    sharded = is_sharded_checkpoint(path)
    if sharded and damage(path):
        return False
    try:
        checkpoint = torch.load(Path(path) / RUN_STATE_NAME if sharded else path,
                                map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable for any reason: the caller picks another file
        return False
    required = [key for key in REQUIRED_KEYS if not (sharded and key == "model_state_dict")]
    return isinstance(checkpoint, dict) and all(key in checkpoint for key in required)


def saved_value(path, key):
    """One top-level value of a checkpoint, read without loading its tensors; None if the file is
    unreadable or has no such key."""
    if is_sharded_checkpoint(path):  # an FSDP run's directory: its run state says
        path = Path(path) / RUN_STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
    except Exception:  # unreadable for any reason: the caller treats it as unknown
        return None


def saved_step(path):
    """The step a checkpoint holds, read without loading its tensors; None if unreadable."""
    step = saved_value(path, "step")
    return step if isinstance(step, int) else None


def configs_from_checkpoint(checkpoint, path="checkpoint"):
    """The saved (GPTConfig, TrainConfig), checked as strictly as typed flags: a damaged config
    (a hand-edited value of the wrong type or out of range) is a UserError naming the field."""
    try:
        gpt_config = config_from_dict(GPTConfig, checkpoint["gpt_config"])
        train_config = config_from_dict(TrainConfig, checkpoint.get("train_config", {}))
        validate_configs(gpt_config, train_config)
    except UserError as error:
        fail(f"checkpoint {path} has an invalid config: {error}")
    return gpt_config, train_config


def tokenizer_from_checkpoint(checkpoint, gpt_config, path="checkpoint"):
    """The checkpoint's tokenizer, which must fit its model's vocabulary; else a UserError."""
    try:
        tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    except UserError as error:
        fail(f"checkpoint {path}: {error}")
    if tokenizer.vocab_size > gpt_config.vocab_size:
        fail(f"checkpoint {path}: its {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens "
             f"but the model's vocabulary only {gpt_config.vocab_size}")
    return tokenizer


def load_model_state(model, state_dict, path="checkpoint"):
    """Load weights, turning missing keys and wrong shapes into one clear UserError."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first_problem = str(error).strip().splitlines()[1:2] or [str(error)]
        fail(f"checkpoint {path} does not fit its model: {first_problem[0].strip()}")


def plain_weights(checkpoint, path="checkpoint"):
    """The checkpoint's weights under the plain model's names: a LoRA step checkpoint's adapters
    merged into the weights they adapt, with its own --lora_alpha (lora.py's arithmetic)."""
    state_dict = checkpoint["model_state_dict"]
    if not isinstance(state_dict, dict) or not any(name.endswith(".lora_A") for name in state_dict):
        return state_dict
    _, train_config = configs_from_checkpoint(checkpoint, path)
    try:
        return merge_adapters(state_dict, train_config.lora_alpha)
    except (RuntimeError, AttributeError) as error:  # adapters whose shapes do not fit
        fail(f"checkpoint {path}: its LoRA adapters do not fit the weights they adapt: "
             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")


def model_from_checkpoint(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) from a checkpoint file, for sampling and export."""
    checkpoint = load_checkpoint(path)
    gpt_config, _ = configs_from_checkpoint(checkpoint, path)
    tokenizer = tokenizer_from_checkpoint(checkpoint, gpt_config, path)
    model = build_model(gpt_config, vocab_limit=tokenizer.vocab_size)
    load_model_state(model, plain_weights(checkpoint, path), path)
    return model.to(device).eval(), tokenizer, checkpoint
