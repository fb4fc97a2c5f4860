"""How closely a candidate run reproduces a reference run: plain data in, plain data out.

The comparison step of the Polygraphy pattern: a backend runs a graph, and these functions compare
what two runs produced on the same inputs, without knowing which libraries produced them. They
serve three callers: ``build-engines`` (a freshly built TensorRT plan against ONNX Runtime FP32,
refused when it breaks :data:`PLAN_GATES`), the GPU check script, and the precision verdict
(export's search and ``bench``), which adds task metrics on top of these.

- :func:`compare_classifier`: probability differences and gate decisions flipped at τ.
- :func:`compare_detections`: the reference's boxes play ground truth, the candidate's boxes are
  scored against them (COCO-style 101-point AP per class at one IoU), plus matched fraction and IoU.

Example:
    >>> ref = np.array([0.1, 0.6, 0.9], np.float32)
    >>> fid = compare_classifier(ref, ref + np.float32(0.01), threshold=0.605)
    >>> fid.flips, round(fid.max_abs_dprob, 3)
    (1, 0.01)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spine_edge.postprocess import Detections, box_iou
from spine_edge.support import json_safe

#: Recall points of COCO's interpolated AP.
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class ClassifierFidelity:
    """Agreement of two sets of classifier probabilities on the same images.

    Attributes:
        count: Images compared.
        threshold: Gate threshold τ at which decisions are compared (``prob >= τ`` is positive).
        max_abs_dprob: Largest ``|p_candidate - p_reference|`` (NaN or inf in the candidate count as inf).
        mean_abs_dprob: Mean of the same over the images.
        flips: Images whose gate decision differs.
        nonfinite: Candidate probabilities that are NaN or infinite.
        margin: Band around τ within which a flip is expected (see ``decisive_flips``).
        decisive_flips: Flips of images whose reference probability is at least ``margin`` from τ:
            those a difference within the allowed ``|Δprob|`` cannot explain (all flips when
            ``margin`` is 0).
    """

    count: int
    threshold: float
    max_abs_dprob: float
    mean_abs_dprob: float
    flips: int
    nonfinite: int
    margin: float = 0.0
    decisive_flips: int = 0

    @property
    def flip_fraction(self) -> float:
        """``flips / count`` (0 for an empty comparison)."""
        return self.flips / self.count if self.count else 0.0

    @property
    def decisive_flip_fraction(self) -> float:
        """``decisive_flips / count`` (0 for an empty comparison)."""
        return self.decisive_flips / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinities become None)."""
        return {
            **json_safe(asdict(self)),
            "flip_fraction": self.flip_fraction,
            "decisive_flip_fraction": self.decisive_flip_fraction,
        }


def compare_classifier(
    ref_probs: np.ndarray, cand_probs: np.ndarray, threshold: float, margin: float = 0.0
) -> ClassifierFidelity:
    """Compare candidate probabilities with reference ones image by image.

    Args:
        ref_probs: ``[N]`` (or any shape, flattened) reference probabilities, e.g. ONNX Runtime FP32.
        cand_probs: Candidate probabilities of the same images in the same order.
        threshold: Gate threshold τ.
        margin: Flips of images whose reference lies less than ``margin`` from τ are counted in
            ``flips`` but not in ``decisive_flips`` (a gate allowing ``|Δprob| <= margin`` must expect them).

    Returns:
        The differences and flipped decisions. A NaN candidate counts as a flip and as an infinite
        difference, so a broken run never looks close.

    Raises:
        ValueError: The two arrays hold different numbers of values.
    """
    ref = np.asarray(ref_probs, dtype=np.float64).ravel()
    cand = np.asarray(cand_probs, dtype=np.float64).ravel()
    if ref.shape != cand.shape:
        raise ValueError(f"reference has {ref.size} probabilities, candidate {cand.size}: compare the same images")
    if ref.size == 0:
        return ClassifierFidelity(0, float(threshold), 0.0, 0.0, 0, 0, float(margin), 0)
    finite = np.isfinite(cand)
    delta = np.where(finite, np.abs(cand - ref), np.inf)
    flipped = ((ref >= threshold) != (cand >= threshold)) | ~finite
    return ClassifierFidelity(
        count=int(ref.size),
        threshold=float(threshold),
        max_abs_dprob=float(delta.max()),
        mean_abs_dprob=float(delta.mean()),
        flips=int(np.count_nonzero(flipped)),
        nonfinite=int(np.count_nonzero(~finite)),
        margin=float(margin),
        decisive_flips=int(np.count_nonzero(flipped & ((np.abs(ref - threshold) >= margin) | ~finite))),
    )


@dataclass(frozen=True)
class ClassAgreement:
    """Box agreement of one class.

    Attributes:
        class_id: Class index (the detector's output channel).
        ref_boxes: Reference boxes of this class, over all images.
        cand_boxes: Candidate boxes of this class.
        matched: Reference boxes matched by a candidate box at the IoU threshold.
        ap: Candidate boxes' average precision against the reference boxes (101-point, COCO style);
            0 when the reference has no box of this class but the candidate has some.
    """

    class_id: int
    ref_boxes: int
    cand_boxes: int
    matched: int
    ap: float


@dataclass(frozen=True)
class DetectionFidelity:
    """Agreement of two detectors' boxes on the same images.

    Attributes:
        images: Images compared.
        iou: IoU at which a candidate box matches a reference box of the same class.
        ref_boxes: Reference boxes, all classes.
        cand_boxes: Candidate boxes, all classes.
        matched: Reference boxes matched (greedy by candidate score, one candidate per reference box).
        mean_iou: Mean IoU of the matched pairs (1.0 when nothing was matched and nothing was expected).
        ap: The per-class APs averaged with each class weighted by its boxes (the larger of its
            reference and candidate counts, so boxes in a class the reference lacks count against
            the candidate); 1.0 when neither side has any box (perfect agreement on "nothing here").
            Weighted, not a plain mean over classes, so that it is stable on small sets: on the
            demo's 100 test images one class had a single reference box, and losing it moved the
            plain mean by 0.2 (0.93 -> 0.72) while every other class agreed as well as before.
        class_mean_ap: The plain mean of the per-class APs (COCO's mAP form), for reference.
        per_class: One :class:`ClassAgreement` per class either side has boxes for, by class id.
    """

    images: int
    iou: float
    ref_boxes: int
    cand_boxes: int
    matched: int
    mean_iou: float
    ap: float
    per_class: tuple[ClassAgreement, ...]
    class_mean_ap: float = 1.0

    @property
    def recall(self) -> float:
        """Matched share of the reference boxes (1.0 when the reference has none)."""
        return self.matched / self.ref_boxes if self.ref_boxes else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data: dict[str, Any] = json_safe(asdict(self))
        data["recall"] = self.recall
        return data


def _interpolated_ap(hits: np.ndarray, total: int) -> float:
    """101-point interpolated AP of detections sorted by score (``hits``: 1 for a match, 0 otherwise)."""
    if total == 0:
        return 0.0 if hits.size else 1.0
    if hits.size == 0:
        return 0.0
    tp = np.cumsum(hits)
    recall = tp / total
    precision = tp / np.arange(1, hits.size + 1)
    # Precision envelope: the best precision at any recall at least as high.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, _RECALL_POINTS, side="left")
    sampled = np.where(index < envelope.size, envelope[np.minimum(index, envelope.size - 1)], 0.0)
    return float(sampled.mean())


def match_boxes(
    cand_boxes: np.ndarray, cand_scores: np.ndarray, ref_boxes: np.ndarray, iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO's greedy matching of one image and class: candidates by descending score each take the
    unmatched reference box of highest IoU, if that IoU is at least ``iou``.

    Args:
        cand_boxes: ``[K, 4]`` candidate boxes (xyxy).
        cand_scores: ``[K]`` their scores.
        ref_boxes: ``[R, 4]`` reference (or ground-truth) boxes of the same image and class.
        iou: IoU threshold of a match.

    Returns:
        ``order`` (candidate indices by descending score, stable), ``hits`` (1 where the candidate at
        that rank matched, int64) and ``ious`` (the matched IoU at that rank, 0 where unmatched).
    """
    order = np.argsort(-np.asarray(cand_scores), kind="stable")
    hits = np.zeros(len(order), dtype=np.int64)
    ious = np.zeros(len(order), dtype=np.float64)
    if len(ref_boxes) and len(order):
        overlaps = box_iou(np.asarray(cand_boxes)[order], ref_boxes)
        taken = np.zeros(len(ref_boxes), dtype=bool)
        for rank in range(len(order)):
            row = np.where(taken, -1.0, overlaps[rank])
            best = int(row.argmax())
            if row[best] >= iou:
                taken[best] = True
                hits[rank] = 1
                ious[rank] = row[best]
    return order, hits, ious


def compare_detections(
    ref_dets: Sequence[Detections], cand_dets: Sequence[Detections], iou: float = 0.5
) -> DetectionFidelity:
    """Score the candidate's boxes against the reference's, as if the reference were ground truth.

    Matching follows COCO: per class, candidate boxes in descending score order each take the
    unmatched reference box of the same image with the highest IoU, if that IoU is at least ``iou``.

    Args:
        ref_dets: One :class:`~spine_edge.postprocess.Detections` per image (e.g. ONNX Runtime FP32,
            decoded and NMS'ed with the bundle's thresholds).
        cand_dets: The candidate's detections of the same images, decoded the same way.
        iou: IoU threshold of a match.

    Returns:
        Box counts, matches, mean IoU and AP per class and overall.

    Raises:
        ValueError: Different numbers of images, or ``iou`` outside (0, 1].
    """
    if len(ref_dets) != len(cand_dets):
        raise ValueError(f"reference has {len(ref_dets)} images, candidate {len(cand_dets)}: compare the same images")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    classes = sorted({int(c) for d in (*ref_dets, *cand_dets) for c in np.asarray(d.class_ids).tolist()})
    per_class: list[ClassAgreement] = []
    matched_ious: list[float] = []
    for cls in classes:
        scored: list[tuple[float, int]] = []  # (score, hit) over all images
        total = matched = cand_total = 0
        for ref, cand in zip(ref_dets, cand_dets, strict=True):
            ref_boxes = np.asarray(ref.boxes)[np.asarray(ref.class_ids) == cls]
            keep = np.asarray(cand.class_ids) == cls
            cand_boxes, cand_scores = np.asarray(cand.boxes)[keep], np.asarray(cand.scores)[keep]
            total += len(ref_boxes)
            cand_total += len(cand_boxes)
            order, hits, ious = match_boxes(cand_boxes, cand_scores, ref_boxes, iou)
            scored.extend(zip(cand_scores[order].astype(float).tolist(), hits.tolist(), strict=True))
            matched_ious.extend(ious[hits == 1].tolist())
            matched += int(hits.sum())
        scored.sort(key=lambda item: -item[0])
        hits = np.array([hit for _, hit in scored], dtype=np.float64)
        per_class.append(ClassAgreement(cls, total, cand_total, matched, _interpolated_ap(hits, total)))
    ref_total = sum(c.ref_boxes for c in per_class)
    return DetectionFidelity(
        images=len(ref_dets),
        iou=float(iou),
        ref_boxes=ref_total,
        cand_boxes=sum(c.cand_boxes for c in per_class),
        matched=sum(c.matched for c in per_class),
        mean_iou=float(np.mean(matched_ious)) if matched_ious else (1.0 if ref_total == 0 else 0.0),
        ap=_box_weighted_ap(per_class),
        per_class=tuple(per_class),
        class_mean_ap=_class_mean_ap(per_class),
    )


def _class_mean_ap(per_class: Sequence[ClassAgreement]) -> float:
    """Plain mean of the per-class APs over the classes the reference has boxes of (pycocotools' rule)."""
    return _weighted_ap(per_class, [1.0 if c.ref_boxes else 0.0 for c in per_class])


def _box_weighted_ap(per_class: Sequence[ClassAgreement]) -> float:
    """Per-class AP weighted by each class's reference boxes; classes without one are left out, as in COCO.

    A class the reference has no box of has no AP (its candidate boxes are counted in ``cand_boxes``
    against ``matched``). Weighting it by its candidate boxes, as an earlier revision did, scored a
    candidate identical to FP32 at 0.56: build-engines' parity check decodes the candidate down to half
    the confidence threshold, so low-score boxes of another class appeared with AP 0.
    """
    return _weighted_ap(per_class, [float(c.ref_boxes) for c in per_class])


def _weighted_ap(per_class: Sequence[ClassAgreement], weights: Sequence[float]) -> float:
    """Weighted mean AP; a reference with no box at all is judged by the candidate's boxes alone (1.0 if none)."""
    total = float(sum(weights))
    if total == 0:
        return 0.0 if any(c.cand_boxes for c in per_class) else 1.0
    return float(np.dot(weights, [c.ap for c in per_class]) / total)


@dataclass(frozen=True)
class FidelityGates:
    """Limits a built plan must stay within against ONNX Runtime FP32 on the parity canvases.

    These catch a broken plan (wrong weights, overflow, a layer lowered too far), not a small
    accuracy loss: the accuracy verdict of a precision is measured at export on real images.

    Attributes:
        max_abs_dprob: Largest probability difference allowed.
        max_flip_fraction: Share of gate decisions allowed to flip *decisively* (reference further than
            ``max_abs_dprob`` from τ: compare with ``margin=max_abs_dprob``); flips inside that band
            follow from the allowed difference and are reported, not refused.
        min_box_ap: Smallest candidate-box AP against the reference boxes.
    """

    max_abs_dprob: float
    max_flip_fraction: float
    min_box_ap: float


#: Default gates per precision for a built plan against ONNX Runtime FP32. FP32 plans run with TF32
#: off, so they match to rounding; FP16/INT8 allow no more |Δprob| than the precision verdict
#: (``spine_edge.metrics.ACCURACY_GATES``) accepted for the graph at export, so a plan is refused for
#: computing something else than that graph, never for the precision's own, already accepted, error.
PLAN_GATES: dict[str, FidelityGates] = {
    "fp32": FidelityGates(max_abs_dprob=1e-3, max_flip_fraction=0.0, min_box_ap=0.98),
    "fp16": FidelityGates(max_abs_dprob=0.05, max_flip_fraction=0.05, min_box_ap=0.90),
    "int8": FidelityGates(max_abs_dprob=0.25, max_flip_fraction=0.10, min_box_ap=0.70),
}


def gate_violations(
    gates: FidelityGates,
    classifier: ClassifierFidelity | None = None,
    detector: DetectionFidelity | None = None,
) -> tuple[str, ...]:
    """The gates a comparison breaks, each as one readable sentence (empty: all hold).

    Decisive flips are counted against ``max_flip_fraction``: with a handful of canvases any
    decisive flip under a zero-flip gate is a violation.
    """
    problems: list[str] = []
    if classifier is not None:
        if classifier.nonfinite:
            problems.append(f"{classifier.nonfinite} probabilities are NaN or infinite")
        if classifier.max_abs_dprob > gates.max_abs_dprob:
            problems.append(f"max |Δprob| {classifier.max_abs_dprob:.3g} > {gates.max_abs_dprob:.3g}")
        if classifier.decisive_flip_fraction > gates.max_flip_fraction:
            problems.append(
                f"{classifier.decisive_flips} of {classifier.count} gate decisions flipped with the reference at "
                f"least {classifier.margin:.3g} from τ (> {gates.max_flip_fraction:.0%})"
            )
    if detector is not None and detector.ap < gates.min_box_ap:
        problems.append(f"box AP against the reference {detector.ap:.3f} < {gates.min_box_ap:.2f}")
    return tuple(problems)
