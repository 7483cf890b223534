"""Time the training step: `python benchmarks/bench_train.py [train.py flags] [--bench_steps K ...]`.

Two measurements of the same model, optimizer and data, taken in turn --repeats times so that a
burst of load on a shared machine hits both; the best (lowest) time of each is reported:
- the loop: train.run_loop itself. Each call continues the run for K steps and logs only at its
  last step, so the throughput in the record it returns is the loop's own clock over exactly
  those K steps, read after a device synchronisation. The evaluation and checkpoint that end
  each call come after that clock. A first call of W steps warms up (compilation, allocator);
- the bare step: the run's own step (train.forward_backward, that is forward, backward and
  gradient clipping, then the AdamW step; or the same recorded as a CUDA graph, as the loop runs
  it on CUDA) on one fixed batch already on the device, with no data loading, schedule or logging.
It prints ms/step, tokens/s, MFU (when the device's peak is known or --peak_flops is given), peak
memory (CUDA max allocated, or the process's max RSS on the CPU) and the loop's overhead over the
bare step. --synthetic_vocab V trains on uniformly random tokens instead of a corpus. Checkpoints
and metrics go to a temporary directory that is deleted afterwards.
"""

import dataclasses
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpt_train.cli import run_main  # noqa: E402
from config import (GPTConfig, TrainConfig, apply_args_to_configs, build_parser, fail, parse_args,
                    parse_bool, validate)
from model import flops_per_token  # noqa: E402
from gpt_train.runtime import peak_flops, print0, setup_runtime  # noqa: E402
from gpt_train.tokenizer import CharTokenizer  # noqa: E402
from train import build_run, forward_backward, run_loop  # noqa: E402

SYNTHETIC_TOKENS = 1 << 20  # long enough that random windows rarely repeat


def parse_bench_args(argv=None):
    parser = build_parser("Benchmark the training step (every train.py flag is accepted).")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--bench_steps", type=int, default=20, help="timed optimizer steps (K)")
    group.add_argument("--warmup_steps", type=int, default=5,
                       help="untimed optimizer steps before timing (W)")
    group.add_argument("--repeats", type=int, default=3,
                       help="timed rounds of K steps, loop and bare step in turn; the best counts")
    group.add_argument("--bare", type=parse_bool, default=True, metavar="true|false",
                       help="also time a bare forward/backward/clip/AdamW step")
    group.add_argument("--synthetic_vocab", type=int, default=0,
                       help="train on random tokens of this vocabulary instead of --data")
    args = parse_args(argv, parser)  # flags over a --config recipe, as train.py reads them
    if args.bench_steps <= 0 or args.repeats <= 0 or args.warmup_steps < 0:
        fail("--bench_steps and --repeats must be positive and --warmup_steps must not be negative")
    if args.synthetic_vocab < 0:
        fail(f"--synthetic_vocab must not be negative, got {args.synthetic_vocab}")
    if "resume" in args or "init_from" in args:
        fail("the benchmark always starts from a freshly initialised model: drop --resume/--init_from")
    return args


def configure(args, checkpoint_dir):
    """train.py's configs, with the run's length set to W + repeats x K steps."""
    gpt_config, train_config = apply_args_to_configs(args, GPTConfig(), TrainConfig())
    total = args.warmup_steps + args.repeats * args.bench_steps
    train_config.max_iters = total
    train_config.warmup_iters = min(train_config.warmup_iters, total)  # learning-rate warmup
    train_config.checkpoint_dir = checkpoint_dir
    train_config.keep_last = 1
    if "eval_batches" not in args:
        train_config.eval_batches = 1  # evaluation runs outside the timed interval; keep it short
    if args.synthetic_vocab:
        gpt_config.vocab_size = args.synthetic_vocab
    validate(gpt_config, train_config)
    return gpt_config, train_config


def synthetic_tokenizer(vocab_size):
    """A char-level tokenizer of `vocab_size` distinct characters, so that evaluation (bits per
    byte) and checkpoints work on random ids exactly as they do on a corpus."""
    code_points = (c for c in range(vocab_size + 0x800) if not 0xD800 <= c < 0xE000)  # no surrogates
    return CharTokenizer("".join(chr(c) for _, c in zip(range(vocab_size), code_points)))


def synthetic_tokens(gpt_config, train_config):
    """(tokenizer, uniformly random token ids) standing in for a corpus in train.build_run."""
    rng = np.random.default_rng(train_config.seed)
    ids = rng.integers(0, gpt_config.vocab_size, size=SYNTHETIC_TOKENS).astype(np.int32)
    return synthetic_tokenizer(gpt_config.vocab_size), ids


def build_benchmark_run(args, gpt_config, train_config):
    """train.py's own Run (data, model, optimizer, schedule), on the corpus or synthetic tokens."""
    runtime = setup_runtime(train_config)
    if runtime.distributed:
        fail("bench_train.py runs in one process; start it with python, not torchrun")
    tokens = synthetic_tokens(gpt_config, train_config) if args.synthetic_vocab else None
    return build_run(gpt_config, train_config, runtime, tokens=tokens)


def run_loop_for(run, config, steps):
    """Continue the run for `steps` optimizer steps in train.run_loop; its seconds per step."""
    stop = run.step + steps
    # log (and so read the clock) only at the last step; evaluate and save after that reading
    run.train_config = dataclasses.replace(config, max_iters=stop, log_iter=stop, eval_iter=stop,
                                           save_iter=stop)
    run.loader.sampler.seek(run.step * config.grad_accum_steps)
    record = run_loop(run)
    return run.tokens_per_step / record["tokens_per_sec"]


def bare_step_timer(run):
    """A function timing `steps` bare optimizer steps: train.forward_backward (forward, backward,
    unscale, clip) and the AdamW step, or the run's CUDA graph of them, on one fixed batch."""
    runtime, optimizer, scaler = run.runtime, run.optimizer, run.scaler
    batch = tuple(part.to(runtime.device) for part in run.loader.dataset[0])
    same_batch = itertools.repeat(batch)

    def step():
        if run.graphed_step is not None:
            run.graphed_step(same_batch)
            return
        forward_backward(run, [batch] * run.train_config.grad_accum_steps)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def seconds_per_step(steps):
        synchronize(runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(runtime.device)
        return (time.perf_counter() - start) / steps

    return seconds_per_step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024), "process max RSS"


def report(name, seconds_per_step, tokens_per_step, flops_per_step, peak):
    tokens_per_second = tokens_per_step / seconds_per_step
    line = f"{name}: {1000 * seconds_per_step:.2f} ms/step | {tokens_per_second:,.0f} tokens/s"
    if peak:
        line += f" | MFU {100 * flops_per_step / seconds_per_step / peak:.1f}%"
    print(line)


def main(argv=None):
    args = parse_bench_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as checkpoint_dir:
        gpt_config, train_config = configure(args, checkpoint_dir)
        run = build_benchmark_run(args, gpt_config, train_config)
        device = run.runtime.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.warmup_steps:
            run_loop_for(run, train_config, args.warmup_steps)
        bare_step = bare_step_timer(run) if args.bare else None
        if bare_step and args.warmup_steps:
            bare_step(args.warmup_steps)
        loop_times, bare_times = [], []
        for _ in range(args.repeats):
            loop_times.append(run_loop_for(run, train_config, args.bench_steps))
            if bare_step:
                bare_times.append(bare_step(args.bench_steps))

    t = run.train_config
    tokens_per_step = run.tokens_per_step
    flops_per_step = flops_per_token(run.model) * tokens_per_step
    peak = peak_flops(t, device)
    print0(f"benchmark: {args.warmup_steps} warm-up + {args.repeats} x {args.bench_steps} timed "
           f"steps, {tokens_per_step:,} tokens/step, dtype "
           f"{str(run.runtime.dtype).removeprefix('torch.')}, compile {t.compile}, "
           f"device {device}")
    print("loop ms/step of each round: " + ", ".join(f"{1000 * s:.2f}" for s in loop_times))
    report("loop", min(loop_times), tokens_per_step, flops_per_step, peak)
    if bare_times:
        print("bare ms/step of each round: " + ", ".join(f"{1000 * s:.2f}" for s in bare_times))
        report("bare", min(bare_times), tokens_per_step, flops_per_step, peak)
        overhead = 100 * (min(loop_times) / min(bare_times) - 1)
        print(f"loop overhead over the bare step: {overhead:+.1f}%")
    if not peak:
        print("MFU: peak FLOP/s of this device unknown; give --peak_flops to report it")
    memory, kind = peak_memory(device)
    print(f"peak memory: {memory / 2**20:,.1f} MiB ({kind})")
    if device.type == "cuda":  # allocated + what the caching allocator and CUDA graphs hold
        print(f"peak memory reserved: {torch.cuda.max_memory_reserved(device) / 2**20:,.1f} MiB")


if __name__ == "__main__":
    run_main(main)
