"""Where a run's metrics go: metrics.jsonl, TensorBoard and Weights & Biases (`--log_to`).

Every destination receives the same records (the dicts train.py's `log_step` builds) at the same
steps, and only rank 0 writes. A resumed run continues the same history: records after the
resumed step are dropped from metrics.jsonl. What is measured, and when, is train.py's business.
"""

import json


class MetricsLog:
    """One JSON object per line in checkpoint_dir/metrics.jsonl, written by rank 0 only."""

    def __init__(self, path, runtime):
        self.path = path
        self.enabled = runtime.is_main

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def trim_after(self, step):
        """Drop records after `step` so the file tells one consistent history; mark the resume."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        kept.append(json.dumps({"step": step, "event": "resume"}))
        self.path.write_text("\n".join(kept) + "\n")
