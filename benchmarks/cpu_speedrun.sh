#!/usr/bin/env bash
# The README's "CPU speedrun": train on DATA (tiny Shakespeare), then report the training's wall
# time and the final model's validation loss.
# Usage: benchmarks/cpu_speedrun.sh DATA [OUT_DIR] [extra train.py flags]
# OUT_DIR (default: a new temporary directory) receives the checkpoints, metrics.jsonl and the
# token cache. Extra flags come after the recipe's and override them (for quick smoke runs).
# - wall time: the whole `python train.py` process, start-up and tokenizing included (the token
#   cache starts empty in OUT_DIR);
# - validation loss: evaluate.py on gpt_final.pt, in float32, over the whole validation split
#   (the last --val_fraction 0.1 of the text), every token scored once. It runs after the clock
#   stops: measuring the result is not part of producing it.
set -euo pipefail
export PYTHONUNBUFFERED=1

# ---- the speedrun recipe: the README quotes these flags; tune them here -------------------------
# nanoGPT's CPU recipe for tiny Shakespeare (char-level, 4 layers x 128 wide, context 64, batch
# 12), trained harder and shorter: a 4x higher peak learning rate with a short warmup, 1300 steps
# instead of 2000, no biases, and one validation estimate at the end instead of periodic ones.
SPEEDRUN_FLAGS=(
    --tokenizer char --val_fraction 0.1
    --n_layer 4 --n_head 4 --n_embd 128 --block_size 64 --dropout 0.0 --bias false
    --batch_size 12 --max_iters 1300
    --learning_rate 4e-3 --warmup_iters 50 --min_lr_ratio 0.1 --betas 0.9 0.99
    --weight_decay 0.1 --grad_clip 1.0
    --device cpu --dtype float32 --compile false
    --eval_iter 1300 --eval_batches 20 --log_iter 100 --save_iter 1300
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
if [[ -e "$OUT_DIR/metrics.jsonl" ]]; then
    echo "error: $OUT_DIR already holds a metrics.jsonl; give a new or empty OUT_DIR" >&2
    exit 2
fi

now() { "$PYTHON" -c 'import time; print(time.time())'; }

command=("$PYTHON" "$REPO/train.py" --data "$DATA" "${SPEEDRUN_FLAGS[@]}"
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
