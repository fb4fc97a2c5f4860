"""FLOP counting on a hand-made graph whose multiply-accumulates are known by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.benchmarks.flops import count_flops
from spine_edge.errors import BundleError

# Conv 3→8, 3x3, pad 1 on 32x32: 8 * 32 * 32 outputs x (3 * 3 * 3) = 221,184 MACs
CONV_MACS = 8 * 32 * 32 * 3 * 3 * 3
# depthwise Conv (group 8), 3x3, stride 2, pad 1 → 8 x 16 x 16 outputs x (1 * 3 * 3) = 18,432 MACs
DEPTHWISE_MACS = 8 * 16 * 16 * 1 * 3 * 3
# Gemm [1, 2048] x [2048, 10] (transB) = 20,480 MACs; MatMul [1, 10] x [10, 5] = 50 MACs
GEMM_MACS = 2048 * 10
MATMUL_MACS = 10 * 5


def hand_made_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w_conv"),
        numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w_dw"),
        numpy_helper.from_array(rng.normal(size=(10, 2048)).astype(np.float32), "w_fc"),
        numpy_helper.from_array(rng.normal(size=(10,)).astype(np.float32), "b_fc"),
        numpy_helper.from_array(rng.normal(size=(10, 5)).astype(np.float32), "w_mm"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w_dw"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=8, name="dw"),
        helper.make_node("Flatten", ["c2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["fc"], transB=1, name="fc"),
        helper.make_node("MatMul", ["fc", "w_mm"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_counts_conv_depthwise_gemm_matmul_exactly(tmp_path: Path) -> None:
    path = tmp_path / "hand.onnx"
    onnx.save(hand_made_graph(), path)
    count = count_flops(path)
    assert count.by_op == {"Conv": CONV_MACS + DEPTHWISE_MACS, "Gemm": GEMM_MACS, "MatMul": MATMUL_MACS}
    assert count.macs == CONV_MACS + DEPTHWISE_MACS + GEMM_MACS + MATMUL_MACS == 260_146
    assert count.flops == 2 * 260_146
    assert count.nodes == 4 and count.uncounted == ()


def test_dynamic_batch_scales_the_count_and_leaves_the_model_alone() -> None:
    model = hand_made_graph()
    before = model.SerializeToString()
    assert count_flops(model, batch=4).macs == 4 * count_flops(model).macs
    assert model.SerializeToString() == before


def test_transposed_gemm_input_reduces_over_its_first_axis() -> None:
    nodes = [helper.make_node("Gemm", ["a", "b"], ["y"], transA=1, name="g")]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [6, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [6, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert count_flops(model).macs == 4 * 3 * 6


def test_unreadable_file_is_a_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(BundleError, match=r"broken\.onnx"):
        count_flops(path)


def test_shapes_an_exporter_recorded_with_a_symbolic_batch_are_inferred_again() -> None:
    # torch.onnx.export writes value_info and outputs with the dynamic axis name; shape inference would keep them.
    model = hand_made_graph()
    for name, dims in (("c1", ["batch", 8, 32, 32]), ("c2", ["batch", 8, 16, 16]), ("fc", ["batch", 10])):
        model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    count = count_flops(model)
    assert count.macs == 260_146 and count.uncounted == ()
