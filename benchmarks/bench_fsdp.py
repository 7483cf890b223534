"""--parallel fsdp against ddp on CPU processes (gloo): `python benchmarks/bench_fsdp.py`.

Prints three tables, each from torchrun launches of train.py (or of this script as a worker):
1. equal training: a DDP and an FSDP run of --processes processes and --steps steps, their
   losses at every logged step and their final weights side by side;
2. exact resume: an FSDP run killed (SIGKILL, the whole process group) once its step
   --kill_at checkpoint exists, then the same command with --resume auto, against the
   uninterrupted FSDP run of table 1: its final weights must be equal bit for bit;
3. memory: the bytes of parameters, gradients and AdamW state that each rank holds after one
   optimizer step, measured from the tensors, with 2 and 4 processes (--memory_processes), for
   DDP and FSDP, and the figure train.py's start line predicts.
Runs go to a temporary directory, deleted afterwards. No speed is measured here: on CPU
processes sharing a few cores, step times say nothing about GPUs.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

TINY_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n"
                    for i in range(400))
MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32",
         "--batch_size", "8", "--grad_accum_steps", "2", "--device", "cpu", "--dropout", "0.0"]
MEMORY_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512)


def torchrun(processes, script, argv, cwd, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(script), *map(str, argv)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:  # its own process group, so that a SIGKILL reaches every rank at once
        return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    finished = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"torchrun {script.name} {' '.join(map(str, argv))} failed:\n"
                 f"{finished.stderr[-3000:]}")
    return finished.stdout


def records(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def largest_difference(ours, reference, skip_key_biases=False):
    """(the largest difference of any weight, the tensor it is in, that tensor's largest size);
    `skip_key_biases`: leaving out the attention's key biases, whose exact gradient is zero."""
    width = ours["ln_f.weight"].numel()
    differences = []
    for name in ours:
        difference = (ours[name] - reference[name]).abs()
        if skip_key_biases and name.endswith("attn.qkv.bias"):
            difference[width:2 * width] = 0
        differences.append((difference.max().item(), name, reference[name].abs().max().item()))
    return max(differences)


def train_argv(directory, corpus, steps, parallel, *extra):
    return ["--data", corpus, "--cache_dir", directory.parent / "token-cache",
            "--checkpoint_dir", directory, *MODEL, "--max_iters", steps, "--warmup_iters", 5,
            "--log_iter", 5, "--eval_iter", steps, "--save_iter", 10, "--eval_batches", 2,
            "--parallel", parallel, *extra]


def equal_training(root, corpus, args):
    print(f"1. {args.processes} processes, {args.steps} steps: FSDP against DDP")
    for parallel in ("ddp", "fsdp"):
        torchrun(args.processes, REPOSITORY / "train.py",
                 train_argv(root / parallel, corpus, args.steps, parallel), root)
    ddp, fsdp = records(root / "ddp"), records(root / "fsdp")
    print(f"{'step':>5} {'DDP loss':>10} {'FSDP loss':>10} {'difference':>11}")
    worst = 0.0
    for a, b in zip(ddp, fsdp):
        worst = max(worst, abs(a["loss"] - b["loss"]))
        print(f"{a['step']:>5} {a['loss']:>10.6f} {b['loss']:>10.6f} {b['loss'] - a['loss']:>11.2e}")
    ours, reference = weights(root / "fsdp" / "gpt_final.pt"), weights(root / "ddp" / "gpt_final.pt")
    final, name, size = largest_difference(ours, reference)
    print(f"largest loss difference {worst:.2e}; largest final weight difference {final:.2e}, "
          f"in {name} (whose largest weight is {size:.3f})")
    final, name, size = largest_difference(ours, reference, skip_key_biases=True)
    print(f"without the attention's key biases (their exact gradient is zero): {final:.2e}, "
          f"in {name} (whose largest weight is {size:.3f})")
    print(f"validation loss: DDP {ddp[-1]['val_loss']:.6f}, FSDP {fsdp[-1]['val_loss']:.6f}\n")


def exact_resume(root, corpus, args):
    print(f"2. FSDP killed after its step-{args.kill_at} checkpoint, then --resume auto")
    directory = root / "killed"
    argv = train_argv(directory, corpus, args.steps, "fsdp", "--resume", "auto")
    run = torchrun(args.processes, REPOSITORY / "train.py", argv, root, wait=False)
    while not (directory / f"gpt_step{args.kill_at}").exists() and run.poll() is None:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    left = sorted(p.name for p in directory.iterdir() if p.name.startswith("gpt_"))
    print(f"killed: the directory held {', '.join(left)}")
    torchrun(args.processes, REPOSITORY / "train.py", argv, root)
    resumed = weights(directory / "gpt_final.pt")
    whole = weights(root / "fsdp" / "gpt_final.pt")
    import torch
    same = all(torch.equal(resumed[name], whole[name]) for name in whole)
    later = [r["loss"] for r in records(root / "fsdp") if r["step"] > args.kill_at]
    logged = [r["loss"] for r in records(directory) if r["step"] > args.kill_at][-len(later):]
    print(f"final weights bit-identical to the uninterrupted run: {same}; losses after step "
          f"{args.kill_at} identical: {logged == later}\n")


def memory(root, args):
    print("3. bytes per rank after one optimizer step: parameters + gradients + AdamW state")
    print(f"{'processes':>9} {'parallel':>8} {'parameters':>11} {'gradients':>10} "
          f"{'AdamW':>10} {'total':>10} {'predicted':>10} {'of DDP':>7}")
    for processes in args.memory_processes:
        totals = {}
        for parallel in ("ddp", "fsdp"):
            output = torchrun(processes, Path(__file__), ["--worker", parallel], root)
            figures = json.loads(output.strip().splitlines()[-1])
            totals[parallel] = sum(figures["measured"])
            parameters, gradients, state = figures["measured"]
            print(f"{processes:>9} {parallel:>8} {parameters:>11,} {gradients:>10,} {state:>10,} "
                  f"{totals[parallel]:>10,} {figures['predicted']:>10,} "
                  f"{totals[parallel] / totals['ddp']:>7.3f}")
    print()


def memory_worker(parallel):
    """Under torchrun: one optimizer step, then the largest rank's bytes as one JSON line."""
    import torch
    import torch.distributed as dist
    from config import GPTConfig, TrainConfig
    from model import build_model
    from gpt_train.optim import configure_optimizer
    from gpt_train.parallel import bytes_per_rank, make_parallel, measured_bytes
    from gpt_train.runtime import setup_runtime

    train_config = TrainConfig(device="cpu", parallel=parallel)
    runtime = setup_runtime(train_config)
    model = build_model(GPTConfig(**MEMORY_MODEL))
    wrapped = make_parallel(train_config, runtime).wrap(model)
    optimizer = configure_optimizer(model, train_config)
    tokens = torch.randint(0, MEMORY_MODEL["vocab_size"], (4, MEMORY_MODEL["block_size"]))
    wrapped(input_ids=tokens, labels=tokens, return_logits=False).loss.backward()
    optimizer.step()
    measured = list(measured_bytes(model, optimizer))
    parameters, gradients, state, _ = bytes_per_rank(model)
    everyone = [None] * runtime.world_size
    dist.all_gather_object(everyone, (sum(measured), measured, parameters + gradients + state))
    if runtime.is_main:
        _, measured, predicted = max(everyone)
        print(json.dumps({"measured": measured, "predicted": predicted}))
    del wrapped  # a DDP wrapper outliving its process group hangs the exit of a rank
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--kill_at", type=int, default=30)
    parser.add_argument("--memory_processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return memory_worker(args.worker)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        corpus = root / "corpus.txt"
        corpus.write_text(TINY_TEXT, encoding="utf-8")
        equal_training(root, corpus, args)
        exact_resume(root, corpus, args)
        memory(root, args)
    print("4. GPU step time, FSDP on one GPU against DDP on one GPU: unmeasured (no GPU here)")


if __name__ == "__main__":
    main()
