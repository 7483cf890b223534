"""Generate text from a trained checkpoint: `python sample.py [--prompt TEXT] [...]`.

--checkpoint also takes a Hugging Face GPT-2 directory or model id (`gpt2`). With no --checkpoint
it uses checkpoints/gpt_best.pt, gpt_final.pt or the newest gpt_step*.pt, and says which. Text is
streamed to stdout as it is generated (a multi-byte character is printed once it is complete),
and the same --seed gives the same text. The model and its key/value cache live in model.py,
the generation loop in generation.py, checkpoint loading in checkpoint.py.
"""

import argparse
import sys

import torch

from checkpoint import add_checkpoint_arguments, checkpoint_to_load, model_from_checkpoint
from config import ArgumentParser, fail, run_main
from generation import encode_prompt, generate_text
from runtime import autocast_context, select_device, select_dtype, set_seed


def parse_sample_args(argv=None):
    parser = ArgumentParser(description="Generate text from a trained checkpoint.",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default="\n", help="text the samples continue")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest; 0 = all")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples <= 0 or args.top_k < 0:
        fail("--max_new_tokens and --top_k must not be negative, --num_samples must be positive")
    if args.temperature < 0:
        fail(f"--temperature must not be negative, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def main(argv=None):
    args = parse_sample_args(argv)
    path = checkpoint_to_load(args)
    device = select_device(args.device)
    set_seed(args.seed)
    model, tokenizer, _ = model_from_checkpoint(path, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    dtype = select_dtype("auto", device)

    def autocast():
        return autocast_context(device, dtype)

    encode_prompt(tokenizer, args.prompt, device)  # a prompt the vocabulary lacks fails before output
    if not args.checkpoint:  # evaluate.py and export.py name the file in their output
        print(f"sampling from {path}", file=sys.stderr)
    for index in range(args.num_samples):
        if index:
            sys.stdout.write("\n---------------\n")
        sys.stdout.write(args.prompt)
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens, sys.stdout, autocast,
                      temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                      generator=generator)
    sys.stdout.write("\n")


if __name__ == "__main__":
    run_main(main)
