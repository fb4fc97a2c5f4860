"""Export stores real validation canvases for build-engines' plan check and clears stale engine caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spine_edge.backends.onnxruntime import ORT_TENSORRT_CACHE, ort_tensorrt_cache_dir
from spine_edge.backends.openvino import OPENVINO_CACHE, openvino_cache_dir
from spine_edge.bundle import ROLES, load_manifest
from spine_edge.export import engines
from spine_edge.export.config import ExportConfig
from spine_edge.export.evaluation import EvalSet, read_eval_set
from spine_edge.export.pipeline import PARITY_CANVASES, remove_stale_files, run_export, write_parity_sets
from spine_edge.metrics import ImageBoxes
from tests.export.conftest import EXPORT_SIZE


def _eval_set(labels: list[int]) -> EvalSet:
    n = len(labels)
    # Each canvas holds its own index, so the test can tell which images were kept.
    index = np.arange(n, dtype=np.uint8)[:, None, None, None]
    return EvalSet(
        folder=Path("."),
        split="val",
        image_ids=tuple(f"img{i}" for i in range(n)),
        labels=np.asarray(labels, dtype=np.int64),
        classifier_canvases=np.broadcast_to(index, (n, 1, 4, 4)).copy(),
        detector_canvases=np.broadcast_to(index, (n, 1, 6, 6)).copy(),
        placements=(),
        ground_truth=tuple(ImageBoxes.empty() for _ in range(n)),
        fingerprint="",
    )


def test_parity_sets_alternate_abnormal_and_normal_images(tmp_path: Path) -> None:
    data = _eval_set([0, 0, 0, 1, 0, 1, 0, 0, 0])
    classifier, detector = write_parity_sets(tmp_path, data, count=5)
    with np.load(classifier) as stored:
        assert stored["canvases"][:, 0, 0, 0].tolist() == [3, 0, 5, 1, 2]
        assert stored["canvases"].shape == (5, 1, 4, 4)
    with np.load(detector) as stored:
        assert stored["canvases"][:, 0, 0, 0].tolist() == [3, 0, 5, 1, 2]
        assert stored["canvases"].shape == (5, 1, 6, 6)


def test_parity_sets_of_an_earlier_export_are_removed_when_none_were_written(tmp_path: Path) -> None:
    written = write_parity_sets(tmp_path, _eval_set([0, 1]))
    assert sorted(p.name for p in remove_stale_files(tmp_path, [])) == sorted(p.name for p in written)
    assert not any(p.exists() for p in written)


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory: pytest.TempPathFactory, export_checkpoints: Path, export_prepared: Path) -> Path:
    """An FP32-only export of the tiny checkpoints with the tiny prepared cache as evaluation data."""
    out = tmp_path_factory.mktemp("parity_export") / "bundle"
    run_export(ExportConfig(export_checkpoints, out, precisions=("fp32",), eval_data=export_prepared))
    return out


def test_export_stores_real_letterboxed_validation_canvases(fp32_export: Path, export_prepared: Path) -> None:
    manifest = load_manifest(fp32_export)
    data = read_eval_set(export_prepared, "val", EXPORT_SIZE, EXPORT_SIZE)
    canvases = {"classifier": data.classifier_canvases, "detector": data.detector_canvases}
    for role in ROLES:
        entry = manifest.find(role, "fp32", "onnx")
        assert entry is not None
        parity = engines.load_parity_set(fp32_export, role, entry.inputs[0])
        assert parity.source == "bundle" and len(parity.canvases) == PARITY_CANVASES
        # Every stored canvas is one of the letterboxed validation images, none repeated.
        matches = [int(np.flatnonzero((canvases[role] == c).all(axis=(1, 2, 3)))[0]) for c in parity.canvases]
        assert len(set(matches)) == PARITY_CANVASES
        assert set(data.labels[matches].tolist()) == {0, 1}


def test_re_export_clears_caches_of_graphs_no_longer_listed(
    fp32_export: Path, export_checkpoints: Path, export_prepared: Path
) -> None:
    entry = load_manifest(fp32_export).models[0]
    kept = [ort_tensorrt_cache_dir(fp32_export, entry), openvino_cache_dir(fp32_export, entry)]
    stale = [fp32_export / ORT_TENSORRT_CACHE / "0123456789abcdef", fp32_export / OPENVINO_CACHE / "fedcba9876543210"]
    timing = fp32_export / ORT_TENSORRT_CACHE / "timing"
    for folder in (*kept, *stale, timing):
        folder.mkdir(parents=True)
        (folder / "blob").write_bytes(b"cached")
    run_export(ExportConfig(export_checkpoints, fp32_export, precisions=("fp32",), eval_data=export_prepared))
    manifest = load_manifest(fp32_export)
    # The tiny graphs export deterministically, so the re-export lists the same graph and keeps its caches.
    assert entry.sha256 in {e.sha256 for e in manifest.models}
    assert all(folder.is_dir() for folder in (*kept, timing))
    assert not any(folder.exists() for folder in stale)
