"""The runtime runs where torch, timm, ultralytics (and the training/export tooling) are absent.

Each check runs in a subprocess whose ``sitecustomize`` puts a finder at the front of
``sys.meta_path`` that makes those imports raise ImportError, as on a kiosk with only the runtime,
and records every blocked attempt: an import that the code catches and survives still counts.
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

from spine_edge.bundle import load_manifest
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

#: What a target box never has: the training stack, the graph tooling and the bench extra.
TRAINING_STACK = ("torch", "torchvision", "timm", "ultralytics", "onnx", "sklearn")
#: The project's own workstation packages: only a CLI command may import them, lazily.
WORKSTATION = ("spine_edge.export", "spine_edge.training", "spine_edge.benchmarks")
#: Everything the runtime itself (import, infer) must do without.
RUNTIME_BLOCKED = TRAINING_STACK + WORKSTATION

SITECUSTOMIZE = """
import os
import sys

BLOCKED = tuple(os.environ["SPINE_EDGE_TEST_BLOCKED"].split(","))
LOG = os.environ["SPINE_EDGE_TEST_BLOCK_LOG"]


class BlockTrainingStack:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            with open(LOG, "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{name} is blocked: the spine-edge runtime must not import it", name=name)
        return None


sys.meta_path.insert(0, BlockTrainingStack())
"""

CLI = "from spine_edge.cli import main; main()"


class Blocked:
    """A subprocess runner with some packages blocked, and the log of what tried to import them."""

    def __init__(self, site: Path, blocked: tuple[str, ...]) -> None:
        self.log = site / "blocked.log"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), self.env.get("PYTHONPATH", "")) if p)
        self.env["SPINE_EDGE_TEST_BLOCKED"] = ",".join(blocked)
        self.env["SPINE_EDGE_TEST_BLOCK_LOG"] = str(self.log)

    def run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        self.log.unlink(missing_ok=True)
        return subprocess.run(
            [sys.executable, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=120
        )

    def attempts(self) -> list[str]:
        """Blocked names the last run tried to import."""
        return self.log.read_text().split() if self.log.is_file() else []


def _blocked(tmp_path_factory: pytest.TempPathFactory, blocked: tuple[str, ...]) -> Blocked:
    site = tmp_path_factory.mktemp("blocker")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return Blocked(site, blocked)


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory: pytest.TempPathFactory) -> Blocked:
    return _blocked(tmp_path_factory, RUNTIME_BLOCKED)


@pytest.fixture(scope="module")
def no_training_stack(tmp_path_factory: pytest.TempPathFactory) -> Blocked:
    return _blocked(tmp_path_factory, TRAINING_STACK)


def test_the_blocker_blocks(runtime_only: Blocked, tmp_path: Path) -> None:
    for name in ("torch", "ultralytics.utils", "timm", "spine_edge.export.engines", "spine_edge.benchmarks"):
        done = runtime_only.run(["-c", f"import {name}"], tmp_path)
        assert done.returncode != 0 and "is blocked" in done.stderr, name
        first = runtime_only.attempts()[0]  # the outermost blocked package: a parent is imported first
        assert name == first or name.startswith(first + "."), (name, first)


def test_import_spine_edge_and_help(runtime_only: Blocked, tmp_path: Path) -> None:
    code = (
        "import spine_edge, spine_edge.cascade, spine_edge.infer, spine_edge.backends, spine_edge.overlay\n"
        "import spine_edge.backends.tensorrt, spine_edge.backends.cuda, spine_edge.cli, spine_edge.metrics\n"
    )
    done = runtime_only.run(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    assert runtime_only.attempts() == []  # not even an attempt that the code caught and survived
    helped = runtime_only.run(["-c", CLI, "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "infer" in helped.stdout and "build-engines" in helped.stdout
    assert runtime_only.run(["-c", CLI, "infer", "--help"], tmp_path).returncode == 0
    assert runtime_only.attempts() == []


def test_infer_runs_without_the_training_stack(runtime_only: Blocked, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    folder = tmp_path / "scans"
    folder.mkdir()
    image = np.zeros((96, 128), np.uint8)
    image[:48, 64:96] = 255
    cv2.imwrite(str(folder / "a.png"), image)
    write_test_dicom(
        folder / "b.dicom", image.astype(np.uint16) * 16, window=(2048, 4096), transfer_syntax="jpeg2000-lossless"
    )
    done = runtime_only.run(["-c", CLI, "infer", "--no-guard", str(folder), "--bundle", str(bundle)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 ok (2 positive), 0 failed" in done.stdout
    assert runtime_only.attempts() == []
    records = [json.loads(line) for line in (tmp_path / "scans_results/results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(r["detections"] and r["overlay"] for r in records)


def test_build_engines_on_the_cpu_without_the_training_stack(no_training_stack: Blocked, tmp_path: Path) -> None:
    # build-engines runs on the target box: it may import spine_edge.export.engines, never torch or onnx.
    bundle = make_bundle(tmp_path / "bundle")
    done = no_training_stack.run(
        ["-c", CLI, "build-engines", str(bundle), "--target", "onnxruntime-cpu", "--threads", "1"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert no_training_stack.attempts() == []
    built = [e for e in load_manifest(bundle).models if e.format == "onnx-optimized"]
    assert sorted(e.role for e in built) == ["classifier", "detector"]
    assert all(e.build is not None and e.build.builder == "onnxruntime" for e in built)
