"""Full fine-tune versus LoRA: `python benchmarks/bench_lora.py [--device cuda] [--batch_size B]`.

The GPT-2 124M shape (12 layers, width 768, 12 heads, vocabulary 50304; random weights, synthetic
tokens: no download) trained both ways by train.py's own Run (`build_run`, which adds the adapters
for --lora_rank) and timed with bench_train.py's bare step (forward, backward, clip, AdamW). Each
way runs in a process of its own, so peak memory is its own: CUDA max allocated on a GPU, the
process's max RSS on the CPU (which includes the ~0.3 GB of torch itself). It prints ms/step, peak
memory, the optimizer state's size and the trainable parameters of each, then the ratios. The
defaults (batch 1, context 128) suit a CPU; on a GPU try `--batch_size 8 --block_size 1024`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import torch  # noqa: E402

from bench_train import bare_step_timer, peak_memory, synthetic_tokens  # noqa: E402
from gpt_train.cli import run_main  # noqa: E402
from config import ArgumentParser, GPTConfig, TrainConfig, fail, validate  # noqa: E402
from model import count_parameters  # noqa: E402
from gpt_train.runtime import setup_runtime  # noqa: E402
from train import build_run  # noqa: E402

RESULT = "result: "  # the line a variant's process reports on


def parse_bench_args(argv=None):
    parser = ArgumentParser(description="Peak memory and ms/step: full fine-tune vs LoRA.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=128, help="context of each sequence")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--bench_steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora_rank <= 0 or args.bench_steps <= 0 or args.warmup_steps < 0:
        fail("--lora_rank and --bench_steps must be positive, --warmup_steps not negative")
    return args


def measure(args):
    """Train one variant for warm-up + timed steps; return its figures."""
    lora_rank = args.lora_rank if args.variant == "lora" else 0
    gpt_config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    with tempfile.TemporaryDirectory(prefix="bench_lora-") as checkpoint_dir:
        train_config = TrainConfig(device=args.device, dtype=args.dtype,
                                   batch_size=args.batch_size, eval_batches=1,
                                   max_iters=args.warmup_steps + args.bench_steps, warmup_iters=0,
                                   checkpoint_dir=checkpoint_dir, lora_rank=lora_rank,
                                   lora_alpha=args.lora_alpha)
        validate(gpt_config, train_config)
        runtime = setup_runtime(train_config)
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        run = build_run(gpt_config, train_config, runtime,
                        tokens=synthetic_tokens(gpt_config, train_config))
        seconds_per_step = bare_step_timer(run)
        if args.warmup_steps:
            seconds_per_step(args.warmup_steps)
        seconds = seconds_per_step(args.bench_steps)
    optimizer_bytes = sum(value.numel() * value.element_size()
                          for state in run.optimizer.state.values() for value in state.values()
                          if hasattr(value, "numel"))
    memory, kind = peak_memory(runtime.device)
    return {"ms_per_step": 1000 * seconds, "peak_memory": memory, "memory_kind": kind,
            "optimizer_bytes": optimizer_bytes, "trainable": count_parameters(run.model),
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "device": str(runtime.device)}


def run_variant(variant, argv):
    """`measure` in a fresh process, so its peak memory is its own."""
    result = subprocess.run([sys.executable, __file__, *argv, "--variant", variant],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        sys.exit(result.returncode)
    line = next(line for line in result.stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line.removeprefix(RESULT))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_bench_args(argv)
    if args.variant:  # the child process: one measurement
        print(RESULT + json.dumps(measure(args)))
        return None
    results = {variant: run_variant(variant, argv) for variant in ("full", "lora")}
    full, lora = results["full"], results["lora"]
    print(f"GPT-2 shape: {args.n_layer} layers, width {args.n_embd}, vocabulary "
          f"{args.vocab_size}; batch {args.batch_size} x context {args.block_size}; "
          f"{full['device']}; {args.bench_steps} timed steps after {args.warmup_steps} warm-up")
    for name, result in (("full fine-tune", full), (f"LoRA r={args.lora_rank}", lora)):
        print(f"{name}: {result['ms_per_step']:.1f} ms/step | peak memory "
              f"{result['peak_memory'] / 2**20:,.0f} MiB ({result['memory_kind']}) | optimizer "
              f"state {result['optimizer_bytes'] / 2**20:,.1f} MiB | trainable "
              f"{result['trainable']:,} of {result['parameters']:,} parameters")
    print(f"LoRA vs full: optimizer state {full['optimizer_bytes'] / lora['optimizer_bytes']:.0f}x "
          f"smaller, peak memory {lora['peak_memory'] / full['peak_memory']:.2f}x, time per step "
          f"{lora['ms_per_step'] / full['ms_per_step']:.2f}x")
    return results


if __name__ == "__main__":
    run_main(main)
