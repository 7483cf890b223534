"""evaluate.py --tasks against lm-evaluation-harness on the same model, items and machine.

`python benchmarks/compare_lm_eval.py --checkpoint RUN/gpt_final.pt --tasks piqa,winogrande
--tasks_dir DIR [--limit N] [--lm_eval /path/to/lm_eval] [--work DIR]`

1. exports the checkpoint (export.py) and writes, for each task, the local lm-eval task of its
   format (benchmarks/lm_eval_tasks/<task>_jsonl.yaml) reading the very file evaluate.py finds;
2. runs `evaluate.py --tasks ... --results` and `lm_eval --model hf` on the export (zero-shot,
   float32, the CPU unless --device says otherwise), each as a whole process, timed from start to
   exit, start-up included, and prints items per second for both;
3. prints per task both programs' acc and acc_norm, and the items on which they disagree (each
   item's verdict from evaluate.py's per-item results and lm-eval's --log_samples).
lm-eval is not a dependency of this project: install it in a virtual environment of its own
(benchmarks/README.md says how) and pass its `lm_eval` with --lm_eval.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's modules

from config import ArgumentParser, fail  # noqa: E402
from gpt_train.cli import run_main  # noqa: E402
from gpt_train.tasks import find_task_file, parse_task_names  # noqa: E402

TASK_YAMLS = REPO / "benchmarks" / "lm_eval_tasks"


def parse_compare_args(argv=None):
    parser = ArgumentParser(description="evaluate.py --tasks against lm-evaluation-harness.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file of a run")
    parser.add_argument("--tasks", default="hellaswag,piqa,arc_easy,winogrande,lambada_openai")
    parser.add_argument("--tasks_dir", required=True)
    parser.add_argument("--limit", type=int, default=0, help="first N items of each task")
    parser.add_argument("--lm_eval", default="lm_eval", help="lm-evaluation-harness's command")
    parser.add_argument("--batch_size", type=int, default=32, help="for both programs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="compare_lm_eval", help="directory for the export, "
                        "the task files and both programs' results")
    return parser.parse_args(argv)


def write_task_yamls(names, tasks_dir, directory):
    """The local lm-eval task of each name, reading the file evaluate.py finds."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        template = TASK_YAMLS / f"{name}_jsonl.yaml"
        if not template.is_file():
            fail(f"no lm-eval task for {name}: benchmarks/lm_eval_tasks has "
                 f"{sorted(p.stem for p in TASK_YAMLS.glob('*.yaml'))}")
        path = find_task_file(name, tasks_dir).resolve()
        text = re.sub(r"(?m)^(    test: ).*$", lambda m: m.group(1) + json.dumps(str(path)),
                      template.read_text())
        (directory / template.name).write_text(text)
    for helper in TASK_YAMLS.glob("*.py"):
        (directory / helper.name).write_text(helper.read_text())


def timed(command, log):
    """Run `command` as a whole process; its wall seconds. Its output goes to `log`."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                cwd=REPO).returncode
    seconds = time.perf_counter() - start
    if status:
        fail(f"{command[0]} {command[1]} exited with status {status}; see {log}")
    return seconds


def lm_eval_verdicts(output_path, names):
    """{task: {"acc": [...], "acc_norm": [...]}} per doc, in the file's order, from the samples
    lm-eval logged."""
    verdicts = {}
    for name in names:
        files = sorted(Path(output_path).rglob(f"samples_{name}_jsonl_*.jsonl"))
        if not files:
            fail(f"lm-eval logged no samples of {name}_jsonl under {output_path}")
        samples = sorted((json.loads(line) for line in files[-1].read_text().splitlines()
                          if line.strip()), key=lambda sample: sample["doc_id"])
        verdicts[name] = {key: [int(sample[key]) for sample in samples if key in sample]
                          for key in ("acc", "acc_norm")}
    return verdicts


def lm_eval_figures(output_path, name):
    """lm-eval's aggregated figures of one task, from its newest results file."""
    files = sorted(Path(output_path).rglob("results_*.json"))
    return json.loads(files[-1].read_text())["results"][f"{name}_jsonl"]


def compare(ours, theirs, names):
    """A line per task: both programs' figures and the items where their verdicts differ."""
    print(f"{'task':<16} {'items':>6}  {'acc ours':>9} {'lm-eval':>9}  "
          f"{'acc_norm ours':>13} {'lm-eval':>9}  items that differ (acc, acc_norm)")
    for name in names:
        mine, other = ours["tasks"][name]["per_item"], theirs[name]
        line = f"{name:<16} {len(mine['acc']):>6}"
        differ = []
        for key in ("acc", "acc_norm"):
            if not other[key]:
                line += f"  {'-':>9} {'-':>9}" if key == "acc" else f"  {'-':>13} {'-':>9}"
                differ.append("-")
                continue
            width = 9 if key == "acc" else 13
            line += (f"  {100 * sum(mine[key]) / len(mine[key]):>{width - 1}.2f}%"
                     f" {100 * sum(other[key]) / len(other[key]):>8.2f}%")
            differ.append(str(sum(a != b for a, b in zip(mine[key], other[key])) +
                              abs(len(mine[key]) - len(other[key]))))
        print(f"{line}  {', '.join(differ)}")


def main(argv=None):
    args = parse_compare_args(argv)
    names = parse_task_names(args.tasks)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    export_dir, task_dir = work / "export", work / "lm_eval_tasks"
    subprocess.run([sys.executable, "export.py", "--checkpoint", args.checkpoint, "--out",
                    str(export_dir), "--overwrite", "true"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    write_task_yamls(names, args.tasks_dir, task_dir)
    limit = ["--limit", str(args.limit)] if args.limit else []
    ours_seconds = timed([sys.executable, "evaluate.py", "--checkpoint", args.checkpoint,
                          "--tasks", ",".join(names), "--tasks_dir", args.tasks_dir,
                          "--batch_size", str(args.batch_size), "--device", args.device,
                          "--results", str(work / "ours.json"), *limit], work / "ours.log")
    lm_eval_seconds = timed([args.lm_eval, "--model", "hf", "--model_args",
                             f"pretrained={export_dir},dtype=float32", "--tasks",
                             ",".join(f"{name}_jsonl" for name in names), "--include_path",
                             str(task_dir), "--device", args.device, "--batch_size",
                             str(args.batch_size), "--log_samples", "--output_path",
                             str(work / "lm_eval"), *limit], work / "lm_eval.log")
    ours = json.loads((work / "ours.json").read_text())
    items = sum(task["items"] for task in ours["tasks"].values())
    print(f"{items} items: evaluate.py {ours_seconds:.1f} s ({items / ours_seconds:.1f} items/s), "
          f"lm-eval {lm_eval_seconds:.1f} s ({items / lm_eval_seconds:.1f} items/s), whole "
          f"processes; evaluate.py {lm_eval_seconds / ours_seconds:.2f}x lm-eval's items/s")
    compare(ours, lm_eval_verdicts(work / "lm_eval", names), names)
    for name in names:
        if "perplexity" in ours["tasks"][name]:
            theirs = lm_eval_figures(work / "lm_eval", name).get("perplexity,none")
            print(f"{name} perplexity: ours {ours['tasks'][name]['perplexity']:.6g}, "
                  f"lm-eval {theirs:.6g}")


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task files are local
    run_main(main)
