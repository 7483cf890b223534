#!/usr/bin/env bash
# The README's "CPU speedrun": train on DATA (tiny Shakespeare) with recipes/cpu_speedrun.toml,
# then report the training's wall time and the final model's validation loss.
# Usage: benchmarks/cpu_speedrun.sh DATA [OUT_DIR] [extra train.py flags]
# OUT_DIR (default: a new temporary directory) receives the checkpoints, metrics.jsonl and the
# token cache. Extra flags override the recipe's values (for quick smoke runs); another recipe
# is `--config recipes/nanogpt_cpu.toml`.
# - wall time: the whole `python train.py` process, start-up and tokenizing included (the token
#   cache starts empty in OUT_DIR);
# - validation loss: evaluate.py on gpt_final.pt, in float32, over the whole validation split
#   (the last --val_fraction 0.1 of the text), every token scored once. It runs after the clock
#   stops: measuring the result is not part of producing it.
set -euo pipefail
export PYTHONUNBUFFERED=1

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DATA [OUT_DIR] [extra train.py flags]" >&2
    exit 2
fi
DATA=$1
OUT_DIR=${2:-$(mktemp -d "${TMPDIR:-/tmp}/cpu_speedrun.XXXXXX")}
shift $(( $# >= 2 ? 2 : 1 ))
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -e "$OUT_DIR/metrics.jsonl" ]]; then
    echo "error: $OUT_DIR already holds a metrics.jsonl; give a new or empty OUT_DIR" >&2
    exit 2
fi

now() { "$PYTHON" -c 'import time; print(time.time())'; }

command=("$PYTHON" "$REPO/train.py" --config "$REPO/recipes/cpu_speedrun.toml" --data "$DATA"
         --checkpoint_dir "$OUT_DIR" --cache_dir "$OUT_DIR/token-cache" "$@")
echo "running: ${command[*]}"
start=$(now)
"${command[@]}"
end=$(now)

evaluation=$("$PYTHON" "$REPO/evaluate.py" --checkpoint "$OUT_DIR/gpt_final.pt" --device cpu \
             --dtype float32 | tee /dev/stderr)
"$PYTHON" - "$start" "$end" "$evaluation" "$OUT_DIR/metrics.jsonl" <<'PY'
import json, re, sys
start, end, evaluation, metrics = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
records = [json.loads(line) for line in open(metrics) if line.strip()]
estimate = [r for r in records if "val_loss" in r][-1]
loss = re.search(r"^loss (\d+\.\d+)", evaluation, re.MULTILINE).group(1)
print(f"wall time: {end - start:.1f} s (start-up included)")
print(f"in-run validation estimate: {estimate['val_loss']:.4f} at step {estimate['step']}")
print(f"final validation loss: {loss} (whole validation split, evaluate.py)")
PY
echo "checkpoints and metrics.jsonl in $OUT_DIR"
