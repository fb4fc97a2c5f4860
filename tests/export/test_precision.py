from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.export import precision as prec
from spine_edge.export.evaluation import run_graph
from spine_edge.export.opcheck import check_symmetric_qdq, check_trt_ops
from spine_edge.imageio import read_image
from spine_edge.preprocess import letterbox
from tests.export.conftest import EXPORT_SIZE, ExportedGraphs


def _val(prepared: Path, n: int, pad: int) -> np.ndarray:
    paths = sorted((prepared / "images" / "val").glob("*.png"))[:n]
    return np.stack([letterbox(read_image(p).image, EXPORT_SIZE, pad)[0] for p in paths])[:, None]


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


@pytest.fixture(scope="module")
def fp16_graphs(export_graphs: ExportedGraphs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fp16")
    return {
        "classifier": prec.write_fp16_graph(export_graphs.classifier, folder / "classifier.fp16.onnx"),
        "detector": prec.write_fp16_graph(export_graphs.detector, folder / "detector.fp16.onnx"),
    }


def test_fp16_body_spans_first_to_last_conv(export_graphs: ExportedGraphs) -> None:
    model = onnx.load(str(export_graphs.classifier))
    body = prec.fp16_body(model)
    by_name = {n.name: n for n in model.graph.node}
    assert {by_name[n].op_type for n in body} >= {"Conv", "Relu", "Add"}
    outside = {n.op_type for n in model.graph.node if n.name not in body}
    # preprocessing and the tail stay out: TTA warps, sigmoid / view mean / weighted sum, CAM normalisation
    assert {"GridSample", "Cast", "Gemm", "ReduceMax"} <= outside
    for node in model.graph.node:
        if node.op_type == "Gemm":  # the linear heads follow the last Conv
            assert node.name not in body


def test_fp16_graphs_keep_the_interface_and_sensitive_ops_in_fp32(fp16_graphs: dict[str, Path]) -> None:
    for role, path in fp16_graphs.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
        assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)
        halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
        assert len(halves) > 20, role
        types = _types(model)
        for node in model.graph.node:
            if node.op_type in ("GridSample", "Gemm", "ReduceMax"):
                assert all(types[o] == TensorProto.FLOAT for o in node.output), node.name
        assert check_trt_ops(path).ok
    classifier = onnx.load(str(fp16_graphs["classifier"]))
    types = _types(classifier)
    # the per-member probability (sigmoid of the logits, then the mean over views) is computed in FP32
    sigmoids = [
        n for n in classifier.graph.node if n.op_type == "Sigmoid" and "/members." in n.name and n.name.count("/") == 2
    ]
    assert sigmoids and all(types[n.output[0]] == TensorProto.FLOAT for n in sigmoids)


def test_fp16_graphs_run_on_onnxruntime_cpu_close_to_fp32(
    export_graphs: ExportedGraphs, fp16_graphs: dict[str, Path], export_prepared: Path
) -> None:
    images = _val(export_prepared, 6, 0)
    ref = run_graph(export_graphs.classifier, images, ["prob", "cam"], 6)
    got = run_graph(fp16_graphs["classifier"], images, ["prob", "cam"], 6)
    emulated = run_graph(prec.emulate_fp16(onnx.load(str(fp16_graphs["classifier"]))), images, ["prob"], 6)
    # Measured on the tiny members: the FP16 file on ORT CPU differs from FP32 by ~1e-5 (ORT runs the
    # float16 ops in float32, so only the weight rounding shows) and the emulation by ~1e-3.
    assert np.abs(got["prob"] - ref["prob"]).max() < 2e-3
    assert np.abs(got["cam"] - ref["cam"]).max() < 2e-2
    assert 0 < np.abs(emulated["prob"] - ref["prob"]).max() < 1e-2
    det_images = _val(export_prepared, 4, 114)
    det_ref = run_graph(export_graphs.detector, det_images, ["yolo_raw"], 4)["yolo_raw"]
    det_got = run_graph(fp16_graphs["detector"], det_images, ["yolo_raw"], 4)["yolo_raw"]
    # The random YOLO (BatchNorm statistics of near-zero activations) amplifies rounding far more than a
    # trained one; measured here: median |Δbox| 1.4e-3 px, 95th percentile 0.27 px, worst anchor 5 px;
    # mean |Δscore| 6.6e-4.
    box_error = np.abs(det_got[:, :4] - det_ref[:, :4])
    assert np.median(box_error) < 0.02 and np.percentile(box_error, 95) < 1.0
    assert np.abs(det_got[:, 4:] - det_ref[:, 4:]).mean() < 5e-3


def _chain(x: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray]:
    """FP32 graph x → Mul(c) → Sigmoid → Mul(c), with every op in the FP16 body, and the numpy
    result of running it with float16 tensors between ops and float32 arithmetic inside them."""
    c = np.array([1.001], np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["m"], name="mul1"),
        helper.make_node("Sigmoid", ["m"], ["s"], name="sig"),
        helper.make_node("Mul", ["s", "c"], ["y"], name="mul2"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(c, "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    h = np.float16
    c16 = c.astype(h).astype(np.float32)
    m = (x.astype(h).astype(np.float32) * c16).astype(h).astype(np.float32)
    s = (1 / (1 + np.exp(-m))).astype(h).astype(np.float32)
    return model, (s * c16).astype(h).astype(np.float32)


def test_emulation_rounds_every_fp16_tensor_exactly() -> None:
    x = np.array([0.1234567, 1.7654321, -3.3333, 0.5], np.float32)
    model, expected = _chain(x)
    converted = prec.convert_to_fp16(model, {"mul1", "sig", "mul2"})
    assert [n.op_type for n in converted.graph.node] == ["Cast", "Mul", "Sigmoid", "Mul", "Cast"]
    emulated = prec.emulate_fp16(converted)
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
    fp32 = x * 1.001
    fp32 = 1.001 / (1 + np.exp(-fp32))
    assert np.abs(got - fp32).max() > 1e-5  # the rounding is visible, so the equality above means something


def test_calibration_reader_streams_runtime_canvases(export_prepared: Path) -> None:
    paths = prec.select_calibration_images(export_prepared, 5)
    assert len(paths) == 5 and all(p.parent.name == "train" for p in paths)
    assert paths == tuple(sorted(paths)) and len(set(paths)) == 5
    reader = prec.CalibrationImages(paths, "image", EXPORT_SIZE, 114)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed["image"])
    assert len(feeds) == 5
    expected, _ = letterbox(read_image(paths[2]).image, EXPORT_SIZE, 114)
    assert feeds[2].dtype == np.uint8 and feeds[2].shape == (1, 1, EXPORT_SIZE, EXPORT_SIZE)
    np.testing.assert_array_equal(feeds[2][0, 0], expected)
    reader.set_range(3, 10)
    assert [reader.get_next() is not None for _ in range(3)] == [True, True, False]
    everything = prec.select_calibration_images(export_prepared, 300)  # fewer train images than asked: all of them
    assert len(everything) == 12 and {p.parent.name for p in everything} == {"train"}


def test_calibration_images_include_every_class(export_prepared: Path, tmp_path: Path) -> None:
    """A class seen in one train image is calibrated on, although even spacing alone would skip it."""
    counts = prec.class_counts(export_prepared, prec.select_calibration_images(export_prepared, 12))
    rare = tmp_path / "prepared"
    (rare / "images" / "train").mkdir(parents=True)
    (rare / "labels" / "train").mkdir(parents=True)
    for i in range(40):
        (rare / "images" / "train" / f"{i:03d}.png").write_bytes(b"")
        label = "2 0.5 0.5 0.1 0.1\n" if i == 7 else ("0 0.5 0.5 0.1 0.1\n" if i % 2 else "")
        (rare / "labels" / "train" / f"{i:03d}.txt").write_text(label)
    chosen = prec.select_calibration_images(rare, 6)
    assert len(chosen) == 6 and chosen == tuple(sorted(set(chosen)))
    assert prec.class_counts(rare, chosen).keys() == {prec.NORMAL, 0, 2}
    assert rare / "images" / "train" / "007.png" in chosen
    assert sum(counts.values()) >= 12


@pytest.fixture(scope="module")
def int8_graphs(export_graphs: ExportedGraphs, export_prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("int8")
    paths = prec.select_calibration_images(export_prepared, 6)
    out = {}
    for role, fp32, pad in (("classifier", export_graphs.classifier, 0), ("detector", export_graphs.detector, 114)):
        reader = prec.CalibrationImages(paths, "image", EXPORT_SIZE, pad)
        calibration = prec.calibrate(fp32, reader, folder / f"{role}.json")
        body = prec.fp16_body(onnx.load(str(fp32)))
        for target in ("tensorrt", "onnxruntime"):
            out[role, target] = prec.quantize_graph(fp32, folder / f"{role}.{target}.onnx", calibration, target, body)
        out[role, "calibration"] = calibration
    return out


def test_calibration_summary(int8_graphs: dict) -> None:
    calibration = int8_graphs["classifier", "calibration"]
    assert calibration.images == 6 and calibration.method == "minmax"
    assert calibration.seconds > 0 and calibration.peak_rss_mb >= calibration.baseline_rss_mb > 0
    assert calibration.ranges.is_file()


def test_tensorrt_int8_graphs_are_symmetric_int8(int8_graphs: dict) -> None:
    for role in ("classifier", "detector"):
        path = int8_graphs[role, "tensorrt"]
        model = onnx.load(str(path))
        consts = {t.name: t for t in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert len(qdq) > 50, role
        for node in qdq:
            zero_point = consts[node.input[2]]
            assert zero_point.data_type == TensorProto.INT8, node.name
            assert not numpy_helper.to_array(zero_point).any(), node.name
        assert check_symmetric_qdq(path) == ()
        assert check_trt_ops(path).ok, check_trt_ops(path).summary()
        assert prec.activation_types(path) == {"int8": prec.activation_types(path)["int8"]}


def consts(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def test_tensorrt_int8_graphs_quantise_only_weighted_layer_inputs(int8_graphs: dict) -> None:
    """TensorRT's placement: every DequantizeLinear feeds a Conv/Gemm/MatMul, no Q/DQ on activations or outputs.

    The ONNX Runtime graph of the same FP32 graph quantises activations, adds and concats too.
    """
    weighted = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    for role in ("classifier", "detector"):
        for target, only_weighted in (("tensorrt", True), ("onnxruntime", False)):
            model = onnx.load(str(int8_graphs[role, target]))
            readers: dict[str, set[str]] = {}
            for node in model.graph.node:
                for name in node.input:
                    readers.setdefault(name, set()).add(node.op_type)
            dequant_readers = set().union(
                *(readers.get(n.output[0], set()) for n in model.graph.node if n.op_type == "DequantizeLinear")
            )
            weights = consts(model)
            activation_quants = [
                n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights
            ]
            weighted_nodes = [n for n in model.graph.node if n.op_type in weighted]
            if only_weighted:
                assert dequant_readers <= weighted, (role, dequant_readers - weighted)
                # At most one activation Q per weighted layer: none on activations, adds, concats.
                assert len(activation_quants) <= len(weighted_nodes), role
            else:
                assert dequant_readers - weighted, role
                assert len(activation_quants) > len(weighted_nodes), role


def test_onnxruntime_int8_graphs_use_uint8_activations(int8_graphs: dict) -> None:
    for role in ("classifier", "detector"):
        path = int8_graphs[role, "onnxruntime"]
        counts = prec.activation_types(path)
        assert counts.get("uint8", 0) > 20 and "int8" not in counts, (role, counts)
        weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.INT8]
        assert weights, role  # per-channel int8 weights
        assert check_symmetric_qdq(path)  # asymmetric by design: not a TensorRT graph


def test_int8_graphs_run_close_to_fp32(int8_graphs: dict, export_graphs: ExportedGraphs, export_prepared: Path) -> None:
    images = _val(export_prepared, 8, 0)
    ref = run_graph(export_graphs.classifier, images, ["prob"], 8)["prob"]
    for target in ("tensorrt", "onnxruntime"):
        got = run_graph(int8_graphs["classifier", target], images, ["prob"], 8)["prob"]
        # Measured on the random tiny members: mean |Δprob| ≈ 0.01–0.02.
        assert np.abs(got - ref).mean() < 0.05, target
    keep = "/members.1/conv_stem/Conv"
    fp32 = onnx.load(str(export_graphs.classifier))
    qdq = onnx.load(str(int8_graphs["classifier", "tensorrt"]))
    partial = prec.keep_float(qdq, fp32, [keep])
    onnx.checker.check_model(partial, full_check=True)
    conv = next(n for n in partial.graph.node if n.name == keep)
    original = next(n for n in fp32.graph.node if n.name == keep)
    # The kept node reads the float activation and the FP32 weight: nothing left to fuse into an INT8 kernel.
    assert conv.input[0] == original.input[0] and conv.input[1] == original.input[1]
    assert len(partial.graph.node) < len(qdq.graph.node)
    kept = run_graph(partial, images, ["prob"], 8)["prob"]
    assert np.isfinite(kept).all()


def test_percentile_calibration_in_chunks(export_graphs: ExportedGraphs, export_prepared: Path, tmp_path: Path) -> None:
    paths = prec.select_calibration_images(export_prepared, 6)
    reader = prec.CalibrationImages(paths, "image", EXPORT_SIZE, 114)
    minmax = prec.calibrate(export_graphs.detector, reader, tmp_path / "minmax.json", "minmax")
    reader.rewind()
    percentile = prec.calibrate(
        export_graphs.detector, reader, tmp_path / "pct.json", "percentile", chunk=2, percentile=99.0
    )
    assert percentile.method == "percentile" and percentile.images == 6
    from onnxruntime.quantization import load_tensors_data

    lo, hi = load_tensors_data(minmax.ranges), load_tensors_data(percentile.ranges)
    assert hi.calibration_method != lo.calibration_method
    # Percentile ranges lie inside the min-max ranges of the same activations, and are narrower for many.
    narrower = 0
    for name, bounds in lo.data.items():
        low, high = (float(np.ravel(v)[0]) for v in bounds.range_value)
        p_low, p_high = (float(np.ravel(v)[0]) for v in hi.data[name].range_value)
        slack = 1e-3 * (high - low) + 1e-6
        assert low - slack <= p_low and p_high <= high + slack, name
        narrower += (p_high - p_low) < 0.9 * (high - low)
    assert narrower > 10


def test_tensorrt_int8_graph_gets_an_fp16_body(int8_graphs: dict, export_prepared: Path, tmp_path: Path) -> None:
    images = _val(export_prepared, 6, 0)
    for role, output in (("classifier", "prob"), ("detector", "yolo_raw")):
        source = onnx.load(str(int8_graphs[role, "tensorrt"]))
        body = prec.int8_fp16_body(source)
        path = tmp_path / f"{role}.int8.trt.onnx"
        onnx.save(body, str(path))
        onnx.checker.check_model(body, full_check=True)
        assert max(o.version for o in body.opset_import if o.domain in ("", "ai.onnx")) == prec.QDQ_FP16_OPSET
        types = _types(body)
        # The interface is the FP32 graph's; every convolution reads FP16, every body Q/DQ scale is FP16.
        assert [types[i.name] for i in body.graph.input] == [types[i.name] for i in source.graph.input]
        assert {types[o.name] for o in body.graph.output} == {TensorProto.FLOAT}
        convs = [n for n in body.graph.node if n.op_type == "Conv"]
        assert convs and all(types[n.input[0]] == TensorProto.FLOAT16 for n in convs), role
        assert prec.fp16_share(body) >= 0.9 and prec.fp16_share(source) == 0.0
        scales = [types[n.input[1]] for n in body.graph.node if n.op_type == "DequantizeLinear"]
        assert scales.count(TensorProto.FLOAT16) >= 0.9 * len(scales), role
        # Still TensorRT's explicit quantisation: symmetric int8, supported ops.
        assert check_symmetric_qdq(path) == ()
        assert check_trt_ops(path).ok, check_trt_ops(path).summary()
        # Same weights: int8 values unchanged wherever the scale was a normal float16.
        before = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer if t.data_type == TensorProto.INT8}
        after = {t.name: numpy_helper.to_array(t) for t in body.graph.initializer if t.data_type == TensorProto.INT8}
        moved = sum(int((before[k] != after[k]).sum()) for k in before if k in after)
        assert moved <= 0.001 * sum(v.size for v in before.values()), role

        canvas = images if role == "classifier" else _val(export_prepared, 6, 114)
        fp32_body = run_graph(source, canvas, [output], 6)[output]
        emulated = run_graph(prec.emulate_fp16(body), canvas, [output], 6)[output]
        scale = 1.0 if role == "classifier" else float(np.abs(fp32_body).max())
        # FP16 rounding of activations and scales on top of INT8: small next to the INT8 error itself.
        assert np.abs(emulated - fp32_body).mean() / scale < 0.01, role
        # The runtime's ONNX Runtime backend runs it unfused (fake quantisation), close to the emulation.
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        direct = session.run([output], {session.get_inputs()[0].name: canvas})[0]
        assert np.abs(direct - emulated).mean() / scale < 0.01, role


def test_fp16_body_raises_tiny_weight_scales_and_requantises() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    weight[1] *= 1e-6  # a channel whose int8 scale underflows float16's normal range
    scale = (np.abs(weight).reshape(2, -1).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
    act_scale = np.float32(1 / 127)
    zero = np.int8(0)
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "as", "az"], ["xq"], name="q0"),
        helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="dq0"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y0"], ["y1"], name="relu"),
        helper.make_node("QuantizeLinear", ["y1", "as", "az"], ["yq"], name="q1"),
        helper.make_node("DequantizeLinear", ["yq", "as", "az"], ["yd"], name="dq1"),
        helper.make_node("ReduceSum", ["yd"], ["y"], name="tail", keepdims=0),
    ]
    # A second conv makes the Relu part of the body (a Conv above and below it).
    nodes.insert(5, helper.make_node("Conv", ["y1", "w2"], ["y2"], name="conv1"))
    nodes[-1] = helper.make_node("Flatten", ["y2"], ["y"], name="tail")
    graph = helper.make_graph(
        [n for n in nodes if n.name not in ("q1", "dq1")],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [
            numpy_helper.from_array(np.array(act_scale), "as"),
            numpy_helper.from_array(np.array(zero), "az"),
            numpy_helper.from_array(q, "w"),
            numpy_helper.from_array(scale, "ws"),
            numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
            numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    body = prec.int8_fp16_body(model)
    inits = {t.name: numpy_helper.to_array(t) for t in body.graph.initializer}
    new_scale = next(v for k, v in inits.items() if k.startswith("ws")).astype(np.float32)
    assert new_scale.dtype == np.float32 and (new_scale >= np.finfo(np.float16).tiny).all()
    dequantised = inits["w"].astype(np.float32) * new_scale[:, None, None, None]
    # Each channel is still the nearest point of its (new) grid to the FP32 weight.
    assert np.all(np.abs(dequantised - weight) <= new_scale[:, None, None, None] / 2 + 1e-12)
    assert np.array_equal(inits["w"][0], q[0])  # a normal scale: the int8 values did not move
    x = rng.normal(size=(1, 1, 4, 4)).astype(np.float32)
    got = run_graph(prec.emulate_fp16(body), x, ["y"], 1)["y"]
    want = run_graph(model, x, ["y"], 1)["y"]
    assert np.allclose(got, want, rtol=2e-2, atol=1e-3)


def test_fp16_scales_stay_finite_and_normal() -> None:
    scales = prec._fp16_scale(np.array([1e6, 1.0 / 127, 1e-9], np.float32))
    assert np.isfinite(scales).all()
    assert scales[0] == np.finfo(np.float16).max and scales[2] == np.finfo(np.float16).tiny
    assert scales[1] == pytest.approx(1.0 / 127, rel=2**-11)


def test_the_search_judges_the_tensorrt_graph_as_tensorrt_builds_it(int8_graphs: dict, export_prepared: Path) -> None:
    from spine_edge.export.sensitivity import as_built

    ort_graph = onnx.load(str(int8_graphs["classifier", "onnxruntime"]))
    assert as_built(ort_graph, "onnxruntime") is ort_graph
    trt_graph = onnx.load(str(int8_graphs["classifier", "tensorrt"]))
    built = as_built(trt_graph, "tensorrt")
    assert max(o.version for o in built.opset_import if o.domain in ("", "ai.onnx")) == prec.QDQ_FP16_OPSET
    halves = [n for n in built.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert len(halves) > 50  # every FP16 tensor rounded, as the FP16 body computes it
    images = _val(export_prepared, 4, 0)
    expected = run_graph(prec.emulate_fp16(prec.int8_fp16_body(trt_graph)), images, ["prob"], 4)["prob"]
    np.testing.assert_array_equal(run_graph(built, images, ["prob"], 4)["prob"], expected)
