"""How much of an INT8 graph really runs in INT8 kernels: counted after ONNX Runtime's own graph optimisation.

Where Q/DQ nodes sit says little: a convolution whose Q/DQ pairs ONNX Runtime cannot fuse (a batch
norm or a layout transpose between them, an excluded node, an unsupported pattern) runs as a float
``Conv`` between a DequantizeLinear and a QuantizeLinear, slower than FP32. So the graph is loaded the
way the runtime loads it (``ORT_ENABLE_ALL``, CPU provider), the optimised graph is saved with
``SessionOptions.optimized_model_filepath``, and its weighted nodes are sorted into INT8 kernels
(QLinearConv, ConvInteger, MatMulInteger, QLinearMatMul, QGemm, ...) and float ones (Conv, FusedConv,
MatMul, Gemm, ...). Each is weighted by the multiply-accumulates of the FP32 node it came from
(ONNX Runtime keeps the node name, adding ``_token_<n>`` when it rewrites a node's layout), so the
share is of the model's arithmetic, not of its node count.

Example:
    >>> coverage = count_int8_coverage(Path("bundle/classifier.int8.ort.onnx"), Path("bundle/classifier.fp32.onnx"))  # doctest: +SKIP
    >>> f"{coverage.int8_share:.0%}", coverage.float_layers[:2]  # doctest: +SKIP
    ('97%', ('/members.0/stem/conv/Conv', '/members.0/head/Gemm'))
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

#: Weighted ops that run integer arithmetic on ONNX Runtime's CPU provider (any domain).
INT8_OPS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "MatMulInteger",
        "QLinearMatMul",
        "QGemm",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "NhwcQLinearConv",
    }
)
#: Weighted ops that run float arithmetic.
FLOAT_OPS = frozenset(
    {"Conv", "ConvTranspose", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}
)
#: The FP32 ops whose arithmetic the share is counted over.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: What ONNX Runtime appends to a node name it rewrites (layout transforms at ``ORT_ENABLE_ALL``).
_TOKEN_SUFFIX = re.compile(r"(_token_\d+)+$")
#: What ONNX Runtime's quantiser appends to a quantised weight's name.
_QUANTIZED = re.compile(r"_quantized$")
#: The coverage goal of the issue: at least this share of the convolution/matmul arithmetic in INT8.
COVERAGE_GOAL = 0.90


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Static dims of a tensor; symbolic ones (the batch) count as 1, so FLOPs are per sample."""
    return [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]


def layer_flops(fp32: onnx.ModelProto) -> dict[str, float]:
    """Multiply-accumulates ×2 of every Conv / ConvTranspose / MatMul / Gemm of an FP32 graph, per sample, by node name.

    Batch-like symbolic dimensions count as 1, so a graph that stacks its TTA views along the batch
    reports the FLOPs of one view: every weighted node scales alike, and the share is unchanged.
    """
    inferred = onnx.shape_inference.infer_shapes(fp32)
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in (*graph.input, *graph.output, *graph.value_info)}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    flops: dict[str, float] = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = shapes.get(node.input[1])
            reduce = float(np.prod(weight[1:])) if weight else 0.0
            if node.op_type == "ConvTranspose" and weight:
                reduce = float(weight[0] * np.prod(weight[2:]))
        else:
            first = shapes.get(node.input[0])
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            reduce = float(first[-2] if trans_a and first and len(first) > 1 else (first[-1] if first else 0))
        flops[node.name] = 2.0 * float(np.prod(out[1:] if len(out) > 1 else out)) * reduce
    return flops


def optimized_graph(path: Path, out: Path) -> Path:
    """Load a graph as the runtime does on the CPU (``ORT_ENABLE_ALL``) and save what ONNX Runtime made of it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out)
    # Layout transforms make the saved graph specific to this CPU; it is only read here, never shipped.
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return out


@dataclass(frozen=True)
class LayerKernel:
    """One weighted FP32 node and the kernel ONNX Runtime runs it with.

    Attributes:
        name: FP32 node name.
        op_type: The optimised graph's integer op (``QLinearConv``, ...), or ``float``.
        flops: Its FLOPs per sample in the FP32 graph.
        int8: Whether that op is an integer kernel.
    """

    name: str
    op_type: str
    flops: float
    int8: bool


@dataclass(frozen=True)
class Int8Coverage:
    """The share of a graph's convolution/matmul arithmetic that runs in INT8 kernels after optimisation.

    Attributes:
        layers: Every weighted node of the FP32 graph, in graph order, with the kernel that runs it.
        float_ops: Float weighted ops present in the optimised graph (``Conv``, ``FusedConv``, ...).
        counted_from: How the graph was optimised.
        float_islands: Op types, and how many, that still read a dequantised activation after
            optimisation: float work between Q/DQ pairs that FLOPs do not show (DenseNet's
            pre-activation batch norms run here in float between a DequantizeLinear and a
            QuantizeLinear, with layout transposes around them).
        activation_qdq: QuantizeLinear / DequantizeLinear nodes on activations left after
            optimisation (each a float↔int8 pass over a tensor at run time).
        rule: Whose fusion decided: ``onnxruntime`` (its optimised graph) or ``tensorrt`` (its Q/DQ rule).
    """

    layers: tuple[LayerKernel, ...]
    float_ops: tuple[str, ...]
    counted_from: str
    float_islands: dict[str, int] = field(default_factory=dict)
    activation_qdq: int = 0
    rule: Literal["onnxruntime", "tensorrt"] = "onnxruntime"

    @property
    def int8_flops(self) -> float:
        """FLOPs per sample in INT8 kernels."""
        return sum(layer.flops for layer in self.layers if layer.int8)

    @property
    def float_flops(self) -> float:
        """FLOPs per sample in float kernels."""
        return sum(layer.flops for layer in self.layers if not layer.int8)

    @property
    def int8_share(self) -> float:
        """INT8 share of the weighted arithmetic (0 for a graph without any)."""
        total = self.int8_flops + self.float_flops
        return self.int8_flops / total if total else 0.0

    @property
    def float_layers(self) -> tuple[str, ...]:
        """Nodes that run in float, largest first."""
        return tuple(layer.name for layer in sorted(self.layers, key=lambda x: -x.flops) if not layer.int8)

    def to_dict(self) -> dict[str, Any]:
        """The record the accuracy report and the manifest carry."""
        return {
            "int8_flop_share": round(self.int8_share, 4),
            "goal": COVERAGE_GOAL,
            "meets_goal": self.int8_share >= COVERAGE_GOAL,
            "int8_mflops": round(self.int8_flops / 1e6, 3),
            "float_mflops": round(self.float_flops / 1e6, 3),
            "int8_layers": sum(1 for layer in self.layers if layer.int8),
            "float_layers": list(self.float_layers),
            "float_ops": list(self.float_ops),
            "float_islands": dict(self.float_islands),
            "activation_qdq": self.activation_qdq,
            "counted_from": self.counted_from,
            "rule": self.rule,
        }

    def describe(self) -> str:
        """``93.1 % of conv/matmul FLOPs in INT8 (2 layers float: a, b)``, and by whose rule for TensorRT."""
        floats = self.float_layers
        tail = f": {', '.join(floats[:5])}{', ...' if len(floats) > 5 else ''}" if floats else ""
        text = f"{self.int8_share:.1%} of conv/matmul FLOPs in INT8 ({len(floats)} layer(s) float{tail})"
        return f"{text} by TensorRT's Q/DQ fusion rule" if self.rule == "tensorrt" else text


def _weight_owners(fp32: onnx.ModelProto) -> dict[str, str]:
    """FP32 initializer name → the weighted node that reads it (weights and biases)."""
    initializers = {t.name for t in fp32.graph.initializer}
    return {
        name: node.name
        for node in fp32.graph.node
        if node.op_type in WEIGHTED_OPS
        for name in node.input[1:]
        if name in initializers
    }


def count_int8_coverage(int8_path: Path, fp32_path: Path) -> Int8Coverage:
    """Count which of the FP32 graph's convolutions and matmuls run in INT8 once ONNX Runtime has optimised the INT8 graph.

    An integer kernel is traced back to its FP32 node by name (ONNX Runtime keeps it, adding
    ``_token_<n>`` on layout rewrites) or by its quantised weight (``<weight>_quantized``); every FP32
    weighted node not traced to an integer kernel runs in float (ONNX Runtime renames float
    convolutions it moves to its blocked NCHWc layout, so those are recognised by elimination).

    Args:
        int8_path: The Q/DQ graph.
        fp32_path: The FP32 graph it was quantised from (FLOPs per node).

    Returns:
        The per-layer kernels and the INT8 share.
    """
    import onnxruntime as ort

    fp32 = onnx.load(str(fp32_path))
    flops = layer_flops(fp32)
    owners = _weight_owners(fp32)
    with tempfile.TemporaryDirectory(prefix="spine-edge-coverage-") as tmp:
        optimised = onnx.load(str(optimized_graph(int8_path, Path(tmp) / "optimized.onnx")))
    int8_kernels: dict[str, str] = {}
    float_ops: set[str] = set()
    constants = {t.name for t in optimised.graph.initializer}
    dequantised = {
        node.output[0]
        for node in optimised.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] not in constants
    }
    islands: dict[str, int] = {}
    activation_qdq = 0
    for node in optimised.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            activation_qdq += node.input[0] not in constants
        elif any(name in dequantised for name in node.input):
            islands[node.op_type] = islands.get(node.op_type, 0) + 1
    for node in optimised.graph.node:
        if node.op_type in FLOAT_OPS:
            float_ops.add(node.op_type)
        if node.op_type not in INT8_OPS:
            continue
        name = _TOKEN_SUFFIX.sub("", node.name)
        if name not in flops:
            name = next((owners[w] for w in (_QUANTIZED.sub("", i) for i in node.input) if w in owners), name)
        if name in flops:
            int8_kernels[name] = node.op_type
    return Int8Coverage(
        layers=tuple(
            LayerKernel(name, int8_kernels.get(name, "float"), value, name in int8_kernels)
            for name, value in flops.items()
        ),
        float_ops=tuple(sorted(float_ops)),
        float_islands=dict(sorted(islands.items(), key=lambda item: -item[1])),
        activation_qdq=activation_qdq,
        counted_from=f"onnxruntime {ort.__version__} CPUExecutionProvider, ORT_ENABLE_ALL, optimized_model_filepath",
    )


def count_tensorrt_int8_coverage(int8_path: Path, fp32_path: Path) -> Int8Coverage:
    """Count the INT8 share of a TensorRT-target Q/DQ graph by TensorRT's explicit-quantisation rule.

    ONNX Runtime's CPU optimiser is the wrong judge of this graph: its integer convolutions want
    int32 biases, the TensorRT graph has float ones, so ONNX Runtime fuses almost none of it (the
    demo detector: 1.9 %). TensorRT fuses a convolution or matmul whose data input comes from a
    DequantizeLinear of an activation and whose weight from a DequantizeLinear of int8 constants into
    an INT8 kernel (adding the float bias and the pointwise ops after it in that kernel); a layer that
    reads a float input or float weights (what :func:`spine_edge.export.precision.keep_float` makes)
    runs in the graph's float type. That rule is applied to the graph itself; a built engine's layer
    information (``trtexec --exportLayerInfo``) is what confirms it on a GPU.

    Args:
        int8_path: The TensorRT-target Q/DQ graph (FP16 or FP32 body).
        fp32_path: The FP32 graph it was quantised from (FLOPs per node, by name).
    """
    model = onnx.load(str(int8_path))
    flops = layer_flops(onnx.load(str(fp32_path)))
    constants = {t.name for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def dequantised(name: str, constant: bool) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and (node.input[0] in constants) == constant

    int8 = {
        node.name
        for node in model.graph.node
        if node.op_type in WEIGHTED_OPS
        and len(node.input) > 1
        and dequantised(node.input[0], constant=False)
        and dequantised(node.input[1], constant=True)
    }
    return Int8Coverage(
        layers=tuple(
            LayerKernel(name, "int8 (TensorRT Q/DQ fusion)" if name in int8 else "float", value, name in int8)
            for name, value in flops.items()
        ),
        float_ops=(),
        rule="tensorrt",
        counted_from="TensorRT explicit-quantisation rule on the graph (input and weights from DequantizeLinear); "
        "a lower-precision engine's layer information confirms it on a GPU",
    )
