"""Train a GPT: `python train.py [--flag value ...]`, or `torchrun ... train.py` on several devices.

`train()` reads as eight stages: configure, seed and device, data, model, optimizer and schedule,
resume, loop, final save. Stages 3 to 5 build one `Run` (step.py), the object the loop, resume and
checkpoints read. Notable details:
- resume is exact: model, optimizer, schedule, gradient scaler, every random state and the data
  position are saved, so a resumed run continues with the very next batch and step;
- the hot loop makes no host-device synchronisation except at log time, and checks for a
  non-finite loss there, before any checkpoint is written;
- Ctrl-C, SIGTERM or SIGHUP finishes the current step, saves a checkpoint and prints how to
  resume; an output whose reader went away (`python train.py | head`, a closed terminal) is
  dropped from then on, and training goes on;
- every evaluation with the lowest validation loss so far writes gpt_best.pt, and
  --early_stop_patience ends the run once evaluations stop improving (best_model.py);
- --init_from also takes a Hugging Face GPT-2 (pretrained.py, through checkpoint.py) and evaluates
  it before the first step; --lora_rank trains low-rank adapters only (lora.py);
- under torchrun, every rank trains on its slice of the same global batch, and only rank 0 prints
  and writes files;
- nothing in --checkpoint_dir is replaced unless a flag says so: the rules, and the files they
  protect, are rundir/rules.py's; this module asks them once (configure.py, before any file is
  touched) and deletes (--overwrite) or moves aside (a rewind) what a run replaces only once its
  first steps have passed the finite-loss check;
- step checkpoints also hold the run's id (what --keep_last deletes is the run's own) and a
  fingerprint of --data (a resume on changed data says so).
The configuration is resolved in configure.py, the model lives in model.py, batches in dataset.py,
the optimizer and schedule in optim.py, one optimizer step and the `Run` in step.py, checkpoint
files in checkpoint.py, the run directory in rundir/; how the model is spread over ranks
(--parallel ddp or fsdp) in parallel.py, and an FSDP run's sharded step checkpoints in
sharded_checkpoint.py.
"""

from gpt_train.cli import exit_on_signals, run_main
from config import parse_args

if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback
    run_main(parse_args)  # --help and a mistyped flag answer before torch loads

import contextlib
import math
import shlex
import signal

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt_train.checkpoint import (configs_from_checkpoint, load_model_state, plain_weights,
                        save_checkpoint)
from gpt_train.cli import EXIT_STATUS, UserError, fail, output_that_may_close
from config import config_to_dict
from gpt_train.configure import configure
from dataset import (RandomWindows, build_dataloader, get_dataset, training_and_validation,
                     validation_batches)
from gpt_train.generation import generate_text
from gpt_train.lora import add_lora, merged_state_dict
from model import build_model, count_parameters, crop_block_size, flops_per_token
from gpt_train.optim import (Schedule, configure_optimizer, describe_schedule, learning_rate_scheduler,
                   load_optimizer_state, rebase_schedule, schedule_changes)
from gpt_train.parallel import memory_line, uses_fsdp, wrap_model
from gpt_train.rundir.lock import hold_run_directory
from gpt_train.rundir.names import (best_path, final_path, sharded_step_path,
                                    sharded_temporary_path, step_path)
from gpt_train.rundir.rules import new_run_id, prepare_run_directory
from gpt_train.runtime import (check_memory, peak_flops, print0, random_states, restore_random_states,
                     setup_runtime)
from gpt_train.scoring import piece_lengths, score_batches
from gpt_train.sharded_checkpoint import (gathered_weights, resharding_note, restore_training_state,
                                save_sharded_checkpoint)
from gpt_train.step import LossMeter, Run, graphed_step_for, optimizer_step, recorder_for
from gpt_train.task_scoring import task_metrics, training_tasks
from gpt_train.tokencache import data_fingerprint
from gpt_train.tokenizer import tokenizer_from_state


def train(argv=None):
    """The eight stages, in order; returns the last record logged."""
    # `python train.py | head`, a closed terminal: the output is dropped, the training goes on
    with output_that_may_close():
        gpt_config, train_config, checkpoint = configure(argv)  # 1: every refusal happens here
        runtime = setup_runtime(train_config)  # 2: seeds every random source, picks the device
        try:
            # one run per directory: rank 0 writes the files, so rank 0 holds the directory
            with hold_run_directory(train_config.checkpoint_dir, enabled=runtime.is_main):
                run = build_run(gpt_config, train_config, runtime, checkpoint)  # 3 to 5
                prepare_checkpoint_dir(run, checkpoint)
                if train_config.resume:
                    resume(run, checkpoint)  # 6
                record = run_loop(run)  # 7
                return finish(run, record)  # 8
        finally:
            if dist.is_initialized():  # torchrun's group, or --parallel fsdp's group of one
                dist.destroy_process_group()


def build_run(gpt_config, train_config, runtime, checkpoint=None, tokens=None):
    """Stages 3 to 5: the data and its loaders, the model on its device, the optimizer and schedule.

    `checkpoint` (resume or --init_from) supplies the tokenizer and the starting weights; `tokens`
    = (tokenizer, token ids) replaces the corpus (the benchmark's synthetic data).
    """
    t = train_config
    fingerprint = data_fingerprint(t.data) if t.data and tokens is None else None
    tokenizer, ids = tokens or load_corpus(gpt_config, t, checkpoint, fingerprint)
    train_tokens, val_tokens = training_and_validation(ids, tokenizer, t, gpt_config.block_size)
    check_memory(memory_needs(gpt_config, t, runtime))
    held_out = " (--val_data)" if t.val_data else ""
    print0(f"data: {len(train_tokens) + len(val_tokens):,} tokens ({len(train_tokens):,} train, "
           f"{len(val_tokens):,} validation{held_out}), {tokenizer.kind} tokenizer, "
           f"vocabulary {tokenizer.vocab_size}")
    windows = RandomWindows(train_tokens, gpt_config.block_size, t.batch_size, t.seed,
                            runtime.rank, runtime.world_size)
    loader = build_dataloader(windows, stop=t.max_iters * t.grad_accum_steps,
                              num_workers=t.num_workers, pin_memory=runtime.device.type == "cuda")
    val_set = validation_batches(val_tokens, gpt_config.block_size, t.batch_size, t.eval_batches,
                                 runtime.rank, runtime.world_size)
    tasks = training_tasks(t, tokenizer, gpt_config.block_size)  # --eval_tasks, read once
    model, wrapped_model = prepare_model(gpt_config, t, runtime, checkpoint, tokenizer.vocab_size)
    recorder = recorder_for(runtime.device)
    # FSDP's steps are never recorded as CUDA graphs (step.graph_fallback)
    optimizer = configure_optimizer(model, t, capturable=recorder is not None and not uses_fsdp(t))
    scheduler = learning_rate_scheduler(optimizer, Schedule.from_config(t))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    run = Run(gpt_config, t, runtime, tokenizer, loader, val_set, model, wrapped_model, optimizer,
              scheduler, scaler)
    run.graphed_step = graphed_step_for(run, recorder)
    run.data_fingerprint = fingerprint
    run.tasks = tasks
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
    held = 16 * parameters // (runtime.world_size if uses_fsdp(t) else 1)  # FSDP: one slice each
    return [
        (f"a model of {parameters:,} parameters, with its gradients and AdamW state",
         f"--n_layer {g.n_layer}, --n_embd {g.n_embd}", held, device),
        ("the activations of a batch", f"--batch_size {t.batch_size}, --block_size {g.block_size}",
         held + t.batch_size * g.block_size * per_token, device),
        ("the validation set", f"--eval_batches {t.eval_batches}, --batch_size {t.batch_size}",
         t.eval_batches * t.batch_size * runtime.world_size * window_bytes, host),
        ("the sample printed at each evaluation", f"--sample_tokens {t.sample_tokens}",
         t.sample_tokens * 80, host),  # the ids, and each token's text kept as a Python string
    ]


def load_corpus(gpt_config, train_config, checkpoint=None, fingerprint=None):
    """(tokenizer, token ids) of the configured corpus; a new run's vocabulary sets the model's.

    A resume whose data differs from the checkpoint's (by `fingerprint`) says so, and a problem
    with the data then (characters the saved vocabulary lacks) is put down to that change.
    """
    saved_tokenizer = tokenizer_from_state(checkpoint["tokenizer"]) if checkpoint else None
    change = data_change(train_config, checkpoint, fingerprint)
    try:
        tokenizer, ids = get_dataset(train_config, saved_tokenizer)
    except UserError as error:
        if change:
            fail(f"{change}: {error}")
        raise
    if checkpoint is None:
        gpt_config.vocab_size = padded_vocab_size(tokenizer)
    return tokenizer, ids


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
    print0(f"note: {change}; the run goes on with this text, so its batches differ from the "
           f"original run's")
    return change


def padded_vocab_size(tokenizer):
    """BPE vocabularies are padded to a multiple of 64 (faster matmuls); padded ids are never sampled."""
    if tokenizer.kind == "bpe":
        return (tokenizer.vocab_size + 63) // 64 * 64
    return tokenizer.vocab_size


def prepare_model(gpt_config, train_config, runtime, checkpoint=None, vocab_limit=None):
    """The model on its device; returns (model, the module that trains: compiled and/or DDP, or
    under --parallel fsdp the model itself, sharded in place).

    `vocab_limit` is the tokenizer's vocabulary, where the model's is padded beyond it.
    """
    t = train_config
    model = build_model(gpt_config, vocab_limit)
    if checkpoint is not None and not t.resume:  # --init_from: start from its weights
        state = crop_block_size(plain_weights(checkpoint, t.init_from), gpt_config.block_size)
        load_model_state(model, state, t.init_from)
        origin = "a Hugging Face model" if checkpoint.get("pretrained") else \
            f"step {int(checkpoint.get('step', 0))} of its run"
        print0(f"initialized from {t.init_from} ({origin})")
    if t.lora_rank:  # after the weights are in, before a resumed run's adapters are
        add_lora(model, t.lora_rank, t.lora_alpha, t.lora_dropout)
    if not uses_fsdp(t):  # FSDP moves the model block by block as it shards it (parallel.py)
        model.to(runtime.device)
    total = sum(p.numel() for p in model.parameters())
    print0(f"model: {count_parameters(model):,} trainable parameters" +
           (f" of {total:,} (LoRA rank {t.lora_rank})" if t.lora_rank else ""))
    wrapped_model = wrap_model(model, t, runtime)  # parallel.py: DDP or FSDP
    if uses_fsdp(t):
        print0(memory_line(model, runtime))
    return model, wrapped_model


def prepare_checkpoint_dir(run, checkpoint=None):
    """Before the first step, on the rank that writes: room for two checkpoints of this model, and
    what the run replaces (--overwrite), which goes only once its first steps are done (rundir/rules.py).
    """
    if run.runtime.is_main:
        weights = sum(p.numel() for p in run.model.parameters())
        bytes_per_checkpoint = 4 * (weights + 2 * count_parameters(run.model)) + (1 << 20)  # + moments
        resumed_step = int(checkpoint["step"]) if run.train_config.resume else 0
        run_id = checkpoint.get("run_id") if run.train_config.resume else None  # a resume keeps it
        if not isinstance(run_id, str):
            run_id = new_run_id()
        run.directory = prepare_run_directory(run.train_config, resumed_step, bytes_per_checkpoint,
                                              run_id)


def resume(run, checkpoint):
    """Restore everything a step checkpoint holds; afterwards run.step is its step."""
    runtime, path = run.runtime, run.train_config.resume
    # a gpt_step{N} directory, or a whole-model checkpoint into FSDP's slices: sharded_checkpoint.py
    sharded = checkpoint.get("sharded", False) or uses_fsdp(run.train_config)
    if not sharded:
        load_model_state(run.model, checkpoint["model_state_dict"], path)
    try:
        if sharded:
            restore_training_state(run.model, run.optimizer, checkpoint, path)
        else:
            load_optimizer_state(run.optimizer, checkpoint["optimizer_state_dict"])
        run.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if "scaler_state_dict" in checkpoint and run.scaler.is_enabled():
            run.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        run.step = int(checkpoint["step"])
        saved_world_size = int(checkpoint.get("world_size", 1))
        rank_states = checkpoint["random_states"]
        run.loader.sampler.seek(int(checkpoint["data_state"]["position"]))
        if "early_stopping" in checkpoint:  # absent from checkpoints older than gpt_best.pt
            run.best.load_state_dict(checkpoint["early_stopping"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} cannot be resumed: {type(error).__name__}: {error}")
    rebase_schedule(run.optimizer, run.scheduler, run.train_config, run.step)
    note = resharding_note(saved_world_size, checkpoint.get("sharded", False), runtime.world_size,
                           run.train_config.parallel)  # FSDP on either side: one line of its own
    try:
        if saved_world_size == runtime.world_size:
            restore_random_states(rank_states[runtime.rank], runtime.device)
        elif note is None:
            print0(f"note: the checkpoint was written by {saved_world_size} process(es) and this "
                   f"run has {runtime.world_size}: random states restart from the seed and the "
                   f"data order changes")
        if note:
            print0(note)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} has damaged random states: {type(error).__name__}: {error}")
    run.loggers.resume(run.step)
    print0(f"resumed from {path} after step {run.step}")
    _, saved_train = configs_from_checkpoint(checkpoint, path)
    if schedule_changes(saved_train, run.train_config) and run.step < run.train_config.max_iters:
        print0(describe_schedule(run.train_config, run.step, saved_train))


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGHUP into a request to stop after the current optimizer step.

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
    with StopRequest(run.runtime) as stop, progress, contextlib.closing(data), run.loggers:
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
            stopping_early = evaluating and run.best.should_stop and not finished
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
    run.directory.clear_replaced_files()  # the loss is finite: the run changes its directory
    if evaluate:
        record.update(estimate_loss(run))
        record.update(task_metrics(run))  # --eval_tasks: hellaswag/acc_norm, ...
        keep_if_best(run, record)
    run.loggers.write(record)
    postfix = {"loss": f"{loss:.4f}", **{name: f"{rate:.2e}" for name, rate in step_rates.items()},
               "tok/s": f"{tokens_per_second:,.0f}"}
    if "mfu" in record:
        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
    progress.set_postfix(postfix, refresh=False)
    print0(format_record(record))
    # under FSDP every rank generates: each forward gathers every rank's slices
    if evaluate and t.sample_tokens and (run.runtime.is_main or uses_fsdp(t)):
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
    run.directory.clear_replaced_files()
    keep_if_best(run, record)
    run.loggers.write(record)
    print0(f"step 0 (starting model) | val_loss {record['val_loss']:.4f} "
           f"({record['val_bpb']:.3f} bits/byte)")


def keep_if_best(run, record):
    """Count the evaluation; write gpt_best.pt if its validation loss is the lowest so far."""
    if run.best.update(record["val_loss"], run.step):
        state = weights_state(run, record.get("loss", math.nan))  # every rank: FSDP gathers
        state["val_loss"] = record["val_loss"]
        if run.runtime.is_main:
            save_checkpoint(state, best_path(run.train_config.checkpoint_dir),
                            run.directory.room_needed)


def early_stop_message(run):
    best, min_delta = run.best, run.train_config.early_stop_min_delta
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
    state = run_summary(run, loss)
    if not uses_fsdp(run.train_config):  # FSDP: each rank saves its slices (save_step_checkpoint)
        state["model_state_dict"] = run.model.state_dict()  # LoRA: adapters apart, to resume exactly
        state["optimizer_state_dict"] = run.optimizer.state_dict()
    state.update({
        "scheduler_state_dict": run.scheduler.state_dict(),
        "random_states": rank_states,
        "data_state": {"position": run.step * run.train_config.grad_accum_steps},
        "world_size": run.runtime.world_size,
        "early_stopping": run.best.state_dict(),  # the key it has always had
        "run_id": run.directory.run_id,  # --keep_last deletes only the run's own step files
    })
    if run.data_fingerprint:  # a resume on other data says so
        state["data_fingerprint"] = run.data_fingerprint
    if run.scaler.is_enabled():
        state["scaler_state_dict"] = run.scaler.state_dict()
    return state


def weights_state(run, loss):
    """What gpt_final.pt holds: weights (LoRA adapters merged in), configs and tokenizer.

    Every rank calls it: under --parallel fsdp the ranks gather the whole model onto rank 0.
    """
    if uses_fsdp(run.train_config):
        weights = gathered_weights(run.model)
    else:
        weights = merged_state_dict(run.model)
    return {**run_summary(run, loss), "model_state_dict": weights}


def run_summary(run, loss):
    """The step, loss, configs and tokenizer: what every checkpoint says about its run."""
    return {"step": run.step, "loss": loss, "gpt_config": config_to_dict(run.gpt_config),
            "train_config": config_to_dict(run.train_config),
            "tokenizer": run.tokenizer.state_dict()}


def save_step_checkpoint(run, loss):
    state = checkpoint_state(run, loss)  # every rank takes part: random states are gathered
    t = run.train_config
    run.directory.clear_replaced_files()  # done already by the log before every save
    if uses_fsdp(t):  # every rank writes its slices into a directory (sharded_checkpoint.py)
        path = sharded_step_path(t.checkpoint_dir, run.step)
        save_sharded_checkpoint(state, run.model, run.optimizer, path, sharded_temporary_path(path))
    else:
        path = step_path(t.checkpoint_dir, run.step)
        if run.runtime.is_main:
            save_checkpoint(state, path, run.directory.room_needed)
    if run.runtime.is_main:
        run.directory.prune(t.keep_last, run.step)
    return path


def batches(loader):
    """The loader's batches; closing this generator shuts its worker processes down at once."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator


# The learning rates a record holds, by name: AdamW's, and with --optimizer muon, Muon's.
RATE_NAMES = ("lr", "muon_lr")


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
    run.loggers.write_sample(run.step, text)


def finish(run, record):
    """The final save: weights, configs and tokenizer, no optimizer state; then the final figures."""
    path = final_path(run.train_config.checkpoint_dir)
    state = weights_state(run, record["loss"])  # every rank: FSDP gathers onto rank 0
    if run.runtime.is_main:
        run.directory.clear_replaced_files()
        save_checkpoint(state, path, run.directory.room_needed)
    if "val_loss" not in record:  # resumed at the end: the loop had nothing left to do
        record.update(estimate_loss(run))
    print0(f"final validation loss: {record['val_loss']:.4f} at step {run.step} "
           f"({record['val_bpb']:.4f} bits per byte); weights saved to {path}")
    best = run.best
    if best.best_step >= 0:
        print0(f"best validation loss: {best.best_loss:.4f} at step {best.best_step}; weights "
               f"saved to {best_path(run.train_config.checkpoint_dir)}")
    return record


if __name__ == "__main__":
    run_main(train)
