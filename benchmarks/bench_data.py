"""Benchmark the data path on a large corpus: tokenize throughput and peak memory.

    python benchmarks/bench_data.py --size_mb 200

Builds a synthetic UTF-8 corpus of the given size (ASCII words with some Chinese and emoji, and a
few characters that first turn up late in the file), tokenizes it through the token cache with the
char tokenizer, trains a few steps of a tiny model on it with `train.train`, and prints the
tokenize throughput in MB/s and the process's peak resident memory. The target: peak RSS under
1.5 GB for a 1 GB file, and not growing with the corpus size (compare two sizes). Everything is
written to a new scratch directory, removed at the end unless --keep is given.
"""

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402  (needs the repository on sys.path)
from tokencache import CHUNK_BYTES, cached_tokens  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are from at or an model "
         "data train token loss step batch layer attention gradient memory corpus sample "
         "naïve café Zürich 数据 训练 模型 语言 🙂 🚀 ünïcödé").split()
BLOCK_WORDS = 200_000  # words per generated block, about 1.3 MB of text


def peak_rss_mb():
    """The peak resident set size of this process so far, in MB (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def write_corpus(path, size_bytes, seed=0):
    """About `size_bytes` of text, written one block at a time (never the whole corpus in memory).

    Block k carries one character of its own (a CJK ideograph), so new characters keep turning up
    to the end of the file, as in real corpora: the cache's char vocabulary must be renumbered.
    """
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    written, block = 0, 0
    with open(path, "wb") as out:
        while written < size_bytes:
            chosen = words[rng.integers(0, len(words), BLOCK_WORDS)]
            lines = [" ".join(chosen[i:i + 12]) for i in range(0, BLOCK_WORDS, 12)]
            lines[len(lines) // 2] += " " + chr(0x4E00 + block)
            data = ("\n".join(lines) + "\n").encode("utf-8")[:size_bytes - written]
            data = data.decode("utf-8", errors="ignore").encode("utf-8")  # no character cut short
            if not data:
                break
            out.write(data)
            written += len(data)
            block += 1
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, default=200.0, help="corpus size in MB (default 200)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--dir", default=None, help="where to make the scratch directory (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the cache")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    corpus, cache_dir = work / "corpus.txt", work / "token-cache"
    try:
        print(f"peak RSS after imports: {peak_rss_mb():.0f} MB")
        clock = time.perf_counter()
        size = write_corpus(corpus, int(args.size_mb * 1e6))
        print(f"corpus: {size / 1e6:.1f} MB written in {time.perf_counter() - clock:.1f} s to {corpus}")
        print(f"peak RSS after writing the corpus: {peak_rss_mb():.0f} MB")

        clock = time.perf_counter()
        tokenizer, ids = cached_tokens(str(corpus), "char", cache_dir)
        seconds = time.perf_counter() - clock
        print(f"tokenize: {len(ids):,} tokens ({ids.dtype}), vocabulary {tokenizer.vocab_size}, "
              f"{seconds:.1f} s = {size / 1e6 / seconds:.1f} MB/s (chunks of {CHUNK_BYTES >> 20} MB)")
        print(f"peak RSS after tokenizing: {peak_rss_mb():.0f} MB")
        del ids

        clock = time.perf_counter()
        cached_tokens(str(corpus), "char", cache_dir)
        print(f"reopening the cache: {1000 * (time.perf_counter() - clock):.0f} ms")

        clock = time.perf_counter()
        train.train(["--data", str(corpus), "--cache_dir", str(cache_dir),
                     "--checkpoint_dir", str(work / "checkpoints"), "--device", "cpu",
                     "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
                     "--batch_size", "16", "--max_iters", str(args.steps), "--warmup_iters", "1",
                     "--log_iter", str(args.steps), "--eval_iter", str(args.steps),
                     "--eval_batches", "4", "--save_iter", str(args.steps)])
        print(f"training {args.steps} steps took {time.perf_counter() - clock:.1f} s")
        print(f"peak RSS: {peak_rss_mb():.0f} MB for a {size / 1e6:.1f} MB corpus "
              f"(target: under 1500 MB for 1000 MB, flat in the corpus size)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
