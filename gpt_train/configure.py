"""Configuring a training run: the flags, a --config recipe, and a checkpoint's configs reconciled.

`configure` answers "what does this run start from?": flags over a --config recipe over the
defaults for a new run; for --resume, the checkpoint's configs with the flags given laid over its
training settings; for --init_from, the checkpoint's architecture and tokenizer. The rules:
- the architecture and tokenizer always come from the checkpoint: a flag that contradicts them is
  an error (`reject_architecture_changes`); --init_from may only shrink block_size;
- --resume never inherits --overwrite, and continues in the checkpoint's directory unless
  --checkpoint_dir says otherwise; a --max_iters at or below its step leaves nothing to train;
  --lora_rank and --optimizer shape the state it loads, so they cannot change
  (`reject_state_changes`); without --data it reads the saved path (`check_saved_data`);
  without --lr_decay_iters, a decay that has begun keeps its end (optim.resumed_decay_iters),
  and one line says how the rate goes on (`describe_schedule`);
- `--resume auto` resumes the newest readable step checkpoint if there is one, else starts a new
  run (from --init_from if given), so a requeued job can repeat its command.
Whether the run may write into its --checkpoint_dir is rundir/rules.py's rule, asked from here,
so that every refusal happens before any file is touched. The dataclasses and their validation are
config.py's.
"""

import copy
import glob
from pathlib import Path

from config import (ARCHITECTURE_FIELDS, GPTConfig, TrainConfig, UserError, adapt_defaults,
                    apply_args_to_configs, check_configs, configs_to_toml, fail, name_the_recipe,
                    parse_args, validate)
from gpt_train.checkpoint import configs_from_checkpoint, load_checkpoint, tokenizer_from_checkpoint
from gpt_train.cli import NothingToTrain
from gpt_train.optim import describe_schedule, resumed_decay_iters, schedule_changes
from gpt_train.rundir.reading import latest_checkpoint
from gpt_train.rundir.rules import (accept_an_attempt_that_saved_nothing, exit_if_finished,
                                    refuse_to_replace_a_run)
from gpt_train.runtime import note, print0, select_device
from gpt_train.step_checkpoint import resumable_step


def configure(argv=None):
    """Flags (over a --config recipe) over the defaults; on --resume or --init_from, over the
    checkpoint's configs. --print_config prints the result as a recipe, and nothing is trained.

    Returns (gpt_config, train_config, checkpoint), checkpoint being the loaded file or None.
    --print_config, and a finished run under --resume auto, raise NothingToTrain. Every refusal
    happens here, before any file is touched.
    """
    args = parse_args(argv)
    gpt_config, train_config = apply_args_to_configs(args, GPTConfig(), TrainConfig())
    given = vars(args)
    checkpoint, attempt, schedule_line, adapted = None, False, None, []
    automatic = train_config.resume == "auto"
    if automatic:
        latest = latest_checkpoint(train_config.checkpoint_dir, require_readable=True, report=note)
        train_config.resume = str(latest or "")
        train_config.init_from = "" if latest else train_config.init_from
    if train_config.resume and train_config.init_from:
        validate(gpt_config, train_config)  # says to give only one, before either file is read
    if train_config.resume:
        gpt_config, train_config, checkpoint, schedule_line = configure_resume(args, train_config,
                                                                               automatic)
    else:
        if train_config.init_from:
            gpt_config, checkpoint = configure_init_from(given, train_config)
        adapted = adapt_defaults(gpt_config, train_config, given)
        if automatic:
            attempt = accept_an_attempt_that_saved_nothing(train_config)
    check_configs(args, gpt_config, train_config)
    for line in adapted:  # once the configs are valid; a refusal is one line alone
        note(line)  # on stderr: under --print_config, stdout is the recipe alone
    if given.get("print_config"):
        print0(configs_to_toml(gpt_config, train_config), end="")
        raise NothingToTrain
    select_device(train_config.device)  # a device this machine lacks, before the directory's rules
    refuse_to_replace_a_run(train_config, attempt_accepted=attempt)
    if schedule_line:
        print0(schedule_line)
    return gpt_config, train_config, checkpoint


def configure_resume(args, train_config, automatic):
    """--resume: the checkpoint's configs with the flags given laid over its training settings.

    `train_config` holds the flags over the defaults; with `automatic` (--resume auto), its
    resume is the newest readable step checkpoint, and a finished run trains nothing. Returns
    (gpt_config, train_config, checkpoint, the line saying how the learning rate goes on where
    the flags change the saved schedule, or None).
    """
    given = vars(args)
    path, directory = train_config.resume, train_config.checkpoint_dir
    if path == "latest":
        path = latest_checkpoint(directory, require_readable=True, report=note)
        if path is None:
            fail(f"--resume latest: no readable gpt_step*.pt in {directory}")
    checkpoint = load_checkpoint(path, weights=False)  # a sharded one: weights come in resume()
    step = resumable_step(checkpoint, path)
    saved_gpt, saved_train = configs_from_checkpoint(checkpoint, path)
    tokenizer_from_checkpoint(checkpoint, saved_gpt, path)
    try:
        reject_architecture_changes(given, saved_gpt, path, checkpoint["tokenizer"])
        reject_state_changes(given, saved_train, path)
    except UserError as error:
        name_the_recipe(args, error)
    check_saved_data(given, saved_train, path)
    gpt_config, train_config = apply_args_to_configs(args, saved_gpt, copy.copy(saved_train))
    if "lr_decay_iters" not in given:  # a decay that has begun keeps its end
        train_config.lr_decay_iters = resumed_decay_iters(saved_train, train_config, step)
    train_config.resume, train_config.init_from = str(path), ""
    train_config.overwrite = given.get("overwrite", False)  # never inherited from the saved run
    if "checkpoint_dir" not in given:  # the run continues where its checkpoint is
        train_config.checkpoint_dir = str(Path(path).parent)
    if automatic:  # a requeued job: whatever is left of the run, if anything, is what to do
        exit_if_finished(Path(path), checkpoint, train_config)
    elif train_config.max_iters <= step:
        fail(f"{path} is at step {step} and --max_iters is {train_config.max_iters}: nothing is "
             f"left to train, and nothing was changed; to train further, add a larger "
             f"--max_iters, e.g. --max_iters {2 * step}")
    schedule_line = None  # how the rate goes on, where the flags changed the saved schedule
    if schedule_changes(saved_train, train_config) and step < train_config.max_iters:
        schedule_line = describe_schedule(train_config, step, saved_train)
    return gpt_config, train_config, checkpoint, schedule_line  # later files: rundir/rules.py


# The training settings whose saved state a resume loads as it is: a flag that differs cannot apply.
STATE_FIELDS = {"lora_rank": "its LoRA adapters have rank", "optimizer": "its optimizer state is"}


def reject_state_changes(given, saved_train, path):
    """--lora_rank and --optimizer shape the saved state a resume loads: a flag that differs is an
    error naming the flag (not the size mismatch it would cause)."""
    for name, what in STATE_FIELDS.items():
        saved = getattr(saved_train, name)
        if name in given and given[name] != saved:
            # a new run can start from the weights of a checkpoint without adapters
            other = "" if saved_train.lora_rank else \
                f", or start a new run from its weights with --init_from {path}"
            fail(f"--{name} {given[name]} contradicts the checkpoint {path}: {what} {saved}, which "
                 f"a resume continues; leave out --{name} to resume it{other}")


def check_saved_data(given, saved_train, path):
    """A resume without --data reads the checkpoint's saved --data path, which is relative to
    where the run was started: say so when it is not found from here."""
    data = saved_train.data
    if "data" not in given and data and not Path(data).exists() and not glob.glob(data):
        fail(f"the checkpoint {path} was trained on --data {data}, which is not found from "
             f"{Path.cwd()} (a relative path is read from where a command runs); give --data "
             f"with that text's path")


def configure_init_from(given, train_config):
    """--init_from: the checkpoint's architecture (block_size may shrink) and tokenizer."""
    checkpoint = load_checkpoint(train_config.init_from)
    saved_gpt, _ = configs_from_checkpoint(checkpoint, train_config.init_from)
    requested_block_size = given.get("block_size", saved_gpt.block_size)
    if requested_block_size > saved_gpt.block_size:
        fail(f"--block_size {requested_block_size} exceeds the checkpoint's "
             f"{saved_gpt.block_size}: position embeddings can be cropped, not invented")
    reject_architecture_changes({k: v for k, v in given.items() if k != "block_size"},
                                saved_gpt, train_config.init_from, checkpoint["tokenizer"])
    saved_gpt.block_size = requested_block_size
    saved_gpt.dropout = given.get("dropout", saved_gpt.dropout)
    train_config.tokenizer = tokenizer_from_checkpoint(checkpoint, saved_gpt,
                                                       train_config.init_from).kind
    return saved_gpt, checkpoint


def reject_architecture_changes(given, saved_gpt, path, saved_tokenizer):
    """The architecture and tokenizer come from the checkpoint; a flag that differs is an error."""
    saved_kind = saved_tokenizer.get("kind") if isinstance(saved_tokenizer, dict) else None
    saved_source = saved_tokenizer.get("source") if isinstance(saved_tokenizer, dict) else None
    if "tokenizer" in given and given["tokenizer"] not in (saved_kind, saved_source):
        fail(f"--tokenizer {given['tokenizer']} contradicts the checkpoint {path}, whose model was "
             f"trained with the {saved_kind} tokenizer")
    for name in ARCHITECTURE_FIELDS:
        if name in given and given[name] != getattr(saved_gpt, name):
            fail(f"--{name} {given[name]} contradicts the checkpoint {path}, which has "
                 f"{name}={getattr(saved_gpt, name)}; the architecture comes from the checkpoint")
