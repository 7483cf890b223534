#!/usr/bin/env bash
# The README's "CPU speedrun": train on DATA (tiny Shakespeare) and report wall time and final
# validation loss. Usage: benchmarks/cpu_speedrun.sh DATA [OUT_DIR] [extra train.py flags]
# OUT_DIR (default: a new temporary directory) receives the checkpoints and metrics.jsonl.
# Extra flags come after the recipe's and override them (for quick smoke runs).
# The wall time covers the whole `python train.py` process, start-up included. The final
# validation loss is train.py's evaluation after the last step: the last 10% of the text
# (--val_fraction 0.1), over --eval_batches 200 evenly spaced batches.
set -euo pipefail
export PYTHONUNBUFFERED=1

# ---- the speedrun recipe: the README quotes these flags; tune them here -------------------------
# Starting point: nanoGPT's CPU recipe for tiny Shakespeare (char-level).
SPEEDRUN_FLAGS=(
    --tokenizer char --val_fraction 0.1
    --n_layer 4 --n_head 4 --n_embd 128 --block_size 64 --dropout 0.0
    --batch_size 12 --max_iters 2000
    --learning_rate 1e-3 --warmup_iters 100 --min_lr_ratio 0.1 --betas 0.9 0.99
    --weight_decay 0.1 --grad_clip 1.0
    --device cpu --dtype float32 --compile false
    --eval_iter 2000 --eval_batches 200 --log_iter 100 --save_iter 2000
)
# -------------------------------------------------------------------------------------------------

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DATA [OUT_DIR] [extra train.py flags]" >&2
    exit 2
fi
DATA=$1
OUT_DIR=${2:-$(mktemp -d "${TMPDIR:-/tmp}/cpu_speedrun.XXXXXX")}
shift $(( $# >= 2 ? 2 : 1 ))
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command=("$PYTHON" "$REPO/train.py" --data "$DATA" "${SPEEDRUN_FLAGS[@]}" --checkpoint_dir "$OUT_DIR" "$@")
echo "running: ${command[*]}"
start=$("$PYTHON" -c 'import time; print(time.time())')
"${command[@]}"
end=$("$PYTHON" -c 'import time; print(time.time())')

"$PYTHON" - "$OUT_DIR/metrics.jsonl" "$start" "$end" <<'PY'
import json, sys
path, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
records = [json.loads(line) for line in open(path) if line.strip()]
final = [r for r in records if "val_loss" in r][-1]
print(f"wall time: {end - start:.1f} s (start-up included)")
print(f"final validation loss: {final['val_loss']:.4f} at step {final['step']}")
PY
echo "checkpoints and metrics.jsonl in $OUT_DIR"
