"""Accuracy metrics computed by the reference implementations, on plain arrays.

Classification metrics come from scikit-learn and detection mAP from pycocotools, so a number this
module reports is the number those libraries report on the same predictions. Both are imported
lazily (extra ``bench``): the runtime imports this module without them.

Detections and ground truth are lists with one :class:`ImageBoxes` per image, in the same order;
boxes are ``xyxy`` in any pixel frame, as long as both lists use the same one.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from spine_edge.fidelity import FidelityGates
from spine_edge.support import import_optional


@dataclass(frozen=True)
class ClassificationMetrics:
    """Binary triage metrics of one set of predictions.

    Attributes:
        auroc: Area under the ROC curve (``nan`` when only one class is present).
        sensitivity: True-positive rate at ``threshold`` (``prob >= threshold`` is positive).
        specificity: True-negative rate at ``threshold``.
        f1: F1 score of the positive class at ``threshold``.
        threshold: The decision threshold τ.
        n_positive: Number of abnormal images.
        n_negative: Number of normal images.
    """

    auroc: float
    sensitivity: float
    specificity: float
    f1: float
    threshold: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image: ground truth (``scores`` unused) or detections.

    Attributes:
        boxes: ``[K, 4]`` float ``xyxy`` boxes.
        classes: ``[K]`` integer class indices (``CLASS_NAMES`` order).
        scores: ``[K]`` confidences; required for detections.
    """

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None = None

    @staticmethod
    def empty() -> ImageBoxes:
        """An image with no boxes (a normal image, or one with no detection)."""
        return ImageBoxes(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.float32))


@dataclass(frozen=True)
class ClassAP:
    """COCO average precision of one class (``nan`` where the class has no ground-truth box)."""

    ap50: float
    ap50_95: float
    n_ground_truth: int


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO-style detection accuracy as pycocotools computes it (area ``all``, maxDets 100).

    Attributes:
        map50: Mean over classes with ground truth of AP at IoU 0.5.
        map50_95: Mean over classes with ground truth of AP averaged over IoU 0.50:0.05:0.95.
        per_class: AP per class name.
        n_images: Number of images evaluated.
        n_detections: Number of detections evaluated.
    """

    map50: float
    map50_95: float
    per_class: dict[str, ClassAP] = field(default_factory=dict)
    n_images: int = 0
    n_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _sklearn_metrics() -> Any:
    return import_optional("sklearn.metrics", "bench", "Computing AUROC / sensitivity / F1")


def compute_auroc(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """scikit-learn's ``roc_auc_score``, or ``nan`` when ``labels`` hold a single class.

    Example:
        >>> compute_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape}) and scores ({s.shape}) differ in length")
    if np.unique(y).size < 2:
        return math.nan
    return float(_sklearn_metrics().roc_auc_score(y, s))


def evaluate_classification(
    labels: np.ndarray | Sequence[int], probs: np.ndarray | Sequence[float], threshold: float
) -> ClassificationMetrics:
    """AUROC and the operating point at τ of binary predictions.

    Args:
        labels: 1 for abnormal, 0 for normal, one per image.
        probs: Predicted probability of abnormal, one per image.
        threshold: Gate threshold τ; ``prob >= τ`` counts as positive, as in the cascade.

    Returns:
        The metrics; rates with an empty denominator are ``nan``.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    predicted = (p >= threshold).astype(np.int64)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    tp = int(((predicted == 1) & (y == 1)).sum())
    tn = int(((predicted == 0) & (y == 0)).sum())
    f1 = float(_sklearn_metrics().f1_score(y, predicted, zero_division=0)) if y.size else math.nan
    return ClassificationMetrics(
        auroc=compute_auroc(y, p),
        sensitivity=tp / positives if positives else math.nan,
        specificity=tn / negatives if negatives else math.nan,
        f1=f1,
        threshold=float(threshold),
        n_positive=positives,
        n_negative=negatives,
    )


def _coco_eval_classes() -> tuple[Any, Any]:
    purpose = "Computing detection mAP"
    coco = import_optional("pycocotools.coco", "bench", purpose)
    cocoeval = import_optional("pycocotools.cocoeval", "bench", purpose)
    return coco.COCO, cocoeval.COCOeval


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_ground_truth(ground_truth: Sequence[ImageBoxes], num_classes: int) -> dict[str, Any]:
    """The COCO ``instances`` dict of the ground truth: image ``i`` gets id ``i + 1``, class ``c`` id ``c + 1``.

    Annotation ids start at 1 because pycocotools reads id 0 as "unmatched".
    """
    annotations: list[dict[str, Any]] = []
    for image_index, truth in enumerate(ground_truth):
        for box, cls in zip(_xywh(truth.boxes), np.asarray(truth.classes).ravel(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index + 1,
                    "category_id": int(cls) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i + 1} for i in range(len(ground_truth))],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        "annotations": annotations,
    }


def coco_detections(detections: Sequence[ImageBoxes]) -> list[dict[str, Any]]:
    """COCO result records of detections, ids matching :func:`coco_ground_truth`."""
    records = []
    for image_index, found in enumerate(detections):
        if found.scores is None:
            raise ValueError(f"detections of image {image_index} have no scores")
        for box, cls, score in zip(
            _xywh(found.boxes), np.asarray(found.classes).ravel(), np.asarray(found.scores).ravel(), strict=True
        ):
            records.append(
                {
                    "image_id": image_index + 1,
                    "category_id": int(cls) + 1,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    return records


def _mean_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


def evaluate_detection(
    ground_truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes], class_names: Sequence[str]
) -> DetectionMetrics:
    """mAP@0.5 and mAP@0.5:0.95, overall and per class, exactly as pycocotools' COCOeval computes them.

    Args:
        ground_truth: One entry per image (an empty one for an image without lesions).
        detections: One entry per image, same order, with scores.
        class_names: Names of the class indices.

    Returns:
        The metrics; ``nan`` where no class has a ground-truth box.

    Example:
        >>> gt = [ImageBoxes(np.array([[0, 0, 10, 10]]), np.array([0]))]
        >>> det = [ImageBoxes(np.array([[0, 0, 10, 10]]), np.array([0]), np.array([0.9]))]
        >>> evaluate_detection(gt, det, ["a"]).map50
        1.0
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection images")
    coco_cls, coco_eval_cls = _coco_eval_classes()
    num_classes = len(class_names)
    gt_dict = coco_ground_truth(ground_truth, num_classes)
    counts = np.bincount([a["category_id"] - 1 for a in gt_dict["annotations"]], minlength=num_classes)
    records = coco_detections(detections)

    per_class: dict[str, ClassAP] = {}
    if not records or not gt_dict["annotations"]:
        # pycocotools cannot load an empty result list; with no detections every class with
        # ground truth has AP 0, and with no ground truth nothing is defined.
        for c, name in enumerate(class_names):
            ap = 0.0 if counts[c] else math.nan
            per_class[name] = ClassAP(ap, ap, int(counts[c]))
        overall = 0.0 if counts.sum() else math.nan
        return DetectionMetrics(overall, overall, per_class, len(ground_truth), len(records))

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(records)
        evaluator = coco_eval_cls(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: [T IoU thresholds, R recall points, K classes, A area ranges, M maxDets]; area "all"
    # is index 0 and maxDets 100 the last index, as summarize() uses for stats[0] and stats[1].
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    for c, name in enumerate(class_names):
        per_class[name] = ClassAP(
            ap50=_mean_valid(precision[0, :, c]),
            ap50_95=_mean_valid(precision[:, :, c]),
            n_ground_truth=int(counts[c]),
        )
    return DetectionMetrics(
        map50=float(evaluator.stats[1]) if evaluator.stats[1] > -1 else math.nan,
        map50_95=float(evaluator.stats[0]) if evaluator.stats[0] > -1 else math.nan,
        per_class=per_class,
        n_images=len(ground_truth),
        n_detections=len(records),
    )


@dataclass(frozen=True)
class AccuracyGate:
    """How far a lower precision may move from FP32 (DESIGN.md): the one rule :mod:`spine_edge.verdict` applies.

    Task gates bound the metric losses, in percentage points; the fidelity gates bound how far the
    candidate's outputs drift from FP32's on the same images, which is stable on small sets and can
    fail a precision on its own.

    Attributes:
        auroc_pt: Largest allowed AUROC loss of the classifier ensemble.
        map50_pt: Largest allowed mAP@0.5 loss of the detector.
        fidelity: Limits on |Δprob|, gate decisions flipped and box agreement with FP32.
    """

    auroc_pt: float
    map50_pt: float
    fidelity: FidelityGates

    def auroc_holds(self, delta_pt: float) -> bool | None:
        """Whether a ΔAUROC point estimate (points) is within the gate; None when it could not be measured."""
        return None if math.isnan(delta_pt) else abs(delta_pt) <= self.auroc_pt + 1e-9

    def map50_holds(self, delta_pt: float) -> bool | None:
        """Whether a ΔmAP@0.5 point estimate (points) is within the gate; None when it could not be measured."""
        return None if math.isnan(delta_pt) else abs(delta_pt) <= self.map50_pt + 1e-9

    def allowed_flips(self, count: int) -> int:
        """Decisions of ``count`` that may change: ``floor(max_flip_fraction × count)``, at least one.

        One changed decision is allowed however few there are: a single borderline case is no evidence.
        """
        return max(1, math.floor(self.fidelity.max_flip_fraction * count))


#: The gate of the 16-bit float executions (FP16, BF16).
_HALF_FLOAT_GATE = AccuracyGate(
    auroc_pt=0.3, map50_pt=0.5, fidelity=FidelityGates(max_abs_dprob=0.05, max_flip_fraction=0.01, min_box_ap=0.90)
)
#: The accuracy gates by precision: what export's search and report and ``spine-edge bench`` apply,
#: through :func:`spine_edge.verdict.judge`. The |Δprob| and box-AP limits are those of
#: :data:`spine_edge.fidelity.PLAN_GATES`, so a built plan may differ from FP32 by no more than its
#: graph was accepted with. The flip limit is stricter than the plans': here every flipped decision
#: counts (a plan counts only decisive flips, on its few parity canvases), and of the N evaluation
#: images ``floor(max_flip_fraction * N)`` may flip, at least one (one borderline image is no evidence).
ACCURACY_GATES: dict[str, AccuracyGate] = {
    "fp16": _HALF_FLOAT_GATE,
    # The FP32 graph computed in BF16 by OpenVINO (7 stored mantissa bits to FP16's 10, FP32 accumulation
    # in the AMX / AVX-512 BF16 units): a 16-bit float execution, judged by FP16's gates, as build-engines
    # judges its parity.
    "bf16": _HALF_FLOAT_GATE,
    "int8": AccuracyGate(
        auroc_pt=1.0, map50_pt=1.5, fidelity=FidelityGates(max_abs_dprob=0.25, max_flip_fraction=0.05, min_box_ap=0.70)
    ),
}


def delta_points(value: float, reference: float) -> float:
    """``value - reference`` in percentage points (metrics in [0, 1] → ×100); ``nan`` if either is."""
    return (value - reference) * 100.0


def count_flips(reference_probs: np.ndarray, probs: np.ndarray, threshold: float) -> int:
    """Images whose gate decision (``prob >= τ``) differs between two sets of probabilities."""
    a = np.asarray(reference_probs).ravel() >= threshold
    b = np.asarray(probs).ravel() >= threshold
    return int((a != b).sum())
