"""Time generation with and without the key/value cache: `python benchmarks/bench_sample.py`.

A block_size 256 model (randomly initialised, or --checkpoint) generates --max_new_tokens (500)
tokens greedily from a one-token prompt, once with the cache (each new token costs one position of
compute) and once re-running the whole window for every token. Both runs must produce the same
tokens; the script prints tokens/s for each and the ratio. Once the context is full, both slide
the same window (see model.GPT.generate_stream), so the ratio includes that cost too.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import torch  # noqa: E402

from gpt_train.checkpoint import model_from_checkpoint  # noqa: E402
from gpt_train.cli import run_main  # noqa: E402
from config import ArgumentParser, DTYPES, GPTConfig, TrainConfig, fail, validate  # noqa: E402
from model import build_model, count_parameters  # noqa: E402
from gpt_train.runtime import autocast_context, select_device, select_dtype, set_seed  # noqa: E402


def parse_bench_args(argv=None):
    parser = ArgumentParser(description="Benchmark sampling with and without the KV cache.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="a trained model; empty = random init")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--block_size", type=int, default=256, help="random-init model only")
    parser.add_argument("--n_layer", type=int, default=GPTConfig.n_layer)
    parser.add_argument("--n_head", type=int, default=GPTConfig.n_head)
    parser.add_argument("--n_embd", type=int, default=GPTConfig.n_embd)
    parser.add_argument("--vocab_size", type=int, default=65, help="tiny Shakespeare's characters")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        fail(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    return args


def load_model(args, device):
    if args.checkpoint:
        model, _, _ = model_from_checkpoint(args.checkpoint, device)
        return model
    gpt_config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    validate(gpt_config, TrainConfig())
    return build_model(gpt_config).to(device).eval()


def timed_generate(model, prompt, max_new_tokens, use_cache, device, dtype):
    """(generated ids, seconds) for greedy generation; a short untimed run warms the kernels up."""
    def generate(num_tokens):
        with autocast_context(device, dtype):
            return model.generate(prompt, num_tokens, temperature=0, use_cache=use_cache)

    generate(min(8, max_new_tokens))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    ids = generate(max_new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ids, time.perf_counter() - start


def main(argv=None):
    args = parse_bench_args(argv)
    device = select_device(args.device)
    set_seed(args.seed)
    model = load_model(args, device)
    dtype = select_dtype(args.dtype, device)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    config = model.config
    print(f"model: {count_parameters(model):,} parameters, n_layer {config.n_layer}, n_embd "
          f"{config.n_embd}, block_size {config.block_size}; {args.max_new_tokens} new tokens, "
          f"greedy, batch 1, {device}, {str(dtype).removeprefix('torch.')}")
    cached_ids, cached_seconds = timed_generate(model, prompt, args.max_new_tokens, True, device, dtype)
    full_ids, full_seconds = timed_generate(model, prompt, args.max_new_tokens, False, device, dtype)
    cached_rate = args.max_new_tokens / cached_seconds
    full_rate = args.max_new_tokens / full_seconds
    print(f"with KV cache: {cached_rate:,.1f} tokens/s ({cached_seconds:.3f} s)")
    print(f"without cache: {full_rate:,.1f} tokens/s ({full_seconds:.3f} s)")
    print(f"speed-up of the cache: {cached_rate / full_rate:.2f}x")
    differences = (cached_ids != full_ids).nonzero()
    if len(differences):
        # a near-tie between two logits can flip under a different summation order
        print(f"greedy tokens: differ from position {int(differences[0, 1])} on")
    else:
        print("greedy tokens: identical with and without the cache")


if __name__ == "__main__":
    run_main(main)
