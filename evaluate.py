"""Score a checkpoint on a text: `python evaluate.py --checkpoint PATH [--data FILE]`, or on
benchmark tasks: `python evaluate.py --checkpoint PATH --tasks hellaswag,piqa --tasks_dir DIR`.

With --tasks it prints a table of each task's accuracies and their centered mean (the tasks'
files, formats and scoring are tasks.py's and task_scoring.py's; `--results FILE.json` keeps them).
On a text:

Prints the mean loss per token, the perplexity, and bits per byte: the total loss in bits divided
by the UTF-8 bytes of the scored text. Loss and perplexity depend on how the tokenizer cuts the
text; bits per byte does not, so it is the figure that compares runs with different tokenizers.
- Without --data it scores the validation split of the checkpoint's own training data (the same
  corpus, tokenizer and --val_fraction as the run), so the figure is comparable to its val_loss.
- The text is cut into windows of block_size tokens. By default they do not overlap, so the first
  tokens of each window see little context. With `--stride S` < block_size a window starts every S
  tokens and scores only the tokens that are new in it: each token is still scored exactly once,
  with at least block_size - S tokens of context (except near the start).
- The first token of the text is never scored (nothing precedes it), so it is left out of the
  byte count too.
Checkpoint loading is checkpoint.py's job, which file of a run directory to load rundir/reading.py's,
tokenizing dataset.py's and tokenizer.py's.
"""

import json
from pathlib import Path

from gpt_train.cli import exit_on_signals, run_main
from config import ArgumentParser, DTYPES, fail
from gpt_train.rundir.names import add_checkpoint_arguments


def parse_evaluate_args(argv=None):
    parser = ArgumentParser(description="Loss, perplexity and bits per byte of a checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--data", default="", help="the text to score, read as train.py reads "
                        "--data: a UTF-8 text file or directory of *.txt; or documents: "
                        ".jsonl[.gz], .parquet, or a directory or glob of them; empty = the "
                        "validation split of the checkpoint's training data")
    parser.add_argument("--stride", type=int, default=0,
                        help="tokens between window starts; 0 = block_size (no overlap)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="windows per forward pass (tasks: up to as many tokens)")
    parser.add_argument("--tasks", default="", help="benchmark tasks to score instead of a text, "
                        "comma-separated (hellaswag,piqa,arc_easy,winogrande,lambada_openai)")
    parser.add_argument("--tasks_dir", default="", help="where the tasks' files are: a "
                        "directory searched for <task>.jsonl (hellaswag: also hellaswag_val.jsonl)")
    parser.add_argument("--limit", type=int, default=0,
                        help="score only the first N items of each task (0 = all)")
    parser.add_argument("--results", default="",
                        help="also write the tasks' figures to this JSON file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="autocast dtype; auto = bfloat16 on recent GPUs, float32 on the CPU")
    args = parser.parse_args(argv)
    if args.stride < 0:
        fail(f"--stride must not be negative, got {args.stride}")
    if args.batch_size <= 0:
        fail(f"--batch_size must be positive, got {args.batch_size}")
    check_task_args(args)
    return args


def check_task_args(args):
    if args.limit < 0:
        fail(f"--limit must not be negative, got {args.limit}")
    if not args.tasks:
        for flag in ("tasks_dir", "limit", "results"):
            if getattr(args, flag):
                fail(f"--{flag} goes with --tasks: name the tasks to score")
        return
    if not args.tasks_dir:
        fail("--tasks needs --tasks_dir, the directory holding the tasks' .jsonl files")
    if args.data or args.stride:
        fail("--tasks scores benchmark tasks, not a text: leave out --data and --stride")
    if args.results:
        check_results_path(Path(args.results))


def check_results_path(path):
    """--results may be new, or an earlier results file of evaluate.py, which it replaces."""
    if path.is_dir():
        fail(f"--results {path} is a directory: name a .json file")
    if not path.exists():
        if not path.parent.is_dir():
            fail(f"--results {path}: the directory {path.parent} does not exist")
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and earlier.get("written_by") == "evaluate.py"):
        fail(f"--results {path} exists and is not a results file of evaluate.py: "
             f"name a new file")


if __name__ == "__main__":
    exit_on_signals()  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback
    run_main(parse_evaluate_args)  # --help and a mistyped flag answer before torch loads

# The flags above are read before these imports: torch takes seconds to load.
import contextlib  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpt_train.atomic import atomic_write  # noqa: E402
from gpt_train.checkpoint import configs_from_checkpoint, model_from_checkpoint  # noqa: E402
from dataset import (check_token_ids, corpus_tokens, get_dataset,  # noqa: E402
                     training_and_validation)
from model import IGNORE_INDEX  # noqa: E402
from gpt_train.progress import progress  # noqa: E402
from gpt_train.rundir.reading import checkpoint_to_load  # noqa: E402
from gpt_train.runtime import (autocast_context, check_memory, select_device,  # noqa: E402
                               select_dtype)
from gpt_train.scoring import piece_lengths, score_batches, summarize  # noqa: E402
from gpt_train.task_scoring import centered_accuracy, format_table, load_tasks  # noqa: E402


def window_plan(num_tokens, block_size, stride):
    """(starts, first_scored): where each window starts and the first token index it scores.

    Window k starts at token k * stride and predicts the tokens start+1 .. start+block_size. It
    scores those not scored by an earlier window, so every token after the first is scored once.
    """
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    last = num_tokens - 1  # index of the last token, the last one to predict
    # the first window whose predictions reach `last` is the final one
    num_windows = max(1, math.ceil((last - block_size) / stride) + 1)
    starts = np.arange(num_windows, dtype=np.int64) * stride
    ends = np.minimum(starts + block_size, last)  # last token index each window predicts
    first_scored = np.concatenate([[1], ends[:-1] + 1])
    return starts, first_scored


def window_batches(ids, block_size, starts, first_scored, batch_size):
    """(input_ids, labels) batches; labels are IGNORE_INDEX where a window scores nothing new or runs
    past the text (those inputs are padded with id 0, which causal attention never lets earlier
    positions see)."""
    offsets = np.arange(block_size + 1)
    for begin in range(0, len(starts), batch_size):
        window_starts = starts[begin:begin + batch_size, None]
        positions = window_starts + offsets  # (windows, block_size + 1)
        inside = positions < len(ids)
        rows = np.where(inside, ids[np.minimum(positions, len(ids) - 1)], 0)
        target_positions = positions[:, 1:]
        scored = inside[:, 1:] & (target_positions >= first_scored[begin:begin + batch_size, None])
        labels = np.where(scored, rows[:, 1:], IGNORE_INDEX)
        yield torch.from_numpy(rows[:, :-1]), torch.from_numpy(labels)


def evaluate_tokens(model, tokenizer, ids, stride=None, batch_size=32,
                    autocast=contextlib.nullcontext):
    """(total nats, scored tokens, their UTF-8 bytes) of `ids` under `model`, in eval mode.

    Every token but the first is scored once; `stride` (default block_size) sets the overlap.
    """
    ids = np.asarray(ids, dtype=np.int64)
    block_size = model.config.block_size
    if len(ids) < 2:
        fail(f"the text is too short to score: it has {len(ids)} token(s), at least 2 are needed")
    starts, first_scored = window_plan(len(ids), block_size, stride or block_size)
    batches = progress(window_batches(ids, block_size, starts, first_scored, batch_size),
                       math.ceil(len(starts) / batch_size), "evaluating", "batches")
    piece_bytes = piece_lengths(tokenizer, next(model.parameters()).device)
    total_nats, num_tokens, num_bytes = score_batches(model, batches, piece_bytes, autocast).tolist()
    return total_nats, int(num_tokens), int(num_bytes)


def scoring_memory(gpt_config, num_tokens, stride, batch_size, device):
    """A lower bound of one forward pass over a batch of windows, for `check_memory`: the logits
    in float32, and a few widths of activations per token."""
    windows = min(batch_size, math.ceil(max(num_tokens - 1, 1) / stride))
    per_token = 4 * gpt_config.vocab_size + 4 * 4 * gpt_config.n_embd
    return ("a batch of windows", f"--batch_size {batch_size}",
            windows * gpt_config.block_size * per_token, device)


def tokens_to_score(checkpoint, tokenizer, data, path):
    """(ids, description): the text of `data`, or the checkpoint's own validation split."""
    gpt_config, train_config = configs_from_checkpoint(checkpoint, path)
    if data:  # through the token cache: a large file is read in chunks and memory-mapped
        _, ids = corpus_tokens(data, train_config, tokenizer)  # the cache train.py's runs use
        return np.asarray(check_token_ids(ids, tokenizer.vocab_size, data)), data
    _, tokens = get_dataset(train_config, tokenizer)
    _, val_tokens = training_and_validation(tokens, tokenizer, train_config,
                                            gpt_config.block_size)
    source = train_config.val_data or train_config.data or "the built-in corpus"
    return np.asarray(val_tokens), f"validation split of {source}"


def evaluate_tasks(args, model, tokenizer, path, autocast):
    """Score --tasks; print the table; write --results; return the results."""
    suite = load_tasks(args.tasks, args.tasks_dir, tokenizer, model.config.block_size,
                       args.limit)
    results = suite.score(model, args.batch_size, autocast, progress=True)
    print(f"{path} on {len(results)} task(s) from {args.tasks_dir}"
          f"{f', the first {args.limit} items of each' if args.limit else ''}:")
    print(format_table(results))
    if args.results:
        report = {"written_by": "evaluate.py", "checkpoint": str(path), "tasks": results,
                  "centered_accuracy": centered_accuracy(results),
                  "files": {task.name: str(task.path) for task in suite.tasks}}
        with atomic_write(args.results) as handle:
            handle.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return results


def main(argv=None):
    args = parse_evaluate_args(argv)
    device = select_device(args.device)
    path = checkpoint_to_load(args)
    dtype = select_dtype(args.dtype, device)
    model, tokenizer, checkpoint = model_from_checkpoint(path, device)
    if args.tasks:
        return evaluate_tasks(args, model, tokenizer, path,
                              lambda: autocast_context(device, dtype))
    block_size = model.config.block_size
    if args.stride > block_size:
        fail(f"--stride {args.stride} exceeds the model's block_size {block_size}: "
             f"tokens between windows would never be scored")
    ids, source = tokens_to_score(checkpoint, tokenizer, args.data, path)
    check_memory([scoring_memory(model.config, len(ids), args.stride or block_size,
                                 args.batch_size, device)])
    totals = evaluate_tokens(model, tokenizer, ids, args.stride or block_size, args.batch_size,
                             autocast=lambda: autocast_context(device, dtype))
    result = summarize(*totals)
    print(f"{path} on {source}: {result['tokens']:,} tokens, {result['bytes']:,} bytes")
    print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
          f"bits per byte {result['bits_per_byte']:.4f}")
    return result


if __name__ == "__main__":
    run_main(main)
