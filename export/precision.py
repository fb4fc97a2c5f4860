"""Lower-precision graphs from the FP32 ONNX: FP16 conversion and INT8 Q/DQ quantisation.

FP16: a graph-level converter instead of ``onnxconverter-common``'s ``convert_float_to_float16``
(which failed on the fused classifier here, around GridSample and its Cast placement) or a
half-precision PyTorch trace (which would run the sensitive tail in half as well, unless the
training module were taken apart). The converter reads each operator's ONNX schema, switches only the float32 tensors bound
to a type constraint that allows float16, and inserts one Cast wherever an FP16 tensor meets an
FP32 consumer or the reverse. Which nodes run in FP16 is a plain set of node names; the default
policy (:func:`fp16_body`) is "the convolutional body": every node that has a Conv at or above it
and a Conv at or below it. The preprocessing before the first Conv (cast, /255, TTA grid sampling,
normalisation) and the tail after the last Conv (pooling, heads, sigmoid, view mean, ensemble
weighting, CAM, YOLO box decode) stay FP32, as does the graph interface (uint8 in, float32 out).

INT8: explicit quantisation with ONNX Runtime's ``quantize_static`` in QDQ format, calibrated once per
graph on real images read through a :class:`CalibrationImages` reader; two variants per graph:

* ``tensorrt``: symmetric int8 activations and per-channel symmetric int8 weights, every zero point 0
  (TensorRT's explicit-quantisation requirement).
* ``onnxruntime``: uint8 activations with zero points and per-channel int8 weights (U8S8), which ONNX
  Runtime's CPU kernels fuse into QLinearConv / integer GEMM; symmetric S8S8 was slower than FP32 on
  the AVX2 CPUs measured here.

Where the Q/DQ pairs go depends on the target. ``onnxruntime``: on every quantisable body node
(activations kept, ``QDQKeepRemovableActivations``), because ONNX Runtime's CPU selectors fuse a
conv into QLinearConv only when its output is quantised too, and chain QLinear ops through
activations, adds and concats. ``tensorrt``: on the inputs of weighted layers only (Conv, Gemm,
MatMul), none on their outputs, activations, adds or concats, which is TensorRT's Q/DQ placement
recommendation and what ModelOpt writes: TensorRT (and OpenVINO, which reads the same file) fuses
the activation and the next layer's quantisation into the conv, while a Q/DQ pair on a Sigmoid or
a Mul splits SiLU and squeeze-excitation into separate kernels and adds a rounding per pair. Measured
on the demo's TensorRT classifier, quantising every op failed the flip gate even with all weighted
layers in float (7 flips on 100 images), the activations' Q/DQ alone; at paper size on OpenVINO
that placement ran 105 unfused scale/shift ops and 888 FakeQuantize ops. Layers the INT8 search
keeps in float are then put back by :func:`keep_float`, which edits the Q/DQ graph so ONNX Runtime
cannot fuse them into integer kernels anyway (``nodes_to_exclude`` alone does not stop it).

ONNX Runtime's quantiser was chosen over NVIDIA ModelOpt because ``nvidia-modelopt[onnx]`` pins onnx
1.21 and pulls onnxruntime-gpu into the workstation environment, while the two gave the same
ResNet-50 accuracy in the design notes. ModelOpt's edge is Q/DQ placement tuned for TensorRT's fusions
(none on conv outputs, one per residual Add), which affects engine speed, not what the graph computes;
biases stay float in the TensorRT graph (``QuantizeBias`` off): TensorRT's explicit quantisation
takes int8 Q/DQ only (``export.opcheck.check_symmetric_qdq``) and adds the bias in its fused kernels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spine_edge.bundle import CalibrationMethod
from spine_edge.errors import DatasetError
from spine_edge.export.bundle_writer import write_onnx
from spine_edge.preprocess import letterbox

log = logging.getLogger(__name__)

_FLOAT = TensorProto.FLOAT
_HALF = TensorProto.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)
#: Ops whose output type comes from an attribute, not from an input type constraint.
_ATTRIBUTE_TYPED = {
    "ConstantOfShape",
    "EyeLike",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
_CONV_OPS = {"Conv", "ConvTranspose"}
#: Ops with weights: what :func:`keep_float` keeps in float, and what keeps reading quantised inputs.
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


# --------------------------------------------------------------------------------------------- FP16


def fp16_body(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes of the convolutional body: a Conv at or above them and a Conv at or below them.

    The same set is what INT8 may quantise: preprocessing and the output tail stay FP32 in every
    precision.

    Args:
        model: The FP32 graph (nodes in topological order, as exporters write them).

    Returns:
        Node names of the body.
    """
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)

    count = len(graph.node)
    below_conv = [False] * count  # a Conv at or above the node
    for i, node in enumerate(graph.node):
        below_conv[i] = node.op_type in _CONV_OPS or any(
            below_conv[producers[name]] for name in node.input if name in producers
        )
    above_conv = [False] * count  # a Conv at or below the node
    for i in reversed(range(count)):
        node = graph.node[i]
        above_conv[i] = node.op_type in _CONV_OPS or any(
            above_conv[j] for out in node.output for j in consumers.get(out, ())
        )
    return {node.name for i, node in enumerate(graph.node) if below_conv[i] and above_conv[i]}


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _constraint_slots(node: onnx.NodeProto, opset: int) -> tuple[dict[int, str], dict[int, str]]:
    """For each input and output index, the type constraint it is bound to, where that constraint allows float16."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    half_ok = {c.type_param_str for c in schema.type_constraints if "tensor(float16)" in c.allowed_type_strs}

    def slots(formals: Sequence[Any], count: int) -> dict[int, str]:
        bound = {}
        for index in range(count):
            formal = formals[min(index, len(formals) - 1)]
            if formal.type_str in half_ok:
                bound[index] = formal.type_str
        return bound

    return slots(schema.inputs, len(node.input)), slots(schema.outputs, len(node.output))


def convert_to_fp16(model: onnx.ModelProto, fp16_nodes: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``fp16_nodes`` compute in float16, with Casts at every FP16/FP32 border.

    Graph inputs and outputs keep their types. Float initialisers used only by FP16 nodes are stored
    as float16 (clipped to ±65504); those used on both sides are stored once per precision.

    Args:
        model: FP32 graph with unique node names.
        fp16_nodes: Names of the nodes to run in FP16 (e.g. from :func:`fp16_body`).

    Returns:
        The mixed-precision graph (checked by the caller when written).
    """
    src = onnx.ModelProto()
    src.CopyFrom(model)
    graph = src.graph
    opset = next(o.version for o in src.opset_import if o.domain in ("", "ai.onnx"))
    types = _tensor_types(src)
    initializers = {t.name: t for t in graph.initializer}

    # 1. which slot of which node wants which type
    wanted: list[tuple[onnx.NodeProto, int, int]] = []  # (node, input index, element type it needs)
    new_types: dict[str, int] = {}
    for node in graph.node:
        half = node.name in fp16_nodes and node.op_type not in _ATTRIBUTE_TYPED
        if node.op_type == "Cast":
            target = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            if half and target == _FLOAT:
                for attr in node.attribute:
                    if attr.name == "to":
                        attr.i = _HALF
                new_types[node.output[0]] = _HALF
            continue
        in_slots, out_slots = _constraint_slots(node, opset)
        # A constraint switches to float16 only if it binds float32 tensors.
        switched = {c for i, c in in_slots.items() if node.input[i] and types.get(node.input[i]) == _FLOAT}
        switched |= {c for i, c in out_slots.items() if types.get(node.output[i]) == _FLOAT}
        for i, name in enumerate(node.input):
            if name and i in in_slots and types.get(name) == _FLOAT:
                wanted.append((node, i, _HALF if half and in_slots[i] in switched else _FLOAT))
        for i, name in enumerate(node.output):
            if half and i in out_slots and out_slots[i] in switched and types.get(name) == _FLOAT:
                new_types[name] = _HALF

    # 2. initialisers: store in the precision their consumers want
    init_users: dict[str, set[int]] = {}
    for node, i, dtype in wanted:
        if node.input[i] in initializers:
            init_users.setdefault(node.input[i], set()).add(dtype)
    for name, dtypes in init_users.items():
        if dtypes != {_HALF}:
            continue
        tensor = initializers[name]
        values = numpy_helper.to_array(tensor).clip(-_FP16_MAX, _FP16_MAX).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(values, name))
        new_types[name] = _HALF
    for name, dtypes in init_users.items():
        if dtypes == {_HALF, _FLOAT}:
            values = numpy_helper.to_array(initializers[name]).clip(-_FP16_MAX, _FP16_MAX).astype(np.float16)
            graph.initializer.append(numpy_helper.from_array(values, f"{name}__fp16"))
            for node, i, dtype in wanted:
                if node.input[i] == name and dtype == _HALF:
                    node.input[i] = f"{name}__fp16"

    # 3. casts where a tensor's new type differs from what a consumer wants (one per tensor and type)
    casts: dict[tuple[str, int], str] = {}
    cast_nodes: dict[str, list[onnx.NodeProto]] = {}  # producer tensor -> casts to insert after it

    def cast_of(name: str, dtype: int) -> str:
        key = (name, dtype)
        if key not in casts:
            suffix = "fp16" if dtype == _HALF else "fp32"
            casts[key] = f"{name}__to_{suffix}"
            cast = helper.make_node("Cast", [name], [casts[key]], name=f"{name}__cast_{suffix}", to=dtype)
            cast_nodes.setdefault(name, []).append(cast)
        return casts[key]

    for node, i, dtype in wanted:
        name = node.input[i]
        if new_types.get(name, types.get(name)) != dtype:
            node.input[i] = cast_of(name, dtype)

    # graph outputs keep their declared type: the producer writes a renamed tensor, a Cast restores the name
    for output in graph.output:
        if new_types.get(output.name) == _HALF:
            inner = f"{output.name}__fp16"
            for node in graph.node:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if o == output.name else o for o in node.input]
            cast = helper.make_node("Cast", [inner], [output.name], name=f"{output.name}__cast_fp32", to=_FLOAT)
            cast_nodes.setdefault(inner, []).append(cast)

    # 4. rebuild the node list in topological order with the casts right after their producers
    ordered: list[onnx.NodeProto] = []
    for name in [*(i.name for i in graph.input), *initializers]:
        ordered.extend(cast_nodes.pop(name, []))
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered.extend(cast_nodes.pop(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(src, strict_mode=True)


def write_fp16_graph(fp32_path: Path, out: Path) -> Path:
    """Convert an FP32 graph's convolutional body to FP16 and write it; returns ``out``."""
    model = onnx.load(str(fp32_path))
    return write_onnx(convert_to_fp16(model, fp16_body(model)), out)


def emulate_fp16(fp16_model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that computes what an FP16 graph computes, for measuring FP16 accuracy on a CPU.

    ONNX Runtime's CPU provider has no float16 kernels for most ops on x86 and quietly runs them in
    float32, dropping the fp16 rounding between ops it inserted casts for (measured: the FP16 YOLO
    graph matched FP32 to 1.5e-5 px, i.e. only the weights were rounded). This rewrite makes every
    float16 op explicit: inputs cast up to float32, the op in float32 (as GPUs accumulate FP16 convs),
    outputs cast back to float16. ONNX Runtime keeps explicit casts, so each intermediate tensor is
    rounded to float16 exactly as on a GPU.

    Args:
        fp16_model: A graph from :func:`convert_to_fp16`.

    Returns:
        The emulation graph (same inputs and outputs).
    """
    model = onnx.ModelProto()
    model.CopyFrom(fp16_model)
    graph = model.graph
    types = _tensor_types(model)
    rewritten: list[onnx.NodeProto] = []
    widened: dict[str, str] = {}  # float16 tensor -> its float32 copy, made before its first consumer
    for node in graph.node:
        halves_in = [i for i, name in enumerate(node.input) if name and types.get(name) == _HALF]
        halves_out = [i for i, name in enumerate(node.output) if types.get(name) == _HALF]
        if node.op_type == "Cast" or not (halves_in or halves_out):
            rewritten.append(node)
            continue
        for i in halves_in:
            name = node.input[i]
            if name not in widened:
                widened[name] = f"{name}__emu_fp32"
                rewritten.append(
                    helper.make_node("Cast", [name], [widened[name]], name=f"{name}__emu_widen", to=_FLOAT)
                )
            node.input[i] = widened[name]
        rewritten.append(node)
        for i in halves_out:
            wide = f"{node.output[i]}__emu_raw"
            rewritten.append(
                helper.make_node("Cast", [wide], [node.output[i]], name=f"{node.name}__emu_out{i}", to=_HALF)
            )
            node.output[i] = wide
    del graph.node[:]
    graph.node.extend(rewritten)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


# --------------------------------------------------------------------------------------------- INT8


class _DropOnnxRuntimeChatter(logging.Filter):
    """ONNX Runtime's quantiser logs through the root logger (per-channel scale notes, a reminder to run
    its pre-processing, which is skipped on purpose: the graph is already simplified and shape-inferred,
    and ORT's optimiser would rename the nodes our layer choices refer to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Silence ONNX Runtime quantisation's root-logger messages and prints below ERROR."""
    chatter = _DropOnnxRuntimeChatter()
    root = logging.getLogger()
    root.addFilter(chatter)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(chatter)


QuantTarget = Literal["tensorrt", "onnxruntime"]
CalibrationMethodName = CalibrationMethod  # the one definition, under the name export uses


class CalibrationImages:
    """Calibration batches read exactly as the runtime reads them: ``read_image`` → letterbox → ``[1, 1, S, S]`` uint8.

    ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next() -> dict | None``), plus
    ``set_range`` so the calibrator can consume it in chunks. Images are read one at a time when
    asked for, so memory does not grow with the number of images.

    Args:
        paths: Image files (the prepared cache's PNGs).
        input_name: The graph's input name.
        size: Letterbox side.
        pad_value: Letterbox fill (0 for the classifier, 114 for the detector).

    Example:
        >>> reader = CalibrationImages(paths, "image", 384, 0)  # doctest: +SKIP
        >>> reader.get_next()["image"].shape  # doctest: +SKIP
        (1, 1, 384, 384)
    """

    def __init__(self, paths: Sequence[Path], input_name: str, size: int, pad_value: int) -> None:
        self.paths = tuple(paths)
        self.input_name = input_name
        self.size = size
        self.pad_value = pad_value
        self._next = 0
        self._end = len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only ``paths[start_index:end_index]`` from now on."""
        self._next, self._end = start_index, min(end_index, len(self.paths))

    def rewind(self) -> None:
        """Serve all images again from the first."""
        self.set_range(0, len(self.paths))

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next image as a feed dict, or None when the range is exhausted.

        Raises:
            ImageReadError: An image cannot be read.
        """
        if self._next >= self._end:
            return None
        path = self.paths[self._next]
        self._next += 1
        return {self.input_name: load_canvas(path, self.size, self.pad_value)[None, None]}


def load_canvas(path: Path, size: int, pad_value: int) -> np.ndarray:
    """One image as the runtime feeds it: ``read_image`` then letterbox, ``[S, S]`` uint8."""
    from spine_edge.imageio import read_image

    canvas, _ = letterbox(read_image(path).image, size, pad_value)
    return canvas


#: Class key of an image without any box (a normal radiograph) in :func:`image_classes`.
NORMAL = -1


def image_classes(prepared: Path, image: Path) -> frozenset[int]:
    """The lesion classes of a prepared PNG (its YOLO label file), or ``{NORMAL}`` for an image without boxes."""
    label = Path(prepared) / "labels" / image.parent.name / f"{image.stem}.txt"
    lines = label.read_text().splitlines() if label.is_file() else []
    classes = frozenset(int(line.split()[0]) for line in lines if line.strip())
    return classes or frozenset({NORMAL})


def _evenly(items: Sequence[Path], count: int) -> list[Path]:
    """``count`` items evenly spaced over a sorted sequence (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def select_calibration_images(prepared: Path, count: int) -> tuple[Path, ...]:
    """``count`` train PNGs of the prepared cache (all of them when there are fewer) in which every class appears.

    Calibrating on train keeps the val split, where accuracy is judged, unseen by calibration
    (val is used only when the cache has no train images). Rare classes are picked first: for each
    class, rarest first, images containing it are added (evenly spaced over its images) until it
    has its share ``max(1, count // (4 · classes))``, normal images counting as one class; the rest
    of ``count`` is filled evenly over the remaining images. Activation ranges are maxima, so the
    one image where a rare lesion lights up a channel is what MinMax must see; even spacing alone
    misses a class seen in a handful of images.

    Raises:
        DatasetError: The cache has no images.
    """
    files: list[Path] = []
    for split in ("train", "val"):
        folder = Path(prepared) / "images" / split
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if files:
            break
    if not files:
        raise DatasetError(
            f"{prepared}: no PNGs under images/train or images/val; pass --calib-data a folder written by "
            "`spine-edge data prepare`"
        )
    if len(files) <= count:
        return tuple(files)
    by_class: dict[int, list[Path]] = {}
    for path in files:
        for cls in image_classes(prepared, path):
            by_class.setdefault(cls, []).append(path)
    share = max(1, count // (4 * len(by_class)))
    chosen: dict[Path, None] = {}
    for _, members in sorted(by_class.items(), key=lambda item: (len(item[1]), item[0])):
        have = sum(1 for p in members if p in chosen)
        fresh = [p for p in members if p not in chosen]
        chosen.update(dict.fromkeys(_evenly(fresh, max(0, min(share - have, count - len(chosen))))))
    rest = [p for p in files if p not in chosen]
    chosen.update(dict.fromkeys(_evenly(rest, count - len(chosen))))
    return tuple(sorted(chosen))


def class_counts(prepared: Path, images: Sequence[Path]) -> dict[int, int]:
    """How many of the images contain each class (:data:`NORMAL` for images without boxes)."""
    counts: dict[int, int] = {}
    for path in images:
        for cls in image_classes(prepared, path):
            counts[cls] = counts.get(cls, 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class CalibrationResult:
    """Activation ranges of one FP32 graph and how they were obtained.

    Attributes:
        ranges: JSON cache of the ranges (ONNX Runtime's ``save_tensors_data`` format).
        method: ``minmax`` or ``percentile``.
        images: Number of calibration images.
        source: Folder the images came from.
        seconds: Wall time of the calibration.
        peak_rss_mb: Peak resident memory of this process during calibration.
        baseline_rss_mb: Resident memory when calibration started.
    """

    ranges: Path
    method: CalibrationMethodName
    images: int
    source: str
    seconds: float
    peak_rss_mb: float
    baseline_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the ranges file is a temporary, so it is left out)."""
        data = asdict(self)
        data.pop("ranges")
        return data


def _rss_mb(field_name: str) -> float:
    """VmRSS / VmHWM of this process in MiB from /proc (Linux), or ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0) so the peak is the calibration's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.debug("cannot reset the peak-RSS counter; reporting the process's lifetime peak")


def calibrate(
    fp32_path: Path,
    reader: CalibrationImages,
    ranges_path: Path,
    method: CalibrationMethodName = "minmax",
    chunk: int = 4,
    percentile: float = 99.999,
) -> CalibrationResult:
    """Collect activation ranges of every float tensor of a graph over the calibration images.

    MinMax reduces each tensor to its min and max inside the calibration graph, so memory stays
    at one image's activations. Percentile keeps full activations until histograms are updated, so
    the images go through in chunks of ``chunk`` (the 5.7 GB peak seen with 32 images at 384 px came
    from histogramming all of them at once).

    Args:
        fp32_path: The FP32 graph.
        reader: The calibration images.
        ranges_path: Where to write the ranges (JSON).
        method: ``minmax`` or ``percentile``.
        chunk: Images per histogram update (percentile only).
        percentile: Percentile kept by the percentile method.

    Returns:
        The ranges file and the calibration summary.
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    _reset_peak_rss()
    baseline = _rss_mb("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spine-edge-calib-") as tmp, quiet_onnxruntime():
        calibrator = create_calibrator(
            fp32_path,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile,
            extra_options={"symmetric": False, "percentile": percentile},
        )
        step = len(reader) if method == "minmax" else max(1, chunk)
        for first in range(0, len(reader), step):
            reader.set_range(first, first + step)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, ranges_path)
    return CalibrationResult(
        ranges=ranges_path,
        method=method,
        images=len(reader),
        source=str(Path(reader.paths[0]).parent.parent.resolve()) if reader.paths else "",
        seconds=round(time.perf_counter() - start, 3),
        # VmHWM is synced from per-thread counters lazily and can trail the RSS by a few pages.
        peak_rss_mb=round(max(_rss_mb("VmHWM"), _rss_mb("VmRSS"), baseline), 1),
        baseline_rss_mb=round(baseline, 1),
    )


@dataclass(frozen=True)
class QuantizeSettings:
    """ONNX Runtime quantiser settings of one INT8 target, as typed fields instead of ``extra_options``.

    Attributes:
        target: Who runs the graph.
        activation_type: ``int8`` (symmetric) or ``uint8`` (asymmetric, zero point computed).
        weight_type: Always ``int8``, per output channel.
        symmetric_activations: Force zero point 0 for activations.
        quantize_bias: Store biases as int32 DequantizeLinear (ONNX Runtime's QLinearConv wants them;
            TensorRT takes int8 Q/DQ only and adds the float bias in its fused kernels).
        reduce_range: 7-bit weights, so that U8S8 products cannot saturate the int16 accumulators of
            x86 CPUs without VNNI (AVX2, most AVX-512), the kind of box the ONNX Runtime variant serves.
        weighted_inputs_only: Q/DQ pairs only on the inputs of weighted layers (TensorRT's placement),
            instead of on every quantisable op and its output (ONNX Runtime's QLinear chains).
    """

    target: QuantTarget
    activation_type: Literal["int8", "uint8"]
    weight_type: Literal["int8"] = "int8"
    symmetric_activations: bool = False
    quantize_bias: bool = True
    reduce_range: bool = False
    weighted_inputs_only: bool = False


QUANTIZE_SETTINGS: dict[QuantTarget, QuantizeSettings] = {
    "tensorrt": QuantizeSettings(
        "tensorrt", "int8", symmetric_activations=True, quantize_bias=False, weighted_inputs_only=True
    ),
    # Measured on this AVX2 CPU (no VNNI), trained YOLO11n at 320 px: U8S8 with 8-bit weights lost
    # 4.4 mAP@0.5 points to saturation, with 7-bit weights 0.2.
    "onnxruntime": QuantizeSettings(
        "onnxruntime", "uint8", symmetric_activations=False, quantize_bias=True, reduce_range=True
    ),
}


def quantize_graph(
    fp32_path: Path,
    out: Path,
    calibration: CalibrationResult,
    target: QuantTarget,
    nodes_to_quantize: Iterable[str],
) -> Path:
    """Write the Q/DQ INT8 graph of ``fp32_path`` for a target from previously collected ranges.

    Args:
        fp32_path: The FP32 graph.
        out: File to write.
        calibration: Ranges from :func:`calibrate` on the same graph.
        target: ``tensorrt`` (symmetric int8) or ``onnxruntime`` (U8S8).
        nodes_to_quantize: The nodes to quantise (the convolutional body). Layers to keep in float
            are put back with :func:`keep_float` afterwards, not excluded here (see there why).

    Returns:
        ``out``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    settings = QUANTIZE_SETTINGS[target]
    allowed = list(nodes_to_quantize)
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    weighted = sorted(_WEIGHTED_OPS)
    op_types = weighted if settings.weighted_inputs_only else None
    with tempfile.TemporaryDirectory(prefix="spine-edge-quant-") as tmp:
        staged = Path(tmp) / "int8.onnx"
        # An empty nodes_to_quantize means "everything" to ONNX Runtime, so a graph without a body
        # is written as the FP32 graph itself: nothing is quantised.
        if not allowed:
            model = onnx.load(str(fp32_path))
        else:
            with quiet_onnxruntime():
                quantize_static(
                    str(fp32_path),
                    str(staged),
                    calibration_data_reader=None,
                    calibration_cache_path=str(calibration.ranges),
                    calibrate_method=_calibration_method(calibration.method),
                    quant_format=QuantFormat.QDQ,
                    activation_type=types[settings.activation_type],
                    weight_type=types[settings.weight_type],
                    per_channel=True,
                    reduce_range=settings.reduce_range,
                    nodes_to_quantize=allowed,
                    op_types_to_quantize=op_types,
                    extra_options={
                        "OpTypesToExcludeOutputQuantization": weighted if settings.weighted_inputs_only else [],
                        "ActivationSymmetric": settings.symmetric_activations,
                        "WeightSymmetric": True,
                        "QuantizeBias": settings.quantize_bias,
                        # Without it the quantiser deletes a Relu whose work its QuantizeLinear's range
                        # already does; keep_float then could not unquantise that conv's output without
                        # losing the Relu. ONNX Runtime's optimiser still fuses the kept Relu away.
                        "QDQKeepRemovableActivations": True,
                    },
                )
            model = onnx.load(str(staged))
            if settings.weighted_inputs_only:
                model = _float_for_unweighted_readers(model)
    return write_onnx(model, out)


def _float_for_unweighted_readers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let every non-weighted op read the float tensor instead of the DequantizeLinear a conv reads.

    ONNX Runtime's quantiser, when it quantises a conv's input, points every reader of that tensor at
    the DequantizeLinear output, so a residual Add or a pooling beside the conv would compute on
    the int8 grid too. In TensorRT's placement only weighted layers read quantised tensors; the
    rest stays float (FP16 in the built engine), one rounding less per block.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in _WEIGHTED_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        node.input[:] = [_float_behind(producer, name) for name in node.input]
    return model


def _float_behind(producer: dict[str, onnx.NodeProto], name: str) -> str:
    """The float tensor behind ``DequantizeLinear(QuantizeLinear(x))``, else ``name`` itself."""
    dequant = producer.get(name)
    if dequant is None or dequant.op_type != "DequantizeLinear":
        return name
    quant = producer.get(dequant.input[0])
    return quant.input[0] if quant is not None and quant.op_type == "QuantizeLinear" else name


def _calibration_method(name: CalibrationMethodName) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return CalibrationMethod.MinMax if name == "minmax" else CalibrationMethod.Percentile


def activation_types(path: Path) -> dict[str, int]:
    """Counts of the element types of QuantizeLinear outputs in a graph (``{"int8": n, "uint8": m}``)."""
    model = onnx.load(str(path))
    consts = {t.name: t for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in consts:
            dtype = helper.tensor_dtype_to_np_dtype(consts[node.input[2]].data_type).name
            counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def keep_float(qdq: onnx.ModelProto, fp32: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of a Q/DQ graph where the named weighted nodes compute in float: float input, FP32 weights.

    ``quantize_static(nodes_to_exclude=...)`` is not enough for that: it leaves the excluded node
    between a DequantizeLinear and a QuantizeLinear, and ONNX Runtime (1.2x+) then quantises the
    float weight itself and fuses the node into a QLinearConv anyway (measured here: an excluded U8S8
    conv ran as ``com.microsoft.QLinearConv``). So the node reads the float tensor its input's
    QuantizeLinear reads (where its input is one), and the FP32 graph's weight and bias; the
    non-weighted ops after it (activation, Add, Concat) read its float output instead of the
    QuantizeLinear/DequantizeLinear pair after it. With a float input or a float consumer, ONNX
    Runtime's Conv selector (all inputs DequantizeLinear, every output consumer a QuantizeLinear)
    cannot fuse it. Weighted layers after it keep reading the quantised tensor, so they stay INT8,
    and so does the layer before it, because :func:`quantize_graph` keeps activations
    (``QDQKeepRemovableActivations``): that layer's own output still ends in a QuantizeLinear.
    In the TensorRT graph (Q/DQ on weighted-layer inputs only) there is nothing to bypass: the
    node reads the float tensor, and with every weighted layer kept, no Q/DQ is left at all.
    Which layers really run in float is then counted from the optimised graph
    (:mod:`spine_edge.export.coverage`). Q/DQ nodes and initialisers left unused are removed.

    Args:
        qdq: A graph from :func:`quantize_graph` (every quantisable body node quantised).
        fp32: The FP32 graph it was quantised from (same node and tensor names).
        names: Weighted nodes (Conv, Gemm, MatMul) to run in float.

    Returns:
        The edited graph (unchecked; :func:`write_onnx` checks it when written).

    Raises:
        KeyError: A name that is not a node of both graphs.
    """
    wanted = set(names)
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    if not wanted:
        return model
    graph = model.graph
    originals = {n.name: n for n in fp32.graph.node if n.name in wanted}
    absent = (wanted - set(originals)) | (wanted - {n.name for n in graph.node})
    if absent:
        raise KeyError(f"not nodes of both graphs: {sorted(absent)}")
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    present = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bypass: dict[tuple[str, str], str] = {}  # (consumer, DequantizeLinear output) -> float tensor to read instead
    for node in graph.node:
        if node.name not in wanted:
            continue
        for out in node.output:
            for quant in (c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"):
                for dequant in (c for c in consumers.get(quant.output[0], []) if c.op_type == "DequantizeLinear"):
                    for reader in consumers.get(dequant.output[0], []):
                        # A weighted reader keeps its quantised input, or it would lose its own INT8 kernel.
                        if reader.op_type not in _WEIGHTED_OPS:
                            bypass[(reader.name, dequant.output[0])] = out
        inputs = list(node.input)
        for i, name in enumerate(originals[node.name].input):
            if name not in fp32_inits:
                inputs[i] = _float_behind(producer, inputs[i])
                continue
            # The quantiser may reuse an FP32 initialiser's name for its DequantizeLinear output (biases).
            local = f"{name}__fp32" if name in producer else name
            if local not in present:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(fp32_inits[name])
                tensor.name = local
                graph.initializer.append(tensor)
                present.add(local)
            inputs[i] = local
        node.input[:] = inputs
    for node in graph.node:
        node.input[:] = [bypass.get((node.name, name), name) for name in node.input]
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return model


# ------------------------------------------------------------------ INT8 with an FP16 body (TensorRT)

#: The first opset whose QuantizeLinear/DequantizeLinear take float16 scales (and so compute in FP16).
QDQ_FP16_OPSET = 19
#: The smallest normal float16: a scale below it would lose its precision (or flush to 0) in float16.
_FP16_TINY = float(np.finfo(np.float16).tiny)


def _fp16_scale(scale: np.ndarray) -> np.ndarray:
    """Float16-representable scales (as float32), between the smallest normal float16 and its largest value.

    A scale above 65504 (a range beyond 8.3 million: random weights, never a trained network seen
    here) is clipped, not turned into infinity; its tensor cannot be FP16 anyway, and
    :func:`int8_fp16_body` warns about it.
    """
    return np.clip(scale.astype(np.float32), _FP16_TINY, _FP16_MAX).astype(np.float16).astype(np.float32)


def int8_fp16_body(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT INT8 graph with an FP16 body: the same Q/DQ layers, everything between them in FP16.

    TensorRT builds explicitly quantised graphs strongly typed: every tensor keeps its ONNX type, so
    a Q/DQ graph quantised from the FP32 graph runs all its unquantised ops (residual adds,
    activations, layers the search kept in float, the DequantizeLinear outputs convolutions read)
    in FP32 on the GPU. This rewrite is what NVIDIA ModelOpt's ONNX quantiser does with an FP16
    high-precision type, without its dependencies: the graph moves to opset
    :data:`QDQ_FP16_OPSET` (Q/DQ take float16 scales from there on), and the convolutional body of
    :func:`fp16_body`, extended by the Q/DQ nodes that only feed it (weights, the first
    convolution's input), computes in float16; preprocessing and the tail stay FP32, the
    interface is unchanged.

    Scales are rounded to float16 (and raised to the smallest normal float16, 6.1e-5, where one
    was below it); weights are re-quantised with their rounded scale, so the stored int8 weight
    times its float16 scale stays the nearest grid point to the FP32 graph's weight (for normal
    scales the int8 values do not move: the rounding changes a scale by at most 2^-11 relative).

    Args:
        qdq: A symmetric Q/DQ graph (``tensorrt`` target) with an FP32 body.

    Returns:
        The mixed-precision graph (checked when written).
    """
    from onnx import version_converter

    opset = next(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx"))
    model = onnx.ModelProto()
    model.CopyFrom(version_converter.convert_version(qdq, QDQ_FP16_OPSET) if opset < QDQ_FP16_OPSET else qdq)
    graph = model.graph
    body = fp16_body(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def feeds_body_only(node: onnx.NodeProto) -> bool:
        readers = [r for out in node.output for r in consumers.get(out, [])]
        return bool(readers) and all(r.name in body for r in readers)

    for op_type in ("DequantizeLinear", "QuantizeLinear"):  # DQs first: a Q joins when its DQs did
        body |= {n.name for n in graph.node if n.op_type == op_type and feeds_body_only(n)}

    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.name not in body or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale_name = node.input[1]
        if scale_name not in initializers:
            continue
        scale = numpy_helper.to_array(initializers[scale_name])
        if node.op_type == "QuantizeLinear" and float(np.max(scale)) * 127 > _FP16_MAX:
            log.warning(
                "%s: activation range %.3g exceeds float16 (65504): in the FP16 body this tensor overflows",
                node.input[0],
                float(np.max(scale)) * 127,
            )
        rounded = _fp16_scale(scale)
        source = initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and source is not None and source.data_type == TensorProto.INT8:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            q = numpy_helper.to_array(source).astype(np.float32)
            shape = [1] * q.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            weight = q * scale.reshape(shape)
            requantised = np.clip(np.rint(weight / rounded.reshape(shape)), -127, 127).astype(np.int8)
            source.CopyFrom(numpy_helper.from_array(requantised, source.name))
        initializers[scale_name].CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), scale_name))
    return convert_to_fp16(model, body)


def fp16_share(model: onnx.ModelProto) -> float:
    """The share of a graph's convolutions (and matmuls) that compute in float16 (read FP16 inputs)."""
    types = _tensor_types(model)
    weighted = [n for n in model.graph.node if n.op_type in _WEIGHTED_OPS]
    if not weighted:
        return 0.0
    return sum(types.get(n.input[0]) == _HALF for n in weighted) / len(weighted)
