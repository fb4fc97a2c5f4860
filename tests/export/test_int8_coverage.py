"""INT8 coverage is counted from the graph ONNX Runtime actually runs, not from where Q/DQ nodes sit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.export.coverage import count_int8_coverage, layer_flops
from spine_edge.export.precision import keep_float

SIDE = 16


def _convnet(path: Path) -> Path:
    """Three 3×3 convs (8 channels) with ReLUs and a matmul head."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        channels_in = 3 if i == 0 else 8
        inits += [
            numpy_helper.from_array(rng.normal(0, 0.3, (8, channels_in, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"/conv{i}/Conv", pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/relu{i}/Relu"))
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (8, 2)).astype(np.float32), "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"], name="/gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="/flat"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="/fc/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _quantize(fp32: Path, out: Path, keep: list[str], symmetric: bool) -> Path:
    """Quantise every node, then run ``keep`` in FP32 again, as the export's layer search does."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.feeds = iter([{"x": rng.normal(0, 1, (1, 3, SIDE, SIDE)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QDQKeepRemovableActivations": True},
    )
    model = keep_float(onnx.load(str(out)), onnx.load(str(fp32)), keep)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return out


def test_excluding_a_node_from_quantize_static_does_not_make_it_float(tmp_path: Path) -> None:
    """Why the search edits the graph: ONNX Runtime quantises an excluded node's float weight itself."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32 = _convnet(tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": np.ones((1, 3, SIDE, SIDE), np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    excluded = tmp_path / "excluded.onnx"
    quantize_static(
        str(fp32),
        str(excluded),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=["/conv1/Conv"],
    )
    counted = count_int8_coverage(excluded, fp32)
    kept = count_int8_coverage(_quantize(fp32, tmp_path / "kept.onnx", ["/conv1/Conv"], False), fp32)
    assert "/conv1/Conv" in kept.float_layers
    # Whatever ONNX Runtime does with the excluded node, the count says what it did.
    assert ("/conv1/Conv" in counted.float_layers) == (counted.int8_share < 1.0)


def test_layer_flops_are_the_convolutions_arithmetic(tmp_path: Path) -> None:
    flops = layer_flops(onnx.load(str(_convnet(tmp_path / "fp32.onnx"))))
    assert flops["/conv0/Conv"] == 2 * 8 * SIDE * SIDE * 3 * 9
    assert flops["/conv1/Conv"] == flops["/conv2/Conv"] == 2 * 8 * SIDE * SIDE * 8 * 9
    assert flops["/fc/MatMul"] == 2 * 2 * 8


@pytest.mark.parametrize("symmetric", [False, True])
def test_coverage_counts_integer_kernels_after_optimisation(tmp_path: Path, symmetric: bool) -> None:
    fp32 = _convnet(tmp_path / "fp32.onnx")
    flops = layer_flops(onnx.load(str(fp32)))
    full = count_int8_coverage(_quantize(fp32, tmp_path / "all.onnx", [], symmetric), fp32)
    assert full.int8_share == pytest.approx(1.0) and not full.float_layers
    partial = count_int8_coverage(_quantize(fp32, tmp_path / "one.onnx", ["/conv1/Conv"], symmetric), fp32)
    assert partial.float_layers == ("/conv1/Conv",)
    assert partial.int8_share == pytest.approx(1 - flops["/conv1/Conv"] / sum(flops.values()))
    record = partial.to_dict()
    assert record["float_layers"] == ["/conv1/Conv"] and not record["meets_goal"]
    none = count_int8_coverage(fp32, fp32)
    assert none.int8_share == 0.0 and set(none.float_layers) == set(flops)


def test_a_conv_with_qdq_but_no_integer_kernel_counts_as_float(tmp_path: Path) -> None:
    """Q/DQ on a conv's inputs, but a float batch norm between the DequantizeLinear and the conv (DenseNet's
    pre-activation pattern): the conv carries Q/DQ, yet ONNX Runtime runs it in float."""
    fp32 = _convnet(tmp_path / "fp32.onnx")
    qdq = onnx.load(str(_quantize(fp32, tmp_path / "all.onnx", [], False)))
    nodes = list(qdq.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == "/conv2/Conv")
    conv = nodes[index]
    qdq.graph.initializer.extend(
        numpy_helper.from_array(np.full(8, value, np.float32), name)
        for name, value in (("bn_s", 1.0), ("bn_o", 0.0), ("bn_m", 0.0), ("bn_v", 1.0))
    )
    norm = helper.make_node("BatchNormalization", [conv.input[0], "bn_s", "bn_o", "bn_m", "bn_v"], ["pre"], name="/bn")
    conv.input[0] = "pre"
    qdq.graph.ClearField("node")
    qdq.graph.node.extend([*nodes[:index], norm, *nodes[index:]])
    onnx.save(qdq, str(tmp_path / "preact.onnx"))
    coverage = count_int8_coverage(tmp_path / "preact.onnx", fp32)
    assert coverage.float_layers == ("/conv2/Conv",)
    assert coverage.float_islands and coverage.activation_qdq > 0  # the float work between Q/DQ is counted too
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("w2") for n in qdq.graph.node)


def test_tensorrt_coverage_follows_its_qdq_fusion_rule_on_the_fp16_body(tmp_path: Path) -> None:
    from spine_edge.export.coverage import count_tensorrt_int8_coverage
    from spine_edge.export.precision import int8_fp16_body

    fp32 = _convnet(tmp_path / "fp32.onnx")
    flops = layer_flops(onnx.load(str(fp32)))
    trt = _quantize(fp32, tmp_path / "trt.onnx", ["/conv1/Conv"], True)
    body = tmp_path / "trt16.onnx"
    onnx.save(int8_fp16_body(onnx.load(str(trt))), str(body))
    for graph in (trt, body):
        coverage = count_tensorrt_int8_coverage(graph, fp32)
        # conv1 reads a float input and FP32 weights (kept float); the head's MatMul reads quantised ones.
        assert coverage.float_layers == ("/conv1/Conv",), graph.name
        assert coverage.int8_share == pytest.approx(1 - flops["/conv1/Conv"] / sum(flops.values()))
        # The record says whose rule counted it; the report's wording follows that field.
        assert coverage.to_dict()["rule"] == "tensorrt" and coverage.describe().endswith(
            "by TensorRT's Q/DQ fusion rule"
        )
    assert count_tensorrt_int8_coverage(fp32, fp32).int8_share == 0.0
