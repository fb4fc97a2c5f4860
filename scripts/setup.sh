#!/usr/bin/env bash
# Create .venv (if needed) and install spine-edge with everything the demo and the tests need.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# torch and torchvision first, pinned, so that pip takes the local wheels instead of resolving a
# newer multi-GB CUDA build from the index (ultralytics needs torchvision).
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (a few minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v '^WARNING: Location' || true
fi
echo "[setup] installing spine-edge[train,dev,serve,dicom,explain,openvino] (editable)"
.venv/bin/pip install -q --disable-pip-version-check -e '.[train,dev,serve,dicom,explain,openvino]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import spine_edge, torch, ultralytics, onnxruntime; print('[setup] ok: spine-edge', spine_edge.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
