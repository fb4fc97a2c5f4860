#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: static checks, the runtime tests in a torch-free
# environment, then the whole suite. Extra arguments go to the whole-suite pytest run only (e.g.
# `bash scripts/test.sh -k cascade` or `-m "not slow"`); SPINE_EDGE_QUICK=1 skips the first two
# steps while iterating locally (CI never sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
bash scripts/system-deps.sh || exit 1

if [ "${SPINE_EDGE_QUICK:-0}" != "1" ]; then
  bash scripts/lint.sh || { echo "static checks failed (scripts/lint.sh)" >&2; exit 1; }
  bash scripts/runtime-env.sh || exit 1
  echo "[test] runtime tests without torch (.venv-runtime)"
  .venv-runtime/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests/spine_edge || {
    echo "runtime tests failed in the torch-free environment (.venv-runtime)" >&2; exit 1; }
fi

echo "[test] whole suite (.venv)"
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected": never a success, with or without a filter.
  echo "pytest collected no tests (exit 5)${*:+: check the filter ($*)}" >&2
fi
exit "$rc"
