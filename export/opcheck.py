"""Static check that an ONNX graph only uses what TensorRT's ONNX parser imports.

Run at export time (it needs the ``onnx`` package, not TensorRT or a GPU) so that a graph the
target box cannot build is caught on the workstation, with the offending nodes named. The list of
supported operators and their restrictions lives in ``trt_supported_ops.txt`` beside this module,
with its source and TensorRT version in its header.

Two kinds of problem are reported:

* unsupported: operators absent from the list, operators of a non-default domain (ONNX Runtime
  contrib ops such as ``com.microsoft`` need TensorRT plugins), an opset outside the parser's range,
  and Resize attributes the parser rejects;
* Q/DQ issues (:func:`check_symmetric_qdq`): TensorRT's explicit quantisation is symmetric int8, so
  every QuantizeLinear/DequantizeLinear zero point must be a constant int8 zero.

Operators that are supported with a restriction are listed as caveats, for a human to confirm.

:func:`qdq_body` says in which float type a Q/DQ graph computes what is not quantised: TensorRT
builds Q/DQ graphs strongly typed, so an INT8 graph with an FP32 body runs every unquantised op in
FP32 and is rarely faster than the FP16 plan; the TensorRT INT8 graph should have an FP16 body.

Example:
    >>> report = check_trt_ops("runs/bundle/classifier.int8.trt.onnx")  # doctest: +SKIP
    >>> report.ok, [f.op for f in report.unsupported]  # doctest: +SKIP
    (True, [])

From a shell: ``python -m spine_edge.export.opcheck MODEL.onnx [MODEL.onnx ...]`` (exit status 1 if any fails).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spine_edge.errors import BundleError

#: The supported-operator list shipped with this module.
SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.txt")

_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_RESIZE_MODES = ("nearest", "linear")
_RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")


@dataclass(frozen=True)
class TrtOpList:
    """The operators TensorRT's ONNX parser imports.

    Attributes:
        ops: Operator name → restriction text (empty when the table gives none).
        opset_min: Lowest default-domain opset the parser accepts.
        opset_max: Highest default-domain opset the parser accepts.
        source: The list file it was read from.
    """

    ops: dict[str, str]
    opset_min: int
    opset_max: int
    source: Path


@dataclass(frozen=True)
class OpFinding:
    """One operator type that is unsupported or carries a caveat, with the nodes that use it."""

    op: str
    domain: str
    nodes: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class QdqIssue:
    """A QuantizeLinear/DequantizeLinear node that TensorRT's symmetric int8 cannot import."""

    node: str
    op: str
    message: str


@dataclass(frozen=True)
class OpCheckReport:
    """Result of :func:`check_trt_ops`.

    Attributes:
        path: The checked ONNX file.
        opset: Its default-domain opset.
        unsupported: Operators (or settings) the parser rejects; the graph will not build.
        caveats: Supported operators that carry a restriction worth confirming.
        qdq: Quantisation nodes that are not symmetric int8.
    """

    path: Path
    opset: int
    unsupported: tuple[OpFinding, ...]
    caveats: tuple[OpFinding, ...]
    qdq: tuple[QdqIssue, ...]

    @property
    def ok(self) -> bool:
        """True when nothing would stop TensorRT from importing the graph."""
        return not self.unsupported and not self.qdq

    def summary(self, max_nodes: int = 5) -> str:
        """A readable multi-line account, naming at most ``max_nodes`` nodes per finding."""
        verdict = "ok for TensorRT" if self.ok else "NOT importable by TensorRT"
        lines = [f"{self.path}: opset {self.opset}, {verdict}"]
        for title, findings in (("unsupported", self.unsupported), ("caveat", self.caveats)):
            for f in findings:
                op = f.op if f.domain in _DEFAULT_DOMAINS else f"{f.domain}::{f.op}"
                lines.append(f"  {title}: {op} in {_names(f.nodes, max_nodes)}: {f.message}")
        for issue in self.qdq[:max_nodes]:
            lines.append(f"  Q/DQ: {issue.op} '{issue.node}': {issue.message}")
        if len(self.qdq) > max_nodes:
            lines.append(f"  … and {len(self.qdq) - max_nodes} more Q/DQ nodes like these")
        return "\n".join(lines)


def _names(nodes: tuple[str, ...], limit: int) -> str:
    shown = ", ".join(f"'{n}'" for n in nodes[:limit])
    return shown + (f" (+{len(nodes) - limit} more)" if len(nodes) > limit else "")


@functools.lru_cache(maxsize=4)
def load_trt_op_list(path: Path = SUPPORTED_OPS_FILE) -> TrtOpList:
    """Parse a supported-operator list (``OP [| restriction]`` lines, ``opset MIN MAX``, ``#`` comments)."""
    ops: dict[str, str] = {}
    opset_min, opset_max = 1, 10**6
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("opset "):
            _, lo, hi = line.split()
            opset_min, opset_max = int(lo), int(hi)
            continue
        name, _, caveat = line.partition("|")
        ops[name.strip()] = caveat.strip()
    return TrtOpList(ops=ops, opset_min=opset_min, opset_max=opset_max, source=Path(path))


def _load(onnx_path: str | Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise BundleError(f"{path}: no such ONNX file; check the path or re-export the bundle")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError or ValueError depending on the damage
        raise BundleError(f"{path}: not a readable ONNX model ({exc}); re-export it with `spine-edge export`") from exc


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node with a readable name, including nodes of If/Loop/Scan bodies."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"#{index}:{node.op_type}")
        yield name, node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g, f"{name}/{attr.name}/")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(attr.graphs):
                    yield from _walk(sub, f"{name}/{attr.name}[{k}]/")


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initialisers and Constant-node values of the graph and its subgraphs, by tensor name."""
    found: dict[str, onnx.TensorProto] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            found[init.name] = init
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    found[node.output[0]] = attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        collect(sub)

    collect(model.graph)
    return found


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 0


def _resize_problem(node: onnx.NodeProto) -> str:
    """Why the parser would reject this Resize, or an empty string."""
    mode = _attr(node, "mode", "nearest")
    coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
    problems = []
    if mode not in _RESIZE_MODES:
        problems.append(f"mode={mode} (supported: {', '.join(_RESIZE_MODES)})")
    if coord not in _RESIZE_COORDINATE_MODES:
        problems.append(f"coordinate_transformation_mode={coord}")
    if _attr(node, "antialias", 0):
        problems.append("antialias=1")
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"keep_aspect_ratio_policy={_attr(node, 'keep_aspect_ratio_policy', '')}")
    return "; ".join(problems)


def _group(items: list[tuple[str, str, str, str]]) -> tuple[OpFinding, ...]:
    """(op, domain, node, message) rows → one finding per (op, domain, message), nodes in graph order."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for op, domain, node, message in items:
        grouped.setdefault((op, domain, message), []).append(node)
    return tuple(OpFinding(op, domain, tuple(nodes), message) for (op, domain, message), nodes in grouped.items())


def check_trt_ops(onnx_path: str | Path, op_list: TrtOpList | None = None) -> OpCheckReport:
    """Check every node of an ONNX graph against TensorRT's supported-operator list.

    Args:
        onnx_path: The graph to check (external weights are read from beside it).
        op_list: The list to check against; defaults to ``trt_supported_ops.txt``.

    Returns:
        The report; ``report.ok`` is False if the parser would refuse the graph.

    Raises:
        BundleError: The file is missing or is not an ONNX model.
    """
    ops = op_list or load_trt_op_list()
    model = _load(onnx_path)
    opset = _default_opset(model)
    unsupported: list[tuple[str, str, str, str]] = []
    caveats: list[tuple[str, str, str, str]] = []
    if not ops.opset_min <= opset <= ops.opset_max:
        unsupported.append(
            (
                "opset",
                "",
                "(model)",
                f"default-domain opset {opset} is outside {ops.opset_min}–{ops.opset_max}; "
                f"re-export with an opset in that range (the design uses 17)",
            )
        )
    for name, node in _walk(model.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            unsupported.append(
                (
                    node.op_type,
                    node.domain,
                    name,
                    "operator of a non-standard domain: TensorRT needs a plugin for it; "
                    "export without ONNX Runtime contrib/fused ops (no ORT-optimised graph as TensorRT input)",
                )
            )
        elif node.op_type not in ops.ops:
            unsupported.append((node.op_type, node.domain, name, "not supported by TensorRT's ONNX parser"))
        elif node.op_type == "Resize" and (problem := _resize_problem(node)):
            unsupported.append((node.op_type, node.domain, name, f"unsupported Resize setting: {problem}"))
        elif ops.ops[node.op_type]:
            caveats.append((node.op_type, node.domain, name, ops.ops[node.op_type]))
    return OpCheckReport(
        path=Path(onnx_path),
        opset=opset,
        unsupported=_group(unsupported),
        caveats=_group(caveats),
        qdq=_qdq_issues(model),
    )


def check_symmetric_qdq(onnx_path: str | Path) -> tuple[QdqIssue, ...]:
    """Find QuantizeLinear/DequantizeLinear nodes that are not symmetric int8.

    TensorRT imports Q/DQ only with a zero point of 0 and int8 quantised tensors. ONNX Runtime's
    U8S8 graphs (uint8 activations with a computed zero point) are therefore for ONNX Runtime only;
    a graph marked ``target: tensorrt`` in the bundle must pass this check.

    Args:
        onnx_path: The Q/DQ graph.

    Returns:
        One issue per offending node (empty when the graph is symmetric int8 or has no Q/DQ).

    Raises:
        BundleError: The file is missing or is not an ONNX model.
    """
    return _qdq_issues(_load(onnx_path))


def _qdq_issues(model: onnx.ModelProto) -> tuple[QdqIssue, ...]:
    consts = _constants(model)
    issues: list[QdqIssue] = []
    for name, node in _walk(model.graph):
        if node.op_type not in _QDQ_OPS or node.domain not in _DEFAULT_DOMAINS:
            continue
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if not zero_point:
            message = _missing_zero_point_problem(node, consts)
        elif zero_point not in consts:
            message = f"zero point '{zero_point}' is computed at run time; TensorRT needs a constant int8 zero"
        else:
            message = _zero_point_problem(consts[zero_point])
        if message:
            issues.append(QdqIssue(node=name, op=node.op_type, message=message))
    return tuple(issues)


def _zero_point_problem(tensor: onnx.TensorProto) -> str:
    problems = []
    if tensor.data_type != onnx.TensorProto.INT8:
        problems.append(f"zero point is {onnx.TensorProto.DataType.Name(tensor.data_type).lower()}, not int8")
    values = numpy_helper.to_array(tensor)
    if np.any(values != 0):
        shown = ", ".join(str(v) for v in np.unique(values)[:3])
        problems.append(f"zero point is not 0 ({shown}…): asymmetric quantisation")
    if not problems:
        return ""
    return "; ".join(problems) + "; TensorRT needs symmetric int8 (export the TensorRT graph with symmetric Q/DQ)"


def _missing_zero_point_problem(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> str:
    """Without a zero point, QuantizeLinear outputs uint8 unless ``output_dtype`` says otherwise."""
    if node.op_type == "QuantizeLinear":
        dtype = _attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8
        if dtype != onnx.TensorProto.INT8:
            return (
                f"no zero point, so the output is {onnx.TensorProto.DataType.Name(dtype).lower()}; "
                "TensorRT needs int8 with an int8 zero point of 0"
            )
        return ""
    source = consts.get(node.input[0])
    if source is not None and source.data_type != onnx.TensorProto.INT8:
        return f"dequantises {onnx.TensorProto.DataType.Name(source.data_type).lower()} weights; TensorRT needs int8"
    return ""


@dataclass(frozen=True)
class QdqBody:
    """The float types a Q/DQ graph computes in outside its quantised ops.

    Attributes:
        path: The checked file.
        qdq_nodes: QuantizeLinear/DequantizeLinear nodes.
        float32_ops: Other nodes whose first output is float32 (casts and constants left out).
        float16_ops: Other nodes whose first output is float16.
    """

    path: Path
    qdq_nodes: int
    float32_ops: int
    float16_ops: int

    @property
    def fp32_body(self) -> bool:
        """A Q/DQ graph whose unquantised ops are mostly FP32 (FP32 pre/post-processing ends are fine)."""
        return self.qdq_nodes > 0 and self.float32_ops > self.float16_ops

    def note(self) -> str:
        """One line for a human (empty for a graph without Q/DQ)."""
        if not self.qdq_nodes:
            return ""
        line = f"{self.path}: Q/DQ graph body: {self.float16_ops} float16 ops, {self.float32_ops} float32 ops"
        if self.fp32_body:
            line += (
                "; TensorRT runs the unquantised ops in FP32 under strong typing, so this INT8 plan is unlikely "
                "to beat FP16: quantise the FP16 graph for TensorRT"
            )
        return line


#: Nodes that only move or label values; they say nothing about the body's arithmetic type.
_TYPE_NEUTRAL_OPS = frozenset({"Cast", "Constant", "Shape", "Identity", *_QDQ_OPS})


def qdq_body(onnx_path: str | Path) -> QdqBody:
    """Count the float types of a Q/DQ graph's unquantised ops (types from ONNX shape inference).

    Raises:
        BundleError: The file is missing or is not an ONNX model.
    """
    model = _load(onnx_path)
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # e.g. a graph over 2 GiB: declared types only
        typed = model
    graph = typed.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types |= {t.name: t.data_type for t in graph.initializer}
    qdq = fp32 = fp16 = 0
    for _, node in _walk(graph):
        if node.op_type in _QDQ_OPS:
            qdq += 1
        elif node.op_type not in _TYPE_NEUTRAL_OPS and node.output:
            kind = types.get(node.output[0])
            fp32 += kind == onnx.TensorProto.FLOAT
            fp16 += kind == onnx.TensorProto.FLOAT16
    return QdqBody(Path(onnx_path), qdq, fp32, fp16)


def main(argv: list[str] | None = None) -> int:
    """Check ONNX files given on the command line; exit status 1 if any would not import."""
    parser = argparse.ArgumentParser(prog="python -m spine_edge.export.opcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files to check")
    args = parser.parse_args(argv)
    status = 0
    for path in args.models:
        try:
            report = check_trt_ops(path)
        except BundleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(report.summary())
        note = qdq_body(path).note()
        if note:
            print(f"  {note}")
        status |= 0 if report.ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
