"""The --out directory of export.py: whose export it holds, whether a new export may replace it,
and what a killed export left there.

- `export_source`: export_source.json, the run an export came from: its directory, its id (every
  checkpoint of a training run holds the run's id), the file and its step; or the Hugging Face
  model it was read from;
- `check_out_dir`: --out must be new, empty, or an export of the same run, known by the run's id
  and not by its directory: a new run trained into the same --checkpoint_dir (--overwrite true)
  is another run, and its export does not replace the first one's without --overwrite true;
- `remove_leftovers`: a killed export's temporary directory, in the one temporary form
  `.tmp-NAME.PID` (atomic.py), of a process that is gone, holding nothing but export files.
What an export holds and how it is written is export.py's; reading the checkpoint is
checkpoint.py's.
"""

import json
import os
import shutil
from pathlib import Path

from gpt_train.atomic import temporary_parts
from gpt_train.checkpoint import saved_step, saved_value
from config import fail
from gpt_train.sharded_checkpoint import is_sharded_checkpoint

SOURCE_NAME = "export_source.json"
# Every file an export writes. A directory holding only these (with our tokenizer_vocab.json)
# is an earlier export, which an export of the same run may replace.
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer_vocab.json", SOURCE_NAME)


def export_source(checkpoint_path):
    """export_source.json: the run a checkpoint file belongs to (its directory and id), or the
    Hugging Face directory or model id it was read from, with the file and its step."""
    path = Path(checkpoint_path)
    if path.is_file() or is_sharded_checkpoint(path):  # a run's file (or FSDP step directory)
        run_id = saved_value(path, "run_id")
        return {"run": str(path.resolve().parent),
                "run_id": run_id if isinstance(run_id, str) and run_id else None,
                "checkpoint": str(path.resolve()), "step": saved_step(path)}
    name = str(path.resolve()) if path.is_dir() else str(checkpoint_path)
    return {"run": name, "run_id": None, "checkpoint": name, "step": None}


def run_identity(source):
    """What makes two exports the same run's: the training run's id, or the name of the Hugging
    Face model read (its "run" is its "checkpoint"); None where the source does not say (a
    checkpoint or an export of an older version, without a run id)."""
    if isinstance(source.get("run_id"), str) and source["run_id"]:
        return "run", source["run_id"]
    if "run" in source and source.get("checkpoint") == source["run"]:
        return "pretrained", str(source["run"])
    return None


def earlier_export_source(directory):
    """The export_source.json of an earlier export in `directory`; {} for an export that does not
    have one (written by an older version); None if `directory` is not only an export of ours."""
    names = {path.name for path in directory.iterdir()}
    if not names <= set(EXPORT_FILES) or "tokenizer_vocab.json" not in names:
        return None
    try:
        vocabulary = json.loads((directory / "tokenizer_vocab.json").read_text(encoding="utf-8"))
        if not isinstance(vocabulary, dict) or not {"kind", "pieces"} <= vocabulary.keys():
            return None
        source = json.loads((directory / SOURCE_NAME).read_text(encoding="utf-8"))
        return source if isinstance(source, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None


def check_out_dir(out, overwrite, source):
    """Refuse an --out that would replace files not written by an export of the same run."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    if overwrite or not out.exists():
        return
    try:
        if not any(out.iterdir()):
            return  # empty: nothing to lose
        earlier = earlier_export_source(out)
    except OSError as error:
        fail(f"cannot read --out {out}: {error.strerror or error}")
    if earlier is None:
        fail(f"--out {out} holds files that are not an earlier export: choose another "
             f"directory, or pass --overwrite true to write over its files of the same names")
    ours, theirs = run_identity(source), run_identity(earlier)
    if ours is not None and ours == theirs:
        return
    if theirs is None:
        of_what = "that does not say which run it came from (an older version's: no run id)"
    elif ours is None:
        of_what = (f"of {identity_text(theirs)}, and {source['checkpoint']} does not say which "
                   f"run it is of (an older version's checkpoint: no run id)")
    else:
        of_what = f"of another run ({identity_text(theirs)}; this one: {identity_text(ours)})"
    fail(f"--out {out} holds an export {of_what}: choose another --out, or pass --overwrite true "
         f"to replace it")


def identity_text(identity):
    """A run's identity (`run_identity`) in a message."""
    kind, value = identity
    return f"run id {value[:12]}" if kind == "run" else f"the Hugging Face model {value}"


def remove_leftovers(target):
    """Delete what an export killed while writing left behind: a `.tmp-NAME.PID` directory (the
    one temporary form, atomic.py), NAME --out's, beside or inside --out, of a process that is
    gone, holding nothing but export files. (A `.tmp-NAME.PID.old`, an earlier export caught
    mid-swap, is not in that form: the user's to look at.)"""
    if os.name != "posix":
        return  # no safe way to ask whether the writer is still alive
    for home in (target.parent, target):
        if not home.is_dir():
            continue
        for path in home.iterdir():
            name, pid = temporary_parts(path.name) or ("", 0)
            if name == target.name and path.is_dir() and not path.is_symlink() and \
                    not process_alive(pid) and \
                    {child.name for child in path.iterdir()} <= set(EXPORT_FILES):
                shutil.rmtree(path, ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user's
        return True
    return True
