"""The INT8 layer search: quantise every layer, then keep in FP32 the fewest layers that bring the graph inside its gates.

One search per graph and target, the same for the classifier and the detector:

1. every quantisable node of the convolutional body is quantised (:func:`precision.quantize_graph`)
   and the graph is judged on the whole evaluation set with :mod:`spine_edge.verdict`, the rule
   export's report and bench apply; if it is within its gates, nothing stays in FP32;
2. otherwise each weighted layer (Conv, Gemm, MatMul) is measured alone back in float
   ("leave-one-in-FP32", :func:`precision.keep_float`) on a few calibration images, by a fidelity
   metric that needs no labels: the classifier's mean |Δprob| against FP32, the detector's mean
   |Δclass score| of its raw output against FP32. Layers are ranked by how much putting them back
   in float reduces that error;
3. the ``k`` most sensitive layers are kept in float for ``k = 1, 2, 4, ...`` until the judged graph
   is within its gates, then ``k`` is bisected down to the smallest that still is. The ranking is
   measured once, so each step costs one evaluation. If not even every layer in float is within
   the gates, nothing is kept in float: the error then lies elsewhere (activation Q/DQ), float
   layers would only cost speed, and the verdict says ``fail``.

"Within its gates" (:attr:`spine_edge.verdict.RoleVerdict.within_gates`) is: no fidelity gate broken,
no ``fail``, and the point estimate of the task delta inside the gate. The search does not chase
``hold`` when the interval is merely too wide: more FP32 layers cannot narrow an interval that the
number of evaluation images sets, and the report says ``inconclusive`` then.

Members or halves of the network are no longer kept in FP32 wholesale: a trained EfficientNetV2-B0
member lost most of its INT8 error in a few late layers (its last stage and head moved the probability
by 0.25 and 0.12 on average, earlier stages by < 0.025), and keeping a whole member in FP32 ran the
INT8 graph at FP32 speed (16.8 vs 16.0 ms in the issue that replaced that search).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spine_edge.export import precision as prec
from spine_edge.export.bundle_writer import write_onnx
from spine_edge.export.classifier_graph import PROB_NAME
from spine_edge.export.coverage import (
    WEIGHTED_OPS,
    Int8Coverage,
    count_int8_coverage,
    layer_flops,
)
from spine_edge.export.detector_graph import OUTPUT_NAME
from spine_edge.export.evaluation import ClassifierComparison, DetectorComparison, Evaluation, run_graph
from spine_edge.verdict import RoleVerdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSensitivity:
    """One weighted layer's effect on the INT8 graph's fidelity.

    Attributes:
        name: Node name in the FP32 graph.
        mflops: Its arithmetic, MFLOPs per sample.
        error: The fidelity error with only this layer back in float (the all-INT8 error minus this
            layer's share of it: lower means more sensitive).
    """

    name: str
    mflops: float
    error: float


@dataclass(frozen=True)
class SearchStep:
    """One evaluation of the search.

    Attributes:
        kept_fp32: How many of the ranked layers were in float.
        verdict: The verdict on the evaluation set.
        within_gates: Whether that was good enough to stop.
        summary: The verdict's one-line description.
    """

    kept_fp32: int
    verdict: str
    within_gates: bool
    summary: str


@dataclass(frozen=True)
class Int8Search:
    """An INT8 graph and how the search arrived at it.

    Attributes:
        role: ``classifier`` or ``detector``.
        path: The INT8 graph written.
        kept_fp32: Layers left in float, most sensitive first.
        candidates: Weighted layers the search could quantise.
        quantised_error: The fidelity error with every layer in INT8, on the sensitivity images.
        error_metric: What that error is.
        layers: Every measured layer, most sensitive first (empty when all-INT8 was within the gates).
        steps: Every evaluation, in order.
        sensitivity_images: Images the per-layer errors were measured on.
        seconds: Wall time of the search.
        coverage: What runs in INT8 kernels once ONNX Runtime has optimised the written graph.
    """

    role: str
    path: Path
    kept_fp32: tuple[str, ...]
    candidates: int
    quantised_error: float
    error_metric: str
    layers: tuple[LayerSensitivity, ...]
    steps: tuple[SearchStep, ...]
    sensitivity_images: int
    seconds: float
    coverage: Int8Coverage

    def record(self) -> dict[str, Any]:
        """The report's ``sensitivity`` record of this graph."""
        return {
            "method": "quantise all, then leave-one-in-FP32 per weighted layer; keep the fewest most sensitive "
            "layers in FP32 that bring the graph inside its gates",
            "candidates": self.candidates,
            "kept_fp32": list(self.kept_fp32),
            "error_metric": self.error_metric,
            "quantised_error": self.quantised_error,
            "sensitivity_images": self.sensitivity_images,
            "layers": [asdict(layer) for layer in self.layers[:20]],
            "steps": [asdict(step) for step in self.steps],
            "seconds": round(self.seconds, 1),
            "int8_coverage": self.coverage.to_dict(),
        }


def weighted_layers(fp32: onnx.ModelProto, body: set[str]) -> tuple[str, ...]:
    """The body's Conv / ConvTranspose / Gemm / MatMul nodes, in graph order: what the search may keep in float."""
    return tuple(n.name for n in fp32.graph.node if n.op_type in WEIGHTED_OPS and n.name in body)


def _first_passing(count: int, passes: Callable[[int], bool]) -> int | None:
    """Smallest ``k`` in ``1..count`` with ``passes(k)``, by doubling then bisection (None if not even ``count`` passes)."""
    low, high = 0, 1
    while high < count and not passes(high):
        low, high = high, min(2 * high, count)
    if high >= count and not passes(count):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def search_int8(
    role: str,
    fp32_path: Path,
    out: Path,
    calibration: prec.CalibrationResult,
    target: prec.QuantTarget,
    judge: Callable[[onnx.ModelProto], RoleVerdict],
    error: Callable[[onnx.ModelProto], float],
    error_metric: str,
    sensitivity_images: int,
) -> Int8Search:
    """Quantise a graph and keep in float the fewest, most sensitive layers that bring it inside its gates.

    Args:
        role: ``classifier`` or ``detector`` (for the record and the log).
        fp32_path: The FP32 graph.
        out: The INT8 graph to write.
        calibration: Its activation ranges.
        target: ``tensorrt`` or ``onnxruntime``.
        judge: Runs a candidate graph on the evaluation set and returns its verdict against FP32.
        error: Runs a candidate graph on the sensitivity images and returns its fidelity error.
        error_metric: What ``error`` measures, for the record.
        sensitivity_images: How many images ``error`` runs on.

    Returns:
        The written graph, its coverage and every step taken.
    """
    start = time.perf_counter()
    fp32 = onnx.load(str(fp32_path))
    body = prec.fp16_body(fp32)
    with tempfile.TemporaryDirectory(prefix="spine-edge-int8-") as tmp:
        qdq = onnx.load(str(prec.quantize_graph(fp32_path, Path(tmp) / "all.onnx", calibration, target, body)))
    candidates = weighted_layers(fp32, body)
    steps: list[SearchStep] = []

    def within(kept: Sequence[str]) -> bool:
        verdict = judge(prec.keep_float(qdq, fp32, kept))
        steps.append(SearchStep(len(kept), verdict.verdict, verdict.within_gates, verdict.describe()))
        log.info("export: %s %s INT8 with %d layer(s) in FP32: %s", role, target, len(kept), verdict.describe())
        return verdict.within_gates

    quantised_error = error(qdq)
    ranked: tuple[LayerSensitivity, ...] = ()
    kept: tuple[str, ...] = ()
    if not within(()) and candidates:
        flops = layer_flops(fp32)
        measured = [
            LayerSensitivity(name, round(flops.get(name, 0.0) / 1e6, 3), error(prec.keep_float(qdq, fp32, [name])))
            for name in candidates
        ]
        ranked = tuple(sorted(measured, key=lambda layer: layer.error))
        order = [layer.name for layer in ranked]
        count = _first_passing(len(order), lambda k: within(order[:k]))
        # When even every weighted layer in float misses the gates, the error is not theirs (the
        # ONNX Runtime graph's activation Q/DQ, the TensorRT graph's FP16 body, or a gate no INT8
        # graph can meet): float layers would only cost speed.
        kept = tuple(order[:count]) if count is not None else ()
    write_onnx(prec.keep_float(qdq, fp32, kept), out)
    coverage = count_int8_coverage(out, fp32_path)
    if target == "onnxruntime":  # the TensorRT graph's share, by TensorRT's rule, is counted and logged in variants
        log.info("export: %s onnxruntime INT8: %s", role, coverage.describe())
    return Int8Search(
        role=role,
        path=out,
        kept_fp32=kept,
        candidates=len(candidates),
        quantised_error=quantised_error,
        error_metric=error_metric,
        layers=ranked,
        steps=tuple(steps),
        sensitivity_images=sensitivity_images,
        seconds=time.perf_counter() - start,
        coverage=coverage,
    )


def as_built(model: onnx.ModelProto, target: prec.QuantTarget) -> onnx.ModelProto:
    """The graph whose verdict counts for a target: for TensorRT its FP16 body, through the exact FP16 emulation.

    The layer search edits the FP32-body Q/DQ graph (fast integer kernels on the CPU for ranking
    layers), but TensorRT builds the FP16-body graph, whose float16 activations move probabilities
    near the gate too: measured on the demo with percentile calibration, a classifier that passed
    with 2 flips on its FP32-body twin showed 4 (over the gate) with its FP16 body. So every verdict
    of the search for TensorRT is taken on what TensorRT will build.
    """
    return prec.emulate_fp16(prec.int8_fp16_body(model)) if target == "tensorrt" else model


def search_classifier_int8(
    fp32_path: Path,
    out: Path,
    calibration: prec.CalibrationResult,
    target: prec.QuantTarget,
    evaluation: Evaluation,
    images: np.ndarray,
) -> tuple[Int8Search, ClassifierComparison]:
    """The classifier's search; the error is the mean |Δprob| of the ensemble against FP32 on ``images``.

    Args:
        fp32_path: The FP32 classifier graph.
        out: The INT8 graph to write.
        calibration: Its activation ranges.
        target: ``tensorrt`` or ``onnxruntime``.
        evaluation: The evaluation set and FP32 reference (the verdict).
        images: uint8 ``[K, 1, S, S]`` calibration canvases (the per-layer sensitivity).

    Returns:
        The search and the written graph's comparison with FP32, as built for its target (:func:`as_built`).
    """
    batch = evaluation.settings.batch_size
    reference = run_graph(fp32_path, images, [PROB_NAME], batch)[PROB_NAME]

    def judge(model: onnx.ModelProto) -> RoleVerdict:
        return evaluation.compare_classifier(evaluation.run_classifier(as_built(model, target)), "int8").verdict

    def error(model: onnx.ModelProto) -> float:
        return float(np.abs(run_graph(model, images, [PROB_NAME], batch)[PROB_NAME] - reference).mean())

    search = search_int8(
        "classifier", fp32_path, out, calibration, target, judge, error, "mean |Δprob| vs FP32", len(images)
    )
    built = as_built(onnx.load(str(search.path)), target)
    return search, evaluation.compare_classifier(evaluation.run_classifier(built), "int8")


def search_detector_int8(
    fp32_path: Path,
    out: Path,
    calibration: prec.CalibrationResult,
    target: prec.QuantTarget,
    evaluation: Evaluation,
    images: np.ndarray,
) -> tuple[Int8Search, DetectorComparison]:
    """The detector's search; the error is the mean |Δclass score| of the raw output against FP32 on ``images``.

    The raw scores, not the decoded boxes: on a few images the boxes above the deployed confidence
    are too few (none at all with untrained weights) to rank a hundred layers by.

    Args:
        fp32_path: The FP32 detector graph.
        out: The INT8 graph to write.
        calibration: Its activation ranges.
        target: ``tensorrt`` or ``onnxruntime``.
        evaluation: The evaluation set and FP32 reference (the verdict).
        images: uint8 ``[K, 1, S, S]`` calibration canvases (the per-layer sensitivity).

    Returns:
        The search and the written graph's comparison with FP32, as built for its target (:func:`as_built`).
    """
    batch = evaluation.settings.batch_size
    reference = run_graph(fp32_path, images, [OUTPUT_NAME], batch)[OUTPUT_NAME][:, 4:]

    def judge(model: onnx.ModelProto) -> RoleVerdict:
        return evaluation.compare_detector(evaluation.run_detector(as_built(model, target)), "int8").verdict

    def error(model: onnx.ModelProto) -> float:
        raw = run_graph(model, images, [OUTPUT_NAME], batch)[OUTPUT_NAME][:, 4:]
        return float(np.abs(raw - reference).mean())

    search = search_int8(
        "detector", fp32_path, out, calibration, target, judge, error, "mean |Δclass score| vs FP32", len(images)
    )
    built = as_built(onnx.load(str(search.path)), target)
    return search, evaluation.compare_detector(evaluation.run_detector(built), "int8")
