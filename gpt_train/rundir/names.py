"""The names of a run directory's files, and its inventory by name. No torch.

- the files a run writes (gpt_step{N}.pt, gpt_final.pt, gpt_best.pt, metrics.jsonl, train.lock,
  superseded/, ...) are spelled here and nowhere else; under --parallel fsdp a step checkpoint is
  a gpt_step{N} directory, which every rule treats as it treats a gpt_step{N}.pt;
- `run_files`: what makes a directory hold a run; `step_checkpoints`: its step checkpoints by
  name, whether or not they read (a damaged one is evidence: the rules set it aside, never
  delete it unasked);
- `add_checkpoint_arguments`: the flags a reader names a run's file by.
Whether a file reads is reading.py's question; what may be replaced is rules.py's.
"""

import re
from pathlib import Path

from gpt_train.atomic import temporary_path

# a step checkpoint: a gpt_step{N}.pt file, or under --parallel fsdp a gpt_step{N} directory
STEP_PATTERN = re.compile(r"^gpt_step(\d+)(\.pt)?$")
FINAL_NAME = "gpt_final.pt"
BEST_NAME = "gpt_best.pt"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"  # --log_to tensorboard: the event files' directory
WANDB_RUN_ID_NAME = "wandb_run_id"  # --log_to wandb: the run a resume continues (files: wandb/)
LOCK_NAME = "train.lock"  # not part of the run: present only while a training process holds it
SUPERSEDED_NAME = "superseded"  # the files a rewind moved aside: superseded/<time>-after-step{N}/
REPLACED_NAME = "replaced"  # .tmp-replaced.PID/: what --overwrite is deleting, all or none


def step_path(directory, step):
    """gpt_step{N}.pt: everything needed to continue the run after step N."""
    return Path(directory) / f"gpt_step{step}.pt"


def sharded_step_path(directory, step):
    """gpt_step{N}: a step checkpoint of an FSDP run, a directory of every rank's slices."""
    return Path(directory) / f"gpt_step{step}"


def sharded_temporary_path(path):
    """.tmp-gpt_step{N}.PID: where the ranks write gpt_step{N} before rank 0 renames it (PID
    rank 0's: sharded_checkpoint.py hands rank 0's name to the others)."""
    return temporary_path(path)


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
    return same_directory(path, directory) and (
        path.name in (FINAL_NAME, BEST_NAME, METRICS_NAME) or bool(STEP_PATTERN.match(path.name)))


def is_own_name(name):
    """Whether the tool writes files of this name in a run directory (temporary ones included)."""
    return (name in (FINAL_NAME, BEST_NAME, METRICS_NAME, WANDB_RUN_ID_NAME, "probe")
            or bool(STEP_PATTERN.match(name)))


def same_directory(path, directory):
    """Whether the file `path` lies in `directory`."""
    return Path(path).resolve().parent == Path(directory).resolve()


def run_files(directory):
    """The run files in `directory`: step checkpoints (oldest first), final, best, metrics.

    A directory that has any of them holds a run; other files are never a run's.
    """
    named = [final_path(directory), best_path(directory), metrics_path(directory)]
    return step_checkpoints(directory) + [path for path in named if path.is_file()]


def step_of(path):
    """N, from the name gpt_step{N}.pt (or gpt_step{N})."""
    return int(STEP_PATTERN.match(Path(path).name).group(1))


def is_step_directory_name(name):
    """Whether `name` is an FSDP step checkpoint's, gpt_step{N} (no .pt)."""
    match = STEP_PATTERN.match(name)
    return bool(match) and not match.group(2)


def step_checkpoints(directory):
    """The gpt_step{N}.pt files, and FSDP's gpt_step{N} directories, in `directory`, oldest step
    first; whether they read or not (one without its run_state.pt, with a truncated slice) is
    for the reader to find out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if (match := STEP_PATTERN.match(p.name))
                   and (p.is_file() if match.group(2) else p.is_dir())),
                  key=lambda path: (step_of(path), path))


def list_names(paths, shown=4):
    """The files' names for a message: the first `shown`, then how many more."""
    names = [Path(p).name for p in paths]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def add_checkpoint_arguments(parser):
    """--checkpoint and --checkpoint_dir, as sample.py, evaluate.py and export.py take them."""
    parser.add_argument("--checkpoint", default="", help="a checkpoint file, a Hugging Face GPT-2 "
                        "directory or model id (gpt2, gpt2-medium, ...); empty = the best in "
                        "--checkpoint_dir: gpt_best.pt, gpt_final.pt, then the newest step")
    parser.add_argument("--checkpoint_dir", default="checkpoints",
                        help="the run directory train.py wrote")
