#!/usr/bin/env bash
# GPU check, under 5 minutes on one H100/H200: throughput and MFU of the GPT-2 124M shape with
# bf16 + torch.compile on synthetic tokens, then the tests that need CUDA. Needs no network.
# Usage: benchmarks/gpu_check.sh [extra bench_train.py flags, e.g. --batch_size 32]
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "CUDA is not available"; print(torch.__version__, torch.cuda.get_device_name(0))'

echo "== GPT-2 124M shape: bf16, compile, synthetic tokens =="
"$PYTHON" benchmarks/bench_train.py \
    --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --synthetic_vocab 50304 \
    --bias true --dropout 0.0 --batch_size 16 --grad_accum_steps 1 \
    --dtype bfloat16 --compile true --device cuda \
    --warmup_steps 10 --bench_steps 50 --repeats 2 --bare true "$@"

echo "== CUDA tests =="
"$PYTHON" -m pytest -q -rs tests/test_cuda.py
