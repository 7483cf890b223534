"""Muon on several CPU processes against one: `python benchmarks/bench_muon_ranks.py`.

Prints two tables from torchrun launches of train.py with --optimizer muon (gloo):
1. equal training: for each of --processes (by default 2 and 4), a DDP and an FSDP run of that
   many processes with batch 8 each, and one process with the whole global batch; the losses at
   every logged step side by side, the largest loss difference and the largest final weight
   difference (with and without the attention's key biases, whose exact gradient is zero);
2. exact resume: a DDP and an FSDP run of --kill_processes processes, killed (SIGKILL, the whole
   process group) once the step --kill_at checkpoint exists, then the same command with
   --resume auto, against the uninterrupted run of table 1: final weights equal bit for bit?
Runs go to a temporary directory, deleted afterwards. The model and flags are bench_fsdp.py's.
"""

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_fsdp import (REPOSITORY, TINY_TEXT, largest_difference, records, torchrun,
                        train_argv, weights)

MUON = ["--optimizer", "muon", "--muon_weight_decay", "0.1"]


def run(root, corpus, args, processes, parallel, *extra, name=None, wait=True):
    """A Muon run of `processes` processes (batch 8 each, unless `extra` flags say otherwise):
    (its directory, its output, or with wait=False the running torchrun)."""
    directory = root / (name or f"{parallel}{processes}")
    argv = train_argv(directory, corpus, args.steps, parallel, *MUON, *extra)
    return directory, torchrun(processes, REPOSITORY / "train.py", argv, root, wait=wait)


def equal_training(root, corpus, args):
    print("1. Muon on N processes (batch 8 each) against 1 process (batch 8 x N)")
    for processes in args.processes:
        one, _ = run(root, corpus, args, 1, "ddp", "--batch_size", 8 * processes,
                     name=f"one{processes}")
        runs = {parallel: run(root, corpus, args, processes, parallel)[0]
                for parallel in ("ddp", "fsdp")}
        logged = {name: records(directory) for name, directory in
                  {"one": one, **runs}.items()}
        print(f"\n{processes} processes, {args.steps} steps")
        print("| step | 1 process | ddp | fsdp | ddp - 1 | fsdp - 1 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for single, ddp, fsdp in zip(logged["one"], logged["ddp"], logged["fsdp"]):
            print(f"| {single['step']} | {single['loss']:.6f} | {ddp['loss']:.6f} | "
                  f"{fsdp['loss']:.6f} | {ddp['loss'] - single['loss']:.1e} | "
                  f"{fsdp['loss'] - single['loss']:.1e} |")
        reference = weights(one / "gpt_final.pt")
        for parallel, directory in runs.items():
            worst = max(abs(a["loss"] - b["loss"])
                        for a, b in zip(logged[parallel], logged["one"]))
            ours = weights(directory / "gpt_final.pt")
            final, name, size = largest_difference(ours, reference)
            rest, rest_name, _ = largest_difference(ours, reference, skip_key_biases=True)
            print(f"{parallel}: largest loss difference {worst:.2e}; largest final weight "
                  f"difference {final:.2e} in {name} (whose largest weight is {size:.3f}), "
                  f"{rest:.2e} without the key biases (in {rest_name}); validation loss "
                  f"{logged[parallel][-1]['val_loss']:.6f} against "
                  f"{logged['one'][-1]['val_loss']:.6f}")
    print()


def exact_resume(root, corpus, args):
    print(f"2. Muon on {args.kill_processes} processes, killed after its step-{args.kill_at} "
          f"checkpoint, then --resume auto")
    for parallel, written in (("ddp", f"gpt_step{args.kill_at}.pt"),
                              ("fsdp", f"gpt_step{args.kill_at}")):
        directory, killed = run(root, corpus, args, args.kill_processes, parallel,
                                "--resume", "auto", name=f"{parallel}-killed", wait=False)
        while not (directory / written).exists() and killed.poll() is None:
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        left = sorted(p.name for p in directory.iterdir() if p.name.startswith("gpt_"))
        argv = train_argv(directory, corpus, args.steps, parallel, *MUON, "--resume", "auto")
        torchrun(args.kill_processes, REPOSITORY / "train.py", argv, root)
        uninterrupted = root / f"{parallel}{args.kill_processes}"
        if not uninterrupted.exists():
            run(root, corpus, args, args.kill_processes, parallel)
        resumed = weights(directory / "gpt_final.pt")
        whole = weights(uninterrupted / "gpt_final.pt")
        same = all(torch.equal(resumed[name], whole[name]) for name in whole)
        later = [r["loss"] for r in records(uninterrupted) if r["step"] > args.kill_at]
        logged = [r["loss"] for r in records(directory) if r["step"] > args.kill_at][-len(later):]
        print(f"{parallel}: killed with {', '.join(left)} written; final weights bit-identical "
              f"to the uninterrupted run: {same}; losses after step {args.kill_at} identical: "
              f"{logged == later}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--kill_at", type=int, default=30)
    parser.add_argument("--kill_processes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        corpus = Path(temporary) / "corpus.txt"
        corpus.write_text(TINY_TEXT, encoding="utf-8")
        for table in (equal_training, exact_resume):
            table(corpus.parent, corpus, args)


if __name__ == "__main__":
    sys.exit(main())
