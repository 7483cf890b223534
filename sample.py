"""Generate text from a trained checkpoint: `python sample.py [--prompt TEXT] [...]`.

--checkpoint also takes a Hugging Face GPT-2 directory or model id (`gpt2`). With no --checkpoint
it uses checkpoints/gpt_best.pt, gpt_final.pt or the newest gpt_step*.pt, and says which. Text is
streamed to stdout as it is generated (a multi-byte character is printed once it is complete),
and the same --seed gives the same text. A model trained on documents starts an empty prompt at
a document's start and ends a sample where it ends the document (--stop_at_end_of_text). The
model and its key/value cache live in model.py, the generation loop in generation.py, checkpoint
loading in checkpoint.py, the choice of file in rundir/reading.py.
"""

import math
import sys

from gpt_train.cli import exit_on_signals, run_main
from config import ArgumentParser, MAX_SEED, UserError, fail, parse_bool
from gpt_train.rundir.names import add_checkpoint_arguments

# Below this a temperature is greedy decoding in all but name, and the scaled logits overflow.
SMALLEST_TEMPERATURE = 1e-6


def parse_sample_args(argv=None):
    parser = ArgumentParser(description="Generate text from a trained checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default=None,
                        help="text the samples continue (default: a newline, or the start of a "
                        "document for a model trained on documents)")
    parser.add_argument("--max_new_tokens", type=int, default=500,
                        help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divides the logits before sampling; 0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest; 0 = all")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample from the smallest set of tokens holding this probability "
                        "mass; 1 = off")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to generate")
    parser.add_argument("--seed", type=int, default=1337,
                        help="the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--stop_at_end_of_text", type=parse_bool, default=True,
                        metavar="true|false", help="end a sample where the model ends its "
                        "document (models trained on documents); false goes on past it")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "top_k"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.num_samples <= 0:
        fail(f"--num_samples must be positive, got {args.num_samples}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        fail(f"--temperature must be a finite number, 0 or more, got {args.temperature}")
    if 0 < args.temperature < SMALLEST_TEMPERATURE:
        fail(f"--temperature {args.temperature:g} is too small to sample with; use 0 for greedy "
             f"decoding")
    if not 0.0 < args.top_p <= 1.0:  # also rejects nan
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed <= MAX_SEED:
        fail(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal passed that are not UTF-8
            fail("--prompt is not valid UTF-8 text; check the terminal's encoding")
    return args


if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback
    run_main(parse_sample_args)  # --help and a mistyped flag answer before torch loads

# The flags above are read before these imports: torch takes seconds to load.
import torch  # noqa: E402

from gpt_train.checkpoint import model_from_checkpoint  # noqa: E402
from gpt_train.generation import encode_prompt, generate_text  # noqa: E402
from gpt_train.rundir.reading import checkpoint_to_load  # noqa: E402
from gpt_train.runtime import (autocast_context, check_memory, select_device,  # noqa: E402
                               select_dtype, set_seed)


def default_prompt(tokenizer):
    """A newline, where a corpus's lines start; a vocabulary without one starts from its first id,
    and a model of documents at a document's start (encode_prompt: after the end-of-text id)."""
    if getattr(tokenizer, "end_of_text", None) is not None:
        return ""
    try:
        tokenizer.encode("\n")
    except UserError:
        return ""
    return "\n"


def main(argv=None):
    args = parse_sample_args(argv)
    device = select_device(args.device)
    path = checkpoint_to_load(args)
    set_seed(args.seed)
    model, tokenizer, _ = model_from_checkpoint(path, device)
    prompt = default_prompt(tokenizer) if args.prompt is None else args.prompt
    tokens = len(prompt) + args.max_new_tokens  # at most one token per character of the prompt
    # the ids on the device, and each token's text kept as a Python string
    check_memory([("the generated text", f"--max_new_tokens {args.max_new_tokens}", 8 * tokens,
                   device),
                  ("the generated text", f"--max_new_tokens {args.max_new_tokens}", 80 * tokens,
                   torch.device("cpu"))])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    dtype = select_dtype("auto", device)

    def autocast():
        return autocast_context(device, dtype)

    encode_prompt(tokenizer, prompt, device)  # a prompt the vocabulary lacks fails before output
    if not args.checkpoint:  # evaluate.py and export.py name the file in their output
        print(f"sampling from {path}", file=sys.stderr)
    for index in range(args.num_samples):
        if index:
            sys.stdout.write("\n---------------\n")
        sys.stdout.write(prompt)
        generate_text(model, tokenizer, prompt, args.max_new_tokens, sys.stdout, autocast,
                      stop_at_end_of_text=args.stop_at_end_of_text,
                      temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                      generator=generator)
    sys.stdout.write("\n")


if __name__ == "__main__":
    run_main(main)
