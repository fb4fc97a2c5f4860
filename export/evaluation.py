"""Accuracy of every exported graph on the evaluation images, measured against the FP32 graphs.

The evaluation split is read once (:func:`read_eval_set`, every image by default); the FP32 graphs'
outputs on it are the reference (:func:`evaluate_fp32`); each lower-precision graph is run on ONNX
Runtime CPU and compared with that reference (:meth:`Evaluation.compare_classifier`,
:meth:`Evaluation.compare_detector`) through :mod:`spine_edge.verdict`, the comparison and verdict
rule that bench applies too: fidelity, paired bootstrap intervals of ΔAUROC / ΔmAP@0.5, and
``hold`` / ``fail`` / ``inconclusive``.
The report's rows (:func:`accuracy_row`) and the report itself (:func:`assemble_report`) are built
once, at the end, from those frozen comparisons.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spine_edge.constants import CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.errors import DatasetError, SpineEdgeError
from spine_edge.export.bundle_writer import AccuracyReport, PrecisionAccuracy
from spine_edge.export.classifier_graph import CAM_NAME, INPUT_NAME, OOD_NAME, PROB_NAME, member_scope
from spine_edge.export.detector_graph import OUTPUT_NAME
from spine_edge.imageio import read_image
from spine_edge.metrics import (
    ClassificationMetrics,
    DetectionMetrics,
    ImageBoxes,
    delta_points,
    evaluate_classification,
    evaluate_detection,
)
from spine_edge.postprocess import decode_yolo
from spine_edge.preprocess import Letterbox, letterbox
from spine_edge.verdict import BootstrapSettings, RoleVerdict, judge_classifier, judge_detector

log = logging.getLogger(__name__)

#: Detections kept per image for mAP (COCO's and ultralytics val's limit).
MAP_MAX_DET = 300


# ------------------------------------------------------------------------------------ evaluation data


@dataclass(frozen=True)
class EvalSet:
    """The evaluation split, read once and letterboxed for both graphs.

    Attributes:
        folder: Prepared cache.
        split: Split name.
        image_ids: Image ids in order.
        labels: 1 abnormal / 0 normal.
        classifier_canvases: ``[N, 1, Sc, Sc]`` uint8 (pad 0).
        detector_canvases: ``[N, 1, Sd, Sd]`` uint8 (pad 114).
        placements: Detector letterbox of each image (canvas → source pixels).
        ground_truth: Boxes in source pixels.
        fingerprint: ``prepare.json``'s fingerprint ("" if absent).
    """

    folder: Path
    split: str
    image_ids: tuple[str, ...]
    labels: np.ndarray
    classifier_canvases: np.ndarray
    detector_canvases: np.ndarray
    placements: tuple[Letterbox, ...]
    ground_truth: tuple[ImageBoxes, ...]
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        """Provenance for the report."""
        return {
            "folder": str(self.folder.resolve()),
            "split": self.split,
            "images": len(self.image_ids),
            "abnormal": int(self.labels.sum()),
            "fingerprint": self.fingerprint,
        }


def _yolo_boxes(label_file: Path, width: int, height: int) -> ImageBoxes:
    if not label_file.is_file():
        return ImageBoxes.empty()
    rows = [line.split() for line in label_file.read_text().splitlines() if line.strip()]
    if not rows:
        return ImageBoxes.empty()
    values = np.asarray(rows, dtype=np.float64)
    cx, cy, w, h = values[:, 1] * width, values[:, 2] * height, values[:, 3] * width, values[:, 4] * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
    return ImageBoxes(boxes, values[:, 0].astype(np.int64))


def read_eval_set(
    prepared: Path, split: str, classifier_size: int, detector_size: int, limit: int | None = None
) -> EvalSet:
    """Read a prepared cache's split (``classification.csv`` + YOLO labels) and letterbox every image.

    Raises:
        DatasetError: No ``classification.csv`` or no image of the split.
    """
    table = Path(prepared) / "classification.csv"
    if not table.is_file():
        raise DatasetError(f"{table}: not found; pass a folder written by `spine-edge data prepare`")
    with table.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == split]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DatasetError(f"{table}: no images in split {split!r}; evaluate another split or re-run data prepare")
    ids, labels, cls_canvases, det_canvases, placements, truth = [], [], [], [], [], []
    for row in rows:
        image = read_image(Path(prepared) / row["path"]).image
        ids.append(row["image_id"])
        labels.append(int(row["abnormal"]))
        cls_canvases.append(letterbox(image, classifier_size, CLASSIFIER_PAD_VALUE)[0])
        canvas, placement = letterbox(image, detector_size, DETECTOR_PAD_VALUE)
        det_canvases.append(canvas)
        placements.append(placement)
        label_file = Path(prepared) / "labels" / split / f"{row['image_id']}.txt"
        truth.append(_yolo_boxes(label_file, image.shape[1], image.shape[0]))
    prepare_json = Path(prepared) / "prepare.json"
    fingerprint = json.loads(prepare_json.read_text()).get("fingerprint", "") if prepare_json.is_file() else ""
    return EvalSet(
        folder=Path(prepared),
        split=split,
        image_ids=tuple(ids),
        labels=np.asarray(labels, dtype=np.int64),
        classifier_canvases=np.stack(cls_canvases)[:, None],
        detector_canvases=np.stack(det_canvases)[:, None],
        placements=tuple(placements),
        ground_truth=tuple(truth),
        fingerprint=fingerprint,
    )


# ------------------------------------------------------------------------------------ running graphs


def _session(model: Path | onnx.ModelProto, outputs: Sequence[str]) -> Any:
    """An ONNX Runtime CPU session that can return ``outputs``, exposing internal tensors as extra outputs."""
    import onnxruntime as ort

    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    declared = {o.name for o in proto.graph.output}
    extra = [name for name in outputs if name not in declared]
    if extra:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_graph(
    model: Path | onnx.ModelProto, images: np.ndarray, outputs: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """Run a graph on ONNX Runtime CPU over ``images`` in batches; outputs concatenated along the batch.

    ``outputs`` may name internal tensors; they are exposed as extra graph outputs.
    """
    session = _session(model, outputs)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for first in range(0, len(images), batch_size):
        values = session.run(list(outputs), {INPUT_NAME: images[first : first + batch_size]})
        for name, value in zip(outputs, values, strict=True):
            collected[name].append(value)
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def member_prob_tensors(model: onnx.ModelProto, members: int) -> tuple[str, ...]:
    """Each member's probability tensor ``[N]`` in the fused graph.

    ``DERNetEnsemble`` combines member outputs outside the members' scopes, so a member's
    probability is the rank-1 float tensor produced inside ``/members.i/`` and consumed outside it.

    Raises:
        SpineEdgeError: A member whose probability cannot be located.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in inferred.graph.value_info
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    producer = {out: node.name for node in inferred.graph.node for out in node.output}
    found = []
    for index in range(members):
        scope = member_scope(index)
        names = {
            name
            for node in inferred.graph.node
            if not node.name.startswith(scope)
            for name in node.input
            if producer.get(name, "").startswith(scope) and ranks.get(name) == 1
        }
        if len(names) != 1:
            raise SpineEdgeError(
                f"cannot locate member {index}'s probability in the classifier graph (found {sorted(names)}); "
                "spine_edge.training.models.DERNetEnsemble changed shape: update export.evaluation.member_prob_tensors"
            )
        found.append(names.pop())
    return tuple(found)


@dataclass(frozen=True)
class ClassifierRun:
    """Classifier outputs on the evaluation set: ensemble and per-member probabilities.

    Attributes:
        prob: Ensemble probability ``[N]``.
        members: Member probabilities ``[M, N]``.
        cam: Class-activation maps ``[N, h, w]``.
        ood: In-distribution scores ``[N]``, when the graph has them (:attr:`EvalSettings.ood_score`).
    """

    prob: np.ndarray
    members: np.ndarray
    cam: np.ndarray
    ood: np.ndarray | None = None


@dataclass(frozen=True)
class EvalSettings:
    """How every graph is run and scored on the evaluation set.

    Attributes:
        threshold: Gate threshold τ.
        class_names: Detector classes in output order.
        member_tensors: Each member's probability tensor in the classifier graph
            (:func:`member_prob_tensors`).
        batch_size: Batch of the ONNX Runtime runs.
        map_conf: Confidence threshold of the mAP evaluation.
        iou: NMS IoU of the mAP evaluation (the detector recipe's).
        agreement_conf: Score from which boxes count in the agreement with FP32's boxes (the
            deployed confidence threshold; see :func:`spine_edge.verdict.judge_detector`).
        max_det: Detections kept per image.
        bootstrap: The paired bootstrap of the verdict's intervals.
        ood_score: The classifier graphs output the in-distribution score: every run collects it, so
            each graph's own threshold comes from the run that judged it.
    """

    threshold: float
    class_names: tuple[str, ...]
    member_tensors: tuple[str, ...]
    batch_size: int
    map_conf: float
    iou: float
    agreement_conf: float = 0.0
    max_det: int = MAP_MAX_DET
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    ood_score: bool = False

    def describe_detection(self) -> dict[str, Any]:
        """How detections were produced for mAP (the report's ``detector_eval``)."""
        return {
            "conf": self.map_conf,
            "iou": self.iou,
            "max_det": self.max_det,
            "decode": "spine_edge.postprocess.decode_yolo",
            "boxes": "source pixels of the prepared PNG",
        }


def run_classifier(model: Path | onnx.ModelProto, data: EvalSet, settings: EvalSettings) -> ClassifierRun:
    """Ensemble and member probabilities of a classifier graph on the evaluation set."""
    tensors = settings.member_tensors
    names = [PROB_NAME, CAM_NAME, *tensors, *([OOD_NAME] if settings.ood_score else [])]
    out = run_graph(model, data.classifier_canvases, names, settings.batch_size)
    return ClassifierRun(out[PROB_NAME], np.stack([out[name] for name in tensors]), out[CAM_NAME], out.get(OOD_NAME))


def run_detector(model: Path | onnx.ModelProto, data: EvalSet, settings: EvalSettings) -> tuple[ImageBoxes, ...]:
    """Detections in source pixels, decoded and NMS'ed by the runtime's own numpy code."""
    raw = run_graph(model, data.detector_canvases, [OUTPUT_NAME], settings.batch_size)[OUTPUT_NAME]
    decoded = decode_yolo(raw, settings.map_conf, settings.iou, max_det=settings.max_det)
    return tuple(
        ImageBoxes(placement.boxes_to_source(found.boxes), found.class_ids, found.scores)
        for found, placement in zip(decoded, data.placements, strict=True)
    )


# ------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class ClassifierComparison:
    """A classifier graph's accuracy on the evaluation set, and its verdict against FP32.

    Attributes:
        metrics: Its metrics at τ.
        verdict: Fidelity, ΔAUROC with its interval, and the verdict (:func:`spine_edge.verdict.judge_classifier`).
        ood_scores: Its in-distribution scores on the evaluation set, from the same run (None without them).
    """

    metrics: ClassificationMetrics
    verdict: RoleVerdict
    ood_scores: np.ndarray | None = None

    @property
    def delta_auroc_pt(self) -> float:
        """AUROC minus FP32's, in points."""
        return self.verdict.task.delta_pt

    @property
    def flips(self) -> int:
        """Gate decisions that differ from FP32's."""
        return 0 if self.verdict.classifier is None else self.verdict.classifier.flips

    @property
    def max_abs_dprob(self) -> float:
        """Largest probability difference from FP32."""
        return 0.0 if self.verdict.classifier is None else self.verdict.classifier.max_abs_dprob


@dataclass(frozen=True)
class DetectorComparison:
    """A detector graph's accuracy on the evaluation set, and its verdict against FP32.

    Attributes:
        metrics: Its mAP metrics.
        verdict: Box agreement, ΔmAP@0.5 with its interval, and the verdict (:func:`spine_edge.verdict.judge_detector`).
        delta_map50_95_pt: mAP@0.5:0.95 minus FP32's, in points (reported, not gated).
    """

    metrics: DetectionMetrics
    verdict: RoleVerdict
    delta_map50_95_pt: float

    @property
    def delta_map50_pt(self) -> float:
        """mAP@0.5 minus FP32's, in points."""
        return self.verdict.task.delta_pt


@dataclass(frozen=True)
class Evaluation:
    """The evaluation set, how it is scored and the FP32 graphs' outputs on it (the reference).

    Attributes:
        data: The evaluation images.
        settings: How graphs are run and scored.
        classifier_fp32: The FP32 classifier's outputs.
        detections_fp32: The FP32 detector's detections.
        classifier_metrics: FP32 classifier metrics.
        detector_metrics: FP32 detector metrics.
    """

    data: EvalSet
    settings: EvalSettings
    classifier_fp32: ClassifierRun
    detections_fp32: tuple[ImageBoxes, ...]
    classifier_metrics: ClassificationMetrics
    detector_metrics: DetectionMetrics

    def run_classifier(self, model: Path | onnx.ModelProto) -> ClassifierRun:
        """A classifier graph's outputs on the evaluation set."""
        return run_classifier(model, self.data, self.settings)

    def run_detector(self, model: Path | onnx.ModelProto) -> tuple[ImageBoxes, ...]:
        """A detector graph's detections on the evaluation set, in source pixels."""
        return run_detector(model, self.data, self.settings)

    def compare_classifier(self, run: ClassifierRun, precision: str) -> ClassifierComparison:
        """Score a classifier run and judge it against FP32's with the gates of ``precision``."""
        reference = self.classifier_fp32
        verdict = judge_classifier(
            precision,
            self.data.labels,
            reference.prob,
            run.prob,
            self.settings.threshold,
            reference.cam,
            run.cam,
            self.settings.bootstrap,
        )
        return ClassifierComparison(
            evaluate_classification(self.data.labels, run.prob, self.settings.threshold), verdict, run.ood
        )

    def compare_detector(self, detections: Sequence[ImageBoxes], precision: str) -> DetectorComparison:
        """Score detections and judge them against FP32's with the gates of ``precision``."""
        metrics = evaluate_detection(self.data.ground_truth, list(detections), self.settings.class_names)
        verdict = judge_detector(
            precision,
            self.data.ground_truth,
            self.detections_fp32,
            detections,
            self.settings.agreement_conf,
            settings=self.settings.bootstrap,
        )
        return DetectorComparison(
            metrics=metrics,
            verdict=verdict,
            delta_map50_95_pt=delta_points(metrics.map50_95, self.detector_metrics.map50_95),
        )


def evaluate_fp32(classifier: Path, detector: Path, data: EvalSet, settings: EvalSettings) -> Evaluation:
    """Run the FP32 graphs on the evaluation set: the reference every other graph is compared with."""
    run = run_classifier(classifier, data, settings)
    detections = run_detector(detector, data, settings)
    return Evaluation(
        data=data,
        settings=settings,
        classifier_fp32=run,
        detections_fp32=detections,
        classifier_metrics=evaluate_classification(data.labels, run.prob, settings.threshold),
        detector_metrics=evaluate_detection(data.ground_truth, list(detections), settings.class_names),
    )


# ------------------------------------------------------------------------------------ the report


def accuracy_row(
    variant: str,
    target: str,
    how: str,
    classifier: ClassifierComparison,
    detector: DetectorComparison,
    coverage: Mapping[str, Any] | None = None,
) -> PrecisionAccuracy:
    """The report row of one lower-precision variant: metrics, both roles' verdicts and, for INT8, its coverage."""
    return PrecisionAccuracy(
        variant=variant,
        precision=variant.split("-")[0],
        target=target,
        classifier=classifier.metrics,
        detector=detector.metrics,
        classifier_verdict=classifier.verdict,
        detector_verdict=detector.verdict,
        delta_map50_95_pt=detector.delta_map50_95_pt,
        int8_coverage=dict(coverage or {}),
        how=how,
    )


def assemble_report(
    evaluation: Evaluation,
    rows: Sequence[PrecisionAccuracy],
    parity: Mapping[str, Any],
    sensitivity: Mapping[str, Any],
    trained_on: str,
) -> AccuracyReport:
    """The accuracy report, from the reference, the variants' rows and what the steps measured.

    Args:
        evaluation: The evaluation set and FP32 reference.
        rows: One row per lower-precision variant (:func:`accuracy_row`).
        parity: FP32 graphs vs PyTorch, per role.
        sensitivity: INT8 layer-search records, per graph.
        trained_on: Data fingerprint the checkpoints record ("" if none), compared with the
            evaluation data's so the report says whether they are the same data.
    """
    data = evaluation.data
    eval_data = {
        **data.describe(),
        "checkpoints_fingerprint": trained_on,
        "same_data_as_training": bool(trained_on) and trained_on == data.fingerprint,
    }
    if not eval_data["same_data_as_training"]:
        log.warning(
            "export: evaluating on %s, whose fingerprint differs from the checkpoints' training data", data.folder
        )
    return AccuracyReport(
        eval_data=eval_data,
        threshold=evaluation.settings.threshold,
        classifier_fp32=evaluation.classifier_metrics,
        detector_fp32=evaluation.detector_metrics,
        variants=tuple(rows),
        parity=dict(parity),
        sensitivity=dict(sensitivity),
        detector_eval=evaluation.settings.describe_detection(),
        bootstrap=asdict(evaluation.settings.bootstrap),
    )
