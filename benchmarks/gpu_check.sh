#!/usr/bin/env bash
# GPU check of issue 15, about 6 minutes on one H100/H200, no network. Rows, each next to today's
# figure: the used-by command (5000 steps of the 0.8M-parameter default) with CUDA graphs and the
# fused loss, and the old step for comparison; tiny Shakespeare, 1000 steps, with and without
# --compile; the GPT-2 124M shape (bf16, compiled, batch 16, synthetic tokens) with the fused loss
# on and off: ms/step, tokens/s, MFU, peak memory; then the CUDA tests; then extra rows while time
# is left. Every row has a time limit and a failing row does not stop the next. The whole log,
# each row's output (rows/) and the final table (gpu_check.md) go to $OUT, else a temporary folder.
#
# Usage: benchmarks/gpu_check.sh [--data gpu_data/tinyshakespeare.txt] [--budget SECONDS]
#                                [--only TEXT] [--dry_run]
#   --budget: the whole script's wall-clock limit (default 420); rows past it are cut or skipped
#   --only: run only the rows whose name contains TEXT
#   --dry_run: the same rows on the CPU, tiny shapes, a few steps and no compilation: checks the
#              script itself in a few minutes without a GPU
# To add a row, add a `row` line (kinds: train, bench, pytest; see benchmarks/gpu_check.py).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
DATA=gpu_data/tinyshakespeare.txt
BUDGET=420
DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --dry_run) DRY_RUN=1; shift ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done
export OUT_DIR=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/rows" "$OUT_DIR/rows.jsonl"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export GPU_CHECK_DEADLINE=$(( $(date +%s) + BUDGET ))

# row NAME TIMEOUT KIND TODAY -- ARGS: one line of the table (skipped when under 20 s are left)
row() {
    local name=$1 timeout=$2 kind=$3 today=$4
    shift 4
    [[ "$name" == *"$ONLY"* ]] || return 0
    if [ $(( GPU_CHECK_DEADLINE - $(date +%s) )) -lt 20 ]; then
        echo "== $name: skipped, the --budget of ${BUDGET} s is spent"
        return
    fi
    "$PYTHON" benchmarks/gpu_check.py row --name "$name" --timeout "$timeout" --kind "$kind" \
        --today "$today" "$@" || echo "   (the row's helper failed: status $?)"
}

if [ "$DRY_RUN" = 1 ]; then  # the CPU, tiny shapes: every row runs in seconds
    DEVICE=cpu; COMPILE=false; USED_BY_STEPS=30; SHORT_STEPS=20
    export OMP_NUM_THREADS=1
    SMALL=(--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4 --eval_batches 2
           --warmup_iters 5)
    GPT2=(--n_layer 2 --n_head 2 --n_embd 64 --block_size 64 --synthetic_vocab 512 --batch_size 2)
    BENCH=(--warmup_steps 5 --bench_steps 3 --repeats 1 --bare false)
    TESTS=(tests/test_step.py)
else
    DEVICE=cuda; COMPILE=true; USED_BY_STEPS=5000; SHORT_STEPS=1000
    SMALL=()
    GPT2=(--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --synthetic_vocab 50304
          --batch_size 16)
    BENCH=(--warmup_steps 10 --bench_steps 30 --repeats 2 --bare false)
    TESTS=(tests/test_cuda.py tests/test_step.py)
fi
OLD_STEP=(--cuda_graphs false --fused_loss false)
GPT2+=(--bias true --dropout 0.0 --grad_accum_steps 1 --dtype bfloat16 --compile "$COMPILE"
       --device "$DEVICE")

echo "== gpu_check at $(git rev-parse --short HEAD 2>/dev/null), budget ${BUDGET} s"
echo "   output in $OUT_DIR"
timeout 120 "$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"CUDA", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'

# The rows that decide the issues come first: a budget that runs out cuts the comparisons.
echo "== small model (0.8M parameters, batch 16 x 128, built-in corpus)"
row "used-by command: train.py --max_iters $USED_BY_STEPS --device $DEVICE" 150 train \
    "57 s wall, 90-130 steps/s" -- --max_iters "$USED_BY_STEPS" --device "$DEVICE" "${SMALL[@]}"

echo "== GPT-2 124M shape: bf16, compiled, batch 16 x 1024, synthetic tokens"
row "124M batch 16, fused loss" 240 bench "34.1 ms/step, 41.5% MFU, 11.7 GiB" -- \
    "${GPT2[@]}" "${BENCH[@]}"

echo "== tests"
row "pytest ${TESTS[*]}" 240 pytest "" -- -q -rs -p no:cacheprovider "${TESTS[@]}"

echo "== 124M shape, Muon and the modern block (issue 11: within 10% of today's tokens/s)"
row "124M batch 16, --optimizer muon, rope + rmsnorm + qk_norm + relu2, untied, no bias" 240 \
    bench "34.1 ms/step, 480k tokens/s" -- "${GPT2[@]}" "${BENCH[@]}" --optimizer muon \
    --pos rope --norm rmsnorm --qk_norm true --mlp relu2 --tie_embeddings false --bias false

echo "== comparisons, while the budget lasts"
row "the same small model, old step (graphs and fused loss off), $SHORT_STEPS steps" 90 train \
    "90-130 steps/s" -- --max_iters "$SHORT_STEPS" --device "$DEVICE" "${OLD_STEP[@]}" "${SMALL[@]}"
if [ -f "$DATA" ]; then
    row "tiny Shakespeare $SHORT_STEPS steps" 90 train "17 s (nanoGPT: 15 s)" -- \
        --data "$DATA" --max_iters "$SHORT_STEPS" --device "$DEVICE" "${SMALL[@]}"
    row "tiny Shakespeare $SHORT_STEPS steps, --compile $COMPILE" 150 train "34 s" -- \
        --data "$DATA" --max_iters "$SHORT_STEPS" --device "$DEVICE" --compile "$COMPILE" \
        "${SMALL[@]}"
else
    echo "   skipped: no $DATA (give --data PATH)"
fi
row "124M batch 16, plain loss (--fused_loss false)" 240 bench \
    "34.1 ms/step, 41.5% MFU, 11.7 GiB" -- "${GPT2[@]}" "${BENCH[@]}" --fused_loss false
if [ -f "$DATA" ]; then
    row "tiny Shakespeare $SHORT_STEPS steps, old step" 90 train "17 s" -- \
        --data "$DATA" --max_iters "$SHORT_STEPS" --device "$DEVICE" "${OLD_STEP[@]}" "${SMALL[@]}"
fi
row "124M batch 16, old step (graphs and fused loss off)" 200 bench \
    "34.1 ms/step, 41.5% MFU, 11.7 GiB" -- "${GPT2[@]}" "${BENCH[@]}" "${OLD_STEP[@]}"
row "124M batch 16, fused loss, graphs off" 200 bench "34.1 ms/step" -- \
    "${GPT2[@]}" "${BENCH[@]}" --cuda_graphs false

echo "== table (also in $OUT_DIR/gpu_check.md)"
"$PYTHON" benchmarks/gpu_check.py table
