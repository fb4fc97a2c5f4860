"""Checkpoints → bundle: graphs in every precision, measured against FP32, described by a manifest.

One function per step; :func:`export_bundle` runs them in order:

1. FP32 graphs (classifier ensemble, detector), checked against PyTorch on a few images;
2. FP16 graphs (convolutional body in float16), measured through an exact FP16 emulation on ORT CPU;
3. INT8 Q/DQ graphs for TensorRT (symmetric) and ONNX Runtime (U8S8), calibrated once per graph
   on train images; members / head layers whose measured INT8 loss breaks the gate stay FP32;
4. the TensorRT operator check on every graph;
5. ``accuracy_report.json`` / ``.md`` and ``manifest.json``, written last.

Example:
    >>> report = export_bundle(Path("runs/ckpt"), Path("runs/bundle"), ExportConfig(eval_data=Path("runs/prep")))  # doctest: +SKIP
    >>> report.gates_hold  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spine_edge.export import precision as prec
from spine_edge.export.bundle_writer import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    AccuracyReport,
    PrecisionAccuracy,
    build_manifest,
    model_entry,
    write_accuracy_report,
    write_onnx,
)
from spine_edge.export.classifier_graph import (
    CAM_NAME,
    INPUT_NAME,
    PROB_NAME,
    EnsembleSpec,
    build_ensemble,
    export_classifier_graph,
    member_scope,
    read_ensemble_spec,
    run_ensemble,
)
from spine_edge.export.detector_graph import (
    OUTPUT_NAME,
    DetectorExportModule,
    DetectorSource,
    build_detector_module,
    export_detector_graph,
    head_output_nodes,
    read_detector_json,
    run_detector_module,
)
from spine_edge.export.opcheck import check_symmetric_qdq, check_trt_ops
from spine_edge.bundle import ClassifierInfo, DetectorInfo, EnsembleMember, ModelEntry, write_manifest
from spine_edge.constants import CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.errors import DatasetError, SpineEdgeError
from spine_edge.imageio import read_image
from spine_edge.metrics import (
    ACCURACY_GATES,
    ClassificationMetrics,
    DetectionMetrics,
    ImageBoxes,
    compute_auroc,
    count_flips,
    delta_points,
    evaluate_classification,
    evaluate_detection,
)
from spine_edge.postprocess import decode_yolo
from spine_edge.preprocess import Letterbox, letterbox

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
#: Bundle file of each (role, variant).
FILE_NAMES = {
    "fp32": "{role}.fp32.onnx",
    "fp16": "{role}.fp16.onnx",
    "int8-trt": "{role}.int8.trt.onnx",
    "int8-ort": "{role}.int8.ort.onnx",
}
INT8_VARIANTS: dict[str, prec.QuantTarget] = {"int8-trt": "tensorrt", "int8-ort": "onnxruntime"}
#: Largest FP32-graph vs PyTorch difference accepted: ensemble probability, detector class score.
PARITY_PROB = 1e-4
PARITY_SCORE = 1e-3


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to measure it.

    Attributes:
        precisions: Any of ``fp32``, ``fp16``, ``int8`` (``fp32`` is always written: it is the
            reference and TensorRT's input).
        calib_data: Prepared cache whose train PNGs calibrate INT8 (default: ``eval_data``).
        eval_data: Prepared cache whose val split the accuracy report uses (default: the one the
            checkpoints record as ``prepared``).
        calib_images: Number of calibration images.
        calib_method: ``minmax`` (bounded memory, default) or ``percentile`` (99.999, chunked).
        eval_split: Split of ``eval_data`` to evaluate.
        eval_limit: Evaluate at most this many images (None: all).
        detector_input_size: Detector graph input side (default: ``imgsz`` of ``detector.json``).
        batch_size: Batch of the evaluation runs.
        map_conf: Confidence threshold of the mAP evaluation (0.001, as COCO/ultralytics val).
        parity_images: Images compared between PyTorch and the FP32 graphs.
        max_flip_fraction: Share of evaluation images whose gate decision INT8 may flip before the
            layer search keeps more of the classifier in FP32 (at least one image is allowed).
    """

    precisions: tuple[str, ...] = PRECISIONS
    calib_data: Path | None = None
    eval_data: Path | None = None
    calib_images: int = 32
    calib_method: prec.CalibrationMethodName = "minmax"
    eval_split: str = "val"
    eval_limit: int | None = None
    detector_input_size: int | None = None
    batch_size: int = 8
    map_conf: float = 0.001
    parity_images: int = 4
    max_flip_fraction: float = 0.02


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_bundle` wrote.

    Attributes:
        bundle: The bundle folder.
        manifest: Its ``manifest.json``.
        files: Every file written, manifest last.
        accuracy: The accuracy report (None without evaluation data).
        seconds: Wall time.
        timings: Seconds per step.
    """

    bundle: Path
    manifest: Path
    files: tuple[Path, ...]
    accuracy: AccuracyReport | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gates_hold(self) -> bool | None:
        """Whether every precision met DESIGN.md's accuracy gates (None: not measured)."""
        return None if self.accuracy is None else self.accuracy.gates_hold


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
        return {"folder": str(self.folder.resolve()), "split": self.split, "images": len(self.image_ids),
                "abnormal": int(self.labels.sum()), "fingerprint": self.fingerprint}


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


def member_prob_tensors(model: onnx.ModelProto, members: int) -> list[str]:
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
                "spine_edge.training.models.DERNetEnsemble changed shape: update export.pipeline.member_prob_tensors"
            )
        found.append(names.pop())
    return found


@dataclass(frozen=True)
class ClassifierRun:
    """Classifier outputs on the evaluation set: ensemble and per-member probabilities."""

    prob: np.ndarray
    members: np.ndarray  # [M, N]


def run_classifier(model: Path | onnx.ModelProto, data: EvalSet, member_tensors: Sequence[str], batch: int) -> ClassifierRun:
    """Ensemble and member probabilities of a classifier graph on the evaluation set."""
    out = run_graph(model, data.classifier_canvases, [PROB_NAME, *member_tensors], batch)
    return ClassifierRun(out[PROB_NAME], np.stack([out[name] for name in member_tensors]))


def run_detector(
    model: Path | onnx.ModelProto, data: EvalSet, conf: float, iou: float, max_det: int, batch: int
) -> list[ImageBoxes]:
    """Detections in source pixels, decoded and NMS'ed by the runtime's own numpy code."""
    raw = run_graph(model, data.detector_canvases, [OUTPUT_NAME], batch)[OUTPUT_NAME]
    results = []
    for found, placement in zip(decode_yolo(raw, conf, iou, max_det=max_det), data.placements, strict=True):
        results.append(ImageBoxes(placement.boxes_to_source(found.boxes), found.class_ids, found.scores))
    return results


# ------------------------------------------------------------------------------------ the export


@dataclass
class _Context:
    """State shared by the steps of one export (internal; mutable only while exporting)."""

    checkpoints: Path
    out: Path
    tmp: Path
    config: ExportConfig
    spec: EnsembleSpec
    detector_meta: dict[str, Any]
    detector_source: DetectorSource
    detector_size: int
    data: EvalSet | None
    member_tensors: list[str] = field(default_factory=list)
    entries: list[ModelEntry] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    variants: list[PrecisionAccuracy] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reference_cls: ClassifierRun | None = None
    reference_det: list[ImageBoxes] | None = None
    classifier_fp32: ClassificationMetrics | None = None
    detector_fp32: DetectionMetrics | None = None

    def path(self, role: str, variant: str) -> Path:
        return self.out / FILE_NAMES[variant].format(role=role)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step, log it and keep the time for the report."""
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        log.info("export: %s took %.1f s", name, self.timings[name])

    @property
    def conf(self) -> float:
        return float(self.detector_meta.get("recipe", {}).get("conf", 0.25))

    @property
    def iou(self) -> float:
        return float(self.detector_meta.get("recipe", {}).get("iou", 0.65))

    @property
    def max_det(self) -> int:
        return int(self.detector_meta.get("recipe", {}).get("max_det", 100))


def recorded_prepared(checkpoints: Path) -> Path | None:
    """The prepared cache the checkpoints record (``"prepared"`` in ensemble.json or detector.json), if it exists."""
    for name in ("ensemble.json", "detector.json"):
        path = Path(checkpoints) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("prepared")
            if value and Path(value).is_dir():
                return Path(value)
    return None


def export_bundle(checkpoints: Path, out: Path, config: ExportConfig = ExportConfig()) -> ExportReport:
    """Export the checkpoints of ``spine-edge train`` into a bundle.

    Args:
        checkpoints: Folder with ``classifier_<arch>.pt``, ``ensemble.json``, ``detector.pt``, ``detector.json``.
        out: Bundle folder (created; files of the same names are replaced atomically).
        config: Precisions, data and evaluation settings.

    Returns:
        What was written, with the accuracy report.

    Raises:
        SpineEdgeError: Missing or malformed checkpoints; INT8 requested without data.
        DatasetError: The evaluation or calibration folder is unusable.
    """
    start = time.perf_counter()
    checkpoints, out = Path(checkpoints), Path(out)
    unknown = set(config.precisions) - set(PRECISIONS)
    if unknown:
        raise SpineEdgeError(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISIONS)}")
    eval_data = config.eval_data or recorded_prepared(checkpoints)
    calib_data = config.calib_data or eval_data
    if "int8" in config.precisions and (calib_data is None or eval_data is None):
        raise SpineEdgeError(
            f"{checkpoints}: INT8 export needs calibration and evaluation images, and the checkpoints do not "
            "record a prepared cache: pass --calib-data/--eval-data PREPARED (the folder of `spine-edge data prepare`)"
        )
    spec = read_ensemble_spec(checkpoints)
    detector_meta = read_detector_json(checkpoints / "detector.json")
    detector_module, detector_source = build_detector_module(checkpoints / "detector.pt")
    detector_size = int(config.detector_input_size or detector_meta.get("imgsz", 640))
    _check_class_names(checkpoints, detector_meta, detector_source)
    data = None
    if eval_data is not None:
        data = read_eval_set(eval_data, config.eval_split, spec.input_size, detector_size, config.eval_limit)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spine-edge-export-") as tmp:
        ctx = _Context(checkpoints, out, Path(tmp), config, spec, detector_meta, detector_source, detector_size, data)
        with ctx.step("fp32 graphs"):
            _export_fp32(ctx, build_ensemble(spec), detector_module)
        del detector_module
        if "fp16" in config.precisions:
            with ctx.step("fp16 graphs"):
                _export_fp16(ctx)
        if "int8" in config.precisions:
            with ctx.step("int8 graphs"):
                _export_int8(ctx, calib_data)  # type: ignore[arg-type]
        accuracy = _write_report(ctx)
        remove_stale_files(out, ctx.written)
        manifest = _write_manifest(ctx, accuracy)
    return ExportReport(
        bundle=out,
        manifest=manifest,
        files=(*ctx.written, manifest),
        accuracy=accuracy,
        seconds=round(time.perf_counter() - start, 1),
        timings=dict(ctx.timings),
    )


def _check_class_names(checkpoints: Path, meta: dict[str, Any], source: DetectorSource) -> None:
    recorded = tuple(meta.get("class_names", source.class_names))
    if recorded != source.class_names:
        raise SpineEdgeError(
            f"{checkpoints}: detector.json lists classes {list(recorded)} but detector.pt has "
            f"{list(source.class_names)}; the two files come from different runs: re-run spine-edge train detector"
        )


def _record(ctx: _Context, role: str, variant: str, notes: str) -> None:
    path = ctx.path(role, variant)
    precision = variant.split("-")[0]
    target = {"int8-trt": "tensorrt", "int8-ort": "onnxruntime"}.get(variant, "any")
    opcheck = _opcheck_note(path, target)
    ctx.entries.append(model_entry(ctx.out, path, role, precision, target, f"{notes} {opcheck}".strip()))
    ctx.written.append(path)


def _opcheck_note(path: Path, target: str) -> str:
    """Run the TensorRT operator check; a TensorRT-target graph with asymmetric Q/DQ is a bug here."""
    report = check_trt_ops(path)
    if target == "tensorrt" and check_symmetric_qdq(path):
        raise SpineEdgeError(f"{path}: TensorRT INT8 graph has non-symmetric Q/DQ:\n{report.summary()}")
    if target == "onnxruntime":
        ops_ok = not report.unsupported
        return f"TensorRT op check: ops {'ok' if ops_ok else 'UNSUPPORTED'}; asymmetric Q/DQ, for ONNX Runtime only."
    if not report.ok:
        log.warning("%s", report.summary())
        return "TensorRT op check: FAILED (" + "; ".join(f.op for f in report.unsupported) + ")."
    return "TensorRT op check: ok."


def _export_fp32(ctx: _Context, ensemble: Any, detector: DetectorExportModule) -> None:
    cls_path = export_classifier_graph(ensemble, ctx.path("classifier", "fp32"), ctx.spec.input_size)
    det_path = export_detector_graph(detector, ctx.detector_source, ctx.path("detector", "fp32"), ctx.detector_size)
    ctx.member_tensors = member_prob_tensors(onnx.load(str(cls_path)), len(ctx.spec.members))
    k = ctx.config.parity_images
    if ctx.data is not None:
        cls_images, det_images = ctx.data.classifier_canvases[:k], ctx.data.detector_canvases[:k]
    else:
        rng = np.random.default_rng(0)
        cls_images = rng.integers(0, 256, (k, 1, ctx.spec.input_size, ctx.spec.input_size), dtype=np.uint8)
        det_images = rng.integers(0, 256, (k, 1, ctx.detector_size, ctx.detector_size), dtype=np.uint8)
    ref_prob, ref_cam = run_ensemble(ensemble, cls_images)
    got = run_graph(cls_path, cls_images, [PROB_NAME, CAM_NAME], k)
    ref_raw = run_detector_module(detector, det_images)
    raw = run_graph(det_path, det_images, [OUTPUT_NAME], k)[OUTPUT_NAME]
    ctx.parity = {
        "images": int(len(cls_images)),
        "classifier_max_abs_dprob": float(np.abs(got[PROB_NAME] - ref_prob).max()),
        "classifier_max_abs_dcam": float(np.abs(got[CAM_NAME] - ref_cam).max()),
        "detector_max_abs_dbox_px": float(np.abs(raw[:, :4] - ref_raw[:, :4]).max()),
        "detector_max_abs_dscore": float(np.abs(raw[:, 4:] - ref_raw[:, 4:]).max()),
    }
    if ctx.parity["classifier_max_abs_dprob"] > PARITY_PROB or ctx.parity["detector_max_abs_dscore"] > PARITY_SCORE:
        raise SpineEdgeError(
            f"{ctx.out}: the FP32 graphs do not compute what the PyTorch models compute ({ctx.parity}); "
            "this is an export bug: report it with the checkpoints' torch/timm/ultralytics versions"
        )
    _record(ctx, "classifier", "fp32", "FP32 reference (PyTorch parity in accuracy_report.json).")
    _record(ctx, "detector", "fp32", "FP32 reference (PyTorch parity in accuracy_report.json).")
    if ctx.data is not None:
        ctx.reference_cls = run_classifier(cls_path, ctx.data, ctx.member_tensors, ctx.config.batch_size)
        ctx.reference_det = _detect(ctx, det_path)
        ctx.classifier_fp32 = evaluate_classification(ctx.data.labels, ctx.reference_cls.prob, ctx.spec.threshold)
        ctx.detector_fp32 = evaluate_detection(ctx.data.ground_truth, ctx.reference_det, ctx.detector_source.class_names)


def _detect(ctx: _Context, model: Path | onnx.ModelProto) -> list[ImageBoxes]:
    assert ctx.data is not None
    return run_detector(model, ctx.data, ctx.config.map_conf, ctx.iou, 300, ctx.config.batch_size)


FP16_NOTES = ("FP16 convolutional body (float16 weights and activations between the first and last Conv); "
              "preprocessing, heads, sigmoid, view mean, ensemble weighting, CAM normalisation and YOLO decode "
              "stay FP32; uint8 in, float32 out.")


def _export_fp16(ctx: _Context) -> None:
    for role in ("classifier", "detector"):
        fp32 = onnx.load(str(ctx.path(role, "fp32")))
        converted = prec.convert_to_fp16(fp32, prec.fp16_body(fp32))
        write_onnx(converted, ctx.path(role, "fp16"))
        _record(ctx, role, "fp16", FP16_NOTES)
        if ctx.data is not None:
            emulated = prec.emulate_fp16(converted)
            if role == "classifier":
                ctx.variants.append(_classifier_row(ctx, "fp16", run_classifier(emulated, ctx.data, ctx.member_tensors, ctx.config.batch_size)))
            else:
                _set_detector_row(ctx, "fp16", _detect(ctx, emulated))
    if ctx.data is not None:
        _finish_rows(ctx, "fp16", "any", "measured on ONNX Runtime CPU through an exact emulation (every FP16 tensor "
                     "rounded to float16 by explicit casts, ops accumulate in FP32 as on a GPU), because ORT's CPU "
                     "provider silently runs float16 ops in float32.")


def _export_int8(ctx: _Context, calib_data: Path) -> None:
    assert ctx.data is not None
    paths = prec.select_calibration_images(calib_data, ctx.config.calib_images)
    calibrations = {}
    for role, size, pad in (
        ("classifier", ctx.spec.input_size, CLASSIFIER_PAD_VALUE),
        ("detector", ctx.detector_size, DETECTOR_PAD_VALUE),
    ):
        reader = prec.CalibrationImages(paths, INPUT_NAME, size, pad)
        with ctx.step(f"calibrate {role}"):
            calibrations[role] = prec.calibrate(
                ctx.path(role, "fp32"), reader, ctx.tmp / f"{role}.ranges.json", ctx.config.calib_method
            )
    ctx.calibration = {
        "count": len(paths),
        "source": str((Path(calib_data) / "images").resolve()),
        "splits": sorted({p.parent.name for p in paths}),
        "method": ctx.config.calib_method,
        "reader": "spine_edge.imageio.read_image → spine_edge.preprocess.letterbox → uint8 [1, 1, S, S]",
        "quantiser": "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights)",
        **{role: result.to_dict() for role, result in calibrations.items()},
    }
    for variant, target in INT8_VARIANTS.items():
        with ctx.step(f"quantise classifier {variant}"):
            row, notes = _quantise_classifier(ctx, calibrations["classifier"], variant, target)
        _record(ctx, "classifier", variant, notes)
        ctx.variants.append(row)
        with ctx.step(f"quantise detector {variant}"):
            det_notes = _quantise_detector(ctx, calibrations["detector"], variant, target)
        _record(ctx, "detector", variant, det_notes)
    for variant, target in INT8_VARIANTS.items():
        _finish_rows(ctx, variant, target, f"Q/DQ graph for {target} run on ONNX Runtime CPU.")


def _int8_description(target: prec.QuantTarget, calibration: prec.CalibrationResult) -> str:
    kind = ("symmetric int8 activations (zero point 0), per-channel symmetric int8 weights, float biases"
            if target == "tensorrt"
            else "uint8 activations with zero points, per-channel 7-bit int8 weights (U8S8, reduce_range: no "
                 "int16 saturation on CPUs without VNNI)")
    return f"INT8 Q/DQ for {target}: {kind}; {calibration.method} calibration on {calibration.images} images."


def _member_nodes(fp32: onnx.ModelProto, body: set[str], index: int) -> tuple[set[str], set[str]]:
    """Body nodes of member ``index``, and its later half: every body node from the first Conv of
    the second half of its Convs (graph order) on.

    Measured on a trained EfficientNetV2-B0 member (symmetric INT8, MinMax): quantising only its last
    stage and head moved its probability by 0.25 and 0.12 on average, every earlier stage by < 0.025,
    and keeping the later half of its Convs in FP32 brought the member from −12 to −0.8 AUROC points;
    its squeeze-excitation blocks alone made no difference.
    """
    scope = member_scope(index)
    ordered = [n.name for n in fp32.graph.node if n.name in body and n.name.startswith(scope)]
    convs = [n for n in ordered if n.endswith("/Conv")]
    later = set(ordered[ordered.index(convs[len(convs) // 2]):]) if convs else set(ordered)
    return set(ordered), later


def _quantise_classifier(
    ctx: _Context, calibration: prec.CalibrationResult, variant: str, target: prec.QuantTarget
) -> tuple[PrecisionAccuracy, str]:
    """Quantise the classifier, keeping parts of members in FP32 while the INT8 graph misses the mark.

    The mark, on the evaluation set: ensemble AUROC loss within the INT8 gate (or one swapped pair,
    whichever is larger) and at most ``ExportConfig.max_flip_fraction`` of the gate decisions flipped
    (AUROC alone misses a member whose probabilities all shift: the ranking holds, τ no longer does).
    Each round blames the member with the largest weighted probability error ``w·mean|Δp|`` (member
    AUROC is too noisy on a small split to rank by) and keeps its later half, then all of it, in FP32.
    """
    assert ctx.data is not None and ctx.reference_cls is not None
    fp32_path = ctx.path("classifier", "fp32")
    fp32 = onnx.load(str(fp32_path))
    body = prec.fp16_body(fp32)
    gate = ACCURACY_GATES["int8"]
    names = [m.name for m in ctx.spec.members]
    weights = [m.weight for m in ctx.spec.members]
    member_nodes = [_member_nodes(fp32, body, i) for i in range(len(names))]
    labels = ctx.data.labels
    # One swapped (abnormal, normal) pair moves AUROC by 100 / (P·N) points: on a small validation set
    # that step can exceed the gate itself, and a single swap is no evidence of damage.
    pairs = int(labels.sum()) * int((1 - labels).sum())
    tolerance = max(gate.auroc_pt, 100.0 / pairs if pairs else 0.0)
    max_flips = max(1, math.floor(ctx.config.max_flip_fraction * len(labels)))
    stage = [0] * len(names)  # 0: quantised, 1: later half FP32, 2: whole member FP32
    excluded: set[str] = set()
    steps: list[dict[str, Any]] = []
    ref = ctx.reference_cls
    while True:
        prec.quantize_graph(fp32_path, ctx.path("classifier", variant), calibration, target, body, excluded)
        run = run_classifier(ctx.path("classifier", variant), ctx.data, ctx.member_tensors, ctx.config.batch_size)
        ensemble_delta = delta_points(compute_auroc(labels, run.prob), compute_auroc(labels, ref.prob))
        flips = count_flips(ref.prob, run.prob, ctx.spec.threshold)
        errors = [float(np.abs(run.members[i] - ref.members[i]).mean()) for i in range(len(names))]
        steps.append({
            "kept_fp32": _kept_description(names, stage),
            "delta_auroc_pt": ensemble_delta,
            "flips": flips,
            "member_delta_auroc_pt": {
                n: delta_points(compute_auroc(labels, run.members[i]), compute_auroc(labels, ref.members[i]))
                for i, n in enumerate(names)
            },
            "member_mean_abs_dprob": dict(zip(names, errors, strict=True)),
        })
        # Only losses count: a gain from quantisation noise is no reason to keep anything in FP32.
        if not _loss_exceeds(ensemble_delta, tolerance) and flips <= max_flips:
            break
        candidates = [i for i in range(len(names)) if stage[i] < 2]
        if not candidates:
            break
        worst = max(candidates, key=lambda i: weights[i] * errors[i])
        stage[worst] += 1
        excluded |= member_nodes[worst][1] if stage[worst] == 1 else member_nodes[worst][0]
    kept = _kept_description(names, stage)
    ctx.sensitivity[f"classifier {variant}"] = {
        "steps": steps, "kept_fp32": kept, "auroc_tolerance_pt": tolerance, "max_flips": max_flips,
    }
    row = _classifier_row(ctx, variant, run)
    notes = _int8_description(target, calibration)
    if kept:
        notes += f" Kept in FP32 after measuring the INT8 error per member: {', '.join(kept)}."
    return row, notes


def _kept_description(names: Sequence[str], stage: Sequence[int]) -> list[str]:
    labels = {1: "later half", 2: "whole member"}
    return [f"{name} ({labels[s]})" for name, s in zip(names, stage, strict=True) if s]


def _loss_exceeds(delta_pt: float, budget_pt: float) -> bool:
    """Whether a metric fell by more than the budget (a gain or an unmeasurable delta never does)."""
    return not math.isnan(delta_pt) and -delta_pt > budget_pt + 1e-9


def _quantise_detector(
    ctx: _Context, calibration: prec.CalibrationResult, variant: str, target: prec.QuantTarget
) -> str:
    """Quantise the detector's body; if mAP@0.5 leaves the gate, keep the head's output layers in FP32."""
    assert ctx.data is not None and ctx.detector_fp32 is not None
    fp32_path = ctx.path("detector", "fp32")
    fp32 = onnx.load(str(fp32_path))
    body = prec.fp16_body(fp32)
    head = head_output_nodes(fp32)
    gate = ACCURACY_GATES["int8"]
    steps: list[dict[str, Any]] = []
    kept: list[str] = []
    for excluded in (set(), head):
        if excluded:
            kept = ["Detect head output convs and DFL"]
        prec.quantize_graph(fp32_path, ctx.path("detector", variant), calibration, target, body, excluded)
        found = _detect(ctx, ctx.path("detector", variant))
        metrics = evaluate_detection(ctx.data.ground_truth, found, ctx.detector_source.class_names)
        delta = delta_points(metrics.map50, ctx.detector_fp32.map50)
        steps.append({"kept_fp32": list(kept), "delta_map50_pt": delta})
        if not _loss_exceeds(delta, gate.map50_pt):
            break
    ctx.sensitivity[f"detector {variant}"] = {"steps": steps, "kept_fp32": kept}
    _set_detector_row(ctx, variant, found)
    notes = _int8_description(target, calibration)
    if kept:
        notes += f" Kept in FP32 after measuring the INT8 mAP loss: {', '.join(kept)}."
    return notes


def _classifier_row(ctx: _Context, variant: str, run: ClassifierRun) -> PrecisionAccuracy:
    assert ctx.data is not None and ctx.classifier_fp32 is not None and ctx.reference_cls is not None
    metrics = evaluate_classification(ctx.data.labels, run.prob, ctx.spec.threshold)
    delta = delta_points(metrics.auroc, ctx.classifier_fp32.auroc)
    precision = variant.split("-")[0]
    return PrecisionAccuracy(
        variant=variant,
        precision=precision,
        target="any",
        classifier=metrics,
        delta_auroc_pt=delta,
        flips=count_flips(ctx.reference_cls.prob, run.prob, ctx.spec.threshold),
        max_abs_dprob=float(np.abs(run.prob - ctx.reference_cls.prob).max()),
        detector=None,
        delta_map50_pt=math.nan,
        delta_map50_95_pt=math.nan,
        auroc_gate_holds=ACCURACY_GATES[precision].auroc_holds(delta),
        map50_gate_holds=None,
    )


def _set_detector_row(ctx: _Context, variant: str, detections: list[ImageBoxes]) -> None:
    """Add the detector's metrics to the variant's row (created by the classifier step)."""
    assert ctx.data is not None and ctx.detector_fp32 is not None
    metrics = evaluate_detection(ctx.data.ground_truth, detections, ctx.detector_source.class_names)
    d50 = delta_points(metrics.map50, ctx.detector_fp32.map50)
    precision = variant.split("-")[0]
    for i, row in enumerate(ctx.variants):
        if row.variant == variant:
            ctx.variants[i] = PrecisionAccuracy(
                **{**row.__dict__, "detector": metrics, "delta_map50_pt": d50,
                   "delta_map50_95_pt": delta_points(metrics.map50_95, ctx.detector_fp32.map50_95),
                   "map50_gate_holds": ACCURACY_GATES[precision].map50_holds(d50)}
            )
            return
    raise SpineEdgeError(f"internal: detector metrics for {variant} before its classifier row")


def _finish_rows(ctx: _Context, variant: str, target: str, how: str) -> None:
    for i, row in enumerate(ctx.variants):
        if row.variant == variant:
            ctx.variants[i] = PrecisionAccuracy(**{**row.__dict__, "target": target, "how": how})


def _write_report(ctx: _Context) -> AccuracyReport | None:
    if ctx.data is None or ctx.classifier_fp32 is None or ctx.detector_fp32 is None:
        return None
    trained_on = ctx.spec.raw.get("data_fingerprint") or ctx.detector_meta.get("data_fingerprint", "")
    eval_data = {**ctx.data.describe(), "checkpoints_fingerprint": trained_on,
                 "same_data_as_training": bool(trained_on) and trained_on == ctx.data.fingerprint}
    if not eval_data["same_data_as_training"]:
        log.warning("export: evaluating on %s, whose fingerprint differs from the checkpoints' training data",
                    ctx.data.folder)
    report = AccuracyReport(
        eval_data=eval_data,
        threshold=ctx.spec.threshold,
        classifier_fp32=ctx.classifier_fp32,
        detector_fp32=ctx.detector_fp32,
        variants=tuple(ctx.variants),
        parity=ctx.parity,
        sensitivity=ctx.sensitivity,
        detector_eval={"conf": ctx.config.map_conf, "iou": ctx.iou, "max_det": 300,
                       "decode": "spine_edge.postprocess.decode_yolo", "boxes": "source pixels of the prepared PNG"},
    )
    ctx.written.extend(write_accuracy_report(ctx.out, report))
    return report


def remove_stale_files(out: Path, written: Sequence[Path]) -> list[Path]:
    """Delete export files of an earlier run in ``out`` that this run did not write (e.g. INT8 graphs
    when only FP32 was asked for), so the folder holds no graph the new manifest does not describe.
    Files with other names (engines, timing caches, the user's own) are left alone.

    Returns:
        The files deleted.
    """
    ours = {out / FILE_NAMES[variant].format(role=role) for role in ("classifier", "detector") for variant in FILE_NAMES}
    ours |= {out / REPORT_JSON, out / REPORT_MARKDOWN}
    removed = []
    for path in sorted(ours - {Path(p) for p in written}):
        if path.is_file():
            log.info("export: removing %s from an earlier export", path)
            path.unlink()
            removed.append(path)
    return removed


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("torch", "timm", "ultralytics", "onnx", "onnxruntime", "onnxslim"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = ""
    return found


def _write_manifest(ctx: _Context, accuracy: AccuracyReport | None) -> Path:
    cam_shape = next(
        tuple(int(d) for d in spec.shape[1:])
        for entry in ctx.entries
        if entry.role == "classifier" and entry.precision == "fp32"
        for spec in entry.outputs
        if spec.name == CAM_NAME
    )
    classifier = ClassifierInfo(
        input_size=ctx.spec.input_size,
        members=tuple(EnsembleMember(m.name, m.arch, m.weight) for m in ctx.spec.members),
        tta_views=ctx.spec.tta_views,
        threshold=ctx.spec.threshold,
        cam_shape=cam_shape,  # type: ignore[arg-type]
        resize="letterbox",
        pad_value=CLASSIFIER_PAD_VALUE,
    )
    detector = DetectorInfo(
        input_size=ctx.detector_size,
        class_names=ctx.detector_source.class_names,
        conf_threshold=ctx.conf,
        iou_threshold=ctx.iou,
        max_det=ctx.max_det,
        pad_value=DETECTOR_PAD_VALUE,
        output_layout="yolo_raw",
    )
    from spine_edge.training.checkpoints import load_classifier_checkpoint

    metas = {m.name: load_classifier_checkpoint(m.checkpoint).meta for m in ctx.spec.members}
    source = {
        "checkpoints": str(ctx.checkpoints.resolve()),
        "classifiers": {name: str(m.checkpoint.resolve()) for name, m in zip(metas, ctx.spec.members, strict=True)},
        "ensemble": str(ctx.spec.path.resolve()),
        "detector": str((ctx.checkpoints / "detector.pt").resolve()),
        "data_fingerprint": {
            **{name: meta.data_fingerprint for name, meta in metas.items()},
            "detector": ctx.detector_meta.get("data_fingerprint", ""),
        },
        "val_metrics": {
            "ensemble": ctx.spec.metrics,
            **{name: meta.val_metrics for name, meta in metas.items()},
            "detector": ctx.detector_meta.get("val_metrics", {}),
        },
        "versions": _versions(),
    }
    fp32_files = [ctx.path("classifier", "fp32"), ctx.path("detector", "fp32")]
    manifest = build_manifest(
        ctx.entries,
        classifier,
        detector,
        fp32_files,
        ctx.calibration,
        accuracy.summary() if accuracy else {"skipped": "no evaluation data (pass --eval-data)"},
        source,
    )
    return write_manifest(ctx.out, manifest)
