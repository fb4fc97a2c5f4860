#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected": only possible with a filter that matched nothing.
  echo "pytest collected no tests (exit 5): check the -k/-m filter" >&2
  exit 0
fi
exit "$rc"
