"""The runtime runs where torch, timm, ultralytics (and the training/export tooling) are absent.

Each check runs in a subprocess whose ``sitecustomize`` puts a finder at the front of
``sys.meta_path`` that makes those imports raise ImportError, as on a kiosk with only the runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

#: Packages the runtime must never import: the training stack, the graph tooling, and the project's
#: own workstation packages.
BLOCKED = ("torch", "torchvision", "timm", "ultralytics", "onnx", "sklearn", "training", "export", "benchmarks")

SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class BlockTrainingStack:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the spine-edge runtime must not import it")
        return None


sys.meta_path.insert(0, BlockTrainingStack())
"""

CLI = "from spine_edge.cli import main; main()"


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("blocker")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks(blocked_env: dict[str, str], tmp_path: Path) -> None:
    for name in ("torch", "ultralytics.utils", "timm"):
        done = _run(["-c", f"import {name}"], blocked_env, tmp_path)
        assert done.returncode != 0 and "is blocked" in done.stderr, name


def test_import_spine_edge_and_help(blocked_env: dict[str, str], tmp_path: Path) -> None:
    code = (
        "import sys, spine_edge, spine_edge.cascade, spine_edge.infer, spine_edge.backends, spine_edge.overlay\n"
        "import spine_edge.backends.tensorrt, spine_edge.backends.cuda, spine_edge.cli\n"
        f"print(sorted(m for m in sys.modules if m.partition('.')[0] in {BLOCKED!r}))"
    )
    done = _run(["-c", code], blocked_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    helped = _run(["-c", CLI, "--help"], blocked_env, tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "infer" in helped.stdout
    assert _run(["-c", CLI, "infer", "--help"], blocked_env, tmp_path).returncode == 0


def test_infer_runs_without_the_training_stack(blocked_env: dict[str, str], tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    folder = tmp_path / "scans"
    folder.mkdir()
    image = np.zeros((96, 128), np.uint8)
    image[:48, 64:96] = 255
    cv2.imwrite(str(folder / "a.png"), image)
    write_test_dicom(folder / "b.dicom", image.astype(np.uint16) * 16, window=(2048, 4096), transfer_syntax="jpeg2000-lossless")
    done = _run(["-c", CLI, "infer", str(folder), "--bundle", str(bundle)], blocked_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 ok (2 positive), 0 failed" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "scans_results/results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(r["detections"] and r["overlay"] for r in records)
