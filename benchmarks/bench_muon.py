"""Time Muon's step alone: `python benchmarks/bench_muon.py [train.py model flags] [--steps K]`.

The Muon half of `--optimizer muon` (optim.py's MuonWithAdamW, the blocks' matrices only) and
`torch.optim.Muon` (PyTorch >= 2.9) with the same settings, on the same matrices with fixed random
gradients, in turn for --repeats rounds of K steps; the fastest round of each is reported, in ms
per step. The default model is the CPU speedrun's (recipes/cpu_speedrun.toml); give --config or
model flags for another. It also prints the dtype the Newton-Schulz iteration runs in here.
"""

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import torch  # noqa: E402

from gpt_train.cli import run_main  # noqa: E402
from config import (GPTConfig, TrainConfig, apply_args_to_configs, build_parser,  # noqa: E402
                    fail, parse_args)
from model import build_model  # noqa: E402
from gpt_train.optim import configure_optimizer, newton_schulz_dtype  # noqa: E402

SPEEDRUN_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cpu_speedrun.toml"


def parse_bench_args(argv=None):
    parser = build_parser("Time Muon's step, ours and torch.optim.Muon.")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=int, default=30, help="optimizer steps per round (K)")
    group.add_argument("--repeats", type=int, default=5, help="rounds of each; the fastest counts")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(SPEEDRUN_RECIPE), *argv]
    args = parse_args(argv, parser)
    if args.steps <= 0 or args.repeats <= 0:
        fail("--steps and --repeats must be positive")
    return args


def seconds_per_step(optimizer, steps):
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_bench_args(argv)
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
    optimizers = {"ours (optim.py)": ours}
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


if __name__ == "__main__":
    run_main(main)
