"""Which file of a run directory to read: the newest readable step checkpoint (a resume), and the
file sample.py, evaluate.py and export.py load.

- `latest_checkpoint`: the newest step checkpoint, or the newest that loads, saying which it
  skipped;
- `find_sampling_checkpoint`, `readable_sampling_checkpoint`: gpt_best.pt, else gpt_final.pt,
  else the newest step; a file that does not read is passed over in one line;
- `checkpoint_to_load`: the --checkpoint / --checkpoint_dir a reader was given, as a path.
How a checkpoint is read, and what counts as readable, is checkpoint.py's; the names are names.py's.
"""

import shlex
import sys
from pathlib import Path

from gpt_train.checkpoint import is_readable, load_checkpoint
from config import UserError, fail
from gpt_train.rundir.names import best_path, final_path, list_names, step_checkpoints


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


def readable_sampling_checkpoint(directory):
    """`find_sampling_checkpoint`'s choice if it reads, else the next that does in the same order
    (gpt_final.pt, then the newest step), said in one line on stderr; None if there is none.
    If none reads, the first: loading it says what is wrong with it."""
    named = [path for path in (best_path(directory), final_path(directory)) if path.is_file()]
    candidates = named + list(reversed(step_checkpoints(directory)))
    for index, path in enumerate(candidates):
        if is_readable(path):
            if index:
                verb = "is" if index == 1 else "are"
                print(f"note: {list_names(candidates[:index])} {verb} unreadable (corrupt or "
                      f"truncated); using {path.name}", file=sys.stderr)
            return path
    return candidates[0] if candidates else None


def checkpoint_to_load(args):
    """The --checkpoint given, else the best readable file of --checkpoint_dir, else a UserError."""
    if not args.checkpoint and not args.checkpoint_dir.strip():
        fail("--checkpoint_dir must not be empty (use . for the current directory)")
    if args.checkpoint:
        return args.checkpoint
    directory = Path(args.checkpoint_dir)
    train_there = f"`python train.py --checkpoint_dir {shlex.quote(str(directory))}`"
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        fail(f"--checkpoint_dir {directory} {what}: train a model there with {train_there}, "
             f"or give the --checkpoint_dir a run wrote")
    path = readable_sampling_checkpoint(directory)
    if not path:
        fail(f"no checkpoint in {directory}/: train a model there with {train_there}")
    return path
