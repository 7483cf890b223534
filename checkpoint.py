"""Checkpoint files and the run directory: atomic saves, safe loads, and finding the newest one.

Shared by train.py (save, resume), sample.py, evaluate.py and export.py (load), so there is one
place that names the run directory's files and decides how a checkpoint is written and what
counts as a readable one:
- a save goes to a temporary file in the same directory, is flushed and fsynced, then renamed over
  the final name, so a crash never leaves a truncated file under a checkpoint's name (the token
  cache writes its files the same way, through `atomic_write`);
- a save that fails (a full disk) leaves the earlier files as they were and stops the run with
  one line saying how much room a checkpoint needs;
- every load uses `torch.load(weights_only=True)`: a file that would run code is refused;
- a checkpoint holds only plain data (tensors, numbers, strings, lists, dicts);
- wherever a checkpoint file is accepted, a Hugging Face GPT-2 (a model id or a directory) is too:
  pretrained.py turns it into the same plain dict;
- without --checkpoint, the run directory's best model is used: gpt_best.pt, then gpt_final.pt,
  then the newest step;
- a training run holds its directory with a lock (train.lock) that the kernel drops when the
  process dies, so a second run there is refused and a killed run never blocks the next one;
- under --parallel fsdp a step checkpoint is a gpt_step{N} directory (sharded_checkpoint.py
  writes and reads it); every rule here (latest, --keep_last, what counts as a run) treats it as
  it treats a gpt_step{N}.pt file.
What goes *into* a training checkpoint is train.py's business.
"""

import contextlib
import errno
import os
import pickle
import re
import shutil
import socket
from pathlib import Path

import torch

from config import GPTConfig, ResourceError, TrainConfig, UserError, config_from_dict, fail
from config import validate as validate_configs
from model import build_model
from pretrained import checkpoint_from_pretrained, is_pretrained
from sharded_checkpoint import (RUN_STATE_NAME, has_index, is_sharded_checkpoint,
                                read_sharded_weights)
from tokenizer import tokenizer_from_state

try:
    import fcntl  # POSIX file locks; where it is missing (Windows), runs are not locked
except ImportError:
    fcntl = None

# The run directory (--checkpoint_dir): these names are spelled here and nowhere else.
# A step checkpoint is a gpt_step{N}.pt file, or under --parallel fsdp a gpt_step{N} directory.
STEP_PATTERN = re.compile(r"^gpt_step(\d+)(\.pt)?$")
FINAL_NAME = "gpt_final.pt"
BEST_NAME = "gpt_best.pt"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"  # --log_to tensorboard: the event files' directory
WANDB_RUN_ID_NAME = "wandb_run_id"  # --log_to wandb: the run a resume continues (files: wandb/)
LOCK_NAME = "train.lock"  # not part of the run: present only while a training process holds it
TEMPORARY_PREFIX = ".tmp-"
REQUIRED_KEYS = ("model_state_dict", "gpt_config", "tokenizer")


@contextlib.contextmanager
def atomic_write(path):
    """A new file, open for writing and reading, that replaces `path` only if the block completes.

    It is written under a temporary name in the same directory, flushed, fsynced and renamed over
    `path`, so a crash at any moment leaves the old file or the new one, never a truncated one.
    On any failure the temporary file is removed and the error propagates.
    """
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temporary, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(state, path):
    """Write `state` to `path` atomically; on failure the previous file at `path` is untouched.

    A failed write is not the user's mistake: it is a ResourceError (exit status 1), and a full
    disk says how much room a checkpoint needs.
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
            reason += (f": a checkpoint needs about {_tensor_bytes(state) / 2**20:.1f} MiB and "
                       f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB are free")
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


@contextlib.contextmanager
def hold_run_directory(directory, enabled=True):
    """Hold `directory` for one training run while the block runs; a second run is refused.

    The lock is a flock on train.lock, which the kernel drops when the process dies, however it
    dies (kill -9 included): a file left by a dead run blocks nothing. The file names the holder
    (host and pid) for the message the second run prints. Readers never take the lock.
    """
    if not enabled or fcntl is None:
        yield
        return
    directory = Path(directory)
    path, created = directory / LOCK_NAME, not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = _lock_file(path)
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one else can hold this file now
        handle.close()
        if created:  # a run that failed before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                directory.rmdir()


def _lock_file(path):
    """The lock file at `path`, open and exclusively locked; a UserError if a live run holds it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a run that is starting"
            handle.close()
            fail(f"checkpoint directory {path.parent} is in use by another training run "
                 f"({holder}); wait for it to end, or give another --checkpoint_dir")
        except OSError:  # a file system without locks: go on unlocked
            return handle
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the last holder removed the file as we opened it: lock the new one


def _fsync_directory(directory):
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temporary_files(directory, names="*"):
    """Delete the half-written files (of the given final names) a killed process left behind."""
    for leftover in Path(directory).glob(f"{TEMPORARY_PREFIX}{names}"):
        remove_run_file(leftover)


def remove_run_file(path):
    """Delete a run file, or a sharded checkpoint's directory (--parallel fsdp)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# The first bytes of what torch.save writes: a zip archive, or (before PyTorch 1.6) a pickle.
SAVED_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def load_checkpoint(path, map_location="cpu", weights=True):
    """Read a checkpoint safely; every problem with the file is one clear UserError.

    A Hugging Face GPT-2, a model id or a directory, is imported as a checkpoint (on the CPU).
    A sharded step checkpoint (a directory, --parallel fsdp) gives its run state, and with
    `weights` the whole model's weights, gathered in this process.
    """
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(Path(path), weights)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        fail(f"checkpoint {path} is a directory; give a file in it, such as "
             f"{Path(path) / FINAL_NAME} (a directory is read only as a Hugging Face model, "
             f"with its config.json)")
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
    """A gpt_step{N} directory's run state, with `weights` the whole model's weights too."""
    checkpoint = read_saved_file(path / RUN_STATE_NAME)
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint and key != "model_state_dict"]
    if missing or not has_index(path):
        fail(f"checkpoint {path} is incomplete: it is missing "
             f"{', '.join(repr(k) for k in missing) or 'the index of its shards (.metadata)'}")
    if weights:
        checkpoint["model_state_dict"] = read_sharded_weights(path)
    return checkpoint


def read_saved_file(path, map_location="cpu"):
    """A torch.save file's dict, loaded weights-only; any problem is one UserError."""
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


def step_path(directory, step):
    """gpt_step{N}.pt: everything needed to continue the run after step N."""
    return Path(directory) / f"gpt_step{step}.pt"


def sharded_step_path(directory, step):
    """gpt_step{N}: a step checkpoint of an FSDP run, a directory of every rank's slices."""
    return Path(directory) / f"gpt_step{step}"


def temporary_path(path):
    """The name a file or directory is written under before it is renamed to `path`."""
    return Path(path).with_name(f"{TEMPORARY_PREFIX}{Path(path).name}")


def final_path(directory):
    """gpt_final.pt: the weights at the end of the run."""
    return Path(directory) / FINAL_NAME


def best_path(directory):
    """gpt_best.pt: the weights of the evaluation with the lowest validation loss so far."""
    return Path(directory) / BEST_NAME


def metrics_path(directory):
    """metrics.jsonl: one JSON object per log line."""
    return Path(directory) / METRICS_NAME


def is_run_file(path, directory):
    """Whether `path` is one of the files a run writes into `directory`."""
    path = Path(path)
    return path.resolve().parent == Path(directory).resolve() and (
        path.name in (FINAL_NAME, BEST_NAME, METRICS_NAME) or bool(STEP_PATTERN.match(path.name)))


def run_files(directory):
    """The run files in `directory`: step checkpoints (oldest first), final, best, metrics.

    A directory that has any of them holds a run; other files are never a run's.
    """
    named = [final_path(directory), best_path(directory), metrics_path(directory)]
    return step_checkpoints(directory) + [path for path in named if path.is_file()]


def run_files_after(directory, step):
    """The checkpoints in `directory` from after `step`: what going back to `step` would replace.

    Step files are judged by name, gpt_final.pt and gpt_best.pt by the step they hold (one that
    cannot be read counts as later: it is not ours to judge).
    """
    later = [path for path in step_checkpoints(directory)
             if int(STEP_PATTERN.match(path.name).group(1)) > step]
    for path in (final_path(directory), best_path(directory)):
        if path.is_file():
            saved = saved_step(path)
            if saved is None or saved > step:
                later.append(path)
    return later


def saved_step(path):
    """The step a checkpoint holds, read without loading its tensors; None if unreadable."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:  # unreadable for any reason: the caller treats it as unknown
        return None
    return step if isinstance(step, int) else None


def step_checkpoints(directory):
    """The gpt_step{N}.pt files (and gpt_step{N} directories) in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_PATTERN.match(p.name)) and (m.group(2) or p.is_dir())]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory, require_readable=False, report=print):
    """The newest step checkpoint; with `require_readable`, the newest one that loads."""
    for path in reversed(step_checkpoints(directory)):
        if not require_readable:
            return path
        try:
            load_checkpoint(path, weights=False)  # a sharded one: its run state and index
            return path
        except UserError as error:
            report(f"skipping {path.name}: {error}")
    return None


def find_sampling_checkpoint(directory):
    """gpt_best.pt, else gpt_final.pt, else the newest gpt_step*.pt, else None."""
    for path in (best_path(directory), final_path(directory)):
        if path.is_file():
            return path
    return latest_checkpoint(directory)


def add_checkpoint_arguments(parser):
    """--checkpoint and --checkpoint_dir, as sample.py, evaluate.py and export.py take them."""
    parser.add_argument("--checkpoint", default="", help="a checkpoint file, a Hugging Face GPT-2 "
                        "directory or model id (gpt2, gpt2-medium, ...); empty = the best in "
                        "--checkpoint_dir: gpt_best.pt, gpt_final.pt, then the newest step")
    parser.add_argument("--checkpoint_dir", default="checkpoints")


def checkpoint_to_load(args):
    """The --checkpoint given, else the best file of --checkpoint_dir, else a UserError."""
    if not args.checkpoint and not args.checkpoint_dir.strip():
        fail("--checkpoint_dir must not be empty (use . for the current directory)")
    path = args.checkpoint or find_sampling_checkpoint(args.checkpoint_dir)
    if not path:
        fail(f"no checkpoint in {args.checkpoint_dir}/: train a model first with `python train.py`")
    return path


def prune_checkpoints(directory, keep_last, up_to_step):
    """Keep only the `keep_last` newest step checkpoints (0 keeps all) among the run's own, those
    up to its current step; gpt_best.pt, gpt_final.pt and any later step file (one the run skipped as
    unreadable on --resume latest, or not its own) are never touched."""
    if keep_last <= 0:
        return
    own = [path for path in step_checkpoints(directory)
           if int(STEP_PATTERN.match(path.name).group(1)) <= up_to_step]
    for path in own[:-keep_last]:
        remove_run_file(path)


def check_room_for_checkpoints(directory, bytes_per_checkpoint):
    """Fail before training if `directory` is not writable or cannot hold two checkpoints."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f"{TEMPORARY_PREFIX}probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(f"checkpoint directory {directory} is not writable: {error.strerror or error}")
    free = shutil.disk_usage(directory).free
    if free < 2 * bytes_per_checkpoint:
        fail(f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free but two checkpoints "
             f"of this model need about {2 * bytes_per_checkpoint / 2**20:.1f} MiB")


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


def model_from_checkpoint(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) from a checkpoint file, for sampling and export."""
    checkpoint = load_checkpoint(path)
    gpt_config, _ = configs_from_checkpoint(checkpoint, path)
    tokenizer = tokenizer_from_checkpoint(checkpoint, gpt_config, path)
    model = build_model(gpt_config, vocab_limit=tokenizer.vocab_size)
    load_model_state(model, checkpoint["model_state_dict"], path)
    return model.to(device).eval(), tokenizer, checkpoint
