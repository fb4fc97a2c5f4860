"""Accuracy collection and metrics against the reference implementations, on real toy cascades."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import roc_auc_score

from spine_edge.benchmarks.accuracy import (
    Predictions,
    collect_predictions,
    evaluate_accuracy,
    gated,
    precision_recall_curves,
    truth_from_records,
    valid_indices,
    write_coco_files,
)
from spine_edge.cascade import Cascade
from spine_edge.constants import CLASS_NAMES
from spine_edge.metrics import ImageBoxes, evaluate_detection
from spine_edge.vindr import read_vindr


@pytest.fixture(scope="module")
def truth(toy_vindr: Path):
    return truth_from_records(read_vindr(toy_vindr).test)


@pytest.fixture(scope="module")
def predictions(broken_bundle: Path, truth) -> dict[str, Predictions]:
    cascades = {
        label: Cascade.from_bundle(
            broken_bundle,
            precision=label,
            backend="onnxruntime",
            provider="cpu",
            batch_size=4,
            force_detector=True,
            heatmaps=False,
            threads=1,
            guard=False,
        )
        for label in ("fp32", "int8")
    }
    try:
        return collect_predictions(cascades, truth, batch_size=4, read_workers=2)
    finally:
        for cascade in cascades.values():
            cascade.close()


def _pycocotools_stats(gt_file: Path, dt_file: Path) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dt_file)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_truth_keeps_boxes_in_original_pixels(truth, toy_vindr: Path) -> None:
    records = read_vindr(toy_vindr).test
    assert len(truth) == len(records) == 12
    assert int(truth.labels.sum()) == 6
    first_abnormal = next(i for i, r in enumerate(records) if r.boxes)
    box = records[first_abnormal].boxes[0]
    assert truth.boxes[first_abnormal].boxes[0].tolist() == [box.xmin, box.ymin, box.xmax, box.ymax]
    assert truth.sizes[0] == (128, 128)


def test_every_precision_sees_the_same_decoded_images(predictions, truth) -> None:
    fp32, int8 = predictions["fp32"], predictions["int8"]
    assert fp32.errors == int8.errors == ()
    # The broken INT8 classifier negates the logit: sigmoid(-x) = 1 - sigmoid(x), image for image.
    np.testing.assert_allclose(int8.probs, 1.0 - fp32.probs, atol=1e-6)
    for a, b in zip(fp32.detections, int8.detections, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert sum(len(d.classes) for d in fp32.detections) > 0


def test_cascade_keeps_boxes_only_above_the_gate(predictions) -> None:
    fp32 = predictions["fp32"]
    kept = gated(fp32, 0.5)
    for prob, full, cascade in zip(fp32.probs, fp32.detections, kept, strict=True):
        assert len(cascade.classes) == (len(full.classes) if prob >= 0.5 else 0)


def test_deltas_flips_and_auroc_match_sklearn(predictions, truth) -> None:
    accuracy = evaluate_accuracy(truth, predictions, "fp32", 0.5, CLASS_NAMES)
    fp32, int8 = accuracy["fp32"], accuracy["int8"]
    ref_auroc = roc_auc_score(truth.labels, predictions["fp32"].probs)
    assert fp32.classification.auroc == pytest.approx(ref_auroc, abs=1e-12)
    assert 0.5 < ref_auroc < 1.0
    assert int8.delta_auroc_pt == pytest.approx(
        100 * (roc_auc_score(truth.labels, predictions["int8"].probs) - ref_auroc)
    )
    assert fp32.delta_auroc_pt == fp32.delta_map50_pt == fp32.flips == 0
    assert int8.delta_map50_pt == 0.0  # same detector graph
    expected_flips = int(((predictions["fp32"].probs >= 0.5) != (predictions["int8"].probs >= 0.5)).sum())
    assert int8.flips == expected_flips > 0
    assert 0.0 < fp32.detector.map50 < 1.0


def test_saved_coco_files_reproduce_the_metrics_with_pycocotools(predictions, truth, tmp_path: Path) -> None:
    files = write_coco_files(tmp_path, truth, predictions, 0.5, CLASS_NAMES)
    assert {f.name for f in files} == {
        "ground_truth.json",
        "predictions_fp32_detector.json",
        "predictions_fp32_cascade.json",
        "classification_fp32.json",
        "predictions_int8_detector.json",
        "predictions_int8_cascade.json",
        "classification_int8.json",
    }
    gt = json.loads((tmp_path / "ground_truth.json").read_text())
    assert [c["name"] for c in gt["categories"]] == list(CLASS_NAMES)
    assert gt["images"][0]["file_name"] == truth.paths[0].name and gt["images"][0]["image_id"] == truth.image_ids[0]
    accuracy = evaluate_accuracy(truth, predictions, "fp32", 0.5, CLASS_NAMES)
    for label in ("fp32", "int8"):
        for kind, metrics in (("detector", accuracy[label].detector), ("cascade", accuracy[label].cascade)):
            results = tmp_path / f"predictions_{label}_{kind}.json"
            if not json.loads(results.read_text()):
                # pycocotools cannot load an empty result list; no detection means AP 0 for every class.
                assert (label, kind) == ("int8", "cascade") and metrics.map50 == metrics.map50_95 == 0.0
                continue
            stats = _pycocotools_stats(tmp_path / "ground_truth.json", results)
            assert metrics.map50 == pytest.approx(stats[1], abs=1e-12)
            assert metrics.map50_95 == pytest.approx(stats[0], abs=1e-12)
        saved = json.loads((tmp_path / f"classification_{label}.json").read_text())["images"]
        auroc = roc_auc_score([i["abnormal"] for i in saved], [i["probability"] for i in saved])
        assert accuracy[label].classification.auroc == pytest.approx(auroc, abs=1e-12)


def test_precision_recall_curves_average_to_the_class_ap(predictions, truth) -> None:
    detections = predictions["fp32"].detections
    metrics = evaluate_detection(truth.boxes, detections, CLASS_NAMES)
    curves = precision_recall_curves(truth.boxes, detections, CLASS_NAMES)
    assert set(curves) == {name for name, ap in metrics.per_class.items() if ap.n_ground_truth}
    for name, curve in curves.items():
        assert curve.recall.shape == curve.precision.shape == (101,)
        assert curve.ap50 == pytest.approx(metrics.per_class[name].ap50, abs=1e-12)


def test_unreadable_image_is_left_out_of_every_precision(broken_bundle: Path, truth, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dicom"
    bad.write_bytes(b"DICM? no")
    with_bad = replace(
        truth,
        image_ids=(*truth.image_ids[:2], "bad"),
        paths=(*truth.paths[:2], bad),
        sizes=(*truth.sizes[:2], (1, 1)),
        labels=np.array([0, 1, 0]),
        boxes=(*truth.boxes[:2], ImageBoxes.empty()),
    )
    with Cascade.from_bundle(
        broken_bundle, precision="fp32", backend="onnxruntime", force_detector=True, threads=1, guard=False
    ) as cascade:
        found = collect_predictions({"fp32": cascade}, with_bad, batch_size=2)
    assert [i for i, _ in found["fp32"].errors] == [2]
    assert np.isnan(found["fp32"].probs[2]) and not np.isnan(found["fp32"].probs[:2]).any()
    assert valid_indices(found) == [0, 1]
