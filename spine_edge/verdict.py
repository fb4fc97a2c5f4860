"""Does a lower precision hold FP32's accuracy? One comparison, one verdict, for export and bench alike.

The compare step of the Polygraphy split (a backend runs a graph; this compares plain data): for a
candidate precision against the FP32 reference on the same images it computes

- **fidelity**, stable on small sets: largest and mean |Δprob|, gate decisions flipped, CAM
  correlation (:func:`spine_edge.fidelity.compare_classifier`), and detection agreement: the AP of
  the candidate's boxes with FP32's boxes as ground truth, per class and overall
  (:func:`spine_edge.fidelity.compare_detections`);
- **task deltas** with uncertainty: ΔAUROC and ΔmAP@0.5 and their paired bootstrap confidence
  intervals. Paired: every bootstrap sample draws the same images for both precisions, so the interval
  measures how much the *difference* depends on which images were drawn, which is far narrower than
  the uncertainty of either metric alone when the two precisions agree image by image.

and one verdict per role, with the gates of :data:`spine_edge.metrics.ACCURACY_GATES`:

- ``fail`` when a fidelity gate breaks, or the whole interval lies below ``−gate`` (a loss beyond the
  gate, with confidence ``level``);
- ``hold`` when the fidelity gates hold and the interval's lower end is at or above ``−gate``;
- ``inconclusive`` otherwise (the interval straddles ``−gate``: too few images to tell), or when the
  task metric cannot be measured (one class only, no ground-truth box).

A gain is never a failure: only the lower end of the interval is tested against ``−gate``. A gain
larger than the gate is reported as a sign that the evaluation set is too small (a lower precision
does not really improve a model). ``spine-edge export`` and ``spine-edge bench`` exit 0 with a
warning on ``inconclusive`` and 4 on ``fail`` (README, "Accuracy gates").

The bootstrap is vectorised: image multiplicities ``[n_boot, N]`` weight AUROC's Mann–Whitney sum
and COCO's cumulative true/false positives, so 1000 resamples cost about as much as a few dozen
pycocotools evaluations. Its point estimates (all multiplicities 1) equal scikit-learn's AUROC and
pycocotools' mAP@0.5 (area ``all``, 100 detections per image and class) on the same predictions.

Example:
    >>> labels = np.array([0, 0, 1, 1, 0, 1])
    >>> ref = np.array([0.1, 0.3, 0.7, 0.9, 0.2, 0.6])
    >>> judge_classifier("int8", labels, ref, ref + 0.01, threshold=0.5).verdict
    'hold'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from spine_edge.fidelity import (
    ClassifierFidelity,
    DetectionFidelity,
    compare_classifier,
    compare_detections,
    match_boxes,
)
from spine_edge.metrics import ACCURACY_GATES, AccuracyGate, ImageBoxes
from spine_edge.postprocess import Detections
from spine_edge.support import json_safe

Verdict = Literal["hold", "fail", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("hold", "inconclusive", "fail")
#: COCO's 101 recall points (``COCOeval.params.recThrs``).
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
#: COCO's detections per image (and class) in mAP (``maxDets[-1]``).
COCO_MAX_DETS = 100
#: Bootstrap samples processed at once are capped so ``samples × detections`` stays near this many values.
_CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class BootstrapSettings:
    """How the paired bootstrap resamples the images.

    Attributes:
        n_boot: Resamples. 1000 puts the 2.5 % / 97.5 % percentiles within about ±0.1 standard
            errors of their limit (Efron & Tibshirani's rule of thumb for percentile intervals) at
            well under a second for a few hundred images.
        level: Two-sided confidence level of the interval.
        seed: Seed of the resampling, so a rerun on the same predictions gives the same verdict.
    """

    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be at least 1, got {self.n_boot}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


def resample_indices(n: int, settings: BootstrapSettings) -> np.ndarray:
    """``[n_boot, n]`` image indices drawn with replacement (the same draws serve both precisions)."""
    rng = np.random.default_rng(settings.seed)
    return rng.integers(0, max(n, 1), size=(settings.n_boot, n))


def resample_counts(indices: np.ndarray) -> np.ndarray:
    """How often each image was drawn in each resample: ``[n_boot, n]`` float64 from ``[n_boot, n]`` indices."""
    boots, n = indices.shape
    flat = (indices + n * np.arange(boots)[:, None]).ravel()
    return np.bincount(flat, minlength=boots * n).reshape(boots, n).astype(np.float64)


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each row of image multiplicities ``counts [B, N]`` (ties count one half, as scikit-learn).

    Returns:
        ``[B]``; NaN where a row draws only one class, or where a score is NaN.
    """
    y = np.asarray(labels).astype(np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(s).any():
        return np.full(counts.shape[0], math.nan)
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    weights = counts[:, order]
    pos = np.add.reduceat(weights * y[order], starts, axis=1)
    neg = np.add.reduceat(weights * (1.0 - y[order]), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, math.nan)


@dataclass(frozen=True)
class _ClassTable:
    """One class's detections over all images, in COCO's accumulation order (descending score)."""

    image: np.ndarray  # [D] image index of each detection
    hits: np.ndarray  # [D] 1 where it matched a ground-truth box at the IoU
    truth_per_image: np.ndarray  # [N] ground-truth boxes of the class per image


def _class_tables(
    truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes], iou: float, max_dets: int
) -> dict[int, _ClassTable]:
    """Match detections to ground truth once per image and class, as COCOeval's ``evaluateImg`` does."""
    classes = sorted({int(c) for boxes in (*truth, *detections) for c in np.asarray(boxes.classes).ravel().tolist()})
    tables = {}
    for cls in classes:
        scores, hits, images = [], [], []
        truth_counts = np.zeros(len(truth), dtype=np.float64)
        for index, (gt, found) in enumerate(zip(truth, detections, strict=True)):
            gt_boxes = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(gt.classes).ravel() == cls]
            keep = np.asarray(found.classes).ravel() == cls
            if found.scores is None:
                raise ValueError(f"detections of image {index} have no scores")
            det_boxes = np.asarray(found.boxes, dtype=np.float64).reshape(-1, 4)[keep]
            det_scores = np.asarray(found.scores, dtype=np.float64).ravel()[keep]
            top = np.argsort(-det_scores, kind="stable")[:max_dets]
            order, matched, _ = match_boxes(det_boxes[top], det_scores[top], gt_boxes, iou)
            truth_counts[index] = len(gt_boxes)
            scores.append(det_scores[top][order])
            hits.append(matched)
            images.append(np.full(len(order), index, dtype=np.int64))
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        ranked = np.argsort(-all_scores, kind="stable")
        tables[cls] = _ClassTable(
            image=(np.concatenate(images) if images else np.zeros(0, np.int64))[ranked],
            hits=(np.concatenate(hits) if hits else np.zeros(0, np.int64))[ranked].astype(np.float64),
            truth_per_image=truth_counts,
        )
    return tables


def _class_ap(table: _ClassTable, counts: np.ndarray) -> np.ndarray:
    """COCO's 101-point interpolated AP of one class for each row of ``counts [B, N]`` (NaN: no ground truth)."""
    positives = counts @ table.truth_per_image
    detections = table.image.size
    if detections == 0:
        return np.where(positives > 0, 0.0, math.nan)
    weights = counts[:, table.image]
    tp = np.cumsum(weights * table.hits, axis=1)
    fp = np.cumsum(weights * (1.0 - table.hits), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / positives[:, None]
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
    # Precision envelope: the best precision at any recall at least as high (COCOeval.accumulate).
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.full(counts.shape[0], math.nan)
    for row in np.flatnonzero(positives > 0):
        index = np.searchsorted(recall[row], RECALL_POINTS, side="left")
        sampled = np.where(index < detections, envelope[row, np.minimum(index, detections - 1)], 0.0)
        ap[row] = sampled.mean()
    return ap


def weighted_map50(
    truth: Sequence[ImageBoxes],
    detections: Sequence[ImageBoxes],
    counts: np.ndarray,
    iou: float = 0.5,
    max_dets: int = COCO_MAX_DETS,
) -> np.ndarray:
    """mAP at one IoU for each row of image multiplicities ``counts [B, N]``, as pycocotools computes it.

    A row counts an image drawn ``k`` times as ``k`` copies of it, which is what evaluating the
    resampled image list with pycocotools would do.

    Returns:
        ``[B]``: mean AP over the classes with a ground-truth box in the row (NaN where none has).
    """
    if len(truth) != len(detections):
        raise ValueError(f"{len(truth)} ground-truth images but {len(detections)} detection images")
    tables = _class_tables(truth, detections, iou, max_dets)
    boots = counts.shape[0]
    if not tables:
        return np.full(boots, math.nan)
    largest = max(t.image.size for t in tables.values())
    step = max(1, _CHUNK_VALUES // max(largest, 1))
    per_class = np.full((boots, len(tables)), math.nan)
    for first in range(0, boots, step):
        block = counts[first : first + step]
        for column, table in enumerate(tables.values()):
            per_class[first : first + step, column] = _class_ap(table, block)
    valid = ~np.isnan(per_class)
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(axis=1), np.nansum(per_class, axis=1) / valid.sum(axis=1), math.nan)


@dataclass(frozen=True)
class DeltaInterval:
    """A task metric of the candidate against FP32, with its paired bootstrap interval and verdict.

    Attributes:
        metric: ``auroc`` or ``map50``.
        reference: FP32's value on all images.
        candidate: The candidate's value on all images.
        delta_pt: ``candidate − reference``, in percentage points.
        low_pt: Lower end of the interval of the delta (points).
        high_pt: Upper end (points).
        gate_pt: Largest loss the gate allows (points).
        level: Confidence level of the interval.
        n_boot: Resamples drawn (resamples where the metric is undefined are left out).
        verdict: ``hold`` (lower end ≥ −gate), ``fail`` (upper end < −gate) or ``inconclusive``.
    """

    metric: str
    reference: float
    candidate: float
    delta_pt: float
    low_pt: float
    high_pt: float
    gate_pt: float
    level: float
    n_boot: int
    verdict: Verdict

    @property
    def measurable(self) -> bool:
        """Whether the metric was defined on the evaluation set."""
        return not math.isnan(self.delta_pt)

    @property
    def large_gain(self) -> bool:
        """A gain larger than the gate: a lower precision does not improve a model that much, the set is too small."""
        return self.measurable and self.delta_pt > self.gate_pt

    def describe(self) -> str:
        """``ΔAUROC −0.20 pt [−0.61, +0.15] (gate −1.0)``."""
        name = {"auroc": "ΔAUROC", "map50": "ΔmAP@0.5"}.get(self.metric, f"Δ{self.metric}")
        if not self.measurable:
            return f"{name} not measurable"
        return (
            f"{name} {self.delta_pt:+.2f} pt [{self.low_pt:+.2f}, {self.high_pt:+.2f}] "
            f"({self.level:.0%} CI, gate −{self.gate_pt:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return {**json_safe(asdict(self)), "large_gain": self.large_gain}


def task_verdict(delta_pt: float, low_pt: float, high_pt: float, gate_pt: float) -> Verdict:
    """The verdict rule on a task delta and its interval (points): only losses count."""
    if any(math.isnan(v) for v in (delta_pt, low_pt, high_pt)):
        return "inconclusive"
    if low_pt >= -gate_pt - 1e-9:
        return "hold"
    if high_pt < -gate_pt - 1e-9:
        return "fail"
    return "inconclusive"


def delta_interval(
    metric: str, reference: np.ndarray, candidate: np.ndarray, gate_pt: float, settings: BootstrapSettings
) -> DeltaInterval:
    """The interval and verdict of a metric computed on all images (index 0) and on each resample (1:).

    Args:
        metric: Its name.
        reference: ``[1 + n_boot]`` FP32's metric, all images first.
        candidate: ``[1 + n_boot]`` the candidate's on the same rows.
        gate_pt: Largest allowed loss (points).
        settings: The bootstrap that drew the rows.
    """
    deltas = (candidate[1:] - reference[1:]) * 100.0
    deltas = deltas[~np.isnan(deltas)]
    point = float((candidate[0] - reference[0]) * 100.0)
    if deltas.size and not math.isnan(point):
        tail = (1.0 - settings.level) / 2.0 * 100.0
        low, high = (float(v) for v in np.percentile(deltas, [tail, 100.0 - tail]))
    else:
        low = high = math.nan
    return DeltaInterval(
        metric=metric,
        reference=float(reference[0]),
        candidate=float(candidate[0]),
        delta_pt=point,
        low_pt=low,
        high_pt=high,
        gate_pt=gate_pt,
        level=settings.level,
        n_boot=int(deltas.size),
        verdict=task_verdict(point, low, high, gate_pt),
    )


def paired_counts(n: int, settings: BootstrapSettings) -> np.ndarray:
    """``[1 + n_boot, n]`` image multiplicities: every image once (the point estimate), then the resamples."""
    return _with_all_images(resample_counts(resample_indices(n, settings)))


def _with_all_images(counts: np.ndarray) -> np.ndarray:
    """Row 0: every image once (the point estimate); then the resamples."""
    return np.vstack([np.ones((1, counts.shape[1])), counts])


def cam_correlation(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean Pearson correlation of the two precisions' CAMs, image by image (NaN if no image has a varying CAM).

    Images where either map is constant (no correlation defined) are left out.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise ValueError(f"reference CAMs {ref.shape} and candidate CAMs {cand.shape} differ: compare the same images")
    ref = ref - ref.mean(axis=1, keepdims=True)
    cand = cand - cand.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    valid = norms > 0
    if not valid.any():
        return math.nan
    return float(((ref * cand).sum(axis=1)[valid] / norms[valid]).mean())


@dataclass(frozen=True)
class RoleVerdict:
    """One role's comparison of a candidate precision with FP32, and its verdict.

    Attributes:
        role: ``classifier`` or ``detector``.
        precision: ``fp16`` or ``int8`` (selects the gates).
        images: Images compared.
        task: The task delta (ΔAUROC or ΔmAP@0.5) with its interval.
        classifier: Probability fidelity (classifier only).
        detector: Box agreement with FP32's boxes (detector only).
        cam_correlation: Mean CAM correlation with FP32 (classifier, when CAMs were given).
        failures: Fidelity gates broken, one sentence each.
        notes: What a reader should know (a large gain, an unmeasurable metric).
        verdict: ``hold``, ``fail`` or ``inconclusive``.
    """

    role: str
    precision: str
    images: int
    task: DeltaInterval
    classifier: ClassifierFidelity | None = None
    detector: DetectionFidelity | None = None
    cam_correlation: float | None = None
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    verdict: Verdict = "inconclusive"

    @property
    def within_gates(self) -> bool:
        """No fidelity gate broken and the task delta's point estimate within the gate (what the INT8 search aims for).

        Weaker than ``hold``: the interval may still straddle the gate on a small set, and more FP32
        layers cannot narrow an interval that the number of images sets.
        """
        task = self.task
        loss_ok = not task.measurable or task.delta_pt >= -task.gate_pt - 1e-9
        return not self.failures and self.verdict != "fail" and loss_ok

    def describe(self) -> str:
        """One line: verdict, task interval, fidelity and failures."""
        parts = [f"{self.role} {self.precision}: {self.verdict.upper()}", self.task.describe()]
        if self.classifier is not None:
            fid = self.classifier
            parts.append(f"max|Δp| {fid.max_abs_dprob:.3g}, mean|Δp| {fid.mean_abs_dprob:.3g}, {fid.flips} flip(s)")
        if self.cam_correlation is not None and not math.isnan(self.cam_correlation):
            parts.append(f"CAM r {self.cam_correlation:.3f}")
        if self.detector is not None:
            parts.append(f"box agreement AP {self.detector.ap:.3f} (recall {self.detector.recall:.2f})")
        parts += [f"fails: {f}" for f in self.failures] + list(self.notes)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data: dict[str, Any] = json_safe(
            {
                "role": self.role,
                "precision": self.precision,
                "images": self.images,
                "verdict": self.verdict,
                "task": self.task.to_dict(),
                "classifier_fidelity": None if self.classifier is None else self.classifier.to_dict(),
                "cam_correlation": self.cam_correlation,
                "detection_agreement": None if self.detector is None else self.detector.to_dict(),
                "failures": list(self.failures),
                "notes": list(self.notes),
            }
        )
        return data


def _gate(precision: str) -> AccuracyGate:
    gate = ACCURACY_GATES.get(precision)
    if gate is None:
        raise ValueError(f"no accuracy gate for precision {precision!r}; gated precisions: {sorted(ACCURACY_GATES)}")
    return gate


def _decide(task: DeltaInterval, failures: Sequence[str]) -> tuple[Verdict, tuple[str, ...]]:
    notes = []
    if task.large_gain:
        notes.append(
            f"gain of {task.delta_pt:+.2f} pt beyond the ±{task.gate_pt:g} pt gate: a lower precision does not "
            "improve a model; the evaluation set is too small to measure this precision (use more images)"
        )
    if not task.measurable:
        notes.append(f"{task.metric} not measurable on these images (one class only, or no ground-truth box)")
    elif task.verdict == "inconclusive":
        notes.append(
            f"interval [{task.low_pt:+.2f}, {task.high_pt:+.2f}] pt straddles the −{task.gate_pt:g} pt gate: "
            "too few images to tell"
        )
    return ("fail" if failures else task.verdict), tuple(notes)


def judge_classifier(
    precision: str,
    labels: np.ndarray,
    reference_probs: np.ndarray,
    candidate_probs: np.ndarray,
    threshold: float,
    reference_cams: np.ndarray | None = None,
    candidate_cams: np.ndarray | None = None,
    settings: BootstrapSettings | None = None,
) -> RoleVerdict:
    """Compare a candidate classifier's probabilities with FP32's on the same images and decide.

    Args:
        precision: ``fp16`` or ``int8``.
        labels: ``[N]`` 1 abnormal, 0 normal.
        reference_probs: ``[N]`` FP32 probabilities.
        candidate_probs: ``[N]`` the candidate's, same images and order.
        threshold: Gate threshold τ (decisions ``prob >= τ``).
        reference_cams: ``[N, H, W]`` FP32 CAMs, or None.
        candidate_cams: The candidate's CAMs, or None.
        settings: The bootstrap (default :class:`BootstrapSettings`).

    Returns:
        Fidelity, ΔAUROC with its interval, and the verdict.
    """
    settings = settings or BootstrapSettings()
    gate = _gate(precision)
    y = np.asarray(labels).astype(np.int64).ravel()
    ref = np.asarray(reference_probs, dtype=np.float64).ravel()
    cand = np.asarray(candidate_probs, dtype=np.float64).ravel()
    fidelity = compare_classifier(ref, cand, threshold)
    counts = paired_counts(len(y), settings)
    task = delta_interval(
        "auroc", weighted_auroc(y, ref, counts), weighted_auroc(y, cand, counts), gate.auroc_pt, settings
    )
    failures = []
    limits = gate.fidelity
    if fidelity.nonfinite:
        failures.append(f"{fidelity.nonfinite} probabilities are NaN or infinite")
    if fidelity.max_abs_dprob > limits.max_abs_dprob:
        failures.append(f"max |Δprob| {fidelity.max_abs_dprob:.3g} > {limits.max_abs_dprob:g}")
    allowed = gate.allowed_flips(len(y))
    if fidelity.flips > allowed:
        failures.append(f"{fidelity.flips} of {len(y)} gate decisions flipped (> {allowed})")
    correlation = None
    if reference_cams is not None and candidate_cams is not None:
        correlation = cam_correlation(reference_cams, candidate_cams)
    verdict, notes = _decide(task, failures)
    return RoleVerdict(
        role="classifier",
        precision=precision,
        images=len(y),
        task=task,
        classifier=fidelity,
        cam_correlation=correlation,
        failures=tuple(failures),
        notes=notes,
        verdict=verdict,
    )


def _as_detections(boxes: ImageBoxes, min_score: float) -> Detections:
    scores = np.zeros(len(boxes.classes), np.float32) if boxes.scores is None else np.asarray(boxes.scores)
    keep = scores >= min_score
    return Detections(
        np.asarray(boxes.boxes, np.float32).reshape(-1, 4)[keep],
        scores.astype(np.float32)[keep],
        np.asarray(boxes.classes, np.int64).ravel()[keep],
    )


def judge_detector(
    precision: str,
    truth: Sequence[ImageBoxes],
    reference: Sequence[ImageBoxes],
    candidate: Sequence[ImageBoxes],
    agreement_conf: float = 0.0,
    iou: float = 0.5,
    settings: BootstrapSettings | None = None,
) -> RoleVerdict:
    """Compare a candidate detector's boxes with FP32's on the same images and decide.

    Args:
        precision: ``fp16`` or ``int8``.
        truth: Ground-truth boxes per image.
        reference: FP32's detections per image (with scores), same frame as ``truth``.
        candidate: The candidate's detections.
        agreement_conf: Boxes below this score are left out of the agreement with FP32 (the deployed
            confidence: the near-zero-score boxes kept for mAP reshuffle under any rounding, so
            counting them would measure noise no user sees). mAP uses every box.
        iou: IoU of a match, for mAP and agreement.
        settings: The bootstrap (default :class:`BootstrapSettings`).

    Returns:
        Box agreement, ΔmAP@0.5 with its interval, and the verdict.
    """
    settings = settings or BootstrapSettings()
    gate = _gate(precision)
    agreement = compare_detections(
        [_as_detections(b, agreement_conf) for b in reference],
        [_as_detections(b, agreement_conf) for b in candidate],
        iou,
    )
    counts = paired_counts(len(truth), settings)
    task = delta_interval(
        "map50",
        weighted_map50(truth, reference, counts, iou),
        weighted_map50(truth, candidate, counts, iou),
        gate.map50_pt,
        settings,
    )
    failures = []
    if agreement.ap < gate.fidelity.min_box_ap:
        failures.append(f"box agreement AP with FP32 {agreement.ap:.3f} < {gate.fidelity.min_box_ap:.2f}")
    verdict, notes = _decide(task, failures)
    return RoleVerdict(
        role="detector",
        precision=precision,
        images=len(truth),
        task=task,
        detector=agreement,
        failures=tuple(failures),
        notes=notes,
        verdict=verdict,
    )


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """The verdict of several comparisons: ``fail`` if any fails, else ``inconclusive`` if any is, else ``hold``."""
    seen = set(verdicts)
    return max(seen, key=VERDICTS.index) if seen else "inconclusive"
