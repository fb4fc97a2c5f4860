"""The bundle's graphs per precision: FP32 (checked against PyTorch), FP16 and INT8 Q/DQ, per role.

Each builder writes the files of one precision for both roles (classifier, detector) and returns a
frozen result naming them, with their accuracy against FP32 when there is an evaluation set.
:func:`model_entry_of` turns each written graph into its manifest entry at the end, after the
TensorRT operator check.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from spine_edge.bundle import ModelEntry
from spine_edge.constants import CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.errors import SpineEdgeError
from spine_edge.export import precision as prec
from spine_edge.export.bundle_writer import model_entry, write_onnx
from spine_edge.export.calibration import CalibrationSet
from spine_edge.export.classifier_graph import CAM_NAME, PROB_NAME, export_classifier_graph, run_ensemble
from spine_edge.export.coverage import count_tensorrt_int8_coverage
from spine_edge.export.detector_graph import (
    OUTPUT_NAME,
    DetectorExportModule,
    DetectorSource,
    export_detector_graph,
    run_detector_module,
)
from spine_edge.export.evaluation import (
    ClassifierComparison,
    DetectorComparison,
    EvalSet,
    Evaluation,
    member_prob_tensors,
    run_graph,
)
from spine_edge.export.opcheck import check_symmetric_qdq, check_trt_ops
from spine_edge.export.sensitivity import search_classifier_int8, search_detector_int8

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ROLES = ("classifier", "detector")
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
FP32_NOTES = "FP32 reference (PyTorch parity in accuracy_report.json)."
FP16_NOTES = (
    "FP16 convolutional body (float16 weights and activations between the first and last Conv); "
    "preprocessing, heads, sigmoid, view mean, ensemble weighting, CAM normalisation and YOLO decode "
    "stay FP32; uint8 in, float32 out."
)
FP16_HOW = (
    "measured on ONNX Runtime CPU through an exact emulation (every FP16 tensor rounded to float16 by "
    "explicit casts, ops accumulate in FP32 as on a GPU), because ORT's CPU provider silently runs "
    "float16 ops in float32."
)
#: The tensor roles every graph of a role must declare in the manifest (see bundle_writer.TENSOR_ROLES_BY_NAME).
EXPECTED_ROLES = {"classifier": {"image", "probability", "cam"}, "detector": {"image", "yolo_raw"}}
#: Roles a graph may carry besides those: the classifier's in-distribution score, absent when the export
#: had no training images to fit it on.
OPTIONAL_ROLES: dict[str, set[str]] = {"classifier": {"ood_score"}, "detector": set()}


def graph_path(out: Path, role: str, variant: str) -> Path:
    """The bundle file of a role's variant (``classifier.int8.trt.onnx``)."""
    return out / FILE_NAMES[variant].format(role=role)


def variant_target(variant: str) -> str:
    """Who runs a variant's graph: ``tensorrt``, ``onnxruntime`` or ``any``."""
    return INT8_VARIANTS.get(variant, "any")


@dataclass(frozen=True)
class GraphFile:
    """One graph written into the bundle.

    Attributes:
        role: ``classifier`` or ``detector``.
        variant: ``fp32``, ``fp16``, ``int8-trt`` or ``int8-ort``.
        path: The file.
        notes: How it was made, for the manifest entry.
    """

    role: str
    variant: str
    path: Path
    notes: str

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``."""
        return self.variant.split("-")[0]

    @property
    def target(self) -> str:
        """Who runs it: ``tensorrt``, ``onnxruntime`` or ``any``."""
        return variant_target(self.variant)


@dataclass(frozen=True)
class Parity:
    """FP32 graphs against the PyTorch modules they were traced from, on the same images.

    Attributes:
        images: Images compared.
        classifier_max_abs_dprob: Largest ensemble-probability difference.
        classifier_max_abs_dcam: Largest CAM difference.
        detector_max_abs_dbox_px: Largest box-coordinate difference (input pixels).
        detector_max_abs_dscore: Largest class-score difference.
    """

    images: int
    classifier_max_abs_dprob: float
    classifier_max_abs_dcam: float
    detector_max_abs_dbox_px: float
    detector_max_abs_dscore: float

    @property
    def holds(self) -> bool:
        """Whether both graphs compute what PyTorch computes, within :data:`PARITY_PROB` / :data:`PARITY_SCORE`."""
        return self.classifier_max_abs_dprob <= PARITY_PROB and self.detector_max_abs_dscore <= PARITY_SCORE

    def to_dict(self) -> dict[str, Any]:
        """The report's ``parity``."""
        return asdict(self)


@dataclass(frozen=True)
class Fp32Graphs:
    """The FP32 graphs: the reference every precision is measured against, and TensorRT's input.

    Attributes:
        classifier: The classifier graph.
        detector: The detector graph.
        member_tensors: Each member's probability tensor in the classifier graph.
        parity: Their agreement with PyTorch.
    """

    classifier: GraphFile
    detector: GraphFile
    member_tensors: tuple[str, ...]
    parity: Parity


@dataclass(frozen=True)
class Variant:
    """The graphs of one lower precision (both roles) and their accuracy against FP32.

    Attributes:
        variant: ``fp16``, ``int8-trt`` or ``int8-ort``.
        graphs: The classifier's and the detector's graph, in that order.
        how: How its accuracy was measured.
        classifier: Classifier accuracy (None without an evaluation set).
        detector: Detector accuracy (None without an evaluation set).
        sensitivity: INT8 layer-search records, per graph (``classifier int8-trt``); empty for FP16.
        coverage: INT8 coverage per role (:meth:`spine_edge.export.coverage.Int8Coverage.to_dict`); empty for FP16.
    """

    variant: str
    graphs: tuple[GraphFile, GraphFile]
    how: str
    classifier: ClassifierComparison | None = None
    detector: DetectorComparison | None = None
    sensitivity: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """Who runs its graphs."""
        return variant_target(self.variant)


def _parity_images(
    data: EvalSet | None, count: int, classifier_size: int, detector_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation images where there are some, else fixed random ones: the comparison needs inputs, not labels."""
    if data is not None:
        return data.classifier_canvases[:count], data.detector_canvases[:count]
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 256, (count, 1, classifier_size, classifier_size), dtype=np.uint8),
        rng.integers(0, 256, (count, 1, detector_size, detector_size), dtype=np.uint8),
    )


def measure_parity(
    ensemble: torch.nn.Module,
    detector: DetectorExportModule,
    classifier_path: Path,
    detector_path: Path,
    cls_images: np.ndarray,
    det_images: np.ndarray,
) -> Parity:
    """Compare the FP32 graphs with the PyTorch modules on the same images."""
    ref_prob, ref_cam = run_ensemble(ensemble, cls_images)
    got = run_graph(classifier_path, cls_images, [PROB_NAME, CAM_NAME], len(cls_images))
    ref_raw = run_detector_module(detector, det_images)
    raw = run_graph(detector_path, det_images, [OUTPUT_NAME], len(det_images))[OUTPUT_NAME]
    return Parity(
        images=len(cls_images),
        classifier_max_abs_dprob=float(np.abs(got[PROB_NAME] - ref_prob).max()),
        classifier_max_abs_dcam=float(np.abs(got[CAM_NAME] - ref_cam).max()),
        detector_max_abs_dbox_px=float(np.abs(raw[:, :4] - ref_raw[:, :4]).max()),
        detector_max_abs_dscore=float(np.abs(raw[:, 4:] - ref_raw[:, 4:]).max()),
    )


def export_fp32_graphs(
    ensemble: torch.nn.Module,
    detector: DetectorExportModule,
    detector_source: DetectorSource,
    sizes: tuple[int, int],
    members: int,
    out: Path,
    data: EvalSet | None,
    parity_images: int,
) -> Fp32Graphs:
    """Trace both models to FP32 ONNX and check each graph computes what its PyTorch module computes.

    Args:
        ensemble: The eval-mode ``DERNetEnsemble``.
        detector: The detector export module.
        detector_source: What the detector checkpoint says (class names, channels, stride).
        sizes: Input sides of the classifier and the detector.
        members: Number of ensemble members (to locate their probabilities in the graph).
        out: Bundle folder.
        data: Evaluation set (its first images are compared), or None (random images).
        parity_images: Images compared.

    Raises:
        SpineEdgeError: A graph differs from PyTorch beyond :data:`PARITY_PROB` / :data:`PARITY_SCORE`.
    """
    classifier_size, detector_size = sizes
    cls_path = export_classifier_graph(ensemble, graph_path(out, "classifier", "fp32"), classifier_size)
    det_path = export_detector_graph(detector, detector_source, graph_path(out, "detector", "fp32"), detector_size)
    cls_images, det_images = _parity_images(data, parity_images, classifier_size, detector_size)
    parity = measure_parity(ensemble, detector, cls_path, det_path, cls_images, det_images)
    if not parity.holds:
        raise SpineEdgeError(
            f"{out}: the FP32 graphs do not compute what the PyTorch models compute ({parity.to_dict()}); "
            "this is an export bug: report it with the checkpoints' torch/timm/ultralytics versions"
        )
    return Fp32Graphs(
        classifier=GraphFile("classifier", "fp32", cls_path, FP32_NOTES),
        detector=GraphFile("detector", "fp32", det_path, FP32_NOTES),
        member_tensors=member_prob_tensors(onnx.load(str(cls_path)), members),
        parity=parity,
    )


def build_fp16_variant(fp32: Fp32Graphs, out: Path, evaluation: Evaluation | None) -> Variant:
    """Write both FP16 graphs and, with an evaluation set, measure them through the exact FP16 emulation."""
    graphs = tuple(
        GraphFile(role, "fp16", prec.write_fp16_graph(source.path, graph_path(out, role, "fp16")), FP16_NOTES)
        for role, source in zip(ROLES, (fp32.classifier, fp32.detector), strict=True)
    )
    classifier, detector = graphs
    if evaluation is None:
        return Variant("fp16", (classifier, detector), FP16_HOW)
    cls_run = evaluation.run_classifier(prec.emulate_fp16(onnx.load(str(classifier.path))))
    detections = evaluation.run_detector(prec.emulate_fp16(onnx.load(str(detector.path))))
    return Variant(
        "fp16",
        (classifier, detector),
        FP16_HOW,
        evaluation.compare_classifier(cls_run, "fp16"),
        evaluation.compare_detector(detections, "fp16"),
    )


def int8_description(target: prec.QuantTarget, calibration: prec.CalibrationResult) -> str:
    """The manifest note of an INT8 graph: its Q/DQ scheme and calibration."""
    kind = (
        "symmetric int8 activations (zero point 0), per-channel symmetric int8 weights, float biases"
        if target == "tensorrt"
        else "uint8 activations with zero points, per-channel 7-bit int8 weights (U8S8, reduce_range: no "
        "int16 saturation on CPUs without VNNI)"
    )
    return f"INT8 Q/DQ for {target}: {kind}; {calibration.method} calibration on {calibration.images} images."


def sensitivity_canvases(
    calibration: CalibrationSet, count: int, sizes: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` calibration images as classifier and detector canvases, for the per-layer sensitivity.

    Calibration (train) images, not evaluation ones: the layer ranking needs no labels, and the
    validation split stays what the verdict alone is measured on.
    """
    chosen = calibration.images[:count]
    classifier_size, detector_size = sizes
    return (
        np.stack([prec.load_canvas(p, classifier_size, CLASSIFIER_PAD_VALUE) for p in chosen])[:, None],
        np.stack([prec.load_canvas(p, detector_size, DETECTOR_PAD_VALUE) for p in chosen])[:, None],
    )


def build_int8_variant(
    variant: str,
    fp32: Fp32Graphs,
    calibration: CalibrationSet,
    out: Path,
    evaluation: Evaluation,
    sensitivity_images: int,
) -> Variant:
    """Write both INT8 Q/DQ graphs of a target, each through its layer search, measured on ONNX Runtime CPU.

    Args:
        variant: ``int8-trt`` or ``int8-ort``.
        fp32: The FP32 graphs.
        calibration: Their activation ranges.
        out: Bundle folder.
        evaluation: The evaluation set and FP32 reference.
        sensitivity_images: Calibration images the per-layer sensitivity runs on.
    """
    target = INT8_VARIANTS[variant]
    sizes = (evaluation.data.classifier_canvases.shape[-1], evaluation.data.detector_canvases.shape[-1])
    cls_images, det_images = sensitivity_canvases(calibration, sensitivity_images, sizes)
    cls_search, cls_comparison = search_classifier_int8(
        fp32.classifier.path,
        graph_path(out, "classifier", variant),
        calibration.classifier,
        target,
        evaluation,
        cls_images,
    )
    det_search, det_comparison = search_detector_int8(
        fp32.detector.path,
        graph_path(out, "detector", variant),
        calibration.detector,
        target,
        evaluation,
        det_images,
    )
    how = f"Q/DQ graph for {target} run on ONNX Runtime CPU."
    fp16_shares: dict[str, float] = {}
    coverage = {"classifier": cls_search.coverage, "detector": det_search.coverage}
    if target == "tensorrt":
        # TensorRT builds Q/DQ graphs strongly typed: the unquantised rest must be FP16 in the graph
        # itself, or it runs in FP32 on the GPU. The search edited the FP32-body twin and judged every
        # candidate, the kept one included, as built (sensitivity.as_built): its comparison is already
        # that of the FP16 body, so only the file is rewritten here.
        for role, search, source in (
            ("classifier", cls_search, fp32.classifier),
            ("detector", det_search, fp32.detector),
        ):
            body = prec.int8_fp16_body(onnx.load(str(search.path)))
            write_onnx(body, search.path)
            fp16_shares[role] = prec.fp16_share(body)
            coverage[role] = count_tensorrt_int8_coverage(search.path, source.path)
            log.info("export: %s tensorrt INT8: %s", role, coverage[role].describe())
        how = (
            "Q/DQ graph for tensorrt with an FP16 body (opset 19, float16 scales), measured through the exact "
            "FP16 emulation on ONNX Runtime CPU; the per-layer search edited its FP32-body twin."
        )
    graphs = []
    for role, search, result in (
        ("classifier", cls_search, calibration.classifier),
        ("detector", det_search, calibration.detector),
    ):
        if target == "tensorrt":
            # ONNX Runtime's CPU fusion wants int32 biases; TensorRT fuses these float-bias Q/DQ convs itself.
            notes = (
                f"{int8_description(target, result)} {coverage[role].describe()} "
                f"(ONNX Runtime CPU fuses {search.coverage.int8_share:.1%}: it wants int32 biases)."
            )
        else:
            notes = f"{int8_description(target, result)} {search.coverage.describe()}, counted after ONNX Runtime's optimisation."
        if search.kept_fp32:
            notes += f" Kept in float by the per-layer search: {len(search.kept_fp32)} of {search.candidates} layers."
        if role in fp16_shares:
            notes += (
                f" Body between the Q/DQ layers in FP16 (opset {prec.QDQ_FP16_OPSET}, float16 scales): "
                f"{fp16_shares[role]:.0%} of its conv/matmul layers read FP16; preprocessing and the output tail stay FP32."
            )
        graphs.append(GraphFile(role, variant, search.path, notes))
    return Variant(
        variant=variant,
        graphs=(graphs[0], graphs[1]),
        how=how,
        classifier=cls_comparison,
        detector=det_comparison,
        sensitivity={f"classifier {variant}": cls_search.record(), f"detector {variant}": det_search.record()},
        coverage={
            role: coverage[role].to_dict()
            | (
                {"onnxruntime_cpu_int8_flop_share": round(search.coverage.int8_share, 4)}
                if target == "tensorrt"
                else {}
            )
            for role, search in (("classifier", cls_search), ("detector", det_search))
        },
    )


def _opcheck_note(graph: GraphFile) -> str:
    """Run the TensorRT operator check; a TensorRT-target graph with asymmetric Q/DQ is a bug here."""
    report = check_trt_ops(graph.path)
    if graph.target == "tensorrt" and check_symmetric_qdq(graph.path):
        raise SpineEdgeError(f"{graph.path}: TensorRT INT8 graph has non-symmetric Q/DQ:\n{report.summary()}")
    if graph.target == "onnxruntime":
        ops_ok = not report.unsupported
        return f"TensorRT op check: ops {'ok' if ops_ok else 'UNSUPPORTED'}; asymmetric Q/DQ, for ONNX Runtime only."
    if not report.ok:
        log.warning("%s", report.summary())
        return "TensorRT op check: FAILED (" + "; ".join(f.op for f in report.unsupported) + ")."
    return "TensorRT op check: ok."


def model_entry_of(out: Path, graph: GraphFile) -> ModelEntry:
    """The manifest entry of a written graph, after the TensorRT operator check.

    Raises:
        SpineEdgeError: A TensorRT graph with asymmetric Q/DQ, or a graph whose tensors do not carry
            the roles the runtime looks them up by (an exporter change that renamed a tensor).
    """
    entry = model_entry(
        out, graph.path, graph.role, graph.precision, graph.target, f"{graph.notes} {_opcheck_note(graph)}".strip()
    )
    roles = {spec.role for spec in (*entry.inputs, *entry.outputs)}
    if not EXPECTED_ROLES[graph.role] <= roles <= EXPECTED_ROLES[graph.role] | OPTIONAL_ROLES[graph.role]:
        raise SpineEdgeError(
            f"{graph.path}: tensors {[s.name for s in (*entry.inputs, *entry.outputs)]} carry roles {sorted(map(str, roles))}, "
            f"expected {sorted(EXPECTED_ROLES[graph.role])}: this is an export bug; update "
            "spine_edge.export.bundle_writer.TENSOR_ROLES_BY_NAME with the graph's tensor names"
        )
    return entry
