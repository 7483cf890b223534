"""Several training runs in one torchrun launch: `launch([argv, argv, ...], cwd)`.

Starting the processes and importing torch in each costs far more than a tiny run, so the tests
that compare several multi-process runs start them once. Under torchrun, this file runs
`train.train(argv)` for each argv in turn; the process group is joined by the first run and kept
for the next ones (train.train would leave it after each), then left at the end. A run that
fails ends the launch with its exit status.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch(argvs, cwd):
    """Run train.py with each of `argvs` in one torchrun launch of 2 CPU processes; the finished
    launch."""
    from conftest import torchrun
    return torchrun([__file__, json.dumps([list(map(str, argv)) for argv in argvs])], cwd)


def main(argvs):
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    import train
    from gpt_train.cli import run_main

    leave = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None  # kept for the next run
    try:
        for argv in argvs:
            run_main(train.train, argv)
    finally:
        dist.destroy_process_group = leave
        if dist.is_initialized():
            leave()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
