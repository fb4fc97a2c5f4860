#!/usr/bin/env bash
# The first-GPU proof (see benchmarks/gpu_check.py): builds the bundle's TensorRT plans, checks each
# against ONNX Runtime FP32, times every precision and stage at batch 1 and max, measures peak GPU
# memory, and runs ONNX Runtime's CUDA/TensorRT providers on the same graphs; writes
# gpu_check.json + gpu_check.md. Exit: 0 passed, 1 a step failed, 2 usage, 6 no NVIDIA GPU here,
# 124 killed at the 600 s wall-clock limit (the report then holds the steps that finished).
#
#   bash benchmarks/gpu_check.sh [BUNDLE] [--out DIR] [--device N] [--precision fp16 ...] [--skip-ort]
#
# BUNDLE defaults to $SPINE_EDGE_BUNDLE or runs/bundle. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
if [[ $# -eq 0 || "$1" == -* ]]; then
    set -- "${SPINE_EDGE_BUNDLE:-runs/bundle}" "$@"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
fi
# timeout keeps a hung driver from holding the box: the check budgets itself to 540 s by default.
exec timeout --kill-after=30 600 "$python" -m spine_edge.benchmarks.gpu_check "$@"
