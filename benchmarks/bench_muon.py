"""Time Muon's step alone: `python benchmarks/bench_muon.py [train.py model flags] [--steps K]`.

The Muon half of `--optimizer muon` (muon.py's MuonWithAdamW, the blocks' matrices only) and
`torch.optim.Muon` (PyTorch >= 2.9) with the same settings, on the same matrices with fixed random
gradients, in turn for --repeats rounds of K steps; the fastest round of each is reported, in ms
per step. The default model is the CPU speedrun's (recipes/cpu_speedrun.toml); give --config or
model flags for another. It also prints the dtype the Newton-Schulz iteration runs in here.

With `--processes 1 2 4` it times the step on that many CPU processes instead (torchrun, gloo),
by default on the GPT-2 124M shape's 48 matrices: each rank's step when every rank orthogonalises
every matrix (the step before the work was shared, which is what a process that shares nothing
still does), when the ranks share the work with DDP's whole gradients, and when they share it
with FSDP's row slices; and the Newton-Schulz FLOPs each rank does. Each process takes
cores / processes threads (at least 1): more processes than cores share them.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import torch  # noqa: E402

from gpt_train.cli import run_main  # noqa: E402
from config import (GPTConfig, TrainConfig, apply_args_to_configs, build_parser,  # noqa: E402
                    fail, parse_args)
from model import build_model  # noqa: E402
from gpt_train.muon import (MuonWithAdamW, NewtonSchulzWork, format_flops,  # noqa: E402
                            newton_schulz_dtype, row_range)
from gpt_train.optim import configure_optimizer  # noqa: E402

SPEEDRUN_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cpu_speedrun.toml"
GPT2_SHAPE = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768"]  # the 124M model


def parse_bench_args(argv=None):
    parser = build_parser("Time Muon's step, ours and torch.optim.Muon.")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=int, default=30, help="optimizer steps per round (K)")
    group.add_argument("--repeats", type=int, default=5, help="rounds of each; the fastest counts")
    group.add_argument("--processes", type=int, nargs="+",
                       help="time the step on each of these numbers of CPU processes (torchrun), "
                            "every rank orthogonalising every matrix against the shared work; "
                            "by default on the GPT-2 124M shape")
    group.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = [*GPT2_SHAPE, *argv] if "--processes" in argv or "--worker" in argv else \
            ["--config", str(SPEEDRUN_RECIPE), *argv]
    args = parse_args(argv, parser)
    if args.steps <= 0 or args.repeats <= 0 or any(n <= 0 for n in getattr(args, "processes", [])):
        fail("--steps, --repeats and --processes must be positive")
    args.model_argv = without_processes(argv)  # for the workers
    return args


def without_processes(argv):
    """`argv` without --worker, and without --processes and its numbers."""
    kept, skipping = [], False
    for flag in argv:
        skipping = flag == "--processes" or (skipping and flag.isdigit())
        if not skipping and flag != "--worker":
            kept.append(flag)
    return kept


def seconds_per_step(optimizer, steps):
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_bench_args(argv)
    if getattr(args, "worker", False):
        return time_on_ranks(args)
    if getattr(args, "processes", None):
        return compare_on_processes(args)
    gpt_config, train_config = apply_args_to_configs(args, GPTConfig(vocab_size=65), TrainConfig())
    t = train_config
    model = build_model(gpt_config)
    hidden = [p for name, p in model.named_parameters()
              if p.dim() == 2 and name.startswith("blocks.")]
    generator = torch.Generator().manual_seed(0)
    for p in hidden:
        p.grad = torch.randn(p.shape, generator=generator)
    ours = configure_optimizer(model, dataclasses.replace(t, optimizer="muon"))
    ours.param_groups[:] = [group for group in ours.param_groups if group["muon"]]
    optimizers = {"ours (muon.py)": ours}
    if hasattr(torch.optim, "Muon"):
        optimizers["torch.optim.Muon"] = torch.optim.Muon(
            hidden, lr=t.muon_learning_rate, momentum=t.muon_momentum, nesterov=True,
            weight_decay=t.muon_weight_decay, adjust_lr_fn="original")
    for optimizer in optimizers.values():
        seconds_per_step(optimizer, 3)  # state and allocator warm-up
    times = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            times[name].append(seconds_per_step(optimizer, args.steps))

    dtypes = {tuple(p.shape): str(newton_schulz_dtype(p.detach()[None])).removeprefix("torch.")
              for p in hidden}
    print(f"Muon's step over {len(hidden)} matrices, {args.repeats} rounds of {args.steps} steps, "
          f"{torch.get_num_threads()} threads; Newton-Schulz here in "
          + ", ".join(f"{dtype} for {rows} x {columns}"
                      for (rows, columns), dtype in sorted(dtypes.items())))
    for name, rounds in times.items():
        print(f"{name}: {1000 * min(rounds):.2f} ms/step "
              f"(rounds: {', '.join(f'{1000 * s:.2f}' for s in rounds)})")
    if "torch.optim.Muon" not in optimizers:
        print("torch.optim.Muon: not in this PyTorch (it needs 2.9 or later)")




def compare_on_processes(args):
    """Time the step on each number of processes (a torchrun launch each); print one table."""
    print(f"Muon's step on CPU processes (gloo) on {os.cpu_count()} cores: each rank's seconds "
          f"per step (the slowest rank's; {args.steps} step(s) after an untimed one), and the "
          f"Newton-Schulz FLOPs per rank")
    print("| processes | threads each | every rank all matrices | shared, ddp | shared, fsdp | "
          "FLOPs per rank, all matrices | shared, the busiest rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    lines = []
    for processes in args.processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", __file__, "--worker", *args.model_argv]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            fail(f"{processes} processes failed: {finished.stderr.strip()[-2000:]}")
        row = json.loads(finished.stdout.strip().splitlines()[-1])
        print(f"| {processes} | {row['threads']} | {row['all']:.2f} s | {row['ddp']:.2f} s | "
              f"{row['fsdp']:.2f} s | {format_flops(row['all_flops'])} | "
              f"{format_flops(row['shared_flops'])} |")
        lines.append(row["line"])
    print("\n".join(["", "The start lines:", *lines]))


def time_on_ranks(args):
    """Under torchrun: this rank's seconds per step when it orthogonalises every matrix, and when
    the ranks share the work (whole gradients, as under DDP; row slices, as under FSDP). Rank 0
    prints every rank's slowest figures as one JSON line."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    gpt_config, _ = apply_args_to_configs(args, GPTConfig(vocab_size=65), TrainConfig())
    world_size = int(os.environ["WORLD_SIZE"])
    threads = max(1, os.cpu_count() // world_size)
    torch.set_num_threads(threads)
    layers = muon_layers(gpt_config)
    # before the process group exists, the optimizer shares nothing: every matrix here
    seconds = {"all": rank_seconds_per_step(muon_optimizer(layers), args.steps)}
    dist.init_process_group("gloo")
    seconds["ddp"] = rank_seconds_per_step(muon_optimizer(layers), args.steps, dist.barrier)
    gradients = [layer.weight.grad for layer in layers]
    for layer, gradient in zip(layers, gradients):
        fully_shard(layer)
        layer.weight.grad = torch.zeros_like(layer.weight)  # this rank's rows of the gradient
        rows = slice(*row_range(gradient.size(0), dist.get_rank(), world_size))
        layer.weight.grad.to_local().copy_(gradient[rows])
    seconds["fsdp"] = rank_seconds_per_step(muon_optimizer(layers), args.steps, dist.barrier)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, seconds)
    if dist.get_rank() == 0:
        work = NewtonSchulzWork.balanced([tuple(layer.weight.shape) for layer in layers],
                                         world_size, steps=5)
        print(json.dumps({**{name: max(rank[name] for rank in everyone) for name in seconds},
                          "threads": threads, "all_flops": work.flops(0) if world_size == 1
                          else sum(work.flops(rank) for rank in range(world_size)),
                          "shared_flops": max(work.flops(rank) for rank in range(world_size)),
                          "line": work.describe()}))
    dist.destroy_process_group()


def muon_layers(gpt_config):
    """A bias-free linear layer for each of the model's Muon matrices (the blocks' 2-D weights),
    with a fixed random gradient."""
    with torch.device("meta"):  # the shapes only: nothing is allocated
        shapes = [tuple(p.shape) for name, p in build_model(gpt_config).named_parameters()
                  if p.dim() == 2 and name.startswith("blocks.")]
    generator = torch.Generator().manual_seed(0)
    layers = torch.nn.ModuleList()
    for rows, columns in shapes:
        layer = torch.nn.Linear(columns, rows, bias=False)
        layer.weight.grad = torch.randn(rows, columns, generator=generator)
        layers.append(layer)
    return layers


def muon_optimizer(layers):
    return MuonWithAdamW([{"params": [layer.weight for layer in layers], "muon": True}],
                         lr=0.02)


def rank_seconds_per_step(optimizer, steps, barrier=None):
    """Seconds per step of this rank; with `barrier`, every timed step starts on every rank at
    once, so the shared steps include waiting for the slowest rank's matrices."""
    optimizer.step()  # untimed: it also allocates the momentum
    total = 0.0
    for _ in range(steps):
        if barrier:
            barrier()
        start = time.perf_counter()
        optimizer.step()
        total += time.perf_counter() - start
    return total / steps


if __name__ == "__main__":
    run_main(main)
