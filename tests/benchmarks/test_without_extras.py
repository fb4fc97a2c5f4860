"""``spine-edge bench`` on a box without the training stack or without the ``bench`` extra.

Each run is a subprocess whose ``sitecustomize`` makes the named imports fail, as on a target box
where they were never installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spine_edge.cli import EXIT_OK, EXIT_SETUP

BLOCKER = """
import sys

BLOCKED = {blocked!r}


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked", name=name)
        return None


sys.meta_path.insert(0, Block())
"""

FAST = ["--runs", "2", "--warmup", "0", "--batch-sizes", "1", "--threads", "1", "--max-images", "4"]


def _bench(tmp_path: Path, blocked: tuple[str, ...], *args: str | Path) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", "from spine_edge.cli import main; main()", "-q", "bench", *map(str, args)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)


def test_without_torch_the_baseline_is_skipped_with_a_note(tmp_path: Path, good_bundle: Path, toy_vindr: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    done = _bench(
        tmp_path,
        ("torch", "torchvision", "timm", "ultralytics"),
        "--bundle",
        good_bundle,
        "--data",
        toy_vindr,
        "--checkpoints",
        checkpoints,
        *FAST,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert "- baseline: skipped (The PyTorch baseline needs the Python package 'torch'" in done.stdout
    assert "| PyTorch eager |" not in done.stdout and "Result: PASSED" in done.stdout


@pytest.mark.parametrize("missing", ["sklearn", "pycocotools"])
def test_accuracy_without_the_bench_extra_is_a_setup_error(
    tmp_path: Path, good_bundle: Path, toy_vindr: Path, missing: str
) -> None:
    done = _bench(tmp_path, (missing,), "--bundle", good_bundle, "--data", toy_vindr, *FAST)
    assert done.returncode == EXIT_SETUP
    assert "pip install 'spine-edge[bench]'" in done.stderr and done.stderr.count("\n") == 1
