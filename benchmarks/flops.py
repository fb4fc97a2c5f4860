"""FLOP count of an ONNX graph: the multiply-accumulates of its Conv, Gemm and MatMul nodes.

Every one of these ops computes each output element as a dot product of length ``K``, so
``MACs = numel(output) × K`` with ``K = (C_in / groups) × prod(kernel)`` for Conv and the reduced
dimension for Gemm/MatMul; ``FLOPs = 2 × MACs``. Everything else (activations, pooling, the TTA
warps, normalisation) is left out on purpose: it is a small share of a CNN's arithmetic and has no
agreed FLOP cost, and counting only the dense ops is what ``GFLOP/s`` figures usually mean.

Shapes come from ONNX shape inference with the dynamic batch fixed to 1, so the count is per image.
Q/DQ graphs count like their FP32 source (the weights enter Conv through DequantizeLinear), which is
why the benchmark counts the FP32 graph once and divides it by each precision's time.

``onnx`` is imported lazily: the runtime box may not have it, and then GFLOP/s is simply not reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spine_edge.errors import BundleError
from spine_edge.support import import_optional

#: Ops whose multiply-accumulates are counted.
COUNTED_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class GraphFlops:
    """Arithmetic of one graph for one image.

    Attributes:
        macs: Multiply-accumulates of the counted ops.
        by_op: MACs per op type.
        nodes: Number of counted nodes.
        uncounted: Names of counted-op nodes whose shapes shape inference could not resolve.
    """

    macs: int
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    uncounted: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        """``2 × macs`` (one multiply and one add per MAC)."""
        return 2 * self.macs

    @property
    def gflops(self) -> float:
        """FLOPs in units of 1e9."""
        return self.flops / 1e9

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "macs": self.macs,
            "flops": self.flops,
            "gflops": self.gflops,
            "by_op": dict(self.by_op),
            "nodes": self.nodes,
            "uncounted": list(self.uncounted),
        }


def _fix_dynamic_dims(model: Any, batch: int) -> None:
    """Give every symbolic input dimension the value ``batch`` and drop recorded intermediate shapes (in place).

    Exporters record ``value_info`` and output shapes with the symbolic batch (``"batch"``), and
    shape inference keeps a shape it is given rather than the one it infers, so those are cleared
    and inferred again from the now static inputs.
    """
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = batch
    del model.graph.value_info[:]
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")


def _shapes(model: Any) -> dict[str, tuple[int, ...] | None]:
    """Static shape of every tensor shape inference resolved (None where a dimension stays unknown)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    graph = model.graph
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape"):
            shapes.setdefault(value.name, None)
            continue
        static = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
        shapes.setdefault(value.name, None if -1 in static else static)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def _reduced_length(node: Any, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    """``K``: the length of the dot product behind each output element, or None if unknown."""
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        return None if weight is None else math.prod(weight[1:])
    first = shapes.get(node.input[0])
    if first is None or not first:
        return None
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return first[0] if trans_a else first[-1]
    return first[-1]  # MatMul: numpy semantics, the last axis of A is reduced


def count_flops(model: str | Path | Any, batch: int = 1) -> GraphFlops:
    """Count the multiply-accumulates of a graph's Conv, Gemm and MatMul nodes.

    Args:
        model: An ``.onnx`` path or a loaded ``onnx.ModelProto`` (not modified).
        batch: Value given to dynamic input dimensions (1: a count per image).

    Returns:
        The count; nodes whose shapes stay unknown are listed in ``uncounted``.

    Raises:
        BundleError: The file cannot be read as ONNX.
        MissingDependencyError: ``onnx`` is not installed.

    Example:
        >>> count_flops("runs/bundle/detector.fp32.onnx").gflops  # doctest: +SKIP
        1.65
    """
    onnx = import_optional("onnx", "train", "Counting a graph's FLOPs")
    if isinstance(model, (str, Path)):
        try:
            proto = onnx.load(str(model))
        except Exception as exc:  # protobuf DecodeError, OSError: both mean "not a readable graph"
            raise BundleError(f"{model}: cannot be read as an ONNX graph ({exc}); re-export the bundle") from exc
    else:
        proto = onnx.ModelProto.FromString(model.SerializeToString())
    _fix_dynamic_dims(proto, batch)
    # data_prop folds Shape → Gather → Concat chains, so Reshape/Flatten outputs get static shapes too.
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = _shapes(inferred)
    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    nodes = 0
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        output = shapes.get(node.output[0])
        k = _reduced_length(node, shapes)
        if output is None or k is None:
            uncounted.append(node.name or node.output[0])
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + math.prod(output) * k
        nodes += 1
    return GraphFlops(macs=sum(by_op.values()), by_op=by_op, nodes=nodes, uncounted=tuple(uncounted))
