"""Tiny real inputs for the benchmark tests: a VinDr-layout test split the toy bundle can see, and
bundles with FP16 / INT8 entries, one of them deliberately broken.

The toy bundle (``tests/spine_edge/bundle_factory.py``) calls an image abnormal when one of its
regions is bright, and its detector puts a class-0 box on every bright cell of a 4 x 4 grid. The
split drawn here places bright 32 px cells on 128 px images with ground-truth boxes a little larger
than the cell (so IoUs vary and mAP@0.5:0.95 is neither 0 nor 1), a few ground-truth boxes the
detector cannot find, and normal images with a moderately bright patch, so AUROC is below 1 too.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from spine_edge.bundle import load_manifest, sha256_file, write_manifest
from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES, NO_FINDING
from tests.spine_edge.bundle_factory import classifier_model, detector_model, make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

SIZE = 128  # image side (pixels); the toy graphs letterbox it to 64
CELL = 32  # a detector cell in image pixels (4 x 4 grid)


def write_toy_vindr(root: Path, n_images: int = 12, seed: int = 0) -> Path:
    """A VinDr-layout folder (empty train split) whose test images the toy bundle responds to."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for i in range(n_images):
        image_id = f"toy{i:03d}"
        image = rng.normal(30, 4, (SIZE, SIZE))
        base = {"image_id": image_id, "study_id": f"study{i:03d}", "series_id": f"series{i:03d}", "rad_id": "rad1"}
        if i % 2:  # abnormal: one or two bright cells, each with a ground-truth box around it
            cells = rng.choice(16, size=1 + i % 3 // 2, replace=False)
            for cell in cells:
                r, c = divmod(int(cell), 4)
                y0, x0 = r * CELL, c * CELL
                image[y0 : y0 + CELL, x0 : x0 + CELL] = rng.uniform(200, 250)
                margin = int(rng.integers(0, 12))
                box = (
                    max(0, x0 - margin),
                    max(0, y0 - margin),
                    min(SIZE, x0 + CELL + margin),
                    min(SIZE, y0 + CELL + margin),
                )
                rows.append({**base, "lesion_type": CLASS_NAMES[0], **dict(zip(("xmin", "ymin", "xmax", "ymax"), box))})
            if i % 4 == 3:  # a lesion the detector cannot see (dark, another class)
                rows.append({**base, "lesion_type": CLASS_NAMES[4], "xmin": 2, "ymin": 2, "xmax": 20, "ymax": 20})
            if i % 6 == 5:  # a faint lesion: the classifier hesitates
                image[:] = rng.normal(30, 4, (SIZE, SIZE))
                image[40:56, 40:56] = 150
                rows.append({**base, "lesion_type": CLASS_NAMES[0], "xmin": 36, "ymin": 36, "xmax": 60, "ymax": 60})
        else:
            if i % 4 == 2:  # a normal image with a bright-ish patch: a false positive of the gate
                image[70:90, 70:90] = 175
            rows.append({**base, "lesion_type": NO_FINDING, "xmin": "", "ymin": "", "xmax": "", "ymax": ""})
        write_test_dicom(root / "test_images" / f"{image_id}.dicom", np.clip(image, 0, 255).astype(np.uint8))
    for split, split_rows in (("train", []), ("test", rows)):
        with open(root / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ANNOTATION_COLUMNS))
            writer.writeheader()
            writer.writerows(split_rows)
    return root


def inverted_classifier(size: int = 64, grid: int = 8) -> onnx.ModelProto:
    """The toy classifier with its gain negated: ``prob`` becomes ``1 - prob``, AUROC becomes ``1 - AUROC``."""
    model = classifier_model(size, grid)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == "gain":
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(-10.0, np.float32), "gain"))
    onnx.checker.check_model(model, full_check=True)
    return model


def make_precision_bundle(folder: Path, broken_int8: bool) -> Path:
    """The toy bundle plus FP16 and INT8 entries (same graphs), the INT8 classifier inverted if ``broken_int8``."""
    make_bundle(folder)
    manifest = load_manifest(folder)
    graphs = {
        ("classifier", "fp16"): classifier_model(64, 8),
        ("detector", "fp16"): detector_model(64, 4),
        ("classifier", "int8"): inverted_classifier() if broken_int8 else classifier_model(64, 8),
        ("detector", "int8"): detector_model(64, 4),
    }
    extra = []
    for (role, precision), model in graphs.items():
        file = f"{role}.{precision}.onnx"
        onnx.save(model, folder / file)
        base = next(e for e in manifest.models if e.role == role and e.precision == "fp32")
        target = "onnxruntime" if precision == "int8" else "any"
        extra.append(replace(base, precision=precision, file=file, sha256=sha256_file(folder / file), target=target))
    write_manifest(folder, manifest.with_models((*manifest.models, *extra)))
    return folder


@pytest.fixture(scope="session")
def toy_vindr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labelled test images (6 abnormal) in the VinDr layout."""
    return write_toy_vindr(tmp_path_factory.mktemp("toy_vindr"))


@pytest.fixture(scope="session")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32, FP16 and INT8 graphs that all compute the same thing."""
    return make_precision_bundle(tmp_path_factory.mktemp("good") / "bundle", broken_int8=False)


@pytest.fixture(scope="session")
def broken_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``good_bundle`` but the INT8 classifier inverts every probability."""
    return make_precision_bundle(tmp_path_factory.mktemp("broken") / "bundle", broken_int8=True)
