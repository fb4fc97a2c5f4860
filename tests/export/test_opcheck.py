from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from spine_edge.errors import BundleError
from spine_edge.export.opcheck import SUPPORTED_OPS_FILE, check_symmetric_qdq, check_trt_ops, load_trt_op_list, main
from tests.export.conftest import single_node_graph, tiny_classifier

F = TensorProto.FLOAT


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_op_list_has_its_source_and_the_ops_this_project_needs() -> None:
    text = SUPPORTED_OPS_FILE.read_text()
    assert "onnx-tensorrt" in text and "TensorRT 10.15" in text
    ops = load_trt_op_list()
    assert (ops.opset_min, ops.opset_max) == (9, 24)
    # The classifier (TTA via GridSample, Q/DQ) and the detector (Resize, NMS) need these.
    for op in (
        "Conv",
        "GridSample",
        "Resize",
        "NonMaxSuppression",
        "QuantizeLinear",
        "DequantizeLinear",
        "Sigmoid",
        "Cast",
        "Concat",
        "Split",
        "Softmax",
        "MaxPool",
        "GlobalAveragePool",
        "Gemm",
    ):
        assert op in ops.ops, op
    # Marked "N" in the parser's table.
    for op in ("Det", "Unique", "QLinearConv", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "AffineGrid"):
        assert op not in ops.ops, op
    assert "zero" in ops.ops["QuantizeLinear"] and "4D" in ops.ops["GridSample"]


def test_supported_graph_passes(tmp_path: Path) -> None:
    report = check_trt_ops(_save(tiny_classifier("fp32"), tmp_path / "m.onnx"))
    assert report.ok
    assert report.opset == 17
    assert report.unsupported == () and report.qdq == ()
    assert "ok for TensorRT" in report.summary()


def test_unsupported_op_is_named_with_its_node(tmp_path: Path) -> None:
    model = single_node_graph("Det", [("m", F, [3, 3])], [("d", F, [])])
    report = check_trt_ops(_save(model, tmp_path / "det.onnx"))
    assert not report.ok
    assert [(f.op, f.nodes) for f in report.unsupported] == [("Det", ("the_det",))]
    assert "Det in 'the_det'" in report.summary()


def test_contrib_domain_and_bad_resize_and_old_opset_are_unsupported(tmp_path: Path) -> None:
    contrib = single_node_graph(
        "FusedGemm", [("a", F, [2, 2]), ("b", F, [2, 2])], [("c", F, [2, 2])], domain="com.microsoft"
    )
    report = check_trt_ops(_save(contrib, tmp_path / "contrib.onnx"))
    assert [(f.op, f.domain) for f in report.unsupported] == [("FusedGemm", "com.microsoft")]

    cubic = single_node_graph(
        "Resize", [("x", F, [1, 1, 4, 4]), ("", F, []), ("scales", F, [4])], [("y", F, [1, 1, 8, 8])], mode="cubic"
    )
    report = check_trt_ops(_save(cubic, tmp_path / "cubic.onnx"))
    assert len(report.unsupported) == 1 and "mode=cubic" in report.unsupported[0].message

    old = single_node_graph("Relu", [("x", F, [1])], [("y", F, [1])], opset=8)
    report = check_trt_ops(_save(old, tmp_path / "old.onnx"))
    assert [f.op for f in report.unsupported] == ["opset"]


def test_restricted_op_is_a_caveat_not_a_failure(tmp_path: Path) -> None:
    model = single_node_graph(
        "GridSample", [("x", F, [1, 1, 4, 4]), ("grid", F, [1, 4, 4, 2])], [("y", F, [1, 1, 4, 4])], align_corners=0
    )
    report = check_trt_ops(_save(model, tmp_path / "grid.onnx"))
    assert report.ok
    assert [(f.op, f.nodes) for f in report.caveats] == [("GridSample", ("the_gridsample",))]


def test_nodes_inside_subgraphs_are_checked(tmp_path: Path) -> None:
    branch = helper.make_graph(
        [helper.make_node("Det", ["m"], ["d"], name="inner_det")],
        "then",
        [],
        [helper.make_tensor_value_info("d", F, [])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["d2"], name="inner_id")],
        "else",
        [],
        [helper.make_tensor_value_info("d2", F, [])],
    )
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other, name="branch")
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("m", F, [3, 3]),
            helper.make_tensor_value_info("s", F, []),
        ],
        [helper.make_tensor_value_info("out", F, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = check_trt_ops(_save(model, tmp_path / "if.onnx"))
    assert [(f.op, f.nodes) for f in report.unsupported] == [("Det", ("branch/then_branch/inner_det",))]


def test_symmetric_int8_passes_and_asymmetric_is_flagged(tmp_path: Path) -> None:
    symmetric = _save(tiny_classifier("int8", zero_point=0), tmp_path / "sym.onnx")
    assert check_symmetric_qdq(symmetric) == ()
    assert check_trt_ops(symmetric).ok

    asymmetric = _save(
        tiny_classifier("int8", zero_point=128, zero_point_dtype=TensorProto.UINT8), tmp_path / "asym.onnx"
    )
    issues = check_symmetric_qdq(asymmetric)
    # The activation pair is flagged; the weight DQ (int8, zero 0) is fine.
    assert sorted(i.node for i in issues) == ["dequant_x", "quant_x"]
    assert all("not 0 (128" in i.message and "uint8, not int8" in i.message for i in issues)
    report = check_trt_ops(asymmetric)
    assert not report.ok and len(report.qdq) == 2

    signed_nonzero = _save(tiny_classifier("int8", zero_point=3), tmp_path / "nz.onnx")
    messages = [i.message for i in check_symmetric_qdq(signed_nonzero)]
    assert len(messages) == 2 and all("not 0 (3" in m and "not int8" not in m for m in messages)


def test_quantize_without_zero_point_is_uint8_and_flagged(tmp_path: Path) -> None:
    model = single_node_graph("QuantizeLinear", [("x", F, [4]), ("s", F, [])], [("q", TensorProto.UINT8, [4])])
    issues = check_symmetric_qdq(_save(model, tmp_path / "q.onnx"))
    assert [(i.node, i.op) for i in issues] == [("the_quantizelinear", "QuantizeLinear")]
    assert "uint8" in issues[0].message


def test_missing_or_broken_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such ONNX file"):
        check_trt_ops(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        check_symmetric_qdq(tmp_path / "junk.onnx")


def test_command_line_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _save(tiny_classifier("fp32"), tmp_path / "good.onnx")
    bad = _save(single_node_graph("Unique", [("x", F, [4])], [("y", F, [None])]), tmp_path / "bad.onnx")
    assert main([str(good)]) == 0
    assert main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "good.onnx: opset 17, ok for TensorRT" in out and "unsupported: Unique in 'the_unique'" in out
