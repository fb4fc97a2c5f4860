"""bench's accuracy phase measures every INT8 graph the bundle carries, the TensorRT Q/DQ ones on ONNX Runtime too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from spine_edge.backends import select_model
from spine_edge.benchmarks.config import (
    ONNXRUNTIME_INT8,
    TENSORRT_INT8,
    BenchConfig,
    accuracy_cascade,
    plan_precisions,
)
from spine_edge.cascade import CascadeConfig
from spine_edge.errors import BundleError
from spine_edge.metrics import ACCURACY_GATES
from tests.export.conftest import write_bundle

GRAPHS = (
    ("classifier", "fp32", "any", "classifier.fp32.onnx"),
    ("classifier", "int8", "onnxruntime", "classifier.int8.ort.onnx"),
    ("classifier", "int8", "tensorrt", "classifier.int8.trt.onnx"),
    ("detector", "fp32", "any", "detector.fp32.onnx"),
    ("detector", "int8", "onnxruntime", "detector.int8.ort.onnx"),
    ("detector", "int8", "tensorrt", "detector.int8.trt.onnx"),
)


def test_cpu_plan_adds_the_tensorrt_int8_graphs(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "bundle", GRAPHS)
    config = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="onnxruntime", provider="cpu"), data=tmp_path)
    plan = plan_precisions(manifest, config)
    assert [label for label, _, _ in plan.accuracy] == ["fp32", "int8", TENSORRT_INT8]
    assert plan.latency == ("fp32", "int8")  # latency stays the provider's own graphs
    assert accuracy_cascade(TENSORRT_INT8) == ("int8", "tensorrt") and accuracy_cascade("int8") == ("int8", None)
    own = select_model(manifest, "detector", "int8", "onnxruntime", "cpu")
    forced = select_model(manifest, "detector", "int8", "onnxruntime", "cpu", graph_target="tensorrt")
    assert (own.entry.file, forced.entry.file) == ("detector.int8.ort.onnx", "detector.int8.trt.onnx")


def test_no_tensorrt_graphs_no_extra_cascade(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "bundle", tuple(g for g in GRAPHS if g[2] != "tensorrt"))
    config = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="onnxruntime", provider="cpu"), data=tmp_path)
    assert [label for label, _, _ in plan_precisions(manifest, config).accuracy] == ["fp32", "int8"]
    without_data = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="onnxruntime", provider="cpu"))
    assert plan_precisions(manifest, without_data).accuracy == ()


def test_openvino_plan_measures_fp16_on_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spine_edge.benchmarks import config as bench_config

    monkeypatch.setattr(bench_config, "openvino_bf16", lambda: False)  # BF16's rows: the test below
    fp16 = (("classifier", "fp16", "any", "classifier.fp16.onnx"), ("detector", "fp16", "any", "detector.fp16.onnx"))
    manifest = write_bundle(tmp_path / "bundle", GRAPHS + fp16)
    config = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="openvino"), data=tmp_path)
    plan = plan_precisions(manifest, config)
    assert plan.backend == "openvino" and plan.latency == ("fp32", "int8")  # OpenVINO has no FP16 on a CPU
    by_label = {label: (backend, provider) for label, backend, provider in plan.accuracy}
    # int8's accuracy is measured as its latency row runs it: the TensorRT graph on OpenVINO. ONNX Runtime's
    # own INT8 graph on ONNX Runtime, and the TensorRT one through ONNX Runtime as export judges it, get rows
    # of their own; FP16 (no OpenVINO latency row) is measured on ONNX Runtime.
    assert [label for label, _, _ in plan.accuracy] == ["fp32", "fp16", "int8", ONNXRUNTIME_INT8, TENSORRT_INT8]
    assert by_label["fp16"] == ("onnxruntime", "cpu") and by_label["int8"][0] == "openvino"
    assert by_label[ONNXRUNTIME_INT8] == ("onnxruntime", "cpu") and by_label[TENSORRT_INT8] == ("onnxruntime", "cpu")
    assert accuracy_cascade(ONNXRUNTIME_INT8) == ("int8", None)
    own = select_model(manifest, "classifier", "int8", "onnxruntime", "cpu")
    assert own.entry.target == "onnxruntime"  # what the int8-ort row loads without a graph target
    on_openvino = select_model(manifest, "classifier", "int8", "openvino")
    assert on_openvino.entry.file == "classifier.int8.trt.onnx"  # what the int8 row (latency and accuracy) runs


def test_bf16_is_benched_on_openvino_where_the_cpu_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spine_edge.benchmarks import config as bench_config

    manifest = write_bundle(tmp_path / "bundle", GRAPHS)
    openvino = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="openvino"), data=tmp_path)
    monkeypatch.setattr(bench_config, "openvino_bf16", lambda: True)
    plan = plan_precisions(manifest, openvino)
    assert plan.latency == ("fp32", "bf16", "int8")  # the FP32 graphs with OpenVINO's BF16 hint, in report order
    assert ("bf16", "openvino", None) in plan.accuracy and accuracy_cascade("bf16") == ("bf16", None)
    assert ACCURACY_GATES["bf16"] == ACCURACY_GATES["fp16"]  # a 16-bit float execution: FP16's gates and verdict
    onnxruntime = BenchConfig(CascadeConfig(tmp_path / "bundle", backend="onnxruntime", provider="cpu"))
    assert "bf16" not in plan_precisions(manifest, onnxruntime).latency
    monkeypatch.setattr(bench_config, "openvino_bf16", lambda: False)  # a CPU without BF16 units
    assert "bf16" not in plan_precisions(manifest, openvino).latency
    with pytest.raises(BundleError, match="AVX-512 BF16 or AMX"):
        plan_precisions(manifest, replace(openvino, precisions=("bf16",)))
