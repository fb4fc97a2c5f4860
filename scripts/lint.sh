#!/usr/bin/env bash
# Static checks, run by scripts/test.sh before the tests (and so by CI) and by pre-commit:
#   ruff (lint + format check) over the whole tree, mypy (strict on the runtime package, default
#   strictness on export/training/benchmarks), and a wheel check that only spine_edge* installs.
# mypy cannot follow setuptools' package-dir mapping (export/ -> spine_edge.export), so it checks a
# tree of symlinks laid out as the installed packages, built from pyproject's own mapping.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
STEPS=${*:-ruff mypy wheel}   # e.g. `bash scripts/lint.sh mypy` runs one step (pre-commit does)
want() { [[ " $STEPS " == *" $1 "* ]]; }
status=0

if want ruff; then
  echo "[lint] ruff check"
  "$BIN/ruff" check spine_edge export training benchmarks tests || status=1
  echo "[lint] ruff format --check"
  "$BIN/ruff" format --check spine_edge export training benchmarks tests || status=1
fi

if want mypy; then
echo "[lint] mypy"
TREE=build/typecheck
"$PY" - "$TREE" <<'PYTHON' || exit 1
import os, shutil, sys, tomllib
from pathlib import Path

tree = Path(sys.argv[1])
shutil.rmtree(tree, ignore_errors=True)
mapping = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# Parents before children, so that spine_edge/ exists before spine_edge/export is linked into it.
for package, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
    target = tree.joinpath(*package.split("."))
    target.mkdir(parents=True, exist_ok=True)
    for entry in Path(folder).iterdir():
        link = target / entry.name
        if entry.name == "__pycache__" or link.exists():
            continue
        link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
PYTHON
(cd "$TREE" && "$OLDPWD/$BIN/mypy" --config-file "$OLDPWD/pyproject.toml" --cache-dir "$OLDPWD/build/.mypy_cache" -p spine_edge) || status=1
fi

if want wheel; then
echo "[lint] wheel installs only spine_edge* packages"
WHEELS=$(mktemp -d)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" . >/dev/null 2>&1 || { echo "[lint] wheel build failed" >&2; status=1; }
"$PY" - "$WHEELS" <<'PYTHON' || status=1
import sys, zipfile
from pathlib import Path

wheel = next(Path(sys.argv[1]).glob("spine_edge-*.whl"))
tops = sorted({name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()})
stray = [t for t in tops if not t.startswith("spine_edge")]
print(f"[lint] {wheel.name}: {', '.join(tops)}")
if stray:
    sys.exit(f"[lint] the wheel installs top-level names outside spine_edge: {stray}")
PYTHON
rm -rf "$WHEELS"
fi
[ "$status" -eq 0 ] && echo "[lint] ok" || echo "[lint] FAILED" >&2
exit "$status"
