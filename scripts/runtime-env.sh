#!/usr/bin/env bash
# A kiosk-like environment: spine-edge[cpu,bench] (what a validated kiosk installs) plus the test dependencies, and no torch, timm or
# ultralytics. scripts/test.sh runs the runtime tests in it, so a broken runtime-only install fails CI.
# Idempotent: a second run only re-installs the (editable) project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=.venv-runtime
if [ ! -x "$ENV/bin/python" ]; then
  echo "[runtime-env] creating $ENV with $($PY --version)"
  "$PY" -m venv "$ENV"
fi
"$ENV/bin/pip" install -q --disable-pip-version-check -e '.[cpu,bench,test,serve,dicom,explain,openvino]' 2>&1 | grep -v '^WARNING: Location' || true
if "$ENV/bin/python" -c "import torch" >/dev/null 2>&1 || "$ENV/bin/python" -c "import ultralytics" >/dev/null 2>&1; then
  echo "[runtime-env] torch or ultralytics is installed in $ENV: the runtime extras must not pull them in" >&2
  exit 1
fi
echo "[runtime-env] ok: $("$ENV/bin/python" -c 'import spine_edge, onnxruntime; print("spine-edge", spine_edge.__version__, "| onnxruntime", onnxruntime.__version__)')"
