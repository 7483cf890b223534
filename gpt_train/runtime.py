"""Where the computation runs: device, autocast dtype, random seeds and torchrun ranks.

Shared by train.py, sample.py, evaluate.py and the benchmarks, so that every entry point picks
devices the same way ('auto' = cuda, then mps, then cpu) and rejects a device the machine lacks
with the same message. Under torchrun, `setup_runtime` joins the process group (NCCL on CUDA, gloo
on the CPU). What a command says goes out on rank 0 only: results on stdout (`print0`), notes on
stderr (`note`); errors are cli.py's. `check_memory` compares what a command is about to allocate
with the memory there is, so a size that cannot fit is one line, not a traceback or the kernel's
OOM killer. What to do on the device is left to the callers.
"""

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from config import check_device, fail
from gpt_train.cli import ResourceError

# Peak dense bf16 FLOP/s (no sparsity) of common accelerators, matched against the device name.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10G", 125e12),
              ("L40S", 362e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
              ("V100", 125e12), ("T4", 65e12))


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def autocast(self):
        return autocast_context(self.device, self.dtype)


def autocast_context(device, dtype):
    """Mixed precision for the forward pass and loss; float32 means full precision (no autocast)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def print0(*args, **kwargs):
    """Print a result on rank 0 only (every process is rank 0 outside torchrun): what the run is
    and does, its records, samples and final figures, on stdout. Notes go through `note`."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def note(message):
    """A note for the user on rank 0: "note: MESSAGE" on stderr, where warnings and the progress
    bar go (a fallback taken, a setting adapted, a file skipped), so stdout holds results only."""
    print0(f"note: {message}", file=sys.stderr)


def set_seed(seed):
    """Seed every random source: Python, numpy, torch on the CPU and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def select_device(name, local_rank=0):
    """'auto' picks cuda, then mps, then cpu; a named device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name} was given but {why_no_cuda()}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name} was given but MPS is not available on this machine")
    return device


def why_no_cuda():
    """Why torch sees no CUDA device, and what to do: the build, or the machine."""
    if torch.version.cuda is None and torch.version.hip is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build "
                f"(the command for your system is at https://pytorch.org/get-started/locally/) "
                f"or use --device cpu")
    return (f"CUDA is not available on this machine (torch {torch.__version__} is built for "
            f"CUDA {torch.version.cuda or torch.version.hip}, but finds no GPU or driver)")


def available_memory(device):
    """Bytes that can still be allocated on `device`, or None when unknown.

    CUDA: the free device memory. Otherwise the host's: available RAM plus free swap, capped by
    the container's memory limit (cgroup v2 or v1) when there is one.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        free = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None  # not Linux: no estimate, allocation failures are still caught
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                free = min(free, int(limit.read()) - int(usage.read()))
        except (OSError, ValueError):  # no such file, or "max": no limit
            continue
    return free


def check_memory(needs):
    """A ResourceError naming the flags if any need does not fit where it is allocated.

    `needs` holds (what, the flags that set it, bytes, device) lower bounds: a need that exceeds
    the memory there is cannot fit, whatever else happens.
    """
    free = {}
    for what, flags, size, where in needs:
        if where not in free:
            free[where] = available_memory(where)
        if free[where] is not None and size > free[where]:
            raise ResourceError(f"{what} ({flags}) needs at least {format_bytes(size)} but "
                                f"{where} has {format_bytes(free[where])} available; use smaller "
                                f"sizes")


def format_bytes(size):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def select_dtype(name, device):
    """The autocast dtype. auto: bfloat16 on CUDA GPUs that have it, float16 on older ones,
    float32 on the CPU, where bfloat16 autocast makes small models slower (docs/performance.md)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def setup_runtime(train_config):
    """Join the process group under torchrun, seed, and pick this rank's device and dtype."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(train_config.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = restarted_attempt_store(world_size)
        own_store = {"store": store, "rank": rank, "world_size": world_size} if store else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, **own_store)
    set_seed(train_config.seed + rank)  # ranks differ in dropout; DDP copies rank 0's weights
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    runtime = Runtime(device, select_dtype(train_config.dtype, device), rank, world_size)
    print0(f"device: {device}" + (f" x {world_size} processes" if world_size > 1 else "")
           + f", dtype: {str(runtime.dtype).removeprefix('torch.')}")
    if device.type == "cpu" and not train_config.threads and (advice := busy_cores_note()):
        note(advice)
    return runtime


def busy_cores_note():
    """One line of advice when other processes keep the cores torch's threads would run on busy,
    else None. Each of torch's parallel operations waits for its slowest thread, so a thread that
    shares its core with another process holds up every step: fewer threads run faster then."""
    threads = torch.get_num_threads()
    if threads < 2 or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = os.getloadavg()[0]  # processes running or waiting to, over the last minute
    free = max(1, cores - int(busy))  # a core counts as taken once a whole core's worth is busy
    if free >= threads:
        return None
    return (f"this machine's {cores} cores are busy with other work (load average {busy:.1f}), "
            f"and torch's {threads} threads wait for each other on a busy core, so each step can "
            f"take several times as long; --threads {free} avoids that")


def restarted_attempt_store(world_size):
    """The key-value store for a process group that torchrun --max-restarts has restarted.

    torchrun keeps one store across restarts, and a restarted rank may read the address its dead
    predecessor left there and fail to connect (pytorch issue 135712). Under a prefix of its own,
    each attempt reads only its own keys. The restart count agrees between ranks only when one
    agent starts them all (one node); otherwise, and on a first attempt, None: the default store.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or os.environ.get("GROUP_WORLD_SIZE") != "1"):
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False)
    return dist.PrefixStore(f"attempt-{restart}/", shared)


def peak_flops(train_config, device):
    if train_config.peak_flops:
        return train_config.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS:
            if key in name:
                return flops
    return 0.0  # unknown: report tokens/s only


def random_states(device):
    """Every random generator's state, as plain tensors and lists a checkpoint can hold."""
    _, mt_state, position, *_ = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {"python": [version, list(internal), gauss],
              "numpy": torch.from_numpy(mt_state.astype(np.int64)), "numpy_position": int(position),
              "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_random_states(states, device):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32),
                         states["numpy_position"]))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
