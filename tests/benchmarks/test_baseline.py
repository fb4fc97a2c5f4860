"""The PyTorch eager peer on tiny real checkpoints (skipped where torch is not installed), and its clean skip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from spine_edge.benchmarks.config import BenchConfig
from spine_edge.benchmarks.run import run_bench
from spine_edge.cascade import CascadeConfig

HAS_PEERS = all(importlib.util.find_spec(name) for name in ("torch", "timm", "ultralytics"))
needs_torch = pytest.mark.skipif(not HAS_PEERS, reason="the PyTorch baseline needs torch, timm and ultralytics")

TINY = {"precisions": ("fp32",), "batch_sizes": (1,), "runs": 2, "warmup": 1, "progress": False}


def _tiny_cascade(bundle: Path) -> CascadeConfig:
    return CascadeConfig(bundle, threads=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight 64 px members + ensemble.json and a YOLO11n, as `spine-edge train` writes them."""
    from tests.export.conftest import write_export_classifiers, write_export_detector, write_export_prepared

    prepared = write_export_prepared(tmp_path_factory.mktemp("prepared"), {"train": 4})
    folder = tmp_path_factory.mktemp("ckpt")
    write_export_classifiers(folder)
    write_export_detector(folder, prepared)
    return folder


@needs_torch
def test_baseline_runs_both_peers_and_speedups_are_ratios_of_this_run(
    checkpoints: Path, good_bundle: Path, toy_vindr: Path
) -> None:
    report = run_bench(
        BenchConfig(_tiny_cascade(good_bundle), data=toy_vindr, max_images=4, checkpoints=checkpoints, **TINY)
    )
    baseline = report.baseline
    assert baseline is not None, report.notes
    assert baseline.classifier.n == baseline.detector_inference.n == baseline.detector_predict.n == 2
    # predict's wall time holds ultralytics' letterbox and NMS around the model time it reports.
    assert baseline.detector_predict.p50 >= baseline.detector_inference.p50
    assert baseline.threads == 1 and baseline.versions["torch"]
    assert set(baseline.probs) == {
        1,
        2,
    }  # warm-up took image 0 and all(0.0 <= p <= 1.0 for p in baseline.probs.values())
    fp32 = report.precision("fp32")
    assert fp32 is not None
    cls, det = fp32.model("classifier").at(1), fp32.model("detector").at(1)  # type: ignore[union-attr]
    assert fp32.speedup_vs_torch["classifier"] == pytest.approx(baseline.classifier.p50 / cls.per_image.p50)
    assert fp32.speedup_vs_torch["detector"] == pytest.approx(baseline.detector_inference.p50 / det.per_image.p50)
    assert any(note.startswith("baseline parity: max |prob(PyTorch) - prob(ONNX fp32)|") for note in report.notes)
    assert np.isfinite(list(fp32.speedup_vs_torch.values())).all()


@needs_torch
def test_checkpoints_of_another_input_size_are_refused(checkpoints: Path, tmp_path: Path, toy_vindr: Path) -> None:
    from tests.spine_edge.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path / "bundle", classifier_size=32)
    report = run_bench(
        BenchConfig(_tiny_cascade(bundle), data=toy_vindr, max_images=2, checkpoints=checkpoints, **TINY)
    )
    assert report.baseline is None
    assert any("takes 64 px but the bundle's classifier takes 32 px" in note for note in report.notes)


def test_baseline_is_skipped_with_a_note_when_no_checkpoints_are_known(good_bundle: Path, toy_vindr: Path) -> None:
    report = run_bench(BenchConfig(_tiny_cascade(good_bundle), data=toy_vindr, max_images=2, **TINY))
    assert report.baseline is None and report.passed
    assert any(note.startswith("baseline: skipped (opt-in: pass --checkpoints CKPT") for note in report.notes)
    assert report.precision("fp32").speedup_vs_torch == {}  # type: ignore[union-attr]
