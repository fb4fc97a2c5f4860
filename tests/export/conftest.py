"""Tiny ONNX graphs and bundles for the export tests, built with ``onnx.helper`` in milliseconds.

The classifier stand-in mirrors the real graph's interface: uint8 ``[batch, 1, S, S]`` in, a cast and
scale to [0, 1], then Conv → Relu → GlobalAveragePool → Flatten → Gemm → Sigmoid → ``prob [batch, 1]``.
Variants: ``fp16`` (the body in float16 between casts) and ``int8`` (Q/DQ on the conv input and
weights, with a chosen zero point so the symmetric check has something to find).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.bundle import (
    SCHEMA_VERSION,
    ClassifierInfo,
    DetectorInfo,
    EnsembleMember,
    Manifest,
    ModelEntry,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from spine_edge.constants import CLASS_NAMES

SIZE = 16
OPSET = 17


def tiny_classifier(
    precision: str = "fp32",
    input_name: str = "image",
    output_name: str = "prob",
    seed: int = 0,
    zero_point: int = 0,
    zero_point_dtype: int = TensorProto.INT8,
) -> onnx.ModelProto:
    """The stand-in classifier graph (dynamic batch, opset 17)."""
    rng = np.random.default_rng(seed)
    float_type = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    np_float = np.float16 if precision == "fp16" else np.float32
    weight = rng.normal(0, 0.5, size=(4, 1, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale_255"),
        numpy_helper.from_array(rng.normal(0, 0.1, size=4).astype(np_float), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, size=(1, 4)).astype(np_float), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, size=1).astype(np_float), "fc_b"),
    ]
    nodes = [
        helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT, name="cast_in"),
        helper.make_node("Mul", ["as_float", "scale_255"], ["x"], name="normalise"),
    ]
    conv_in, conv_w = "x", "conv_w"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="cast_fp16"))
        conv_in = "x16"
        inits.append(numpy_helper.from_array(weight.astype(np.float16), "conv_w"))
    elif precision == "int8":
        zp_np = np.int8 if zero_point_dtype == TensorProto.INT8 else np.uint8
        w_scale = float(np.abs(weight).max() / 127)
        inits += [
            numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(zero_point, zp_np), "x_zero"),
            numpy_helper.from_array(np.round(weight / w_scale).astype(np.int8), "conv_w_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="quant_x"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dequant_x"),
            helper.make_node("DequantizeLinear", ["conv_w_q", "w_scale", "w_zero"], ["conv_w_dq"], name="dequant_w"),
        ]
        conv_in, conv_w = "x_dq", "conv_w_dq"
    else:
        inits.append(numpy_helper.from_array(weight, "conv_w"))
    nodes += [
        helper.make_node("Conv", [conv_in, conv_w, "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logit"], transB=1, name="fc"),
        helper.make_node("Sigmoid", ["logit"], ["sig" if precision == "fp16" else output_name], name="sigmoid"),
    ]
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["sig"], [output_name], to=TensorProto.FLOAT, name="cast_out"))
    graph = helper.make_graph(
        nodes,
        f"tiny_{precision}",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # opset 17's IR version: every onnxruntime and TensorRT 10 parser reads it
    onnx.checker.check_model(model)
    return model


def single_node_graph(op: str, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]],
                      domain: str = "", opset: int = OPSET, **attrs: object) -> onnx.ModelProto:
    """A one-node graph (for operator checks; not necessarily runnable)."""
    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], name=f"the_{op.lower()}",
                            domain=domain, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def _entry(folder: Path, file: str, role: str, precision: str, target: str, model: onnx.ModelProto) -> ModelEntry:
    onnx.save(model, str(folder / file))
    graph_in, graph_out = model.graph.input[0].name, model.graph.output[0].name
    return ModelEntry(
        role=role,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        format="onnx",
        file=file,
        sha256=sha256_file(folder / file),
        inputs=(TensorSpec(graph_in, ("batch", 1, SIZE, SIZE), "uint8"),),
        outputs=(TensorSpec(graph_out, ("batch", 1), "float32"),),
        target=target,
    )


#: (role, precision, target, file) of the default test bundle: an ORT-only U8S8-style INT8 graph and a
#: TensorRT-only symmetric one, as the export writes them.
DEFAULT_GRAPHS = (
    ("classifier", "fp32", "any", "classifier.fp32.onnx"),
    ("classifier", "int8", "onnxruntime", "classifier.int8.ort.onnx"),
    ("classifier", "int8", "tensorrt", "classifier.int8.trt.onnx"),
    ("detector", "fp32", "any", "detector.fp32.onnx"),
)


def write_bundle(folder: Path, graphs: tuple[tuple[str, str, str, str], ...] = DEFAULT_GRAPHS) -> Manifest:
    """Write the graphs and a manifest listing them; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for role, precision, target, file in graphs:
        names = ("images", "output0") if role == "detector" else ("image", "prob")
        seed = 1 if target == "onnxruntime" else 0
        model = tiny_classifier(precision, *names, seed=seed)
        entries.append(_entry(folder, file, role, precision, target, model))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id="test0001",
        created="2026-11-27T00:00:00Z",
        class_names=CLASS_NAMES,
        classifier=ClassifierInfo(
            input_size=SIZE,
            members=(EnsembleMember("tiny", "tiny", 1.0),),
            tta_views=("identity",),
            threshold=0.5,
            cam_shape=(SIZE, SIZE),
        ),
        detector=DetectorInfo(input_size=SIZE, class_names=CLASS_NAMES, conf_threshold=0.25, iou_threshold=0.65),
        models=tuple(entries),
    )
    write_manifest(folder, manifest)
    return manifest


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A fresh bundle with the default graphs."""
    folder = tmp_path / "bundle"
    write_bundle(folder)
    return folder
