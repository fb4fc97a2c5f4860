from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import roc_auc_score

from spine_edge.metrics import (
    ACCURACY_GATES,
    ImageBoxes,
    compute_auroc,
    count_flips,
    delta_points,
    evaluate_classification,
    evaluate_detection,
)

NAMES = ("a", "b", "c")


def _boxes(rows: list[list[float]], classes: list[int], scores: list[float] | None = None) -> ImageBoxes:
    return ImageBoxes(
        np.asarray(rows, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int64),
        None if scores is None else np.asarray(scores, np.float32),
    )


def test_auroc_equals_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) + 0.3 * labels
    assert compute_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_single_class_is_nan() -> None:
    assert math.isnan(compute_auroc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_operating_point_at_threshold() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    probs = [0.9, 0.6, 0.478, 0.2, 0.7, 0.1, 0.3, 0.2, 0.0]
    m = evaluate_classification(labels, probs, threshold=0.478)
    # prob >= τ is positive: TP 3 (0.9, 0.6, 0.478 exactly), FN 1, FP 1, TN 4.
    assert (m.n_positive, m.n_negative) == (4, 5)
    assert m.sensitivity == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(4 / 5)
    assert m.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m.auroc == pytest.approx(roc_auc_score(labels, probs))


def test_perfect_detections_give_map_one() -> None:
    gt = [_boxes([[10, 10, 50, 60], [70, 5, 90, 40]], [0, 2]), _boxes([[0, 0, 30, 30]], [1])]
    det = [_boxes([[10, 10, 50, 60], [70, 5, 90, 40]], [0, 2], [0.9, 0.8]), _boxes([[0, 0, 30, 30]], [1], [0.7])]
    m = evaluate_detection(gt, det, NAMES)
    assert m.map50 == pytest.approx(1.0)
    assert m.map50_95 == pytest.approx(1.0)
    assert all(ap.ap50 == pytest.approx(1.0) for ap in m.per_class.values())


def test_false_positive_ranked_above_true_positive_halves_ap() -> None:
    # PR curve: FP first (P=0, R=0), then TP (P=1/2, R=1): COCO's interpolated precision is 1/2 at
    # every one of the 101 recall points, at every IoU threshold (the TP box is exact).
    gt = [_boxes([[10, 10, 50, 50]], [0])]
    det = [_boxes([[60, 60, 90, 90], [10, 10, 50, 50]], [0, 0], [0.9, 0.8])]
    m = evaluate_detection(gt, det, NAMES[:1])
    assert m.map50 == pytest.approx(0.5)
    assert m.map50_95 == pytest.approx(0.5)


def test_half_recall_ap_is_51_of_101_points() -> None:
    gt = [_boxes([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0])]
    det = [_boxes([[10, 10, 50, 50]], [0], [0.9])]
    m = evaluate_detection(gt, det, NAMES[:1])
    assert m.map50 == pytest.approx(51 / 101)


def test_class_without_ground_truth_is_nan_and_missed_class_is_zero() -> None:
    gt = [_boxes([[10, 10, 50, 50]], [0]), _boxes([[5, 5, 25, 25]], [1])]
    det = [_boxes([[10, 10, 50, 50], [0, 0, 9, 9]], [0, 2], [0.9, 0.5]), ImageBoxes.empty()]
    m = evaluate_detection(gt, det, NAMES)
    assert m.per_class["a"].ap50 == pytest.approx(1.0)
    assert m.per_class["b"].ap50 == 0.0
    assert math.isnan(m.per_class["c"].ap50)
    assert m.map50 == pytest.approx(0.5)  # mean over the two classes with ground truth
    assert (m.per_class["a"].n_ground_truth, m.per_class["c"].n_ground_truth) == (1, 0)


def test_no_detections_at_all() -> None:
    gt = [_boxes([[10, 10, 50, 50]], [0]), ImageBoxes.empty()]
    m = evaluate_detection(gt, [ImageBoxes.empty(), ImageBoxes.empty()], NAMES)
    assert m.map50 == 0.0 and m.map50_95 == 0.0
    assert math.isnan(m.per_class["b"].ap50)


def _independent_coco_map(
    gt: list[ImageBoxes], det: list[ImageBoxes], num_classes: int
) -> tuple[float, float, list[float]]:
    """A direct pycocotools evaluation, written without spine_edge.metrics' helpers."""
    images, annotations, results = [], [], []
    for i, (g, d) in enumerate(zip(gt, det)):
        images.append({"id": 100 + i})
        for box, cls in zip(g.boxes, g.classes):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": 1000 + len(annotations),
                    "image_id": 100 + i,
                    "category_id": 10 + int(cls),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, cls, score in zip(d.boxes, d.classes, d.scores):
            results.append(
                {
                    "image_id": 100 + i,
                    "category_id": 10 + int(cls),
                    "score": float(score),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 10 + c} for c in range(num_classes)],
        }
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = []
    for k in range(num_classes):
        p = precision[0, :, k, 0, 2]
        per_class.append(float(p[p > -1].mean()) if (p > -1).any() else math.nan)
    return float(evaluator.stats[1]), float(evaluator.stats[0]), per_class


def test_map_equals_direct_pycocotools_on_random_detections() -> None:
    rng = np.random.default_rng(3)
    gt, det = [], []
    for _ in range(12):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(8, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        classes = rng.integers(0, 3, n)
        gt.append(ImageBoxes(boxes.astype(np.float32), classes))
        jitter = boxes + rng.normal(0, 4, boxes.shape)  # near misses and hits at varying IoU
        extra = rng.uniform(0, 100, (int(rng.integers(0, 3)), 2))
        fp = np.concatenate([extra, extra + 15], 1)
        det_boxes = np.concatenate([jitter, fp]).astype(np.float32)
        det_classes = np.concatenate(
            [np.where(rng.random(n) < 0.8, classes, (classes + 1) % 3), rng.integers(0, 3, len(fp))]
        )
        det.append(ImageBoxes(det_boxes, det_classes.astype(np.int64), rng.random(len(det_boxes)).astype(np.float32)))
    m = evaluate_detection(gt, det, NAMES)
    map50, map50_95, per_class = _independent_coco_map(gt, det, 3)
    assert 0.05 < m.map50 < 0.95  # a case with something to get wrong
    assert m.map50 == pytest.approx(map50, abs=1e-12)
    assert m.map50_95 == pytest.approx(map50_95, abs=1e-12)
    assert [m.per_class[n].ap50 for n in NAMES] == pytest.approx(per_class, abs=1e-12)


def test_gates_flips_and_points() -> None:
    assert delta_points(0.905, 0.91) == pytest.approx(-0.5)
    gate = ACCURACY_GATES["fp16"]
    assert gate.auroc_holds(-0.3) and not gate.auroc_holds(0.31)
    assert gate.map50_holds(math.nan) is None
    assert ACCURACY_GATES["int8"].map50_holds(-1.5)
    assert count_flips(np.array([0.1, 0.5, 0.49, 0.9]), np.array([0.1, 0.49, 0.5, 0.9]), 0.5) == 2
