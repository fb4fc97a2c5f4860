"""A tiny but real bundle for runtime tests: small ONNX graphs honouring the manifest contract.

- Classifier ``image`` uint8 ``[N, 1, S, S]`` → ``prob [N]`` and ``cam [N, g, g]``: the CAM is the mean
  brightness of each of g x g regions (AveragePool), and ``prob = sigmoid(PROB_GAIN * (max(cam) -
  PROB_CENTER))``: an image with one bright region is abnormal, a dark one normal.
- Detector ``images`` uint8 ``[N, 1, S, S]`` → ``yolo_raw [N, 4 + 7, A]`` with one anchor per cell of a
  g x g grid: box centred on the cell, side ``cell * (0.5 + brightness)``; class 0 scores
  ``sigmoid(DET_GAIN * (brightness - DET_CENTER))``, the other classes a constant ``OTHER_SCORE``.

:func:`reference_classifier` and :func:`reference_detector` compute the same in numpy, so tests
check backends and the cascade against values known independently of ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spine_edge.bundle import (
    SCHEMA_VERSION,
    BuildInfo,
    ClassifierInfo,
    DetectorInfo,
    EnsembleMember,
    Manifest,
    ModelEntry,
    sha256_file,
    write_manifest,
)
from spine_edge.constants import CLASS_NAMES, CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.export.bundle_writer import tensor_specs

OPSET = 17
PROB_GAIN, PROB_CENTER = 10.0, 0.5
DET_GAIN, DET_CENTER = 30.0, 0.7
OTHER_SCORE = 0.01


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="spine-edge-tests")
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model


def _scaled_input(name: str, size: int) -> tuple[onnx.ValueInfoProto, list[onnx.NodeProto]]:
    value = helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", 1, size, size])
    nodes = [
        helper.make_node("Cast", [name], ["x_float"], to=TensorProto.FLOAT),
        _const("c255", np.array(255.0, np.float32)),
        helper.make_node("Div", ["x_float", "c255"], ["x"]),
    ]
    return value, nodes


def classifier_model(size: int, grid: int, nan_on_black: bool = False) -> onnx.ModelProto:
    """The classifier graph (see the module docstring).

    ``nan_on_black`` multiplies the probability by ``peak / peak``, so an all-black image yields NaN,
    as a broken low-precision engine might.
    """
    value, nodes = _scaled_input("image", size)
    cell = size // grid
    nodes += [
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]),
        _const("axis1", np.array([1], np.int64)),
        helper.make_node("Squeeze", ["pooled", "axis1"], ["cam"]),
        helper.make_node("ReduceMax", ["cam"], ["peak"], axes=[1, 2], keepdims=0),
        _const("center", np.array(PROB_CENTER, np.float32)),
        _const("gain", np.array(PROB_GAIN, np.float32)),
        helper.make_node("Sub", ["peak", "center"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["sigmoid" if nan_on_black else "prob"]),
    ]
    if nan_on_black:
        nodes += [
            helper.make_node("Div", ["peak", "peak"], ["one_or_nan"]),
            helper.make_node("Mul", ["sigmoid", "one_or_nan"], ["prob"]),
        ]
    outputs = [
        helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", grid, grid]),
    ]
    return _model(nodes, [value], outputs, "tiny_classifier")


def anchor_centres(size: int, grid: int) -> np.ndarray:
    """``[2, A]`` cell centres (x, y), row-major, in input pixels."""
    cell = size / grid
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([(cols + 0.5) * cell, (rows + 0.5) * cell]).astype(np.float32)


def detector_model(size: int, grid: int, num_classes: int = len(CLASS_NAMES)) -> onnx.ModelProto:
    """The detector graph (see the module docstring)."""
    value, nodes = _scaled_input("images", size)
    cell = size // grid
    weights = np.zeros((1, num_classes, 1), np.float32)
    bias = np.full((1, num_classes, 1), np.log(OTHER_SCORE / (1 - OTHER_SCORE)), np.float32)
    weights[0, 0, 0], bias[0, 0, 0] = DET_GAIN, -DET_GAIN * DET_CENTER
    nodes += [
        helper.make_node("AveragePool", ["x"], ["pooled4d"], kernel_shape=[cell, cell], strides=[cell, cell]),
        _const("flat_shape", np.array([0, 1, -1], np.int64)),
        helper.make_node("Reshape", ["pooled4d", "flat_shape"], ["pooled"]),  # [N, 1, A]
        _const("zero", np.array(0.0, np.float32)),
        _const("centres", anchor_centres(size, grid)[None]),
        helper.make_node("Mul", ["pooled", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "centres"], ["xy"]),  # broadcast to [N, 2, A]
        _const("half", np.array(0.5, np.float32)),
        _const("cell", np.array(float(cell), np.float32)),
        helper.make_node("Add", ["pooled", "half"], ["side_rel"]),
        helper.make_node("Mul", ["side_rel", "cell"], ["side"]),
        _const("w", weights),
        _const("b", bias),
        helper.make_node("Mul", ["pooled", "w"], ["weighted"]),
        helper.make_node("Add", ["weighted", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("Concat", ["xy", "side", "side", "scores"], ["yolo_raw"], axis=1),
    ]
    output = helper.make_tensor_value_info("yolo_raw", TensorProto.FLOAT, ["batch", 4 + num_classes, grid * grid])
    return _model(nodes, [value], [output], "tiny_detector")


def _region_means(canvas: np.ndarray, grid: int) -> np.ndarray:
    """``[N, grid, grid]`` mean brightness in [0, 1] of each cell of ``[N, S, S]`` uint8 canvases."""
    n, size = canvas.shape[0], canvas.shape[-1]
    cell = size // grid
    scaled = canvas.reshape(n, size, size).astype(np.float64) / 255.0
    return scaled.reshape(n, grid, cell, grid, cell).mean(axis=(2, 4))


def reference_classifier(canvas: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of :func:`classifier_model`: ``(prob [N], cam [N, g, g])``."""
    cam = _region_means(canvas, grid)
    prob = 1 / (1 + np.exp(-PROB_GAIN * (cam.max(axis=(1, 2)) - PROB_CENTER)))
    return prob, cam


def reference_detector(canvas: np.ndarray, grid: int, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Numpy twin of :func:`detector_model`: ``yolo_raw [N, 4 + C, A]``."""
    size = canvas.shape[-1]
    means = _region_means(canvas, grid).reshape(canvas.shape[0], 1, -1)
    xy = np.broadcast_to(anchor_centres(size, grid)[None], (canvas.shape[0], 2, grid * grid))
    side = (means + 0.5) * (size // grid)
    scores = np.full((canvas.shape[0], num_classes, grid * grid), OTHER_SCORE)
    scores[:, 0] = 1 / (1 + np.exp(-DET_GAIN * (means[:, 0] - DET_CENTER)))
    return np.concatenate([xy, side, side, scores], axis=1)


def _entry(
    folder: Path,
    role: str,
    model: onnx.ModelProto,
    fmt: str = "onnx",
    build: BuildInfo | None = None,
    file: str | None = None,
) -> ModelEntry:
    path = folder / (file or f"{role}.fp32.onnx")
    onnx.save(model, path)
    return _entry_for(role, path, fmt, build)


def _entry_for(role: str, path: Path, fmt: str, build: BuildInfo | None) -> ModelEntry:
    inputs, outputs = tensor_specs(path)
    return ModelEntry(
        role=role,  # type: ignore[arg-type]
        precision="fp32",
        format=fmt,  # type: ignore[arg-type]
        file=path.name,
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        build=build,
    )


def _optimized_entry(folder: Path, role: str, builder_version: str | None) -> ModelEntry:
    """ONNX Runtime's own optimised graph, as ``build-engines`` prepares it for a CPU."""
    import onnxruntime as ort

    from spine_edge.backends.onnxruntime import cpu_model_name

    target = folder / f"{role}.fp32.ort-cpu.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(folder / f"{role}.fp32.onnx"), options, providers=["CPUExecutionProvider"])
    build = BuildInfo(
        builder="onnxruntime",
        builder_version=builder_version or ort.__version__,
        device=cpu_model_name(),
        source=f"{role}.fp32.onnx",
    )
    return _entry_for(role, target, "onnx-optimized", build)


def make_bundle(
    folder: str | Path,
    classifier_size: int = 64,
    detector_size: int = 64,
    cam_grid: int = 8,
    det_grid: int = 4,
    threshold: float = 0.5,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.65,
    optimized_version: str | None = None,
    with_optimized: bool = False,
    nan_on_black: bool = False,
) -> Path:
    """Write a bundle folder (ONNX files + manifest with real sha256s) and return it.

    Args:
        folder: Where to write (created).
        classifier_size: Classifier input side.
        detector_size: Detector input side.
        cam_grid: CAM resolution (and brightness regions of the classifier).
        det_grid: Detector anchors per side.
        threshold: Gate τ.
        conf_threshold: Detector confidence threshold.
        iou_threshold: Detector NMS IoU threshold.
        with_optimized: Also write ``onnx-optimized`` entries made by ONNX Runtime here.
        optimized_version: ``builder_version`` to record for them (default: this onnxruntime).
        nan_on_black: The classifier returns NaN for an all-black image (see :func:`classifier_model`).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    classifier = classifier_model(classifier_size, cam_grid, nan_on_black)
    detector = detector_model(detector_size, det_grid)
    models = [_entry(out, "classifier", classifier), _entry(out, "detector", detector)]
    if with_optimized:
        models += [
            _optimized_entry(out, "classifier", optimized_version),
            _optimized_entry(out, "detector", optimized_version),
        ]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=models[0].sha256[:6] + models[1].sha256[:6],
        created="2026-11-27T00:00:00Z",
        class_names=CLASS_NAMES,
        classifier=ClassifierInfo(
            input_size=classifier_size,
            members=(EnsembleMember("tiny", "brightness", 1.0),),
            tta_views=("identity",),
            threshold=threshold,
            cam_shape=(cam_grid, cam_grid),
            pad_value=CLASSIFIER_PAD_VALUE,
        ),
        detector=DetectorInfo(
            input_size=detector_size,
            class_names=CLASS_NAMES,
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            max_det=100,
            pad_value=DETECTOR_PAD_VALUE,
        ),
        models=tuple(models),
    )
    write_manifest(out, manifest)
    return out
