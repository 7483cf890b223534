"""Train a GPT: `python train.py [--flag value ...]`, or `torchrun ... train.py` on several devices.

`train()` reads as eight stages: configure, seed and device, data, model, optimizer and schedule,
resume, loop, final save. Notable details:
- resume is exact: model, optimizer, schedule, gradient scaler, every random state and the data
  position are saved, so a resumed run continues with the very next batch and step;
- the hot loop makes no host-device synchronisation except at log time, and checks for a
  non-finite loss there, before any checkpoint is written;
- Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and prints how to resume;
- under torchrun, every rank trains on its slice of the same global batch, and only rank 0 prints
  and writes files.
The model lives in model.py, batches in dataset.py, checkpoint files in checkpoint.py.
"""

import contextlib
import json
import math
import shlex
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (check_room_for_checkpoints, configs_from_checkpoint, latest_checkpoint,
                        load_checkpoint, load_model_state, prune_checkpoints,
                        remove_temporary_files, save_checkpoint)
from config import (ARCHITECTURE_FIELDS, GPTConfig, TrainConfig, apply_args_to_configs,
                    config_to_dict, fail, parse_args, run_main, validate)
from dataset import build_dataloader, load_tokens, split_tokens, validation_batches
from model import build_model, count_parameters, flops_per_token
from runtime import peak_flops, print0, random_states, restore_random_states, setup_runtime
from tokenizer import tokenizer_from_state

# ----------------------------------------------------------------------------- stage 1: configure
# (stage 2, seeds, devices and ranks, is runtime.setup_runtime)

def configure(argv=None):
    """Flags over the defaults; on --resume or --init_from, flags over the checkpoint's configs.

    Returns (gpt_config, train_config, checkpoint), checkpoint being the loaded file or None.
    """
    args = parse_args(argv)
    gpt_config, train_config = apply_args_to_configs(args, GPTConfig(), TrainConfig())
    given = vars(args)
    checkpoint = None
    if train_config.resume and train_config.init_from:
        fail("--resume continues a run and --init_from starts a new one: give only one")
    if train_config.resume:
        path = train_config.resume
        if path == "latest":
            path = latest_checkpoint(train_config.checkpoint_dir, require_readable=True, report=print0)
            if path is None:
                fail(f"--resume latest: no readable gpt_step*.pt in {train_config.checkpoint_dir}")
        checkpoint = load_checkpoint(path)
        if "optimizer_state_dict" not in checkpoint:
            fail(f"{path} holds weights only (a final checkpoint); resume from a gpt_step*.pt, "
                 f"or start a new run from it with --init_from")
        saved_gpt, saved_train = configs_from_checkpoint(checkpoint, path)
        reject_architecture_changes(given, saved_gpt, path, checkpoint["tokenizer"])
        gpt_config, train_config = apply_args_to_configs(args, saved_gpt, saved_train)
        train_config.resume, train_config.init_from = str(path), ""
    elif train_config.init_from:
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
        gpt_config = saved_gpt
        train_config.tokenizer = tokenizer_from_state(checkpoint["tokenizer"]).kind
    validate(gpt_config, train_config)
    return gpt_config, train_config, checkpoint


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


# ------------------------------------------------------------------------------- stage 3: data

def padded_vocab_size(tokenizer):
    """BPE vocabularies are padded to a multiple of 64 (faster matmuls); padded ids are never sampled."""
    if tokenizer.kind == "bpe":
        return (tokenizer.vocab_size + 63) // 64 * 64
    return tokenizer.vocab_size


def prepare_data(gpt_config, train_config, runtime, checkpoint=None):
    """Tokenize the corpus, split it, and build the training DataLoader and validation set."""
    t = train_config
    saved_tokenizer = tokenizer_from_state(checkpoint["tokenizer"]) if checkpoint else None
    tokenizer, tokens = load_tokens(t, saved_tokenizer)
    if checkpoint is None:
        gpt_config.vocab_size = padded_vocab_size(tokenizer)
    train_tokens, val_tokens = split_tokens(tokens, t.val_fraction, gpt_config.block_size)
    print0(f"data: {len(tokens):,} tokens ({len(train_tokens):,} train, {len(val_tokens):,} "
           f"validation), {t.tokenizer} tokenizer, vocabulary {tokenizer.vocab_size}")
    loader = build_dataloader(train_tokens, gpt_config.block_size, t.batch_size, t.seed,
                              stop=t.max_iters * t.grad_accum_steps, num_workers=t.num_workers,
                              pin_memory=runtime.device.type == "cuda", rank=runtime.rank,
                              world_size=runtime.world_size)
    val_set = validation_batches(val_tokens, gpt_config.block_size, t.batch_size, t.eval_batches,
                                 runtime.rank, runtime.world_size)
    return tokenizer, loader, val_set


# ------------------------------------------------------------------------------ stage 4: model

def prepare_model(gpt_config, train_config, runtime, checkpoint=None):
    """The model on its device; returns (model, the module to train: compiled and/or DDP-wrapped)."""
    model = build_model(gpt_config)
    if checkpoint is not None and not train_config.resume:  # --init_from: start from its weights
        state = dict(checkpoint["model_state_dict"])
        state["position_embedding.weight"] = state["position_embedding.weight"][:gpt_config.block_size]
        load_model_state(model, state, train_config.init_from)
    model.to(runtime.device)
    print0(f"model: {count_parameters(model):,} trainable parameters")
    train_model = model
    if train_config.compile:
        train_model = torch.compile(train_model)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    return model, train_model


# ------------------------------------------------------------------ stage 5: optimizer, schedule

def configure_optimizer(model, train_config, device):
    """AdamW; weight decay on matrices and embeddings only, never on biases or LayerNorm gains."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": train_config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    options = dict(lr=train_config.learning_rate, betas=tuple(train_config.betas))
    try:  # the fused kernel is one launch for all parameters, where this device has it
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:
        return torch.optim.AdamW(groups, **options)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps,
                                    min_lr_ratio=0.0):
    """Linear warmup to the peak, then a cosine down to `min_lr_ratio` of it at the last step.

    The multiplier for optimizer step s (counting from 0) is (s + 1) / warmup during warmup, so
    the very first step already learns, and the peak is reached at the last warmup step.
    """
    def multiplier(step):
        if step < num_warmup_steps:
            return (step + 1) / num_warmup_steps
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ----------------------------------------------------------------------------- stage 6: resume

def resume(checkpoint, model, optimizer, scheduler, scaler, loader, train_config, runtime):
    """Restore everything a step checkpoint holds; return the number of completed steps."""
    path = train_config.resume
    load_model_state(model, checkpoint["model_state_dict"], path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if "scaler_state_dict" in checkpoint and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler_state_dict"])
        step = int(checkpoint["step"])
        saved_world_size = int(checkpoint.get("world_size", 1))
        rank_states = checkpoint["random_states"]
        loader.sampler.load_state_dict(checkpoint["data_state"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} cannot be resumed: {type(error).__name__}: {error}")
    # the schedule follows this run's flags (a larger --max_iters reshapes the rest of it)
    scheduler.base_lrs = [train_config.learning_rate] * len(optimizer.param_groups)
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(step)
    try:
        if saved_world_size == runtime.world_size:
            restore_random_states(rank_states[runtime.rank], runtime.device)
        else:
            print0(f"note: the checkpoint was written by {saved_world_size} process(es) and this "
                   f"run has {runtime.world_size}: random states restart from the seed and the "
                   f"data order changes")
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as error:
        fail(f"checkpoint {path} has damaged random states: {type(error).__name__}: {error}")
    trim_metrics(Path(train_config.checkpoint_dir) / "metrics.jsonl", step, runtime)
    print0(f"resumed from {path} after step {step}")
    return step


def trim_metrics(path, step, runtime):
    """Drop records after `step` so metrics.jsonl tells one consistent history, and mark the resume."""
    if not runtime.is_main or not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    kept.append(json.dumps({"step": step, "event": "resume"}))
    path.write_text("\n".join(kept) + "\n")


# ------------------------------------------------------------------------------- stage 7: loop

class StopRequest:
    """Turns SIGINT / SIGTERM into a request to stop after the current optimizer step.

    The handler only records the signal, so a second Ctrl-C while a checkpoint is being written
    cannot interrupt the write. Under torchrun the ranks agree on stopping through a small
    all-reduce on a CPU (gloo) group, so every rank stops at the same step.
    """

    EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}

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

    def requested(self):
        if self.group is None:
            return self.signal_number
        flag = torch.tensor([self.signal_number])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signal_number = int(flag)
        return self.signal_number


@torch.no_grad()
def estimate_loss(model, batches, tokenizer, runtime):
    """Validation loss and bits per byte over the fixed validation batches, across all ranks.

    Bits per byte (total nats / ln 2 / UTF-8 bytes of the scored tokens) compares runs whose
    tokenizers differ. No random state is used: dropout is off in eval mode.
    """
    was_training = model.training
    model.eval()
    piece_bytes = torch.tensor([len(piece) for piece in tokenizer.pieces], dtype=torch.float64)
    totals = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # nats, tokens, bytes
    for x, y in batches:
        with runtime.autocast():
            loss = model(input_ids=x.to(runtime.device), labels=y.to(runtime.device)).loss
        totals[0] += loss.double() * y.numel()
        totals[1] += y.numel()
        totals[2] += piece_bytes[y].sum().item()
    if runtime.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    nats, tokens, num_bytes = totals.tolist()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / num_bytes}


def checkpoint_state(model, optimizer, scheduler, scaler, step, loss, gpt_config, train_config,
                     tokenizer, runtime):
    """Everything needed to continue the run after `step`, as plain data."""
    rank_states = random_states(runtime.device)
    if runtime.distributed:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, rank_states)
        rank_states = gathered
    else:
        rank_states = [rank_states]
    state = final_state(model, step, loss, gpt_config, train_config, tokenizer)
    state.update({
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "random_states": rank_states,
        "data_state": {"position": step * train_config.grad_accum_steps},
        "world_size": runtime.world_size,
    })
    if scaler.is_enabled():
        state["scaler_state_dict"] = scaler.state_dict()
    return state


def final_state(model, step, loss, gpt_config, train_config, tokenizer):
    return {"step": step, "loss": loss, "model_state_dict": model.state_dict(),
            "gpt_config": config_to_dict(gpt_config), "train_config": config_to_dict(train_config),
            "tokenizer": tokenizer.state_dict()}


def save_step_checkpoint(state, train_config, runtime):
    path = Path(train_config.checkpoint_dir) / f"gpt_step{state['step']}.pt"
    if runtime.is_main:
        save_checkpoint(state, path)
        prune_checkpoints(train_config.checkpoint_dir, train_config.keep_last)
    return path


class MetricsLog:
    """Appends one JSON object per line to checkpoint_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, directory, runtime):
        self.path = Path(directory) / "metrics.jsonl"
        self.enabled = runtime.is_main

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def forward_backward(model, train_model, optimizer, scaler, data, train_config, runtime):
    """Gradients of one optimizer step's micro-batches, unscaled and clipped; no host sync.

    Returns (the step's loss, whether it or the gradient norm is non-finite) as device tensors.
    """
    accumulation = train_config.grad_accum_steps
    step_loss = torch.zeros((), device=runtime.device)
    for micro_step in range(accumulation):
        x, y = next(data)
        x = x.to(runtime.device, non_blocking=True)
        y = y.to(runtime.device, non_blocking=True)
        # under DDP, only the last micro-step all-reduces the accumulated gradients
        if runtime.distributed and micro_step < accumulation - 1:
            sync = train_model.no_sync()
        else:
            sync = contextlib.nullcontext()
        with sync:
            with runtime.autocast():
                loss = train_model(input_ids=x, labels=y).loss / accumulation
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               train_config.grad_clip or math.inf)
    if scaler.is_enabled():  # float16: the scaler itself skips steps whose gradients overflowed
        return step_loss, ~torch.isfinite(step_loss)
    return step_loss, ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))


def run_loop(model, train_model, optimizer, scheduler, scaler, loader, val_set, tokenizer,
             gpt_config, train_config, runtime, start_step):
    """forward -> backward -> clip -> step, with logging, evaluation and checkpoints.

    Returns the last record logged: step, loss, learning rate, throughput, validation loss.
    """
    t = train_config
    accumulation = t.grad_accum_steps
    tokens_per_step = t.batch_size * gpt_config.block_size * accumulation * runtime.world_size
    flops_per_step = flops_per_token(model) * tokens_per_step
    peak = peak_flops(t, runtime.device)
    metrics = MetricsLog(t.checkpoint_dir, runtime)
    print0(f"tokens per optimizer step: {tokens_per_step:,} = batch {t.batch_size} x block "
           f"{gpt_config.block_size} x accumulation {accumulation} x processes {runtime.world_size}")

    step, last_loss, skipped = start_step, float("nan"), 0
    record = {"step": step, "loss": last_loss}
    loss_sum = torch.zeros((), device=runtime.device)  # summed on the device, read at log time
    steps_since_log = 0
    first_bad_step = torch.full((), -1, device=runtime.device, dtype=torch.long)
    data = batches(loader)
    progress = tqdm(total=t.max_iters, initial=step, disable=not runtime.is_main,
                    dynamic_ncols=True, desc="training")
    clock = time.perf_counter()
    # however the loop ends, the bar is closed and DataLoader workers are shut down
    with StopRequest(runtime) as stop, progress, contextlib.closing(data):
        while step < t.max_iters:
            step_loss, bad = forward_backward(model, train_model, optimizer, scaler, data, t, runtime)
            if t.skip_nonfinite and bool(bad):  # opt-in: costs a host sync every step
                skipped += 1
                if skipped > t.skip_nonfinite:
                    stop_nonfinite(step + 1, t, f"more than {t.skip_nonfinite} skipped batches")
                print0(f"step {step + 1}: non-finite loss or gradient, batch skipped "
                       f"({skipped} of at most {t.skip_nonfinite})")
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
            else:
                first_bad_step = torch.where(bad & (first_bad_step < 0), step + 1, first_bad_step)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss
                steps_since_log += 1
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            scheduler.step()
            step += 1
            progress.update(1)

            finished = step == t.max_iters
            saving = step % t.save_iter == 0 or finished
            stop_signal = stop.requested()
            if step % t.log_iter == 0 or saving or finished or stop_signal:
                if runtime.distributed:  # every rank stops at the first bad step of any rank
                    dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)
                bad_step = int(first_bad_step)
                if bad_step >= 0:
                    stop_nonfinite(bad_step, t)
                elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                if runtime.distributed:  # the mean over every rank's micro-batches
                    dist.all_reduce(loss_sum)
                    loss_sum /= runtime.world_size
                if steps_since_log:
                    last_loss = (loss_sum / steps_since_log).item()
                tokens_per_second = tokens_per_step * steps_since_log / max(elapsed, 1e-9)
                record = {"step": step, "loss": last_loss, "lr": step_lr,
                          "tokens_per_sec": round(tokens_per_second, 1)}
                if peak:
                    record["mfu"] = round(flops_per_step / tokens_per_step * tokens_per_second / peak, 4)
                if step % t.eval_iter == 0 or finished:
                    record.update(estimate_loss(model, val_set, tokenizer, runtime))
                    clock = time.perf_counter()  # evaluation time is not training throughput
                metrics.write(record)
                postfix = {"loss": f"{last_loss:.4f}", "lr": f"{record['lr']:.2e}",
                           "tok/s": f"{tokens_per_second:,.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                progress.set_postfix(postfix, refresh=False)
                print0(format_record(record))
                loss_sum.zero_()
                steps_since_log = 0
                if "val_loss" in record and t.sample_chars and runtime.is_main:
                    print_training_sample(model, tokenizer, t.sample_chars, runtime)
            if saving or stop_signal:
                state = checkpoint_state(model, optimizer, scheduler, scaler, step, last_loss,
                                         gpt_config, t, tokenizer, runtime)
                path = save_step_checkpoint(state, t, runtime)
            if stop_signal and not finished:
                progress.close()  # before the last lines, so they do not land on the bar
                print0(f"stopped by {signal.Signals(stop_signal).name} after step {step}; "
                       f"checkpoint {path}")
                print0(f"resume with: python train.py --resume {shlex.quote(str(path))}")
                raise SystemExit(StopRequest.EXIT_STATUS[stop_signal])
    return record


def batches(loader):
    """The loader's batches; closing this generator shuts its worker processes down at once."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator


def stop_nonfinite(step, train_config, reason="the loss or gradient norm is not finite"):
    fail(f"training diverged at step {step}: {reason}. No checkpoint of this state was written; "
         f"the last good one in {train_config.checkpoint_dir} is intact. Try a lower "
         f"--learning_rate (now {train_config.learning_rate:g}) or --skip_nonfinite N")


def format_record(record):
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f} ({record['val_bpb']:.3f} bits/byte)")
    parts += [f"lr {record['lr']:.2e}", f"{record['tokens_per_sec']:,.0f} tok/s"]
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


def print_training_sample(model, tokenizer, num_tokens, runtime):
    from sample import generate_text  # sampling is sample.py's job; only needed here on request
    model.eval()
    generator = torch.Generator(device=runtime.device).manual_seed(0)  # leaves training's RNG alone
    text = generate_text(model, tokenizer, "", num_tokens, generator=generator,
                         autocast=runtime.autocast)
    model.train()
    print0(f"--- sample ---\n{text}\n--------------")


# ------------------------------------------------------------------------------------- train()

def train(argv=None):
    # 1. configuration: flags over the defaults (or over a checkpoint's configs)
    gpt_config, train_config, checkpoint = configure(argv)
    # 2. seed every random source, pick the device, join the process group under torchrun
    runtime = setup_runtime(train_config)
    try:
        # 3. data: tokens, the train/validation split, the DataLoader
        tokenizer, loader, val_set = prepare_data(gpt_config, train_config, runtime, checkpoint)
        # 4. model on the device
        model, train_model = prepare_model(gpt_config, train_config, runtime, checkpoint)
        prepare_checkpoint_dir(model, train_config, runtime)
        # 5. AdamW with linear warmup and cosine decay
        optimizer = configure_optimizer(model, train_config, runtime.device)
        scheduler = get_cosine_schedule_with_warmup(optimizer, train_config.warmup_iters,
                                                    train_config.max_iters, train_config.min_lr_ratio)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        # 6. resume: model, optimizer, schedule, scaler, random states and data position
        start_step = 0
        if train_config.resume:
            start_step = resume(checkpoint, model, optimizer, scheduler, scaler, loader,
                                train_config, runtime)
        # 7. the loop
        record = run_loop(model, train_model, optimizer, scheduler, scaler, loader, val_set,
                          tokenizer, gpt_config, train_config, runtime, start_step)
        # 8. final save: weights, configs and tokenizer, no optimizer state
        final_path = Path(train_config.checkpoint_dir) / "gpt_final.pt"
        if runtime.is_main:
            save_checkpoint(final_state(model, record["step"], record["loss"], gpt_config,
                                        train_config, tokenizer), final_path)
        if "val_loss" not in record:  # resumed at the end: the loop had nothing left to do
            record.update(estimate_loss(model, val_set, tokenizer, runtime))
        print0(f"final validation loss: {record['val_loss']:.4f} ({record['val_bpb']:.4f} bits per "
               f"byte); weights saved to {final_path}")
        return record
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def prepare_checkpoint_dir(model, train_config, runtime):
    """Before the first step: the directory is writable and has room; old temporary files go."""
    if runtime.is_main:
        bytes_per_checkpoint = 3 * 4 * count_parameters(model) + (1 << 20)  # weights + 2 AdamW moments
        check_room_for_checkpoints(train_config.checkpoint_dir, bytes_per_checkpoint)
        remove_temporary_files(train_config.checkpoint_dir)
        if not train_config.resume:  # a new run starts a new history
            (Path(train_config.checkpoint_dir) / "metrics.jsonl").unlink(missing_ok=True)


if __name__ == "__main__":
    run_main(train)
