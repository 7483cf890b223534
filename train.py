"""Train a GPT: `python train.py [--flag value ...]`, or `torchrun ... train.py` on several devices.

`train()` reads as eight stages: configure, seed and device, data, model, optimizer and schedule,
resume, loop, final save. Stages 3 to 5 build one `Run`, the object the loop, resume and
checkpoints read. `run_loop` shows one iteration whole: forward and backward over the
micro-batches, clip, step, zero the gradients (or the same step replayed as a CUDA graph), log,
evaluate, save; and every way out of it: the last step, a diverged loss, too many skipped
batches, an early stop, a signal. Notable details:
- resume is exact: model, optimizer, schedule, gradient scaler, every random state and the data
  position are saved (step_checkpoint.py), so a resumed run continues with the very next batch;
- the loop makes no host-device synchronisation except at log time, where it checks the loss is
  finite before anything is written;
- Ctrl-C, SIGTERM or SIGHUP finishes the current step, saves a checkpoint and prints how to
  resume; an output whose reader went away (`python train.py | head`, a closed terminal) is
  dropped from then on, and training goes on;
- every evaluation with the lowest validation loss so far writes gpt_best.pt, and
  --early_stop_patience ends the run once evaluations stop improving (best_model.py);
- --init_from also takes a Hugging Face GPT-2 (pretrained.py, through checkpoint.py) and evaluates
  it before the first step; --lora_rank trains low-rank adapters only (lora.py);
- nothing in --checkpoint_dir is replaced unless a flag says so (rundir/rules.py, asked in
  configure.py before any file is touched); what a run replaces goes in its own stage,
  `replace_earlier_files`, once its first steps have passed the finite-loss check;
- under torchrun every rank trains on its slice of the same global batch, and only rank 0 prints
  and writes files; how the model is spread over the ranks (--parallel) is asked of one object
  (parallel.py).
"""

from gpt_train.cli import exit_on_signals, run_main
from config import parse_args

if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback
    run_main(parse_args)  # --help and a mistyped flag answer before torch loads

import contextlib
import math
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import GPTConfig, TrainConfig, UserError, fail
from dataset import (RandomWindows, batches, build_dataloader, get_dataset, training_and_validation,
                     validation_batches)
from model import build_model, count_parameters, crop_block_size, flops_per_token
from gpt_train import step_checkpoint
from gpt_train.best_model import BestModel
from gpt_train.checkpoint import load_model_state, plain_weights, save_checkpoint
from gpt_train.cli import NothingToTrain, output_that_may_close
from gpt_train.configure import configure
from gpt_train.cuda_graphs import GraphedStep, graph_fallback, recorder_for
from gpt_train.generation import generate_text
from gpt_train.lora import add_lora
from gpt_train.muon import work_line
from gpt_train.loggers import Loggers, LossMeter, format_record
from gpt_train.optim import (Schedule, configure_optimizer, current_learning_rates,
                             learning_rate_scheduler)
from gpt_train.parallel import Parallel, make_parallel
from gpt_train.rundir.lock import hold_run_directory
from gpt_train.rundir.names import best_path, final_path
from gpt_train.rundir.rules import RunDirectory, new_run_id, prepare_run_directory
from gpt_train.runtime import Runtime, check_memory, note, peak_flops, print0, setup_runtime
from gpt_train.scoring import piece_lengths, score_batches
from gpt_train.stopping import StopRequest, divergence_line, early_stop_line, stop_line
from gpt_train.task_scoring import TaskSuite, task_metrics, training_tasks
from gpt_train.tokencache import data_fingerprint
from gpt_train.tokenizer import Tokenizer, tokenizer_from_state


def train(argv=None):
    """The eight stages, in order; returns the last record logged (None if nothing trained)."""
    # `python train.py | head`, a closed terminal: the output is dropped, the training goes on
    with output_that_may_close():
        try:
            gpt_config, train_config, checkpoint = configure(argv)  # 1: every refusal is here
        except NothingToTrain:  # --print_config, or --resume auto on a finished run
            return None
        runtime = setup_runtime(train_config)  # 2: seeds every random source, picks the device
        try:
            # one run per directory: rank 0 writes the files, so rank 0 holds the directory
            with hold_run_directory(train_config.checkpoint_dir, enabled=runtime.is_main):
                run = build_run(gpt_config, train_config, runtime, checkpoint)  # 3 to 5
                if train_config.resume:
                    resume(run, checkpoint)  # 6
                record = run_loop(run)  # 7
                return finish(run, record)  # 8
        finally:
            if dist.is_initialized():  # torchrun's group, or --parallel fsdp's group of one
                dist.destroy_process_group()


@dataclass(kw_only=True)
class Run:
    """Everything a training run is made of: what the loop, resume and checkpoints read."""

    gpt_config: GPTConfig
    train_config: TrainConfig
    runtime: Runtime
    parallel: Parallel  # how the model is spread over the ranks: one process, DDP or FSDP
    tokenizer: Tokenizer
    loader: torch.utils.data.DataLoader
    val_set: list  # fixed (input_ids, labels) batches: this rank's share of the validation split
    model: torch.nn.Module  # the plain model: checkpoints hold its weights
    wrapped_model: torch.nn.Module  # the module that trains: compiled, DDP-wrapped or sharded
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    directory: RunDirectory  # --checkpoint_dir, and what the run replaces there
    data_fingerprint: str | None = None  # of --data, kept in step checkpoints
    tasks: TaskSuite | None = None  # --eval_tasks, scored at each evaluation (task_scoring.py)
    recorder: InitVar[object] = None  # what records the step as a CUDA graph, or None
    step: int = 0  # optimizer steps completed
    graphed_step: GraphedStep | None = field(init=False)  # the step as a CUDA graph replay
    loggers: Loggers = field(init=False)  # metrics.jsonl, TensorBoard, W&B: --log_to
    best: BestModel = field(init=False)  # the best validation loss so far, and early stopping

    def __post_init__(self, recorder):
        t = self.train_config
        self.loggers = Loggers(self.gpt_config, t, self.runtime)
        self.best = BestModel(t.early_stop_patience, t.early_stop_min_delta)
        self.graphed_step = graphed_step_for(self, recorder)

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
    fingerprint = data_fingerprint(t.data) if t.data and tokens is None else None
    tokenizer, ids = tokens or load_corpus(gpt_config, t, checkpoint, fingerprint)
    train_tokens, val_tokens = training_and_validation(ids, tokenizer, t, gpt_config.block_size)
    parallel = make_parallel(t, runtime)
    check_memory(memory_needs(gpt_config, t, runtime, parallel))
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
    model = prepare_model(gpt_config, t, checkpoint, tokenizer.vocab_size)
    wrapped_model = parallel.wrap(model)  # on its device: compiled, DDP-wrapped or sharded
    if (line := parallel.memory_line(model)) is not None:
        print0(line)
    recorder = recorder_for(runtime.device)
    # a recorded step needs the learning rate as a tensor (FSDP's steps are never recorded)
    optimizer = configure_optimizer(model, t, capturable=recorder is not None and
                                    not parallel.sharded)
    if t.optimizer == "muon":
        print0(work_line(optimizer, parallel))
    scheduler = learning_rate_scheduler(optimizer, Schedule.from_config(t))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    directory = prepare_checkpoint_dir(t, runtime, model, checkpoint)
    return Run(gpt_config=gpt_config, train_config=t, runtime=runtime, parallel=parallel,
               tokenizer=tokenizer, loader=loader, val_set=val_set, model=model,
               wrapped_model=wrapped_model, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, directory=directory, data_fingerprint=fingerprint, tasks=tasks,
               recorder=recorder)


def memory_needs(gpt_config, train_config, runtime, parallel):
    """Lower bounds of what a run allocates, as (what, the flags that set it, bytes, where), for
    `check_memory` to compare with the memory there is before anything large is allocated."""
    g, t = gpt_config, train_config
    parameters = 12 * g.n_layer * g.n_embd**2 + (g.vocab_size + g.block_size) * g.n_embd
    activation_bytes = torch.finfo(runtime.dtype).bits // 8
    # per token: a dozen widths of activations saved per layer for backward, and the logits
    per_token = 12 * g.n_layer * g.n_embd * activation_bytes + 2 * 4 * g.vocab_size
    window_bytes = 2 * 8 * (g.block_size + 1)  # a window of int64 ids, as input and as labels
    device, host = runtime.device, torch.device("cpu")
    held = parallel.held_per_rank(16 * parameters)  # weights, gradients, two moments: float32
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
    change = step_checkpoint.data_change(train_config, checkpoint, fingerprint)
    try:
        tokenizer, ids = get_dataset(train_config, saved_tokenizer)
    except UserError as error:
        if change:
            fail(f"{change}: {error}")
        raise
    if checkpoint is None:
        gpt_config.vocab_size = padded_vocab_size(tokenizer)
    return tokenizer, ids


def padded_vocab_size(tokenizer):
    """BPE vocabularies are padded to a multiple of 64 (faster matmuls); padded ids are never sampled."""
    if tokenizer.kind == "bpe":
        return (tokenizer.vocab_size + 63) // 64 * 64
    return tokenizer.vocab_size


def prepare_model(gpt_config, train_config, checkpoint=None, vocab_limit=None):
    """The model, still on the CPU: --init_from's weights in, LoRA's adapters added.

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
    total = sum(p.numel() for p in model.parameters())
    print0(f"model: {count_parameters(model):,} trainable parameters" +
           (f" of {total:,} (LoRA rank {t.lora_rank})" if t.lora_rank else ""))
    return model


def prepare_checkpoint_dir(train_config, runtime, model, checkpoint=None):
    """Before the first step, on the rank that writes: room for two checkpoints of this model, and
    what the run replaces (--overwrite) or sets aside, noted, not yet touched (rundir/rules.py)."""
    if not runtime.is_main:
        return RunDirectory(Path(train_config.checkpoint_dir))
    weights = sum(p.numel() for p in model.parameters())
    bytes_per_checkpoint = 4 * (weights + 2 * count_parameters(model)) + (1 << 20)  # + moments
    resumed_step, run_id = 0, new_run_id()
    if train_config.resume and checkpoint is not None:  # a resume keeps its run's id
        resumed_step = step_checkpoint.resumable_step(checkpoint, train_config.resume)
        run_id = step_checkpoint.saved_run_id(checkpoint) or run_id
    return prepare_run_directory(train_config, resumed_step, bytes_per_checkpoint, run_id)


def resume(run, checkpoint):
    """Stage 6: everything the step checkpoint holds, back in the run (step_checkpoint.py)."""
    step_checkpoint.restore(run, checkpoint)
    run.loggers.resume(run.step)
    print0(f"resumed from {run.train_config.resume} after step {run.step}")


def run_loop(run):
    """Stage 7: optimizer steps until --max_iters, each one iteration of the loop below; it ends
    there and only there. Returns the last record logged."""
    t, runtime = run.train_config, run.runtime
    meter, data, progress = LossMeter(runtime.device), batches(run.loader), progress_bar(run)
    record, skipped = {"step": run.step, "loss": math.nan}, 0
    with StopRequest(runtime) as stop, progress, contextlib.closing(data), run.loggers:
        if t.init_from and run.step == 0:
            evaluate_starting_model(run)
        while run.step < t.max_iters:
            rates = current_learning_rates(run.scheduler)  # what this step uses, for its record
            if run.graphed_step is None:  # forward and backward, clip, step, zero the gradients
                loss, grad_norm, bad = forward_backward(run, next_micro_batches(run, data))
                skipping = t.skip_nonfinite and bool(bad)  # opt-in: a host sync every step
                if not skipping:
                    run.scaler.step(run.optimizer)  # float16: unless the gradients overflowed
                run.scaler.update()
                run.optimizer.zero_grad(set_to_none=True)
            else:  # the same step, recorded once as a CUDA graph and replayed (cuda_graphs.py)
                loss, grad_norm, bad = run.graphed_step(data)
                skipping = False
            run.scheduler.step()
            run.step += 1
            progress.update(1)
            if skipping:
                skipped += 1
                if skipped > t.skip_nonfinite:
                    fail(divergence_line(run, run.step, f"more than {t.skip_nonfinite} skipped "
                                                        f"batches"))
                print0(f"step {run.step}: non-finite loss or gradient, batch skipped ({skipped} "
                       f"of at most {t.skip_nonfinite})")  # a step's log line, as the others
            else:
                meter.add(run.step, loss, grad_norm, bad)
            finished = run.step == t.max_iters
            evaluating = run.step % t.eval_iter == 0 or finished
            saving = run.step % t.save_iter == 0 or finished
            stop_signal = stop.pending_signal()
            if run.step % t.log_iter == 0 or evaluating or saving or stop_signal:
                if (bad_step := meter.first_bad_step(runtime)) is not None:  # reads the device
                    fail(divergence_line(run, bad_step))
                replace_earlier_files(run)  # the loss is finite: the run changes its directory
                record = log_step(run, meter, rates, progress, evaluating)
            stopping_early = evaluating and run.best.should_stop and not finished
            if saving or stop_signal or stopping_early:
                path = save_step_checkpoint(run, record["loss"])
            if stopping_early:
                progress.close()
                print0(early_stop_line(run))
                break
            if stop_signal and not finished:
                progress.close()  # before the last line, so that it does not land on the bar
                print0(stop_line(stop_signal, run.step, path))
                raise SystemExit(StopRequest.EXIT_STATUS[stop_signal])
    return record


def forward_backward(run, micro_batches, autocast=None):
    """Gradients of one optimizer step's (x, y) micro-batches, unscaled and clipped; no host sync.

    Returns (the step's loss, the gradient norm before clipping, whether either is non-finite)
    as device tensors. The eager step and the CUDA graph record both run it.
    """
    accumulation, parallel = run.train_config.grad_accum_steps, run.parallel
    autocast = autocast or run.runtime.autocast
    step_loss = torch.zeros((), device=run.runtime.device)
    for micro_step, (x, y) in enumerate(micro_batches):
        # under DDP or FSDP, only the last micro-step reduces the accumulated gradients
        last = micro_step == accumulation - 1
        with contextlib.nullcontext() if last else parallel.pause_gradient_sync(run.wrapped_model):
            with autocast():
                output = run.wrapped_model(input_ids=x, labels=y,
                                           return_logits=not run.train_config.fused_loss)
                loss = output.loss / accumulation
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)
    grad_norm = parallel.clip_gradients(run.model.parameters(), run.train_config.grad_clip)
    if run.scaler.is_enabled():  # float16: the scaler itself skips steps whose gradients overflowed
        return step_loss, grad_norm, ~torch.isfinite(step_loss)
    return step_loss, grad_norm, ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))


def next_micro_batches(run, data):
    """The next grad_accum_steps (x, y) batches of `data`, on their way to the device."""
    device = run.runtime.device
    return [tuple(part.to(device, non_blocking=True) for part in next(data))
            for _ in range(run.train_config.grad_accum_steps)]


def graphed_step_for(run, recorder):
    """The eager step with the optimizer's step, recorded as a CUDA graph (cuda_graphs.py), or
    None where the step runs eagerly (with a note saying why, unless --cuda_graphs false)."""
    if recorder is None:
        return None
    reason = graph_fallback(run.train_config, run.runtime, run.parallel)
    if reason:
        if run.train_config.cuda_graphs:
            note(f"the training step runs without CUDA graphs: {reason}")
        return None

    def step(micro_batches, autocast):
        outputs = forward_backward(run, micro_batches, autocast)
        run.optimizer.step()  # no scaler: float16 is never recorded
        return outputs

    t = run.train_config
    shape = (t.grad_accum_steps, t.batch_size, run.gpt_config.block_size)
    return GraphedStep(step, run.optimizer, run.runtime, shape, recorder)


def replace_earlier_files(run):
    """What the run replaces goes now: an earlier run's files (--overwrite) are deleted, a
    rewind's later ones set aside in superseded/. Only the first call changes anything."""
    run.directory.clear_replaced_files()


def log_step(run, meter, step_rates, progress, evaluate):
    """Read the loss and throughput, evaluate if due, write the record to --log_to's destinations
    and the progress line."""
    loss, grad_norm, steps, seconds = meter.read(run.runtime)
    tokens_per_second = run.tokens_per_step * steps / max(seconds, 1e-9)
    record = {"step": run.step, "loss": loss, **step_rates,
              "tokens_per_sec": round(tokens_per_second, 1)}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    peak = peak_flops(run.train_config, run.runtime.device)
    if peak:
        record["mfu"] = round(flops_per_token(run.model) * tokens_per_second / peak, 4)
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
    if evaluate and run.train_config.sample_tokens and \
            (run.runtime.is_main or run.parallel.every_rank_runs_forward):
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
    replace_earlier_files(run)
    keep_if_best(run, record)
    run.loggers.write(record)
    print0(f"step 0 (starting model) | val_loss {record['val_loss']:.4f} "
           f"({record['val_bpb']:.3f} bits/byte)")


def keep_if_best(run, record):
    """Count the evaluation; write gpt_best.pt if its validation loss is the lowest so far."""
    if run.best.update(record["val_loss"], run.step):
        state = step_checkpoint.weights_state(run, record.get("loss", math.nan))  # every rank
        state["val_loss"] = record["val_loss"]
        if run.runtime.is_main:
            save_checkpoint(state, best_path(run.train_config.checkpoint_dir),
                            run.directory.room_needed)


def save_step_checkpoint(run, loss):
    """Every rank: the step checkpoint (step_checkpoint.py), then --keep_last's pruning."""
    path = step_checkpoint.save(run, loss)
    if run.runtime.is_main:
        run.directory.prune(run.train_config.keep_last, run.step)
    return path


def progress_bar(run):
    """The progress bar of rank 0, after the line saying how many tokens a step trains on."""
    t = run.train_config
    print0(f"tokens per optimizer step: {run.tokens_per_step:,} = batch {t.batch_size} x block "
           f"{run.gpt_config.block_size} x accumulation {t.grad_accum_steps} x processes "
           f"{run.runtime.world_size}")
    return tqdm(total=t.max_iters, initial=run.step, disable=not run.runtime.is_main,
                dynamic_ncols=True, desc="training")


def print_training_sample(run):
    run.model.eval()
    generator = torch.Generator(device=run.runtime.device).manual_seed(0)  # training's RNG untouched
    text = generate_text(run.model, run.tokenizer, "", run.train_config.sample_tokens,
                         autocast=run.runtime.autocast, generator=generator)
    run.model.train()
    print0(f"--- sample ---\n{text}\n--------------")
    run.loggers.write_sample(run.step, text)


def finish(run, record):
    """Stage 8: weights, configs and tokenizer, no optimizer state; then the final figures."""
    path = final_path(run.train_config.checkpoint_dir)
    state = step_checkpoint.weights_state(run, record["loss"])  # every rank: FSDP gathers
    if run.runtime.is_main:
        replace_earlier_files(run)  # a resume at the end: the loop had nothing left to do
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
