from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spine_edge.backends import create_backend, open_backend, select_model
from spine_edge.backends.cuda import GpuInfo
from spine_edge.backends.onnxruntime import OnnxRuntimeBackend, check_providers, resolve_providers
from spine_edge.backends.tensorrt import TensorRTBackend, check_plan_compatible
from spine_edge.bundle import BuildInfo, Manifest, ModelEntry, TensorSpec, load_manifest, sha256_file
from spine_edge.errors import BackendError, BundleError, MissingDependencyError
from tests.spine_edge.bundle_factory import make_bundle, reference_classifier, reference_detector

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"), with_optimized=True)


def _batch(n: int = 3, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 120, (n, 1, size, size), dtype=np.uint8)
    x[0, :, 8:24, 40:56] = 250  # one bright region: abnormal
    return x


def test_onnxruntime_backend_runs_the_graph(bundle: Path) -> None:
    x = _batch()
    with OnnxRuntimeBackend(bundle / "classifier.fp32.onnx", provider="cpu") as backend:
        assert backend.input_specs() == {"image": TensorSpec("image", ("batch", 1, 64, 64), "uint8")}
        assert backend.output_names == ("prob", "cam")
        assert backend.provider == CPU and backend.describe() == "onnxruntime/CPUExecutionProvider"
        assert backend.max_batch is None
        assert backend.threads == len(os.sched_getaffinity(0))
        out = backend.infer({"image": x})
    prob, cam = reference_classifier(x[:, 0], grid=8)
    np.testing.assert_allclose(out["prob"], prob, rtol=1e-5)
    np.testing.assert_allclose(out["cam"], cam, atol=1e-6)
    assert out["prob"][0] > 0.99 and out["prob"][1] < 0.5


def test_backend_checks_state_and_feeds(bundle: Path) -> None:
    backend = OnnxRuntimeBackend(bundle / "detector.fp32.onnx", provider="cpu")
    with pytest.raises(BackendError, match="active backend"):
        backend.infer({"images": _batch()})
    with backend:
        with pytest.raises(BackendError, match="missing inputs"):
            backend.infer({"image": _batch()})
        with pytest.raises(BackendError, match="dtype float32"):
            backend.infer({"images": _batch().astype(np.float32)})
        raw = backend.infer({"images": _batch()})["yolo_raw"]
    assert not backend.is_active
    np.testing.assert_allclose(raw, reference_detector(_batch()[:, 0], grid=4), atol=1e-4)


def test_missing_model_file_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="model file not found"):
        OnnxRuntimeBackend(tmp_path / "nope.onnx").activate()


def test_provider_resolution() -> None:
    assert resolve_providers(None, ["AzureExecutionProvider", CPU]) == [CPU]
    assert resolve_providers(None, [CPU, CUDA, TRT]) == [TRT, CUDA, CPU]
    # A GPU provider asked for by name runs without CPU fallback, so a node it cannot take fails loudly.
    assert resolve_providers("cuda", [TRT, CUDA, CPU]) == [CUDA]
    assert resolve_providers("tensorrt", [TRT, CUDA, CPU]) == [TRT, CUDA]
    assert resolve_providers("cpu", [TRT, CUDA, CPU]) == [CPU]
    with pytest.raises(BackendError, match=r"spine-edge\[gpu-ort\]"):
        resolve_providers("cuda", [CPU])
    with pytest.raises(BackendError, match="unknown provider"):
        resolve_providers("rocm", [CPU])  # type: ignore[arg-type]


def test_silent_cpu_fallback_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    path = Path("classifier.onnx")
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider did not start.*--provider cpu"):
        check_providers(path, [CUDA, CPU], [CPU], explicit=True)
    with caplog.at_level(logging.WARNING):
        assert check_providers(path, [TRT, CUDA, CPU], [CPU], explicit=False) == CPU
    assert "TensorrtExecutionProvider did not start" in caplog.text
    assert check_providers(path, [CUDA, CPU], [CUDA, CPU], explicit=True) == CUDA


def test_optimized_file_is_preferred_when_built_here(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    selection = select_model(manifest, "classifier", "auto", "auto", "cpu")
    assert selection.entry.format == "onnx-optimized" and selection.pre_optimized
    assert selection.precision == "fp32"
    x = _batch()
    with create_backend(bundle, manifest, selection) as backend:
        np.testing.assert_allclose(backend.infer({"image": x})["prob"], reference_classifier(x[:, 0], 8)[0], rtol=1e-5)


def test_optimized_file_from_another_onnxruntime_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_bundle(tmp_path, with_optimized=True, optimized_version="0.0.1")
    with caplog.at_level(logging.WARNING):
        selection = select_model(load_manifest(bundle), "detector", "fp32", "onnxruntime", None)
    assert selection.entry.format == "onnx" and not selection.pre_optimized
    assert "onnxruntime 0.0.1" in caplog.text and "build-engines" in caplog.text


def test_selection_errors_name_what_is_missing(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    with pytest.raises(BundleError, match=r"no classifier TensorRT plan.*build-engines"):
        select_model(manifest, "classifier", "fp16", "tensorrt")
    with pytest.raises(BundleError, match=r"no detector ONNX file at precision int8.*it has: fp32 onnx"):
        select_model(manifest, "detector", "int8", "onnxruntime", "cpu")


def test_altered_model_file_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    (bundle / "detector.fp32.onnx").write_bytes((bundle / "detector.fp32.onnx").read_bytes() + b"\0")
    open_backend(bundle, manifest, "classifier", "fp32", "onnxruntime")  # the untouched file still opens
    with pytest.raises(BundleError, match="does not match the manifest"):
        open_backend(bundle, manifest, "detector", "fp32", "onnxruntime")


def _plan_build(**changes: object) -> BuildInfo:
    build = BuildInfo(
        builder="tensorrt",
        builder_version="10.13.3.9",
        device="NVIDIA GeForce RTX 3050",
        compute_capability="8.6",
        source="classifier.fp32.onnx",
        max_batch=8,
    )
    return replace(build, **changes)  # type: ignore[arg-type]


def test_plan_compatibility_check() -> None:
    gpu = GpuInfo("NVIDIA GeForce RTX 3050", "8.6")
    plan, bundle = Path("runs/bundle/classifier.fp16.plan"), Path("runs/bundle")
    check_plan_compatible(plan, _plan_build(), gpu, "10.13.3.9", bundle)
    cases = {
        "TensorRT 10.13.3.9, this box has TensorRT 10.14.1": (_plan_build(), gpu, "10.14.1"),
        r"built for NVIDIA GeForce RTX 3050 \(compute capability 8.6\), this box has NVIDIA A2 \(compute capability 8.6\)": (
            _plan_build(),
            GpuInfo("NVIDIA A2", "8.6"),
            "10.13.3.9",
        ),
        r"compute capability 8.9\)": (_plan_build(), GpuInfo("NVIDIA GeForce RTX 3050", "8.9"), "10.13.3.9"),
        "no TensorRT build record": (None, gpu, "10.13.3.9"),
    }
    for pattern, (build, here, version) in cases.items():
        with pytest.raises(BundleError, match=pattern) as info:
            check_plan_compatible(plan, build, here, version, bundle)
        assert "spine-edge build-engines runs/bundle" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"spine-edge\[gpu-cu12\]"):
        TensorRTBackend(tmp_path / "x.plan", _plan_build(), tmp_path).activate()


@pytest.mark.skipif(
    importlib.util.find_spec("cuda") is None or shutil.which("nvidia-smi") is not None,
    reason="needs cuda-bindings installed on a box without an NVIDIA driver",
)
def test_cuda_binding_without_driver_is_a_clear_error() -> None:
    from spine_edge.backends.cuda import load_cuda

    with pytest.raises(BackendError, match=r"CUDA .* failed: .*nvidia-smi"):
        load_cuda()


@pytest.mark.gpu
def test_tensorrt_backend_matches_the_reference(tmp_path: Path) -> None:
    import tensorrt as trt

    from spine_edge.backends.cuda import load_cuda

    bundle = make_bundle(tmp_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((bundle / "classifier.fp32.onnx").read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 1, 64, 64), (2, 1, 64, 64), (4, 1, 64, 64))
    config.add_optimization_profile(profile)
    plan = bundle / "classifier.fp32.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    gpu = load_cuda().device_info(0)
    build = _plan_build(
        builder_version=trt.__version__, device=gpu.name, compute_capability=gpu.compute_capability, max_batch=4
    )
    x = _batch(3)
    with TensorRTBackend(plan, build, bundle) as backend:
        assert backend.input_specs()["image"].shape == ("batch", 1, 64, 64)
        assert backend.max_batch == 4 and backend.provider == gpu.name
        first = backend.infer({"image": x})
        second = backend.infer({"image": x[:1]})  # smaller batch reuses the same buffers
    prob, cam = reference_classifier(x[:, 0], 8)
    np.testing.assert_allclose(first["prob"], prob, rtol=1e-3)
    np.testing.assert_allclose(first["cam"], cam, atol=1e-3)
    np.testing.assert_allclose(second["prob"], prob[:1], rtol=1e-3)


def _with_plans(bundle: Path, precisions: tuple[str, ...]) -> Manifest:
    """The bundle's manifest plus TensorRT plan entries (never activated here: selection only)."""
    manifest = load_manifest(bundle)
    plans = []
    for precision in precisions:
        path = bundle / f"classifier.{precision}.plan"
        path.write_bytes(precision.encode())
        plans.append(
            ModelEntry(
                role="classifier",
                precision=precision,
                format="tensorrt",
                file=path.name,  # type: ignore[arg-type]
                sha256=sha256_file(path),
                inputs=manifest.models[0].inputs,
                outputs=manifest.models[0].outputs,
                build=_plan_build(),
            )
        )
    return manifest.with_models((*manifest.models, *plans))


def test_tensorrt_auto_precision_prefers_fp16(tmp_path: Path) -> None:
    manifest = _with_plans(make_bundle(tmp_path), ("fp32", "int8", "fp16"))
    assert select_model(manifest, "classifier", "auto", "tensorrt").entry.precision == "fp16"
    assert select_model(manifest, "classifier", "int8", "tensorrt").entry.file == "classifier.int8.plan"
    assert select_model(manifest, "detector", "auto", "onnxruntime", "cpu").entry.precision == "fp32"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_auto_backend_without_tensorrt_runs_plans_bundle_on_onnxruntime(tmp_path: Path) -> None:
    manifest = _with_plans(make_bundle(tmp_path), ("fp16",))
    selection = select_model(manifest, "classifier", "auto", "auto", "cpu")
    assert (selection.backend, selection.entry.format, selection.precision) == ("onnxruntime", "onnx", "fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers_run_strictly_and_match_the_cpu(tmp_path: Path, provider: str) -> None:
    import onnxruntime as ort

    from spine_edge.backends.onnxruntime import PROVIDERS

    if PROVIDERS[provider] not in ort.get_available_providers():
        pytest.skip(f"{PROVIDERS[provider]} not in this onnxruntime (spine-edge[gpu-ort-cu12] installs it)")
    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    selection = select_model(manifest, "classifier", "fp32", "onnxruntime", provider)  # type: ignore[arg-type]
    x = _batch(3)
    with create_backend(bundle, manifest, selection) as backend:
        assert backend.provider == PROVIDERS[provider]
        out = backend.infer({"image": x})
    np.testing.assert_allclose(out["prob"], reference_classifier(x[:, 0], 8)[0], rtol=1e-3, atol=1e-4)
    if provider == "tensorrt":
        assert any((bundle / "cache" / "ort-tensorrt" / selection.entry.sha256[:16]).iterdir())


def _fp16_scale_qdq_graph(path: Path) -> np.ndarray:
    """A TensorRT-style INT8 graph with an FP16 body (float16 Q/DQ scales, opset 19); returns its weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.linspace(-1, 1, 2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    w_scale = (np.abs(weight).reshape(2, -1).max(axis=1) / 127).astype(np.float16)
    q = np.clip(np.rint(weight / w_scale.astype(np.float32)[:, None, None, None]), -127, 127).astype(np.int8)
    half = lambda v, name: numpy_helper.from_array(np.asarray(v, np.float16), name)  # noqa: E731
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT16),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"]),
        helper.make_node("Concat", ["yd", "yd"], ["cat"], axis=1),  # between Q/DQ pairs, as in the detector
        helper.make_node("QuantizeLinear", ["cat", "s", "z"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"]),
        helper.make_node("Cast", ["cd"], ["prob"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16_body_int8",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [
            half(2.0, "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(q, "w"),
            numpy_helper.from_array(w_scale, "ws"),
            numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return q.astype(np.float32) * w_scale.astype(np.float32)[:, None, None, None]


def test_tensorrt_int8_graph_runs_unfused_on_onnxruntime_cpu(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    path = tmp_path / "classifier.int8.trt.onnx"
    weight = _fp16_scale_qdq_graph(path)
    x = np.random.default_rng(0).integers(0, 255, (2, 1, 8, 8), dtype=np.uint8)
    with OnnxRuntimeBackend(path, provider="cpu", fake_quant=True) as backend:
        got = backend.infer({"image": x})["prob"]
    # The float fake-quantisation the graph means: quantise to the grid of 2.0, conv, quantise again.
    grid = lambda v: np.clip(np.rint(v / 2.0), -128, 127) * 2.0  # noqa: E731
    xs = grid(x.astype(np.float32))
    padded = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((2, 2, 8, 8), np.float32)
    for c in range(2):
        for i in range(3):
            for j in range(3):
                conv[:, c] += weight[c, 0, i, j] * padded[:, 0, i : i + 8, j : j + 8]
    want = np.concatenate([grid(conv)] * 2, axis=1)
    np.testing.assert_allclose(got, want, atol=2.0 + 1e-3)  # one grid step: float16 accumulation order
    assert np.mean(np.abs(got - want) > 1e-3) < 0.05


def test_create_backend_runs_the_tensorrt_int8_graph_as_fake_quantisation(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    selection = select_model(manifest, "classifier", "fp32", "onnxruntime", "cpu")
    plain = create_backend(bundle, manifest, replace(selection, pre_optimized=False))
    assert isinstance(plain, OnnxRuntimeBackend) and not plain.fake_quant
    trt_int8 = replace(selection, entry=replace(selection.entry, precision="int8", target="tensorrt"))
    backend = create_backend(bundle, manifest, trt_int8)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.fake_quant
