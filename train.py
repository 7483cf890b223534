"""Train a GPT: `python train.py [--flag value ...]`, or `torchrun ... train.py` on several devices.

`train()` reads as eight stages: configure, seed and device, data, model, optimizer and schedule,
resume, loop, final save. Stages 3 to 5 build one `Run`, the object the loop, resume and
checkpoints read. Notable details:
- resume is exact: model, optimizer, schedule, gradient scaler, every random state and the data
  position are saved, so a resumed run continues with the very next batch and step;
- the hot loop makes no host-device synchronisation except at log time, and checks for a
  non-finite loss there, before any checkpoint is written;
- Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and prints how to resume;
- every evaluation with the lowest validation loss so far writes gpt_best.pt, and
  --early_stop_patience ends the run once evaluations stop improving (early_stopping.py);
- --init_from also takes a Hugging Face GPT-2 (pretrained.py, through checkpoint.py) and evaluates
  it before the first step; --lora_rank trains low-rank adapters only (lora.py);
- under torchrun, every rank trains on its slice of the same global batch, and only rank 0 prints
  and writes files.
- nothing in --checkpoint_dir is replaced unless a flag says so: a new run into a directory that
  holds a run stops before touching it (unless --overwrite), and the files a run does replace go
  only once its first steps have passed the finite-loss check.
The model lives in model.py, batches in dataset.py, the optimizer in optim.py, the step's
gradients and its CUDA graph in step.py, checkpoint files and the run directory's names in
checkpoint.py.
"""

from config import exit_on_signals

if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback

import contextlib
import copy
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (STEP_PATTERN, best_path, check_room_for_checkpoints,
                        configs_from_checkpoint, final_path, hold_run_directory, is_run_file,
                        latest_checkpoint, load_checkpoint, load_model_state, prune_checkpoints,
                        remove_temporary_files, run_files, run_files_after, save_checkpoint,
                        saved_step, step_checkpoints, step_path, tokenizer_from_checkpoint)
from config import (ARCHITECTURE_FIELDS, EXIT_STATUS, GPTConfig, TrainConfig, adapt_defaults,
                    apply_args_to_configs, check_configs, config_to_dict, configs_to_toml, fail,
                    parse_args, run_main, validate)
from dataset import (RandomWindows, build_dataloader, get_dataset, split_tokens,
                     validation_batches)
from early_stopping import EarlyStopping
from generation import generate_text
from loggers import Loggers
from lora import add_lora, merged_state_dict
from model import build_model, count_parameters, crop_block_size, flops_per_token
from optim import (Schedule, configure_optimizer, current_learning_rates, describe_schedule,
                   follow_schedule, learning_rate_scheduler, load_optimizer_state,
                   resumed_decay_iters, schedule_changes)
from runtime import (check_memory, peak_flops, print0, random_states, restore_random_states,
                     setup_runtime)
from scoring import piece_lengths, score_batches
from step import device_micro_batches, forward_backward, graphed_step_for, recorder_for
from tokenizer import tokenizer_from_state


def train(argv=None):
    gpt_config, train_config, checkpoint = configure(argv)
    runtime = setup_runtime(train_config)  # seeds every random source, picks the device
    try:
        # one run per directory: rank 0 writes the files, so rank 0 holds the directory
        with hold_run_directory(train_config.checkpoint_dir, enabled=runtime.is_main):
            run = build_run(gpt_config, train_config, runtime, checkpoint)
            prepare_checkpoint_dir(run, checkpoint)
            if train_config.resume:
                resume(run, checkpoint)
            record = run_loop(run)
            return finish(run, record)
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def configure(argv=None):
    """Flags (over a --config recipe) over the defaults; on --resume or --init_from, over the
    checkpoint's configs. --print_config prints the result as a recipe and exits.

    Returns (gpt_config, train_config, checkpoint), checkpoint being the loaded file or None.
    `--resume auto` resumes the newest readable step checkpoint if there is one, else starts a new
    run (from --init_from if given), so a requeued job can repeat its command; a finished run
    exits at once.
    Every refusal happens here, before any file is touched.
    """
    args = parse_args(argv)
    gpt_config, train_config = apply_args_to_configs(args, GPTConfig(), TrainConfig())
    given = vars(args)
    checkpoint = None
    automatic = train_config.resume == "auto"
    if automatic:
        latest = latest_checkpoint(train_config.checkpoint_dir, require_readable=True, report=print0)
        train_config.resume = str(latest or "")
        train_config.init_from = "" if latest else train_config.init_from
    if train_config.resume and train_config.init_from:
        validate(gpt_config, train_config)  # says to give only one, before either file is read
    if train_config.resume:
        gpt_config, train_config, checkpoint = configure_resume(args, train_config, automatic)
    else:
        if train_config.init_from:
            gpt_config, checkpoint = configure_init_from(given, train_config)
        for note in adapt_defaults(gpt_config, train_config, given):
            # under --print_config, stdout is the recipe: a note there would break it
            print0(f"note: {note}", file=sys.stderr if given.get("print_config") else None)
        if automatic:
            replace_an_attempt_that_saved_nothing(train_config)
    check_configs(args, gpt_config, train_config)
    if given.get("print_config"):
        print0(configs_to_toml(gpt_config, train_config), end="")
        raise SystemExit(0)
    refuse_to_replace_a_run(train_config, checkpoint)
    return gpt_config, train_config, checkpoint


def configure_resume(args, train_config, automatic):
    """--resume: the checkpoint's configs with the flags given laid over its training settings.

    `train_config` holds the flags over the defaults; with `automatic` (--resume auto), its
    resume is the newest readable step checkpoint, and a finished run exits at once.
    """
    given = vars(args)
    path, directory = train_config.resume, train_config.checkpoint_dir
    if path == "latest":
        path = latest_checkpoint(directory, require_readable=True, report=print0)
        if path is None:
            fail(f"--resume latest: no readable gpt_step*.pt in {directory}")
    checkpoint = load_checkpoint(path)
    if "optimizer_state_dict" not in checkpoint:
        fail(f"{path} holds weights only (a final, best or pretrained model); resume from a "
             f"gpt_step*.pt, or start a new run from it with --init_from")
    step = checkpoint.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        fail(f"checkpoint {path} cannot be resumed: its 'step' is missing or damaged ({step!r})")
    saved_gpt, saved_train = configs_from_checkpoint(checkpoint, path)
    tokenizer_from_checkpoint(checkpoint, saved_gpt, path)
    reject_architecture_changes(given, saved_gpt, path, checkpoint["tokenizer"])
    gpt_config, train_config = apply_args_to_configs(args, saved_gpt, copy.copy(saved_train))
    if "lr_decay_iters" not in given:  # a decay that has begun keeps its end
        train_config.lr_decay_iters = resumed_decay_iters(saved_train, train_config, step)
    train_config.resume, train_config.init_from = str(path), ""
    train_config.overwrite = given.get("overwrite", False)  # never inherited from the saved run
    if "checkpoint_dir" not in given:  # the run continues where its checkpoint is
        train_config.checkpoint_dir = str(Path(path).parent)
    if automatic:  # a requeued job: whatever is left of the run, if anything, is what to do
        exit_if_finished(Path(path), checkpoint, train_config)
        return gpt_config, train_config, checkpoint
    if train_config.max_iters <= step:
        fail(f"{path} is at step {step} and --max_iters is {train_config.max_iters}: nothing is "
             f"left to train, and nothing was changed; to train further, add a larger "
             f"--max_iters, e.g. --max_iters {2 * step}")
    rewinding = given["resume"] != "latest" and same_directory(path, train_config.checkpoint_dir)
    if rewinding and not train_config.overwrite:
        later = run_files_after(train_config.checkpoint_dir, step)
        if later:
            fail(f"--resume {path} goes back to step {step}, but {train_config.checkpoint_dir} "
                 f"holds later files of the run ({list_names(later)}) that it would replace; "
                 f"nothing was changed. Continue from the newest with --resume latest, branch off "
                 f"into another --checkpoint_dir, or discard the later files with --overwrite true")
    return gpt_config, train_config, checkpoint


def exit_if_finished(path, checkpoint, train_config):
    """A gpt_final.pt written after the newest step checkpoint, which is at max_iters or an early
    stop: a finished run, which a requeued job must not train again (exit status 0)."""
    t, step, final = train_config, checkpoint.get("step"), final_path(path.parent)
    if not (isinstance(step, int) and final.is_file()
            and final.stat().st_mtime_ns >= path.stat().st_mtime_ns):
        return
    early_stopping = EarlyStopping(t.early_stop_patience, t.early_stop_min_delta)
    with contextlib.suppress(KeyError, TypeError, ValueError):  # resume() reports damage
        early_stopping.load_state_dict(checkpoint["early_stopping"])
    if step >= t.max_iters:
        ending, flag = f"step {step} of --max_iters {t.max_iters}", "a larger --max_iters"
    elif early_stopping.should_stop:
        ending, flag = f"its early stop at step {step}", "a larger --early_stop_patience"
    else:
        return
    print0(f"the run in {path.parent} is finished: {final.name} follows {ending}; nothing to "
           f"train ({flag} continues it)")
    raise SystemExit(0)


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


def replace_an_attempt_that_saved_nothing(train_config):
    """--resume auto without a checkpoint to resume: an earlier attempt of the same job that never
    saved one left at most metrics.jsonl and gpt_best.pt, which the new attempt replaces. A
    gpt_final.pt is another run's model: the usual refusal keeps it."""
    t = train_config
    existing = run_files(t.checkpoint_dir)
    if existing and not final_path(t.checkpoint_dir).exists() and not t.overwrite:
        print0(f"note: --resume auto: {t.checkpoint_dir} holds no checkpoint to resume, only "
               f"{list_names(existing)} of an attempt that saved none; this run replaces them")
        t.overwrite = True


def refuse_to_replace_a_run(train_config, checkpoint):
    """A run never replaces another run's files, nor the model it fine-tunes, unless told to.

    The directory holds a run when it has any run file (checkpoints or metrics.jsonl). A resume
    continues the run in its own directory; anywhere else, as for a new run, the directory must
    hold no run, or --overwrite must say to replace it.
    """
    t = train_config
    if t.init_from and is_run_file(t.init_from, t.checkpoint_dir):
        fail(f"--init_from {t.init_from} lies in --checkpoint_dir {t.checkpoint_dir}, where this run "
             f"writes its own checkpoints: the model being fine-tuned would be replaced; give "
             f"another --checkpoint_dir")
    if t.overwrite or (t.resume and same_directory(t.resume, t.checkpoint_dir)):
        return
    existing = run_files(t.checkpoint_dir)
    if existing:
        ways = ["train into another --checkpoint_dir",
                "replace it with --overwrite true"]
        resume = resume_command(t.checkpoint_dir)
        if resume:
            ways.insert(0, f"continue it with {resume}")
        first = ", ".join(ways[:-1])
        fail(f"{t.checkpoint_dir} already holds a run ({list_names(existing)}); nothing was "
             f"changed. {first[0].upper()}{first[1:]}, or {ways[-1]}")


def resume_command(directory):
    """The flags that continue the run in `directory`, or None if it has no step checkpoint."""
    if not step_checkpoints(directory):
        return None
    final = final_path(directory)
    finished_at = saved_step(final) if final.is_file() else None
    if finished_at:  # the run is over: it continues only with more steps
        return f"--resume latest --max_iters {2 * finished_at}"
    return "--resume latest"


def files_replaced(train_config, step):
    """The files of an earlier run that this run deletes when it starts (only with --overwrite)."""
    t = train_config
    if not t.overwrite:
        return []
    if t.resume and same_directory(t.resume, t.checkpoint_dir):
        return run_files_after(t.checkpoint_dir, step)
    return run_files(t.checkpoint_dir)


def same_directory(path, directory):
    return Path(path).resolve().parent == Path(directory).resolve()


def list_names(paths, shown=4):
    names = [Path(p).name for p in paths]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def reject_architecture_changes(given, saved_gpt, path, saved_tokenizer):
    """The architecture and tokenizer come from the checkpoint; a flag that differs is an error."""
    saved_kind = saved_tokenizer.get("kind") if isinstance(saved_tokenizer, dict) else None
    if "tokenizer" in given and given["tokenizer"] != saved_kind:
        fail(f"--tokenizer {given['tokenizer']} contradicts the checkpoint {path}, whose model was "
             f"trained with the {saved_kind} tokenizer")
    for name in ARCHITECTURE_FIELDS:
        if name in given and given[name] != getattr(saved_gpt, name):
            fail(f"--{name} {given[name]} contradicts the checkpoint {path}, which has "
                 f"{name}={getattr(saved_gpt, name)}; the architecture comes from the checkpoint")


@dataclass
class Run:
    """Everything a training run is made of: what the loop, resume and checkpoints read."""

    gpt_config: GPTConfig
    train_config: TrainConfig
    runtime: object
    tokenizer: object
    loader: torch.utils.data.DataLoader
    val_set: list  # fixed (input_ids, labels) batches: this rank's share of the validation split
    model: torch.nn.Module  # the plain model: checkpoints hold its weights
    wrapped_model: torch.nn.Module  # the same model compiled and/or DDP-wrapped: what trains
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps completed
    graphed_step: object = None  # step.GraphedStep where the step replays as a CUDA graph
    metrics: Loggers = field(init=False)  # metrics.jsonl, TensorBoard, W&B: --log_to
    early_stopping: EarlyStopping = field(init=False)  # the best validation loss so far
    # what this run replaces in --checkpoint_dir once it starts writing (see start_writing)
    replaced_files: list = field(default_factory=list)
    writing: bool = False

    def __post_init__(self):
        t = self.train_config
        self.metrics = Loggers(self.gpt_config, t, self.runtime)
        self.early_stopping = EarlyStopping(t.early_stop_patience, t.early_stop_min_delta)

    @property
    def tokens_per_step(self):
        t = self.train_config
        return t.batch_size * self.gpt_config.block_size * t.grad_accum_steps * \
            self.runtime.world_size


def build_run(gpt_config, train_config, runtime, checkpoint=None, tokens=None):
    """Stages 3 to 5: the data and its loaders, the model on its device, the optimizer and schedule.

    `checkpoint` (resume or --init_from) supplies the tokenizer and the starting weights; `tokens`
    = (tokenizer, token ids) replaces the corpus (the benchmark's synthetic data).
    """
    t = train_config
    tokenizer, ids = tokens or load_corpus(gpt_config, t, checkpoint)
    train_tokens, val_tokens = split_tokens(ids, t.val_fraction, gpt_config.block_size)
    check_memory(memory_needs(gpt_config, t, runtime))
    print0(f"data: {len(ids):,} tokens ({len(train_tokens):,} train, {len(val_tokens):,} "
           f"validation), {tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size}")
    windows = RandomWindows(train_tokens, gpt_config.block_size, t.batch_size, t.seed,
                            runtime.rank, runtime.world_size)
    loader = build_dataloader(windows, stop=t.max_iters * t.grad_accum_steps,
                              num_workers=t.num_workers, pin_memory=runtime.device.type == "cuda")
    val_set = validation_batches(val_tokens, gpt_config.block_size, t.batch_size, t.eval_batches,
                                 runtime.rank, runtime.world_size)
    model, wrapped_model = prepare_model(gpt_config, t, runtime, checkpoint, tokenizer.vocab_size)
    recorder = recorder_for(runtime.device)
    optimizer = configure_optimizer(model, t, capturable=recorder is not None)
    scheduler = learning_rate_scheduler(optimizer, Schedule.from_config(t))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    run = Run(gpt_config, t, runtime, tokenizer, loader, val_set, model, wrapped_model, optimizer,
              scheduler, scaler)
    run.graphed_step = graphed_step_for(run, recorder)
    return run


def memory_needs(gpt_config, train_config, runtime):
    """Lower bounds of what a run allocates, as (what, the flags that set it, bytes, where), for
    `check_memory` to compare with the memory there is before anything large is allocated."""
    g, t = gpt_config, train_config
    parameters = 12 * g.n_layer * g.n_embd**2 + (g.vocab_size + g.block_size) * g.n_embd
    activation_bytes = torch.finfo(runtime.dtype).bits // 8
    # per token: a dozen widths of activations saved per layer for backward, and the logits
    per_token = 12 * g.n_layer * g.n_embd * activation_bytes + 2 * 4 * g.vocab_size
    window_bytes = 2 * 8 * (g.block_size + 1)  # a window of int64 ids, as input and as labels
    device, host = runtime.device, torch.device("cpu")
    return [
        (f"a model of {parameters:,} parameters, with its gradients and AdamW state",
         f"--n_layer {g.n_layer}, --n_embd {g.n_embd}", 16 * parameters, device),
        ("the activations of a batch", f"--batch_size {t.batch_size}, --block_size {g.block_size}",
         16 * parameters + t.batch_size * g.block_size * per_token, device),
        ("the validation set", f"--eval_batches {t.eval_batches}, --batch_size {t.batch_size}",
         t.eval_batches * t.batch_size * runtime.world_size * window_bytes, host),
        ("the sample printed at each evaluation", f"--sample_tokens {t.sample_tokens}",
         t.sample_tokens * 80, host),  # the ids, and each token's text kept as a Python string
    ]


def load_corpus(gpt_config, train_config, checkpoint=None):
    """(tokenizer, token ids) of the configured corpus; a new run's vocabulary sets the model's."""
    saved_tokenizer = tokenizer_from_state(checkpoint["tokenizer"]) if checkpoint else None
    tokenizer, ids = get_dataset(train_config, saved_tokenizer)
    if checkpoint is None:
        gpt_config.vocab_size = padded_vocab_size(tokenizer)
    return tokenizer, ids


def padded_vocab_size(tokenizer):
    """BPE vocabularies are padded to a multiple of 64 (faster matmuls); padded ids are never sampled."""
    if tokenizer.kind == "bpe":
        return (tokenizer.vocab_size + 63) // 64 * 64
    return tokenizer.vocab_size


def prepare_model(gpt_config, train_config, runtime, checkpoint=None, vocab_limit=None):
    """The model on its device; returns (model, the module that trains: compiled and/or DDP).

    `vocab_limit` is the tokenizer's vocabulary, where the model's is padded beyond it.
    """
    t = train_config
    model = build_model(gpt_config, vocab_limit)
    if checkpoint is not None and not t.resume:  # --init_from: start from its weights
        state = crop_block_size(checkpoint["model_state_dict"], gpt_config.block_size)
        load_model_state(model, state, t.init_from)
    if t.lora_rank:  # after the weights are in, before a resumed run's adapters are
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout)
    model.to(runtime.device)
    total = sum(p.numel() for p in model.parameters())
    print0(f"model: {count_parameters(model):,} trainable parameters" +
           (f" of {total:,} (LoRA rank {t.lora_rank})" if t.lora_rank else ""))
    wrapped_model = torch.compile(model) if train_config.compile else model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped_model = DistributedDataParallel(wrapped_model, device_ids=device_ids)
    return model, wrapped_model


def prepare_checkpoint_dir(run, checkpoint=None):
    """Before the first step: the directory is writable and has room; old temporary files go.

    What the run replaces (with --overwrite) is only noted here: `start_writing` deletes it once
    the first steps are done, so a run that fails before then has changed nothing.
    """
    t = run.train_config
    if run.runtime.is_main:
        weights = sum(p.numel() for p in run.model.parameters())
        bytes_per_checkpoint = 4 * (weights + 2 * count_parameters(run.model)) + (1 << 20)  # + moments
        check_room_for_checkpoints(t.checkpoint_dir, bytes_per_checkpoint)
        remove_temporary_files(t.checkpoint_dir)
        run.replaced_files = files_replaced(t, int(checkpoint["step"]) if t.resume else 0)


def resume(run, checkpoint):
    """Restore everything a step checkpoint holds; afterwards run.step is its step."""
    t, runtime, path = run.train_config, run.runtime, run.train_config.resume
    load_model_state(run.model, checkpoint["model_state_dict"], path)
    try:
        load_optimizer_state(run.optimizer, checkpoint["optimizer_state_dict"])
        run.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if "scaler_state_dict" in checkpoint and run.scaler.is_enabled():
            run.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        run.step = int(checkpoint["step"])
        saved_world_size = int(checkpoint.get("world_size", 1))
        rank_states = checkpoint["random_states"]
        run.loader.sampler.seek(int(checkpoint["data_state"]["position"]))
        if "early_stopping" in checkpoint:  # absent from checkpoints older than gpt_best.pt
            run.early_stopping.load_state_dict(checkpoint["early_stopping"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} cannot be resumed: {type(error).__name__}: {error}")
    follow_schedule(run.scheduler, run.optimizer, t, run.step)  # this run's peaks and shape
    try:
        if saved_world_size == runtime.world_size:
            restore_random_states(rank_states[runtime.rank], runtime.device)
        else:
            print0(f"note: the checkpoint was written by {saved_world_size} process(es) and this "
                   f"run has {runtime.world_size}: random states restart from the seed and the "
                   f"data order changes")
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} has damaged random states: {type(error).__name__}: {error}")
    run.metrics.resume(run.step)
    print0(f"resumed from {path} after step {run.step}")
    _, saved_train = configs_from_checkpoint(checkpoint, path)
    if schedule_changes(saved_train, t) and run.step < t.max_iters:
        print0(describe_schedule(t, run.step, saved_train))


def start_writing(run):
    """The moment the run directory starts to change: before the run's first record or file.

    The loop writes its first record only after the loss of its first steps was found finite
    (or, fine-tuning, once the starting model is evaluated), so a run that fails before then has
    deleted nothing. Now the files of the run it replaces (--overwrite) go.
    """
    if run.writing or not run.runtime.is_main:
        return
    run.writing = True
    for path in run.replaced_files:
        Path(path).unlink(missing_ok=True)


class StopRequest:
    """Turns SIGINT / SIGTERM into a request to stop after the current optimizer step.

    The handler only records the signal, so a second Ctrl-C while a checkpoint is being written
    cannot interrupt the write. Under torchrun the ranks agree on stopping through a small
    all-reduce on a CPU (gloo) group, so every rank stops at the same step.
    """

    EXIT_STATUS = EXIT_STATUS

    def __init__(self, runtime):
        self.signal_number = 0
        self.group = dist.new_group(backend="gloo") if runtime.distributed else None
        self.previous = {}

    def __enter__(self):
        for number in self.EXIT_STATUS:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        self.signal_number = self.signal_number or number

    def pending_signal(self):
        """The signal that asked this run (any rank of it) to stop, or 0."""
        if self.group is None:
            return self.signal_number
        flag = torch.tensor([self.signal_number])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signal_number = int(flag)
        return self.signal_number


class LossMeter:
    """The training loss and gradient norm summed on the device between logs, and the first
    non-finite step.

    All stay on the device until `read`, at log time: the loop never waits for the device.
    """

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.finite_grad_norms = torch.zeros((), device=device)
        self.steps = 0
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.last_loss, self.last_grad_norm = math.nan, None
        self.clock = time.perf_counter()

    def add(self, step, loss, grad_norm, bad):
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step,
                                          self.first_bad_step)
        self.loss_sum += loss
        finite = torch.isfinite(grad_norm)  # float16: the scaler skips steps whose norm overflowed
        self.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
        self.finite_grad_norms += finite
        self.steps += 1

    def read(self, run):
        """(mean loss since the last read, mean gradient norm or None, steps, seconds); stops the
        run at a non-finite step. The gradients, hence their norm, are the same on every rank."""
        if run.runtime.distributed:  # every rank stops at the first bad step of any rank
            dist.all_reduce(self.first_bad_step, op=dist.ReduceOp.MAX)
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            stop_nonfinite(bad_step, run)
        if run.runtime.distributed:  # the mean over every rank's micro-batches
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= run.runtime.world_size
        if self.steps:
            norms = self.finite_grad_norms.clamp(min=1)
            self.last_loss, grad_norm, finite = torch.stack(
                [self.loss_sum / self.steps, self.grad_norm_sum / norms, self.finite_grad_norms]
            ).tolist()
            self.last_grad_norm = grad_norm if finite else None
        steps, seconds = self.steps, time.perf_counter() - self.clock
        for total in (self.loss_sum, self.grad_norm_sum, self.finite_grad_norms):
            total.zero_()
        self.steps, self.clock = 0, time.perf_counter()
        return self.last_loss, self.last_grad_norm, steps, seconds

    def restart_clock(self):
        """Evaluation and sampling time is not training throughput."""
        self.clock = time.perf_counter()


def optimizer_step(run, data, meter, skipped):
    """One optimizer step and one schedule step; returns the learning rates the step used (by
    record name: `lr`, and `muon_lr` with Muon) and the number of batches skipped so far
    (--skip_nonfinite)."""
    t = run.train_config
    step_rates = current_learning_rates(run.scheduler)
    if run.graphed_step is not None:  # the whole step, optimizer included, as one replay
        step_loss, grad_norm, bad = run.graphed_step(data)
        meter.add(run.step + 1, step_loss, grad_norm, bad)
    else:
        step_loss, grad_norm, bad = forward_backward(run, device_micro_batches(run, data))
        if t.skip_nonfinite and bool(bad):  # opt-in: costs a host sync every step
            skipped += 1
            if skipped > t.skip_nonfinite:
                stop_nonfinite(run.step + 1, run, f"more than {t.skip_nonfinite} skipped batches")
            print0(f"step {run.step + 1}: non-finite loss or gradient, batch skipped "
                   f"({skipped} of at most {t.skip_nonfinite})")
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.update()
        else:
            meter.add(run.step + 1, step_loss, grad_norm, bad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return step_rates, skipped


def run_loop(run):
    """forward -> backward -> clip -> step until max_iters, with logs, evaluations and checkpoints.

    Returns the last record logged: step, loss, learning rate, throughput, validation loss.
    """
    t = run.train_config
    print0(f"tokens per optimizer step: {run.tokens_per_step:,} = batch {t.batch_size} x block "
           f"{run.gpt_config.block_size} x accumulation {t.grad_accum_steps} x processes "
           f"{run.runtime.world_size}")
    meter = LossMeter(run.runtime.device)
    record, skipped = {"step": run.step, "loss": math.nan}, 0
    data = batches(run.loader)
    progress = tqdm(total=t.max_iters, initial=run.step, disable=not run.runtime.is_main,
                    dynamic_ncols=True, desc="training")
    # however the loop ends, the bar is closed and DataLoader workers are shut down
    with StopRequest(run.runtime) as stop, progress, contextlib.closing(data), run.metrics:
        if t.init_from and run.step == 0:
            evaluate_starting_model(run)
        while run.step < t.max_iters:
            step_rates, skipped = optimizer_step(run, data, meter, skipped)
            progress.update(1)
            finished = run.step == t.max_iters
            evaluating = run.step % t.eval_iter == 0 or finished
            saving = run.step % t.save_iter == 0 or finished
            stop_signal = stop.pending_signal()
            # a checkpoint is written only after the log has checked the loss is finite
            if run.step % t.log_iter == 0 or evaluating or saving or stop_signal:
                record = log_step(run, meter, step_rates, progress, evaluating)
            stopping_early = evaluating and run.early_stopping.should_stop and not finished
            if saving or stop_signal or stopping_early:
                path = save_step_checkpoint(run, record["loss"])
            if stopping_early:
                progress.close()
                print0(early_stop_message(run))
                break
            if stop_signal and not finished:
                progress.close()  # before the last lines, so they do not land on the bar
                print0(f"stopped by {signal.Signals(stop_signal).name} after step {run.step}; "
                       f"checkpoint {path}")
                print0(f"resume with: python train.py --resume {shlex.quote(str(path))}")
                raise SystemExit(StopRequest.EXIT_STATUS[stop_signal])
    return record


def log_step(run, meter, step_rates, progress, evaluate):
    """Read the loss and throughput, evaluate if due, write the record to --log_to's destinations
    and the progress line."""
    t = run.train_config
    loss, grad_norm, steps, seconds = meter.read(run)
    tokens_per_second = run.tokens_per_step * steps / max(seconds, 1e-9)
    record = {"step": run.step, "loss": loss, **step_rates,
              "tokens_per_sec": round(tokens_per_second, 1)}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    peak = peak_flops(t, run.runtime.device)
    if peak:
        record["mfu"] = round(flops_per_token(run.model) * tokens_per_second / peak, 4)
    start_writing(run)  # the loss is finite: from here on the run changes its directory
    if evaluate:
        record.update(estimate_loss(run))
        keep_if_best(run, record)
    run.metrics.write(record)
    postfix = {"loss": f"{loss:.4f}", **{name: f"{rate:.2e}" for name, rate in step_rates.items()},
               "tok/s": f"{tokens_per_second:,.0f}"}
    if "mfu" in record:
        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
    progress.set_postfix(postfix, refresh=False)
    print0(format_record(record))
    if evaluate and t.sample_tokens and run.runtime.is_main:
        print_training_sample(run)
    meter.restart_clock()
    return record


def estimate_loss(run):
    """Validation loss and bits per byte over the fixed validation batches, across all ranks.

    Deterministic: no random state is used, and dropout is off in eval mode.
    """
    was_training = run.model.training
    run.model.eval()
    piece_bytes = piece_lengths(run.tokenizer, run.runtime.device)
    totals = score_batches(run.model, run.val_set, piece_bytes, run.runtime.autocast)
    if run.runtime.distributed:
        dist.all_reduce(totals)
    run.model.train(was_training)
    nats, tokens, num_bytes = totals.tolist()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / num_bytes}


def evaluate_starting_model(run):
    """Before a fine-tune's first step: the starting model's validation loss, the one to beat."""
    record = {"step": 0, **estimate_loss(run)}
    start_writing(run)
    keep_if_best(run, record)
    run.metrics.write(record)
    print0(f"step 0 (starting model) | val_loss {record['val_loss']:.4f} "
           f"({record['val_bpb']:.3f} bits/byte)")


def keep_if_best(run, record):
    """Count the evaluation; write gpt_best.pt if its validation loss is the lowest so far."""
    if run.early_stopping.update(record["val_loss"], run.step) and run.runtime.is_main:
        state = weights_state(run, record.get("loss", math.nan))
        state["val_loss"] = record["val_loss"]
        save_checkpoint(state, best_path(run.train_config.checkpoint_dir))


def early_stop_message(run):
    best, min_delta = run.early_stopping, run.train_config.early_stop_min_delta
    by = f" by more than {min_delta:g}" if min_delta else ""
    return (f"early stop after step {run.step}: the validation loss did not improve{by} in "
            f"{best.stale_evaluations} evaluations in a row; best {best.best_loss:.4f} at step "
            f"{best.best_step}")


def checkpoint_state(run, loss):
    """Everything needed to continue the run after run.step, as plain data."""
    rank_states = random_states(run.runtime.device)
    if run.runtime.distributed:
        gathered = [None] * run.runtime.world_size
        dist.all_gather_object(gathered, rank_states)
        rank_states = gathered
    else:
        rank_states = [rank_states]
    state = weights_state(run, loss, merged=False)  # LoRA: adapters apart, to resume exactly
    state.update({
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "random_states": rank_states,
        "data_state": {"position": run.step * run.train_config.grad_accum_steps},
        "world_size": run.runtime.world_size,
        "early_stopping": run.early_stopping.state_dict(),
    })
    if run.scaler.is_enabled():
        state["scaler_state_dict"] = run.scaler.state_dict()
    return state


def weights_state(run, loss, merged=True):
    """What gpt_final.pt holds: weights (LoRA adapters merged in), configs and tokenizer."""
    weights = merged_state_dict(run.model) if merged else run.model.state_dict()
    return {"step": run.step, "loss": loss, "model_state_dict": weights,
            "gpt_config": config_to_dict(run.gpt_config),
            "train_config": config_to_dict(run.train_config),
            "tokenizer": run.tokenizer.state_dict()}


def save_step_checkpoint(run, loss):
    state = checkpoint_state(run, loss)  # every rank takes part: random states are gathered
    path = step_path(run.train_config.checkpoint_dir, run.step)
    if run.runtime.is_main:
        start_writing(run)  # a no-op: the log before a save has started the run's files
        save_checkpoint(state, path)
        prune_checkpoints(run.train_config.checkpoint_dir, run.train_config.keep_last, run.step)
    return path


def batches(loader):
    """The loader's batches; closing this generator shuts its worker processes down at once."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator


# Flags that shape each update: when one of them differs from its default, it may be the cause.
UPDATE_FLAGS = ("weight_decay", "grad_clip", "betas", "warmup_iters", "muon_momentum")
# The learning rates a record holds, by name: AdamW's, and with --optimizer muon, Muon's.
RATE_NAMES = ("lr", "muon_lr")


def stop_nonfinite(step, run, reason="the loss or gradient norm is not finite"):
    """End a diverged run: what was kept, and the flags worth changing, in one line."""
    t, defaults = run.train_config, TrainConfig()
    names = [name for name in UPDATE_FLAGS
             if t.optimizer == "muon" or not name.startswith("muon_")]
    changed = [f"--{name} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
               for name in names if (value := getattr(t, name)) != getattr(defaults, name)]
    suspects = f" or check {', '.join(changed)}" if changed else ""
    rates = f"--learning_rate (now {t.learning_rate:g})"
    if t.optimizer == "muon":  # either optimizer's rate may be the one that diverged
        rates = (f"--muon_learning_rate (now {t.muon_learning_rate:g}, Muon's) or "
                 f"--learning_rate (now {t.learning_rate:g}, AdamW's)")
    last_good = last_good_checkpoint(run, step)
    kept = (f"the last good one, {last_good}, is intact" if last_good else
            "this run had saved none before it")
    skip = (f"a --skip_nonfinite above {t.skip_nonfinite}" if t.skip_nonfinite else
            "--skip_nonfinite N")
    fail(f"training diverged at step {step}: {reason}. No checkpoint of this state was written; "
         f"{kept}. Try a lower {rates}{suspects}, or {skip}")


def last_good_checkpoint(run, bad_step):
    """The newest step checkpoint this run can go back to before `bad_step`, or None: one it
    wrote, else the one it resumed from (the files of a run it replaces do not count)."""
    t = run.train_config
    if run.writing or not run.runtime.is_main:  # (only rank 0 writes, and knows when it began)
        saved = [path for path in step_checkpoints(t.checkpoint_dir)
                 if int(STEP_PATTERN.match(path.name).group(1)) < bad_step]
        if saved:
            return saved[-1]
    return Path(t.resume) if t.resume else None


def format_record(record):
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f} ({record['val_bpb']:.3f} bits/byte)")
    parts += [f"{name} {record[name]:.2e}" for name in RATE_NAMES if name in record]
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


def print_training_sample(run):
    run.model.eval()
    generator = torch.Generator(device=run.runtime.device).manual_seed(0)  # training's RNG untouched
    text = generate_text(run.model, run.tokenizer, "", run.train_config.sample_tokens,
                         autocast=run.runtime.autocast, generator=generator)
    run.model.train()
    print0(f"--- sample ---\n{text}\n--------------")
    run.metrics.write_sample(run.step, text)


def finish(run, record):
    """The final save: weights, configs and tokenizer, no optimizer state; then the final figures."""
    path = final_path(run.train_config.checkpoint_dir)
    if run.runtime.is_main:
        start_writing(run)
        save_checkpoint(weights_state(run, record["loss"]), path)
    if "val_loss" not in record:  # resumed at the end: the loop had nothing left to do
        record.update(estimate_loss(run))
    print0(f"final validation loss: {record['val_loss']:.4f} at step {run.step} "
           f"({record['val_bpb']:.4f} bits per byte); weights saved to {path}")
    best = run.early_stopping
    if best.best_step >= 0:
        print0(f"best validation loss: {best.best_loss:.4f} at step {best.best_step}; weights "
               f"saved to {best_path(run.train_config.checkpoint_dir)}")
    return record


if __name__ == "__main__":
    run_main(train)
