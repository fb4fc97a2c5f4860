"""The OpenVINO backend against ONNX Runtime on a tiny convolutional graph and its exporter-made INT8 Q/DQ graph.

The graph has what matters for the CPU kernels (uint8 input, convolutions, a residual Add, pooling, a
dense head) at 32 px, so compiling and running it takes milliseconds. Its INT8 variant is written by the
exporter's own calibration and quantiser for the TensorRT target (symmetric Q/DQ), the graph the
OpenVINO backend runs as INT8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.backends.onnxruntime import OnnxRuntimeBackend
from spine_edge.bundle import ModelEntry, TensorSpec, sha256_file
from spine_edge.errors import BackendError, BundleError, MissingDependencyError

pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'spine-edge[openvino]'")

from spine_edge.backends.openvino import (
    OPENVINO_CACHE,
    OpenVinoBackend,
    check_precision_supported,
    device_capabilities,
    import_openvino,
    openvino_cache_dir,
)

SIZE = 32
#: BF16 keeps 8 bits of mantissa (relative error 2⁻⁸ per op); through four layers and a sigmoid the
#: probabilities of this graph stay within this bound (the issue measured 5e-4 at paper size).
BF16_ATOL = 5e-3
#: The same INT8 graph on two libraries: both quantise with the graph's scales, but may round a
#: requantised value differently by one step; one step of the output's range bounds the difference.
INT8_ATOL = 2e-2


def _conv_graph() -> onnx.ModelProto:
    """uint8 [N,1,S,S] → /255 → conv → relu → conv + residual → relu → GAP → dense → sigmoid → prob [N, 1]."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
        numpy_helper.from_array(rng.normal(0, 0.6, (8, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 2.0, (1, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.array([-0.5], np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["xf", "c255"], ["x"], name="scale"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logit"], transB=1, name="fc"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_conv",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 160, (n, 1, SIZE, SIZE), dtype=np.uint8)
    x[::2, :, 4:14, 10:24] = 250  # every other image has a bright region
    return x


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The FP32 graph and its symmetric INT8 Q/DQ graph (exporter's calibration and TensorRT-target quantiser)."""
    from spine_edge.export import precision as prec
    from spine_edge.io_utils import write_image_atomic

    folder = tmp_path_factory.mktemp("ov_graphs")
    fp32 = folder / "classifier.fp32.onnx"
    onnx.save(_conv_graph(), str(fp32))
    calib = [write_image_atomic(folder / "calib" / f"{i}.png", image[0]) for i, image in enumerate(_images(8, seed=1))]
    reader = prec.CalibrationImages(calib, "image", SIZE, 0)
    ranges = prec.calibrate(fp32, reader, folder / "ranges.json")
    int8 = prec.quantize_graph(
        fp32, folder / "classifier.int8.trt.onnx", ranges, "tensorrt", prec.fp16_body(onnx.load(str(fp32)))
    )
    return {"fp32": fp32, "int8": int8}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    with OnnxRuntimeBackend(path, provider="cpu", threads=1) as backend:
        return backend.infer({"image": x})["prob"]


def _has_bf16() -> bool:
    return "BF16" in device_capabilities(import_openvino().Core())


def test_fp32_equals_onnxruntime(graphs: dict[str, Path]) -> None:
    x = _images(5)
    inputs = (TensorSpec("image", ("batch", 1, SIZE, SIZE), "uint8", "image"),)
    with OpenVinoBackend(graphs["fp32"], threads=1, inputs=inputs) as backend:
        assert backend.input_specs() == {"image": TensorSpec("image", ("batch", 1, SIZE, SIZE), "uint8")}
        assert backend.output_names == ("prob",)
        assert backend.provider == "CPU" and backend.describe() == "openvino/CPU"
        assert backend.max_batch is None
        out = backend.infer({"image": x})["prob"]
        assert "bf16" not in backend.runtime_precisions and "i8" not in backend.runtime_precisions
        assert backend.infer({"image": x[:1]})["prob"].shape == (1, 1)  # the dynamic batch axis really is dynamic
    np.testing.assert_allclose(out, _ort(graphs["fp32"], x), atol=1e-5)
    assert np.ptp(out) > 0.03  # the images give different probabilities: the comparison means something


def test_bf16_within_tolerance(graphs: dict[str, Path]) -> None:
    x = _images(5)
    if not _has_bf16():
        # No BF16 on this CPU: the precision must be refused, never silently run in FP32.
        with (
            pytest.raises(BackendError, match="no native BF16"),
            OpenVinoBackend(graphs["fp32"], precision="bf16", threads=1) as backend,
        ):
            backend.infer({"image": x})
        return
    with OpenVinoBackend(graphs["fp32"], precision="bf16", threads=1) as backend:
        out = backend.infer({"image": x})["prob"]
        assert "bf16" in backend.runtime_precisions
    np.testing.assert_allclose(out, _ort(graphs["fp32"], x), atol=BF16_ATOL)


def test_bf16_is_refused_where_the_cpu_lacks_it() -> None:
    check_precision_supported("bf16", ("FP32", "BF16", "INT8"))
    with pytest.raises(BackendError, match=r"no native BF16.*AMX.*--precision fp32 or int8"):
        check_precision_supported("bf16", ("FP32", "FP16", "INT8"))


def test_int8_qdq_graph_runs_integer_kernels_and_matches_onnxruntime(graphs: dict[str, Path]) -> None:
    x = _images(5)
    with OpenVinoBackend(graphs["int8"], threads=1) as backend:
        out = backend.infer({"image": x})["prob"]
        precisions = backend.runtime_precisions
    assert precisions.get("i8", 0) + precisions.get("u8", 0) >= 2, precisions  # both convolutions
    np.testing.assert_allclose(out, _ort(graphs["int8"], x), atol=INT8_ATOL)


def test_cache_dir_is_keyed_by_the_graph_sha256(graphs: dict[str, Path], tmp_path: Path) -> None:
    sha = sha256_file(graphs["fp32"])
    entry = ModelEntry("classifier", "fp32", "onnx", graphs["fp32"].name, sha, (), ())
    cache = openvino_cache_dir(tmp_path, entry)
    assert cache == tmp_path / OPENVINO_CACHE / sha[:16]
    x = _images(2)
    with OpenVinoBackend(graphs["fp32"], threads=1, cache_dir=cache) as backend:
        first = backend.infer({"image": x})["prob"]
    blobs = sorted(cache.glob("*.blob"))
    assert len(blobs) == 1
    with OpenVinoBackend(graphs["fp32"], threads=1, cache_dir=cache) as backend:  # loaded from the blob
        np.testing.assert_array_equal(backend.infer({"image": x})["prob"], first)
    assert sorted(cache.glob("*.blob")) == blobs


def test_state_and_file_errors(graphs: dict[str, Path], tmp_path: Path) -> None:
    backend = OpenVinoBackend(graphs["fp32"])
    with pytest.raises(BackendError, match="active backend"):
        backend.infer({"image": _images(1)})
    with pytest.raises(BackendError, match="model file not found"):
        OpenVinoBackend(tmp_path / "nope.onnx").activate()
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match=r"(?s)cannot compile it.*re-export"):
        OpenVinoBackend(tmp_path / "bad.onnx").activate()
    with backend, pytest.raises(BackendError, match="dtype float32"):
        backend.infer({"image": _images(1).astype(np.float32)})


def test_missing_openvino_names_the_extra(monkeypatch: pytest.MonkeyPatch, graphs: dict[str, Path]) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'spine-edge\[openvino\]'"):
        OpenVinoBackend(graphs["fp32"]).activate()


# --- selection and build-engines (spine_edge.backends.select_model, export.engines.build_openvino) -------------


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Path:
    from tests.spine_edge.bundle_factory import make_bundle

    return make_bundle(tmp_path / "bundle")


def test_backend_openvino_runs_the_bundle_graph_with_a_sha_keyed_cache(tiny_bundle: Path) -> None:
    from spine_edge.backends import create_backend, select_model
    from spine_edge.bundle import load_manifest
    from tests.spine_edge.bundle_factory import reference_classifier

    manifest = load_manifest(tiny_bundle)
    selection = select_model(manifest, "classifier", "fp32", "openvino")
    assert (selection.backend, selection.precision, selection.entry.format) == ("openvino", "fp32", "onnx")
    x = np.random.default_rng(0).integers(0, 255, (2, 1, 64, 64), dtype=np.uint8)
    with create_backend(tiny_bundle, manifest, selection, threads=1) as backend:
        assert isinstance(backend, OpenVinoBackend)
        out = backend.infer({"image": x})
    np.testing.assert_allclose(out["prob"], reference_classifier(x[:, 0], grid=8)[0], atol=1e-5)
    assert list(openvino_cache_dir(tiny_bundle, selection.entry).glob("*.blob"))
    with pytest.raises(BundleError, match="not fp16"):
        select_model(manifest, "classifier", "fp16", "openvino")


def test_bf16_is_an_openvino_precision(tiny_bundle: Path) -> None:
    from spine_edge.backends import select_model
    from spine_edge.bundle import load_manifest

    manifest = load_manifest(tiny_bundle)
    selection = select_model(manifest, "detector", "bf16", "auto")  # only OpenVINO computes BF16
    assert (selection.backend, selection.precision, selection.compute) == ("openvino", "bf16", "bf16")
    with pytest.raises(BundleError, match=r"bf16.*OpenVINO"):
        select_model(manifest, "detector", "bf16", "onnxruntime")


def _race(monkeypatch: pytest.MonkeyPatch, openvino_ms: float, onnxruntime_ms: float) -> None:
    """Make build-engines' race deterministic: the library decides the time, not the loaded CI box."""
    from spine_edge.export import engines

    def fake(backend: object, canvases: np.ndarray, runs: int) -> float:
        return openvino_ms if isinstance(backend, OpenVinoBackend) else onnxruntime_ms

    monkeypatch.setattr(engines, "_median_batch1_ms", fake)


def test_build_engines_records_openvino_where_measured_faster_and_auto_picks_it(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spine_edge.backends import select_model
    from spine_edge.bundle import load_manifest
    from spine_edge.export.engines import BuildConfig, build_engines

    _race(monkeypatch, openvino_ms=1.0, onnxruntime_ms=2.0)
    report = build_engines(tiny_bundle, BuildConfig(target="onnxruntime-cpu", threads=1))
    manifest = load_manifest(tiny_bundle)
    entry = next(e for e in manifest.models if (e.role, e.format) == ("classifier", "openvino"))
    assert entry.build is not None and entry.build.builder == "openvino"
    assert entry.build.device and entry.build.builder_version == import_openvino().__version__
    assert entry.build.parity["passed"] and entry.build.parity["latency_ms_batch1"] == {
        "openvino": 1.0,
        "onnxruntime": 2.0,
        **({"openvino_bf16": 1.0} if _has_bf16() else {}),
    }
    assert any(m.file.startswith(OPENVINO_CACHE) for m in report.built)
    assert select_model(manifest, "classifier", "auto", "auto").backend == "openvino"
    assert select_model(manifest, "classifier", "auto", "auto", "cpu").backend == "openvino"


def test_build_engines_keeps_onnxruntime_where_openvino_is_slower(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spine_edge.backends import select_model
    from spine_edge.bundle import load_manifest
    from spine_edge.export.engines import BuildConfig, build_engines

    _race(monkeypatch, openvino_ms=1.0, onnxruntime_ms=2.0)
    build_engines(tiny_bundle, BuildConfig(target="onnxruntime-cpu", threads=1))
    _race(monkeypatch, openvino_ms=3.0, onnxruntime_ms=2.0)  # the next build on this box: OpenVINO lost
    report = build_engines(tiny_bundle, BuildConfig(target="onnxruntime-cpu", threads=1))
    manifest = load_manifest(tiny_bundle)
    assert not [e for e in manifest.models if e.format == "openvino"]
    assert any("not faster on this CPU" in s.reason for s in report.skipped)
    assert select_model(manifest, "classifier", "auto", "auto").backend == "onnxruntime"


def test_auto_ignores_an_openvino_record_from_another_box(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from spine_edge.backends import select_model
    from spine_edge.bundle import load_manifest
    from spine_edge.export.engines import BuildConfig, build_engines

    _race(monkeypatch, openvino_ms=1.0, onnxruntime_ms=2.0)
    build_engines(tiny_bundle, BuildConfig(target="onnxruntime-cpu", threads=1))
    manifest = load_manifest(tiny_bundle)
    moved = manifest.with_models(
        tuple(
            replace(e, build=replace(e.build, device="AMD EPYC 9654")) if e.format == "openvino" and e.build else e
            for e in manifest.models
        )
    )
    assert select_model(moved, "classifier", "auto", "auto").backend == "onnxruntime"
