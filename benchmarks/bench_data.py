"""Benchmark the data path on a large corpus: tokenize throughput and peak memory.

    python benchmarks/bench_data.py --size_mb 200
    python benchmarks/bench_data.py --documents --size_mb 500 --bpe_vocab_size 32768

The second form measures a corpus of documents (see `documents_benchmark` below); the first:

Builds a synthetic UTF-8 corpus of the given size (ASCII words with some Chinese and emoji, and a
few characters that first turn up late in the file), tokenizes it through the token cache with the
char tokenizer, trains a few steps of a tiny model on it with `train.train`, and prints the
tokenize throughput in MB/s and the process's peak resident memory. The target: peak RSS under
1.5 GB for a 1 GB file, and not growing with the corpus size (compare two sizes). Everything is
written to a new scratch directory, removed at the end unless --keep is given.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402  (needs the repository on sys.path)
from gpt_train.documents import file_pieces, piece_documents  # noqa: E402
from gpt_train.cachefiles import CHUNK_BYTES, CacheSettings  # noqa: E402
from gpt_train.tokencache import cached_tokens  # noqa: E402
from gpt_train.tokenizer import BPETokenizer, tokenizer_from_state  # noqa: E402

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
    parser.add_argument("--documents", action="store_true",
                        help="a jsonl corpus of documents and a BPE: the preparation table")
    parser.add_argument("--bpe_vocab_size", type=int, default=32768, help="with --documents")
    parser.add_argument("--num_proc", type=int, default=2, help="with --documents: the most "
                        "processes measured (default 2)")
    parser.add_argument("--size_mb", type=float, default=200.0, help="corpus size in MB (default 200)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--dir", default=None, help="where to make the scratch directory (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the cache")
    args = parser.parse_args(argv)
    if args.documents:
        return documents_benchmark(args)

    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    corpus, cache_dir = work / "corpus.txt", work / "token-cache"
    try:
        print(f"peak RSS after imports: {peak_rss_mb():.0f} MB")
        clock = time.perf_counter()
        size = write_corpus(corpus, int(args.size_mb * 1e6))
        print(f"corpus: {size / 1e6:.1f} MB written in {time.perf_counter() - clock:.1f} s to {corpus}")
        print(f"peak RSS after writing the corpus: {peak_rss_mb():.0f} MB")

        clock = time.perf_counter()
        tokenizer, ids = cached_tokens(CacheSettings(str(corpus), "char", cache_dir))
        seconds = time.perf_counter() - clock
        print(f"tokenize: {len(ids):,} tokens ({ids.dtype}), vocabulary {tokenizer.vocab_size}, "
              f"{seconds:.1f} s = {size / 1e6 / seconds:.1f} MB/s (chunks of {CHUNK_BYTES >> 20} MB)")
        print(f"peak RSS after tokenizing: {peak_rss_mb():.0f} MB")
        del ids

        clock = time.perf_counter()
        cached_tokens(CacheSettings(str(corpus), "char", cache_dir))
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


# ------------------------------------------------------------------------- corpora of documents

SYLLABLES = ("ka ri to na me su lo vi an der ing ter pro con ex tion al ment ous ly re un "
             "pre post ma ge bo tu shi zen qua rel vor ath eth").split()
TEN_BILLION = 10_000_000_000


def write_documents(path, size_bytes, seed=0):
    """About `size_bytes` of jsonl: documents of 50-800 words drawn, with Zipf's law, from a
    vocabulary of 60,000 made-up words (so a 32k BPE has real merges to learn), with some
    punctuation, digits and non-ASCII text; written a block at a time."""
    rng = np.random.default_rng(seed)
    parts = rng.integers(0, len(SYLLABLES), size=(60_000, 4))
    lengths = rng.integers(1, 5, size=60_000)
    vocabulary = np.array(["".join(SYLLABLES[p] for p in row[:n])
                           for row, n in zip(parts, lengths)])
    vocabulary[::97] = [f"{w}é" for w in vocabulary[::97]]
    vocabulary[::89] = "数据"
    vocabulary[::83] = [f"{w}," for w in vocabulary[::83]]
    vocabulary[::79] = [f"{w}." for w in vocabulary[::79]]
    vocabulary[::71] = [str(n) for n in range(len(vocabulary[::71]))]
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    written, number = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            words = vocabulary[rng.choice(len(vocabulary), size=200_000, p=weights)]
            cuts = np.cumsum(rng.integers(50, 800, size=1000))
            cuts = cuts[cuts < len(words)]
            lines = []
            for document in np.split(words, cuts):
                lines.append(json.dumps({"id": number, "text": " ".join(document)},
                                        ensure_ascii=False) + "\n")
                number += 1
            block = "".join(lines)
            out.write(block)
            written += len(block.encode("utf-8"))
    return written


def children_peak_rss_mb():
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def cpu_seconds():
    """CPU time of this process (all its threads) and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def reference_encode(corpus, tokenizer, threads):
    """(wall seconds, CPU seconds, tokens): the `tokenizers` library's own encode_batch over the
    documents, a piece at a time, counting only the time inside encode_batch, in a fresh process
    (the library reads RAYON_NUM_THREADS once per process)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(reference_in_this_process,
                          (str(corpus), json.dumps(tokenizer.state_dict()), threads))


def reference_in_this_process(corpus, state_json, threads):
    """The library at its best on `threads` cores: its parallel encoder on that many threads, even
    for one (its sequential one, TOKENIZERS_PARALLELISM=false, ran 1.3x slower on one thread)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    backend = tokenizer_from_state(json.loads(state_json)).backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    seconds, cpu, tokens = 0.0, 0.0, 0
    for piece in file_pieces(0, "jsonl", Path(corpus)):
        texts = piece_documents(piece, "text").texts
        clock, cpu_clock = time.perf_counter(), cpu_seconds()
        encodings = encode(texts, add_special_tokens=False)
        seconds += time.perf_counter() - clock
        cpu += cpu_seconds() - cpu_clock
        tokens += sum(len(e.ids) for e in encodings) + len(texts)
    return seconds, cpu, tokens


def our_preparation(corpus, tokenizer, cache_dir, num_proc):
    """(wall seconds, CPU seconds, tokens) of a fresh token cache built by `num_proc` processes."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process is one core
    clock, cpu_clock = time.perf_counter(), cpu_seconds()
    _, ids = cached_tokens(CacheSettings(str(corpus), "bpe", cache_dir, num_proc=num_proc),
                                         tokenizer=tokenizer)
    return time.perf_counter() - clock, cpu_seconds() - cpu_clock, len(ids)


def documents_benchmark(args):
    """The preparation table: MB/s (per core) of our cache build on 1..num_proc processes and of
    `tokenizers`' encode_batch on as many threads, peak RSS, and the 10B-token projection."""
    work = Path(tempfile.mkdtemp(prefix="bench-documents-", dir=args.dir))
    corpus = work / "corpus.jsonl"
    try:
        clock = time.perf_counter()
        size = write_documents(corpus, int(args.size_mb * 1e6))
        megabytes = size / 1e6
        print(f"corpus: {megabytes:.1f} MB of jsonl in {time.perf_counter() - clock:.0f} s")
        clock = time.perf_counter()
        sample = [text for piece in list(file_pieces(0, "jsonl", corpus))[:2]
                  for text in piece_documents(piece, "text").texts]
        tokenizer = BPETokenizer.train(sample, args.bpe_vocab_size, end_of_text=True)
        print(f"BPE of {tokenizer.vocab_size:,} tokens learned in "
              f"{time.perf_counter() - clock:.0f} s")
        rows, counts = [], {1, args.num_proc}
        for processes in sorted(counts):
            rows.append((f"token cache, {processes} process(es)", processes,
                         *our_preparation(corpus, tokenizer, work / f"cache{processes}",
                                          processes)))
        ours_peak, children_peak = peak_rss_mb(), children_peak_rss_mb()
        for threads in sorted(counts):
            rows.append((f"tokenizers encode_batch, {threads} thread(s)", threads,
                         *reference_encode(corpus, tokenizer, threads)))
        print_table(rows, megabytes, ours_peak, children_peak)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def print_table(rows, megabytes, ours_peak, children_peak):
    """The figures; "per core" divides by the CPU seconds used, which on a machine that other work
    shares is what one core does, where wall-clock rates depend on the neighbours."""
    print(f"\n| {'what':<38} | wall s | CPU s | MB/s (wall) | MB/s per core | tokens/s per core |")
    print(f"|{'-' * 40}|--------|-------|-------------|---------------|-------------------|")
    rates = {}
    for name, _, seconds, cpu, tokens in rows:
        rates[name] = (megabytes / seconds, megabytes / cpu, tokens / cpu, tokens)
        print(f"| {name:<38} | {seconds:>6.1f} | {cpu:>5.1f} | {megabytes / seconds:>11.2f} | "
              f"{megabytes / cpu:>13.2f} | {tokens / cpu:>17,.0f} |")
    names = list(rates)
    most = max(row[1] for row in rows)
    ours_one, ours_most = rates[names[0]], rates[names[len(names) // 2 - 1]]
    theirs_most = rates[names[-1]]
    print(f"\nper core, ours on {most} processes / encode_batch on {most} threads: "
          f"{ours_most[1] / theirs_most[1]:.2f}x; wall clock, {most} processes / 1: "
          f"{ours_most[0] / ours_one[0]:.2f}x (bounded by the idle cores there were)")
    print(f"peak RSS while preparing: {ours_peak:.0f} MB (this process), {children_peak:.0f} MB "
          f"(largest worker)")
    per_core, tokens = ours_most[2], ours_most[3]
    text_gb = TEN_BILLION / tokens * megabytes / 1e3
    print(f"10B tokens = {text_gb:.0f} GB of this jsonl; at {per_core:,.0f} tokens/s per core: "
          f"{TEN_BILLION / per_core / 8 / 3600:.1f} h on 8 cores, "
          f"{TEN_BILLION / per_core / 64 / 3600:.2f} h on 64; disk: {2 * TEN_BILLION / 1e9:.0f} GB "
          f"of uint16 ids, twice that while the pieces are joined")

if __name__ == "__main__":
    main()
