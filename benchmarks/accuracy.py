"""Accuracy of each precision on a labelled VinDr-layout test split, against FP32 in the same run.

Every precision's cascade runs with the detector forced on every image, so one pass gives:

- the classifier's probability of every image (AUROC, and sensitivity/specificity/F1 at τ);
- the **detector alone**: every image's boxes (what the precision does to the detector; this is the
  mAP the DESIGN.md gates compare, as export does);
- the **cascade**: the same boxes kept only where ``prob ≥ τ`` (a normal-gated image contributes no
  boxes), i.e. what ``spine-edge infer`` reports.

Boxes are those the runtime reports (the bundle's confidence threshold, NMS, letterbox undone, in
original pixels), so mAP here is the deployed system's, at its confidence threshold.

Each image is read once and handed, as the decoded array, to every precision's cascade, so a
slow JPEG 2000 decode is paid once per image and memory stays bounded by one batch.

Metrics come from :mod:`spine_edge.metrics` (scikit-learn, pycocotools). :func:`write_coco_files`
saves the ground truth and every precision's predictions as COCO JSON with the same image and
category ids, so anyone can recompute the numbers with pycocotools alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.benchmarks.config import label_precision
from spine_edge.cascade import Cascade
from spine_edge.errors import ImageReadError
from spine_edge.imageio import read_image
from spine_edge.io_utils import write_text_atomic
from spine_edge.metrics import (
    ACCURACY_GATES,
    ClassificationMetrics,
    DetectionMetrics,
    ImageBoxes,
    coco_detections,
    coco_ground_truth,
    count_flips,
    delta_points,
    evaluate_classification,
    evaluate_detection,
)
from spine_edge.results import CascadeResult
from spine_edge.support import import_optional, json_safe
from spine_edge.verdict import BootstrapSettings, RoleVerdict, judge_classifier, judge_detector
from spine_edge.vindr import ImageRecord

GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass(frozen=True)
class TruthSet:
    """The labelled images evaluated, in order (COCO image id = index + 1).

    Attributes:
        image_ids: VinDr image ids.
        paths: Image files.
        sizes: ``(width, height)`` in pixels.
        labels: 1 abnormal, 0 normal.
        boxes: Ground-truth boxes per image, original pixels.
    """

    image_ids: tuple[str, ...]
    paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    labels: np.ndarray
    boxes: tuple[ImageBoxes, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, keep: Sequence[int]) -> TruthSet:
        """The images at the given indices, in that order."""
        return TruthSet(
            image_ids=tuple(self.image_ids[i] for i in keep),
            paths=tuple(self.paths[i] for i in keep),
            sizes=tuple(self.sizes[i] for i in keep),
            labels=self.labels[list(keep)],
            boxes=tuple(self.boxes[i] for i in keep),
        )

    def describe(self) -> dict[str, Any]:
        """Counts for the report."""
        return {
            "images": len(self),
            "abnormal": int(self.labels.sum()),
            "boxes": int(sum(len(b.classes) for b in self.boxes)),
        }


def truth_from_records(records: Sequence[ImageRecord]) -> TruthSet:
    """Ground truth of VinDr records (boxes already in original pixels)."""
    boxes = []
    for record in records:
        if record.boxes:
            coords = np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for b in record.boxes], np.float64)
            boxes.append(ImageBoxes(coords, np.array([b.class_id for b in record.boxes], np.int64)))
        else:
            boxes.append(ImageBoxes.empty())
    return TruthSet(
        image_ids=tuple(r.image_id for r in records),
        paths=tuple(Path(r.path) for r in records),
        sizes=tuple((int(r.width), int(r.height)) for r in records),
        labels=np.array([int(r.abnormal) for r in records], np.int64),
        boxes=tuple(boxes),
    )


@dataclass(frozen=True)
class Predictions:
    """One precision's outputs on the truth set (detector forced on every image).

    Attributes:
        probs: ``[N]`` ensemble probabilities (NaN where the image failed).
        detections: Boxes per image, original pixels (empty where the image failed).
        errors: ``(index, reason)`` of images this precision could not process.
    """

    probs: np.ndarray
    detections: tuple[ImageBoxes, ...]
    errors: tuple[tuple[int, str], ...] = ()

    def subset(self, keep: Sequence[int]) -> Predictions:
        """The images at the given indices (errors dropped: callers keep only valid images)."""
        return Predictions(self.probs[list(keep)], tuple(self.detections[i] for i in keep))


def gated(predictions: Predictions, threshold: float) -> list[ImageBoxes]:
    """The cascade's boxes: an image below the gate (``prob < τ``) keeps none."""
    return [
        boxes if prob >= threshold else ImageBoxes.empty()
        for prob, boxes in zip(predictions.probs, predictions.detections, strict=True)
    ]


def _boxes_of(result: CascadeResult) -> ImageBoxes:
    if not result.detections:
        return ImageBoxes.empty()
    return ImageBoxes(
        np.array([d.box for d in result.detections], np.float64),
        np.array([d.class_id for d in result.detections], np.int64),
        np.array([d.score for d in result.detections], np.float64),
    )


def _read(path: Path) -> np.ndarray | str:
    """The decoded uint8 image, or the reason it could not be read."""
    try:
        return read_image(path).image
    except ImageReadError as exc:
        return exc.reason + (f" ({exc.hint})" if exc.hint else "")
    except Exception as exc:  # noqa: BLE001 -- a decoder's own bug must cost one image, not the whole benchmark
        return f"unexpected {type(exc).__name__}: {exc}"


def _read_ahead(paths: Sequence[Path], ahead: int, workers: int) -> Iterator[np.ndarray | str]:
    """Decoded images in order, with at most ``ahead`` reads in flight (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spine-edge-bench-read") as pool:
        pending: deque[Future[np.ndarray | str]] = deque()
        remaining = iter(paths)
        for path in remaining:
            pending.append(pool.submit(_read, path))
            if len(pending) >= ahead:
                break
        while pending:
            image = pending.popleft().result()
            next_path = next(remaining, None)
            if next_path is not None:
                pending.append(pool.submit(_read, next_path))
            yield image


def collect_predictions(
    cascades: Mapping[str, Cascade],
    truth: TruthSet,
    batch_size: int,
    read_workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Predictions]:
    """Run every cascade (detector forced) over the truth set, reading each image once.

    Args:
        cascades: Label (e.g. ``fp32``) → cascade built with ``force_detector=True``.
        truth: The images.
        batch_size: Images handed to the cascades at a time.
        read_workers: Threads decoding ahead.
        progress: Called with the number of images done after each batch.

    Returns:
        Label → predictions, every image in order.
    """
    probs = {label: np.full(len(truth), np.nan) for label in cascades}
    detections: dict[str, list[ImageBoxes]] = {label: [] for label in cascades}
    errors: dict[str, list[tuple[int, str]]] = {label: [] for label in cascades}
    chunk: list[tuple[int, np.ndarray | str]] = []

    def flush() -> None:
        arrays = [(i, image) for i, image in chunk if not isinstance(image, str)]
        for label, cascade in cascades.items():
            for i, image in chunk:
                if isinstance(image, str):
                    errors[label].append((i, image))
            results = dict(zip((i for i, _ in arrays), cascade.predict_many([a for _, a in arrays]), strict=True))
            for i, _ in chunk:
                result = results.get(i)
                if result is not None and result.ok:
                    probs[label][i] = float(result.probability)  # type: ignore[arg-type]
                    detections[label].append(_boxes_of(result))
                else:
                    if result is not None:
                        refusal = result.refusal
                        why = f"refused: {refusal.code} ({refusal.reason})" if refusal else str(result.error)
                        errors[label].append((i, why))
                    detections[label].append(ImageBoxes.empty())
        if progress:
            progress(len(chunk))
        chunk.clear()

    for index, image in enumerate(_read_ahead(truth.paths, 2 * batch_size, read_workers)):
        chunk.append((index, image))
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    return {
        label: Predictions(probs[label], tuple(detections[label]), tuple(sorted(errors[label]))) for label in cascades
    }


@dataclass(frozen=True)
class PrecisionAccuracy:
    """One precision's accuracy and its distance from the FP32 reference.

    Attributes:
        label: ``fp32``, ``fp16``, ``int8`` (what ran).
        classification: AUROC and the operating point at τ.
        detector: mAP of the detector alone (every image).
        cascade: mAP of the cascade (gated images keep no boxes).
        delta_auroc_pt: AUROC minus the reference's, in points (0 for the reference).
        delta_map50_pt: Detector-alone mAP@0.5 minus the reference's, in points.
        delta_map50_95_pt: Detector-alone mAP@0.5:0.95 minus the reference's, in points.
        delta_cascade_map50_pt: Cascade mAP@0.5 minus the reference's, in points.
        flips: Images whose gate decision differs from the reference's.
        max_abs_dprob: Largest ``|prob - prob_ref|``.
        positives: Images at or above τ.
        classifier_verdict: Fidelity, ΔAUROC with its paired bootstrap interval and the verdict
            (:func:`spine_edge.verdict.judge_classifier`, the rule export applies); None for the reference.
        detector_verdict: Box agreement with the reference, ΔmAP@0.5 (detector alone) with its interval
            and the verdict; None for the reference.
    """

    label: str
    classification: ClassificationMetrics
    detector: DetectionMetrics
    cascade: DetectionMetrics
    delta_auroc_pt: float
    delta_map50_pt: float
    delta_map50_95_pt: float
    delta_cascade_map50_pt: float
    flips: int
    max_abs_dprob: float
    positives: int
    classifier_verdict: RoleVerdict | None = None
    detector_verdict: RoleVerdict | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN written as null)."""
        return json_safe(
            {
                "label": self.label,
                "classification": self.classification.to_dict(),
                "detector": self.detector.to_dict(),
                "cascade": self.cascade.to_dict(),
                "delta_auroc_pt": self.delta_auroc_pt,
                "delta_map50_pt": self.delta_map50_pt,
                "delta_map50_95_pt": self.delta_map50_95_pt,
                "delta_cascade_map50_pt": self.delta_cascade_map50_pt,
                "flips": self.flips,
                "max_abs_dprob": self.max_abs_dprob,
                "positives": self.positives,
                "classifier_verdict": None if self.classifier_verdict is None else self.classifier_verdict.to_dict(),
                "detector_verdict": None if self.detector_verdict is None else self.detector_verdict.to_dict(),
            }
        )


def valid_indices(predictions: Mapping[str, Predictions]) -> list[int]:
    """Images every precision processed: metrics compare precisions on the same images."""
    failed = {i for p in predictions.values() for i, _ in p.errors}
    n = len(next(iter(predictions.values())).probs)
    return [i for i in range(n) if i not in failed]


def evaluate_accuracy(
    truth: TruthSet,
    predictions: Mapping[str, Predictions],
    reference: str,
    threshold: float,
    class_names: Sequence[str],
    bootstrap: BootstrapSettings | None = None,
) -> dict[str, PrecisionAccuracy]:
    """Metrics of every precision, their deltas against ``reference`` and their verdicts, on the same images.

    Args:
        truth: Ground truth, restricted to the images every precision processed.
        predictions: Label → predictions on exactly those images.
        reference: Label of the FP32 reference in ``predictions``.
        threshold: Gate τ.
        class_names: Detector class names.
        bootstrap: The paired bootstrap of the verdicts' intervals (default: 1000 resamples, seed 0).

    A label's gates are those of its precision (``int8-trt`` → ``int8``); a label without gates
    (the reference) gets no verdict.
    """
    results: dict[str, tuple[ClassificationMetrics, DetectionMetrics, DetectionMetrics]] = {}
    for label, pred in predictions.items():
        results[label] = (
            evaluate_classification(truth.labels, pred.probs, threshold),
            evaluate_detection(truth.boxes, pred.detections, class_names),
            evaluate_detection(truth.boxes, gated(pred, threshold), class_names),
        )
    ref_cls, ref_det, ref_cascade = results[reference]
    ref_probs = predictions[reference].probs
    out = {}
    for label, (cls, det, cascade) in results.items():
        probs = predictions[label].probs
        out[label] = PrecisionAccuracy(
            label=label,
            classification=cls,
            detector=det,
            cascade=cascade,
            delta_auroc_pt=delta_points(cls.auroc, ref_cls.auroc),
            delta_map50_pt=delta_points(det.map50, ref_det.map50),
            delta_map50_95_pt=delta_points(det.map50_95, ref_det.map50_95),
            delta_cascade_map50_pt=delta_points(cascade.map50, ref_cascade.map50),
            flips=count_flips(ref_probs, probs, threshold),
            max_abs_dprob=float(np.abs(probs - ref_probs).max()) if len(probs) else math.nan,
            positives=int((probs >= threshold).sum()),
            **_verdicts(label, reference, truth, predictions, threshold, bootstrap),
        )
    return out


def _verdicts(
    label: str,
    reference: str,
    truth: TruthSet,
    predictions: Mapping[str, Predictions],
    threshold: float,
    bootstrap: BootstrapSettings | None,
) -> dict[str, RoleVerdict]:
    """Both roles' verdicts of ``label`` against the reference (none for the reference or an ungated label)."""
    precision = label_precision(label)
    if label == reference or precision not in ACCURACY_GATES:
        return {}
    ref, cand = predictions[reference], predictions[label]
    return {
        "classifier_verdict": judge_classifier(
            precision, truth.labels, ref.probs, cand.probs, threshold, settings=bootstrap
        ),
        # Bench's boxes are the deployed ones (the bundle's confidence already applied), so all count.
        "detector_verdict": judge_detector(precision, truth.boxes, ref.detections, cand.detections, settings=bootstrap),
    }


# ------------------------------------------------------------------------------------------ files


def coco_ground_truth_file(truth: TruthSet, class_names: Sequence[str]) -> dict[str, Any]:
    """COCO ``instances`` of the truth set: :func:`spine_edge.metrics.coco_ground_truth` with file names,
    VinDr image ids, image sizes and the VinDr class names added."""
    data = coco_ground_truth(truth.boxes, len(class_names))
    data["images"] = [
        {"id": i + 1, "file_name": path.name, "image_id": image_id, "width": w, "height": h}
        for i, (image_id, path, (w, h)) in enumerate(zip(truth.image_ids, truth.paths, truth.sizes, strict=True))
    ]
    data["categories"] = [{"id": c + 1, "name": name, "supercategory": "lesion"} for c, name in enumerate(class_names)]
    data["info"] = {"description": "spine-edge bench ground truth (boxes xywh in original pixels)"}
    return data


def write_coco_files(
    folder: Path,
    truth: TruthSet,
    predictions: Mapping[str, Predictions],
    threshold: float,
    class_names: Sequence[str],
) -> list[Path]:
    """Write the ground truth and each precision's predictions so pycocotools/sklearn recompute the metrics.

    Files (``<label>`` is the precision)::

        ground_truth.json                     COCO instances (images, categories, annotations)
        predictions_<label>_detector.json     COCO results, detector alone (every image)
        predictions_<label>_cascade.json      COCO results, images below τ keep no boxes
        classification_<label>.json           {"threshold", "images": [{"id", "image_id", "file_name",
                                               "abnormal", "probability", "decision"}]}

    pycocotools' ``loadRes`` refuses an empty result list: a file holding ``[]`` means no detection,
    i.e. AP 0 for every class with ground truth (what :mod:`spine_edge.metrics` reports).

    Returns:
        The files written.
    """
    folder = Path(folder)
    written = [write_text_atomic(folder / GROUND_TRUTH_FILE, json.dumps(coco_ground_truth_file(truth, class_names)))]
    for label, pred in predictions.items():
        for kind, boxes in (("detector", list(pred.detections)), ("cascade", gated(pred, threshold))):
            path = folder / f"predictions_{label}_{kind}.json"
            written.append(write_text_atomic(path, json.dumps(coco_detections(boxes))))
        images = [
            {
                "id": i + 1,
                "image_id": image_id,
                "file_name": truth.paths[i].name,
                "abnormal": int(truth.labels[i]),
                "probability": float(prob),
                "decision": bool(prob >= threshold),
            }
            for i, (image_id, prob) in enumerate(zip(truth.image_ids, pred.probs, strict=True))
        ]
        path = folder / f"classification_{label}.json"
        written.append(write_text_atomic(path, json.dumps({"threshold": threshold, "images": images}, indent=1)))
    return written


# ------------------------------------------------------------------------------------------ curves


@dataclass(frozen=True)
class PrecisionRecall:
    """COCO's interpolated precision at its 101 recall points, IoU 0.5, area all, 100 detections.

    Attributes:
        recall: ``[101]`` recall points (``params.recThrs``).
        precision: ``[101]`` precision per point; NaN where pycocotools marks it undefined (-1).
        ap50: Mean of the defined points (the class's AP@0.5).
    """

    recall: np.ndarray
    precision: np.ndarray
    ap50: float


def precision_recall_curves(
    truth: Sequence[ImageBoxes], detections: Sequence[ImageBoxes], class_names: Sequence[str]
) -> dict[str, PrecisionRecall]:
    """Per-class precision–recall curves from pycocotools' own evaluation arrays.

    :func:`spine_edge.metrics.evaluate_detection` keeps only the APs; the plots need the curve behind
    each AP, so this runs COCOeval on the same COCO dicts and reads ``eval["precision"]``. Classes
    without ground truth are left out.
    """
    records = coco_detections(detections)
    gt = coco_ground_truth(truth, len(class_names))
    if not records or not gt["annotations"]:
        return {}
    purpose = "Precision-recall curves"
    coco_cls = import_optional("pycocotools.coco", "bench", purpose).COCO
    coco_eval_cls = import_optional("pycocotools.cocoeval", "bench", purpose).COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = coco_eval_cls(coco_gt, coco_gt.loadRes(records), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    recall = np.asarray(evaluator.params.recThrs, np.float64)
    curves = {}
    for c, name in enumerate(class_names):
        values = np.asarray(evaluator.eval["precision"][0, :, c, 0, -1], np.float64)
        if (values > -1).any():
            curve = np.where(values > -1, values, np.nan)
            curves[name] = PrecisionRecall(recall, curve, float(np.nanmean(curve)))
    return curves
