"""The GPU paths' logic, run on any box: TensorRT and CUDA replaced by small fakes that behave like them.

The fakes model what the real libraries do on failure (None objects, False returns, sticky CUDA
errors), so the error mapping, teardown and fallback decisions are tested here; whether the real
libraries behave so is what the ``gpu``-marked tests and ``benchmarks/gpu_check.sh`` confirm.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

import spine_edge.backends as backends
import spine_edge.backends.tensorrt as tensorrt_backend
import spine_edge.export.engines as engines
import spine_edge.gpu_memory as gpu_memory
from spine_edge.backends import create_backend, select_model
from spine_edge.backends.base import DEFAULT_BATCH, BatchRange
from spine_edge.backends.cuda import CudaApi, GpuInfo
from spine_edge.backends.onnxruntime import (
    GpuSettings,
    OnnxRuntimeBackend,
    cuda_provider_options,
    ort_tensorrt_cache_dir,
    profile_shapes,
    resolve_providers,
    strict_fallback,
    summarise_assignment,
    tensorrt_provider_options,
)
from spine_edge.backends.tensorrt import TensorRTBackend, buffer_nbytes, buffer_shape
from spine_edge.bundle import BuildInfo, ModelEntry, TensorSpec, load_manifest, sha256_file
from spine_edge.errors import BackendError, MissingDependencyError
from spine_edge.gpu_memory import GpuMemorySampler
from tests.spine_edge.bundle_factory import make_bundle

GPU = GpuInfo("Fake RTX 3050", "8.6")
TRT_VERSION = "10.99.0"
MAX_BATCH = 4
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


class FakeCuda(CudaApi):
    """Device memory as numpy arrays; ``broken`` makes every later call fail, like a sticky CUDA error."""

    binding = "fake"

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.devices: list[int] = []
        self.free_calls = 0
        self.broken = False
        self._next = 0x1000

    def _call(self, what: str) -> None:
        if self.broken:
            raise BackendError(f"CUDA {what} failed: an illegal memory access was encountered")

    def device_count(self) -> int:
        return 1

    def device_info(self, device: int = 0) -> GpuInfo:
        return GPU

    def set_device(self, device: int) -> None:
        self._call("cudaSetDevice")
        self.devices.append(device)

    def malloc(self, nbytes: int) -> int:
        self._call("cudaMalloc")
        address, self._next = self._next, self._next + nbytes + 256
        self.memory[address] = np.zeros(nbytes, np.uint8)
        return address

    def free(self, ptr: int) -> None:
        self.free_calls += 1
        self._call("cudaFree")
        del self.memory[ptr]

    def malloc_host(self, nbytes: int) -> np.ndarray:
        array = np.zeros(nbytes, np.uint8)
        self.pinned[id(array)] = array
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._call("cudaFreeHost")
        del self.pinned[id(array)]

    def stream_create(self) -> Any:
        return "stream"

    def stream_handle(self, stream: Any) -> int:
        return 7

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy")

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize")

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._call("cudaMemcpyAsync")
        self.memory[dst][: src.nbytes] = src.view(np.uint8)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._call("cudaMemcpyAsync")
        dst.view(np.uint8)[:] = self.memory[src][: dst.nbytes]


class IOMode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class FakeContext:
    """``prob[i]`` = mean brightness of image i / 255, computed from 'device' memory."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] = ()
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if shape[0] > MAX_BATCH:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1,) if self.engine.options.get("data_dependent") else (self.shape[0],)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return not self.engine.options.get("refuse_address")

    def execute_async_v3(self, stream: int) -> bool:
        memory = self.engine.cuda.memory
        n = self.shape[0]
        image = memory[self.addresses["image"]][: n * 4].reshape(n, 4).astype(np.float32)
        prob = (image.mean(axis=1) / 255).astype(np.float32)
        memory[self.addresses["prob"]][: prob.nbytes] = prob.view(np.uint8)
        return True


class FakeEngine:
    num_io_tensors = 2
    _tensors: ClassVar[dict[str, tuple[IOMode, tuple[int, ...], Any]]] = {
        "image": (IOMode.INPUT, (-1, 1, 2, 2), np.uint8),
        "prob": (IOMode.OUTPUT, (-1,), np.float32),
    }

    def __init__(self, cuda: FakeCuda, options: dict[str, Any]) -> None:
        self.cuda = cuda
        self.options = options

    def get_tensor_name(self, index: int) -> str:
        return list(self._tensors)[index]

    def get_tensor_mode(self, name: str) -> IOMode:
        return self._tensors[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def get_tensor_dtype(self, name: str) -> Any:
        return self._tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 1, 2, 2), (2, 1, 2, 2), (MAX_BATCH, 1, 2, 2)]

    def create_execution_context(self) -> FakeContext | None:
        return None if self.options.get("no_context") else FakeContext(self)


def fake_trt(cuda: FakeCuda, **options: Any) -> Any:
    """A tensorrt module stand-in; ``runtime`` = ``"none"`` or ``"typeerror"`` mimics CUDA not starting."""

    class Logger:
        WARNING, ERROR = 2, 1

        def __init__(self, level: int) -> None:
            self.level = level

    def runtime(logger: Logger) -> Any:
        if options.get("runtime") == "typeerror":
            raise TypeError("pybind11::init(): factory function returned nullptr")
        if options.get("runtime") == "none":
            return None
        return SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(cuda, options))

    # A module, like tensorrt itself: hashable, so the backend's per-module logger cache accepts it.
    trt: Any = types.ModuleType("fake_tensorrt")
    trt.__version__ = TRT_VERSION
    trt.Logger, trt.Runtime, trt.Builder, trt.TensorIOMode = Logger, runtime, runtime, IOMode
    trt.nptype = lambda dtype: dtype
    trt.BuilderFlag = SimpleNamespace()
    return trt


def _plan(tmp_path: Path) -> tuple[Path, BuildInfo]:
    plan = tmp_path / "classifier.fp16.plan"
    plan.write_bytes(b"fake plan")
    build = BuildInfo(
        builder="tensorrt",
        builder_version=TRT_VERSION,
        device=GPU.name,
        source="c.onnx",
        compute_capability=GPU.compute_capability,
        max_batch=MAX_BATCH,
    )
    return plan, build


@pytest.fixture()
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    api = FakeCuda()
    monkeypatch.setattr(tensorrt_backend, "load_cuda", lambda device=None: api)
    return api


def _use(monkeypatch: pytest.MonkeyPatch, trt: Any) -> None:
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)


# ---------------------------------------------------------------------------------------------
# Native TensorRT backend


def test_backend_runs_frees_and_applies_the_device(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, fake_trt(cuda))
    plan, build = _plan(tmp_path)
    x = np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2) * 20
    with TensorRTBackend(plan, build, tmp_path, device=1) as backend:
        assert backend.input_specs() == {"image": TensorSpec("image", ("batch", 1, 2, 2), "uint8")}
        assert backend.max_batch == MAX_BATCH and backend.provider == GPU.name
        out = backend.infer({"image": x})
        one = backend.infer({"image": x[:1]})
        with pytest.raises(BackendError, match="exceeds"):
            backend.infer({"image": np.zeros((MAX_BATCH + 1, 1, 2, 2), np.uint8)})
    np.testing.assert_allclose(out["prob"], x.reshape(3, 4).mean(axis=1) / 255, rtol=1e-6)
    np.testing.assert_allclose(one["prob"], out["prob"][:1])
    assert cuda.memory == {} and cuda.pinned == {}  # every buffer released
    assert set(cuda.devices) == {1}  # activate, every infer and teardown ran on device 1


@pytest.mark.parametrize("mode", ["none", "typeerror"])
def test_cuda_start_failure_inside_tensorrt_is_a_backend_error(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    _use(monkeypatch, fake_trt(cuda, runtime=mode))
    plan, build = _plan(tmp_path)
    with pytest.raises(BackendError, match=r"CUDA did not start.*R580.*gpu-cu12"):
        TensorRTBackend(plan, build, tmp_path).activate()
    assert cuda.memory == {}


def test_failed_execution_context_is_reported(tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, fake_trt(cuda, no_context=True))
    plan, build = _plan(tmp_path)
    backend = TensorRTBackend(plan, build, tmp_path)
    with pytest.raises(BackendError, match=r"execution context.*GPU memory"):
        backend.activate()
    assert not backend.is_active


def test_refused_tensor_address_releases_what_was_allocated(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, fake_trt(cuda, refuse_address=True))
    plan, build = _plan(tmp_path)
    with pytest.raises(BackendError, match="refused the buffer address of tensor 'image'"):
        TensorRTBackend(plan, build, tmp_path).activate()
    assert cuda.memory == {} and cuda.pinned == {}


def test_data_dependent_output_is_refused_not_given_one_byte(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, fake_trt(cuda, data_dependent=True))
    plan, build = _plan(tmp_path)
    with pytest.raises(BackendError, match="data-dependent output"):
        TensorRTBackend(plan, build, tmp_path).activate()
    assert cuda.memory == {}


def test_sticky_cuda_error_keeps_the_first_error_and_tries_every_release(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _use(monkeypatch, fake_trt(cuda))
    plan, build = _plan(tmp_path)
    with (
        pytest.raises(BackendError, match="cudaSetDevice failed: an illegal memory access") as info,
        caplog.at_level(logging.WARNING),
        TensorRTBackend(plan, build, tmp_path) as backend,
    ):
        cuda.broken = True
        backend.infer({"image": np.zeros((1, 1, 2, 2), np.uint8)})
    assert "cudaSetDevice" in str(info.value)  # the first failure, not a teardown one
    assert cuda.free_calls == 2  # both device buffers were attempted despite the failures
    assert "while releasing after an earlier error" in caplog.text


def test_teardown_failure_without_an_earlier_error_is_raised(
    tmp_path: Path, cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, fake_trt(cuda))
    plan, build = _plan(tmp_path)
    backend = TensorRTBackend(plan, build, tmp_path).activate()
    cuda.broken = True
    with pytest.raises(BackendError, match="releasing the plan's GPU buffers failed"):
        backend.deactivate()
    assert cuda.free_calls == 2 and not backend.is_active


def test_buffer_shapes() -> None:
    assert buffer_shape("x", (2, 3), None) == (2, 3)
    assert buffer_shape("x", (-1, 3), (8, 3)) == (8, 3)
    with pytest.raises(BackendError, match="no maximum"):
        buffer_shape("x", (-1, 3), None)
    assert buffer_nbytes("x", (8, 3), 4) == 96 and buffer_nbytes("x", (0,), 4) == 1
    with pytest.raises(BackendError, match="data-dependent"):
        buffer_nbytes("x", (-1, 3), 4)


def test_auto_backend_falls_back_when_tensorrt_cannot_start_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeCuda()
    monkeypatch.setattr(backends, "import_tensorrt", lambda: fake_trt(api, runtime="none"))
    monkeypatch.setattr(backends, "load_cuda", lambda device=None: api)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt" else real_find_spec(name, *a)
    )
    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    plan = bundle / "classifier.fp16.plan"
    plan.write_bytes(b"plan")
    entry = ModelEntry(
        role="classifier",
        precision="fp16",
        format="tensorrt",
        file=plan.name,
        sha256=sha256_file(plan),
        inputs=manifest.models[0].inputs,
        outputs=manifest.models[0].outputs,
        build=_plan(tmp_path)[1],
    )
    manifest = manifest.with_models((*manifest.models, entry))
    assert select_model(manifest, "classifier", "auto", "auto", "cpu").backend == "onnxruntime"


# ---------------------------------------------------------------------------------------------
# build-engines: target choice and timing cache


def _patch_engines(monkeypatch: pytest.MonkeyPatch, trt: Any, api: FakeCuda | None = None) -> None:
    def load(device: int | None = None) -> FakeCuda:
        if api is None:
            raise BackendError("CUDA cudaGetDeviceCount failed: no CUDA-capable device is detected")
        return api

    def import_trt() -> Any:
        if isinstance(trt, Exception):
            raise trt
        return trt

    monkeypatch.setattr(engines, "import_tensorrt", import_trt)
    monkeypatch.setattr(engines, "load_cuda", load)


def test_auto_target_falls_back_when_tensorrt_libraries_do_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_engines(monkeypatch, BackendError("tensorrt is installed but its libraries do not load (libnvinfer.so.10)"))
    resolved = engines._resolve_target("auto")
    assert resolved.target == "onnxruntime-cpu" and "libnvinfer" in resolved.reason
    with pytest.raises(engines.EngineBuildError, match=r"libnvinfer.*--target onnxruntime-cpu"):
        engines._resolve_target("tensorrt")


def test_auto_target_falls_back_when_the_builder_cannot_start_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeCuda()
    _patch_engines(monkeypatch, fake_trt(api, runtime="none"), api)
    resolved = engines._resolve_target("auto")
    assert resolved.target == "onnxruntime-cpu" and "R580" in resolved.reason
    with pytest.raises(engines.EngineBuildError, match="builder: CUDA did not start"):
        engines._resolve_target("tensorrt", device=0)


def test_target_choice_without_gpu_or_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_engines(monkeypatch, fake_trt(FakeCuda()), None)
    assert engines._resolve_target("auto").target == "onnxruntime-cpu"
    _patch_engines(monkeypatch, MissingDependencyError("tensorrt", "gpu-cu12", "The native TensorRT backend"))
    assert engines._resolve_target("auto").reason.startswith("TensorRT not installed")
    with pytest.raises(MissingDependencyError, match=r"spine-edge\[gpu-cu12\]"):
        engines._resolve_target("tensorrt")


def test_tensorrt_target_is_taken_with_a_working_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeCuda()
    _patch_engines(monkeypatch, fake_trt(api), api)
    resolved = engines._resolve_target("auto", device=0)
    assert resolved.target == "tensorrt" and resolved.gpu == GPU and resolved.builder is not None
    assert "device 0" in resolved.reason


class FakeBuilderConfig:
    def __init__(self, corrupt: str) -> None:
        self.corrupt = corrupt
        self.seeds: list[bytes] = []

    def create_timing_cache(self, seed: bytes) -> Any:
        self.seeds.append(seed)
        if seed and self.corrupt == "none":
            return None
        if seed and self.corrupt == "raise":
            raise RuntimeError("Failed to deserialize timing cache")
        return SimpleNamespace(seed=seed)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        return True


@pytest.mark.parametrize("corrupt", ["none", "raise"])
def test_corrupt_timing_cache_is_discarded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    (tmp_path / "trt").mkdir()
    (tmp_path / engines.DEFAULT_TIMING_CACHE).write_bytes(b"garbage")
    resolved = engines._Resolved("tensorrt", "", fake_trt(FakeCuda()), GPU, object())
    builder = engines._TensorRTBuilder(
        tmp_path, engines.BuildConfig(), load_manifest(make_bundle(tmp_path / "b")), resolved
    )
    config = FakeBuilderConfig(corrupt)
    with caplog.at_level(logging.WARNING):
        builder._attach_timing_cache(config)
    assert config.seeds == [b"garbage", b""]
    assert "unreadable timing cache" in caplog.text and "discarding" in caplog.text


def test_layer_precisions_and_the_fp32_body_warning() -> None:
    def layer(dtype: str) -> Any:
        return SimpleNamespace(num_outputs=1, get_output=lambda i: SimpleNamespace(dtype=f"DataType.{dtype}"))

    layers = [layer("HALF"), layer("HALF"), layer("INT8"), layer("FLOAT")]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    counts = engines.layer_precisions(network)
    assert counts == {"FLOAT": 1, "HALF": 2, "INT8": 1}
    assert engines.precision_note("int8", counts) == ""
    assert "FP32 body" in engines.precision_note("int8", {"FLOAT": 40, "INT8": 10})
    assert engines.precision_note("fp16", {"FLOAT": 40}) == ""


# ---------------------------------------------------------------------------------------------
# ONNX Runtime GPU providers


SPECS = (TensorSpec("image", ("batch", 1, 384, 384), "uint8", "image"),)


def test_provider_lists_and_strictness() -> None:
    assert resolve_providers("tensorrt", [TRT, CUDA, CPU]) == [TRT, CUDA]
    assert resolve_providers("tensorrt", [TRT, CPU]) == [TRT]
    assert resolve_providers("cuda", [TRT, CUDA, CPU]) == [CUDA]
    assert resolve_providers(None, [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]
    assert [strict_fallback(p) for p in (None, "cpu", "cuda", "tensorrt")] == [False, False, True, True]


def test_tensorrt_provider_options_carry_profile_caches_and_device(tmp_path: Path) -> None:
    settings = GpuSettings(
        device=1,
        batch=BatchRange(1, 4, 8),
        workspace_mib=512,
        engine_cache=tmp_path / "e",
        timing_cache=tmp_path / "t",
        int8=True,
    )
    options = tensorrt_provider_options(settings, SPECS)
    assert options == {
        "device_id": 1,
        "trt_max_workspace_size": 512 << 20,
        "trt_fp16_enable": False,
        "trt_int8_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "e"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "t"),
        "trt_profile_min_shapes": "image:1x1x384x384",
        "trt_profile_opt_shapes": "image:4x1x384x384",
        "trt_profile_max_shapes": "image:8x1x384x384",
    }
    fixed = (TensorSpec("image", (2, 1, 64, 64), "uint8"),)
    assert "trt_profile_min_shapes" not in tensorrt_provider_options(settings, fixed)  # nothing dynamic
    assert "trt_engine_cache_enable" not in tensorrt_provider_options(GpuSettings(), SPECS)


def test_profile_shapes_need_fixed_image_axes() -> None:
    two = (*SPECS, TensorSpec("mask", ("batch", 1, 8, 8), "float32"))
    assert profile_shapes(two, 2) == "image:2x1x384x384,mask:2x1x8x8"
    with pytest.raises(BackendError, match="dynamic axes besides the batch"):
        profile_shapes((TensorSpec("image", ("batch", 1, "h", "w"), "uint8"),), 1)


def test_cuda_provider_options_fit_two_sessions_on_a_small_card() -> None:
    assert cuda_provider_options(GpuSettings(device=2, gpu_mem_limit_mib=1536)) == {
        "device_id": 2,
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": 1536 << 20,
    }
    assert "gpu_mem_limit" not in cuda_provider_options(GpuSettings())
    with pytest.raises(ValueError, match="device must be"):
        GpuSettings(device=-1)


def test_create_backend_keys_the_engine_cache_by_sha256(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    selection = select_model(manifest, "classifier", "fp32", "onnxruntime", "cpu")
    backend = create_backend(bundle, manifest, selection, device=1)
    assert isinstance(backend, OnnxRuntimeBackend)
    entry = selection.entry
    assert backend.gpu.engine_cache == ort_tensorrt_cache_dir(bundle, entry)
    assert backend.gpu.engine_cache.name == entry.sha256[:16] and backend.gpu.device == 1
    assert backend.gpu.batch == DEFAULT_BATCH["classifier"] and backend.inputs == entry.inputs
    # A re-export with other weights gets another folder, never the old engine.
    other = ModelEntry(**{**entry.__dict__, "sha256": "f" * 64})
    assert ort_tensorrt_cache_dir(bundle, other) != backend.gpu.engine_cache


def test_node_assignment_is_recorded(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    with OnnxRuntimeBackend(bundle / "classifier.fp32.onnx", provider="cpu") as backend:
        assignment = backend.node_assignment
    if assignment:  # onnxruntime >= 1.23 records it
        assert set(assignment) == {CPU} and sum(assignment[CPU].values()) > 3
    fake = [
        SimpleNamespace(ep_name=TRT, get_nodes=lambda: [SimpleNamespace(op_type="Conv")] * 3),
        SimpleNamespace(ep_name=CPU, get_nodes=lambda: [SimpleNamespace(op_type="Shape")]),
    ]
    assert summarise_assignment(fake) == {TRT: {"Conv": 3}, CPU: {"Shape": 1}}


# ---------------------------------------------------------------------------------------------
# NVML sampler


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.used = [1000, 1500, 1300, 1300]
        self.calls = 0
        self.shut = False

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index:
            raise self.NVMLError("Invalid Argument")
        return "gpu0"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"Fake RTX 3050"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        value = self.used[min(self.calls, len(self.used) - 1)]
        self.calls += 1
        return SimpleNamespace(total=4096 << 20, used=value << 20)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [SimpleNamespace(pid=42, usedGpuMemory=300 << 20), SimpleNamespace(pid=7, usedGpuMemory=None)]

    def nvmlShutdown(self) -> None:
        self.shut = True


def test_nvml_sampler_reports_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setattr(gpu_memory, "load_nvml", lambda: nvml)
    with GpuMemorySampler(device=0, interval_s=60, pid=42) as sampler:
        sampler.sample()
    report = sampler.report()
    assert report.available and report.name == "Fake RTX 3050" and report.total_mib == 4096
    assert (report.baseline_mib, report.peak_mib, report.peak_rise_mib) == (1000, 1500, 500)
    assert report.peak_process_mib == 300 and report.samples == 3 and nvml.shut


def test_nvml_sampler_is_inactive_without_nvml_or_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_memory, "load_nvml", lambda: None)
    with GpuMemorySampler() as sampler:
        pass
    assert not sampler.report().available and sampler.report().peak_process_mib is None
    nvml = FakeNvml()
    monkeypatch.setattr(gpu_memory, "load_nvml", lambda: nvml)
    with GpuMemorySampler(device=3) as sampler:
        pass
    assert not sampler.report().available and nvml.shut


# ---------------------------------------------------------------------------------------------
# TensorRT-RTX plugin provider (onnxruntime replaced by a fake with the plugin-EP API)

NV_RTX = "NvTensorRTRTXExecutionProvider"


class FakeSessionOptions:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.devices: list[Any] = []
        self.provider_options: dict[str, str] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value

    def add_provider_for_devices(self, devices: list[Any], options: dict[str, str]) -> None:
        self.devices, self.provider_options = devices, options


class FakeSession:
    def __init__(self, path: str, sess_options: FakeSessionOptions, providers: Any = None) -> None:
        self.options = sess_options

    def get_providers(self) -> list[str]:
        return [NV_RTX]

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="image", shape=["batch", 1, 384, 384], type="tensor(uint8)")]

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="prob")]

    def get_provider_graph_assignment_info(self) -> list[Any]:
        return [SimpleNamespace(ep_name=NV_RTX, get_nodes=lambda: [SimpleNamespace(op_type="Conv")])]


def _fake_ort(devices: int) -> Any:
    """An onnxruntime module stand-in with the plugin-EP API (a module, so it can be a cache key)."""
    import types

    registered: list[tuple[str, str]] = []
    ort: Any = types.ModuleType("fake_onnxruntime")
    ort.__version__ = "1.32.0"
    ort.SessionOptions = FakeSessionOptions
    ort.InferenceSession = FakeSession
    ort.ExecutionMode = SimpleNamespace(ORT_SEQUENTIAL=0)
    ort.GraphOptimizationLevel = SimpleNamespace(ORT_DISABLE_ALL=0, ORT_ENABLE_ALL=99)
    ort.get_available_providers = lambda: [CPU]
    ort.register_execution_provider_library = lambda name, path: registered.append((name, path))
    ort.get_ep_devices = lambda: [
        SimpleNamespace(ep_name="OtherEP"),
        *(SimpleNamespace(ep_name=NV_RTX, n=i) for i in range(devices)),
    ]
    ort.registered = registered
    return ort


def _use_fake_ort(monkeypatch: pytest.MonkeyPatch, ort: Any, plugin: bool = True) -> None:
    import sys
    import types

    import spine_edge.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "import_onnxruntime", lambda: ort)
    if plugin:
        module = types.ModuleType(ort_backend.RTX_PLUGIN)
        module.get_ep_name = lambda: NV_RTX  # type: ignore[attr-defined]
        module.get_library_path = lambda: "/site-packages/libonnxruntime_providers_nv_tensorrt_rtx.so"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, ort_backend.RTX_PLUGIN, module)
    else:
        monkeypatch.setitem(sys.modules, ort_backend.RTX_PLUGIN, None)  # import fails


def test_tensorrt_rtx_provider_is_registered_and_attached_to_the_chosen_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ort = _fake_ort(devices=2)
    _use_fake_ort(monkeypatch, ort)
    model = tmp_path / "classifier.fp16.onnx"
    model.write_bytes(b"graph")
    settings = GpuSettings(device=1, batch=BatchRange(1, 2, 4), engine_cache=tmp_path / "cache" / "abc")
    with OnnxRuntimeBackend(model, provider="tensorrt-rtx", gpu=settings, inputs=SPECS) as backend:
        session = backend._session
        assert backend.provider == NV_RTX and backend.max_batch == 4
        assert backend.node_assignment == {NV_RTX: {"Conv": 1}}
    assert ort.registered == [(NV_RTX, "/site-packages/libonnxruntime_providers_nv_tensorrt_rtx.so")]
    options = session.options
    assert [d.n for d in options.devices] == [1]
    assert options.entries["session.disable_cpu_ep_fallback"] == "1"
    assert options.provider_options == {
        "device_id": "1",
        "nv_max_workspace_size": str(1024 << 20),
        "nv_runtime_cache_path": str(tmp_path / "cache" / "abc"),
        "nv_profile_min_shapes": "image:1x1x384x384",
        "nv_profile_opt_shapes": "image:2x1x384x384",
        "nv_profile_max_shapes": "image:4x1x384x384",
    }
    assert (tmp_path / "cache" / "abc").is_dir()
    assert resolve_providers("tensorrt-rtx", [CPU]) == [NV_RTX] and strict_fallback("tensorrt-rtx")


def test_tensorrt_rtx_without_plugin_or_gpu_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"graph")
    _use_fake_ort(monkeypatch, _fake_ort(devices=1), plugin=False)
    with pytest.raises(MissingDependencyError, match=r"spine-edge\[gpu-rtx-cu12\]"):
        OnnxRuntimeBackend(model, provider="tensorrt-rtx").activate()
    _use_fake_ort(monkeypatch, _fake_ort(devices=0))
    with pytest.raises(BackendError, match=r"no supported GPU.*Ampere"):
        OnnxRuntimeBackend(model, provider="tensorrt-rtx").activate()
    _use_fake_ort(monkeypatch, _fake_ort(devices=1))
    with pytest.raises(BackendError, match="device 3 does not exist"):
        OnnxRuntimeBackend(model, provider="tensorrt-rtx", gpu=GpuSettings(device=3)).activate()


def test_cuda_errors_carry_the_right_hint() -> None:
    from spine_edge.backends.cuda import CudaBindingsApi

    class Err(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35

    runtime = SimpleNamespace(
        cudaError_t=Err,
        cudaGetErrorString=lambda err: (Err.cudaSuccess, err.name.encode()),
        cudaSetDevice=lambda device: (Err.cudaErrorInsufficientDriver,),
        cudaMalloc=lambda nbytes: (Err.cudaErrorMemoryAllocation, 0),
        cudaFree=lambda ptr: (Err.cudaSuccess,),
    )
    api = CudaBindingsApi(runtime)
    with pytest.raises(BackendError, match=r"cudaSetDevice failed: cudaErrorInsufficientDriver.*R580"):
        api.set_device(0)
    with pytest.raises(BackendError, match=r"cudaMalloc failed.*not enough GPU memory.*--max-batch"):
        api.malloc(16)
    api.free(0x10)


# ---------------------------------------------------------------------------------------------
# build-engines on TensorRT, end to end: the "plan" is the ONNX graph run by ONNX Runtime behind
# fake TensorRT/CUDA objects, so building, deserialising, the parity check and refusal all run here.

_ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}


class OrtEngine:
    """A deserialised 'plan': tensors and profile like TensorRT's, execution by ONNX Runtime."""

    def __init__(self, onnx_path: str, cuda: FakeCuda, invert: bool) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.cuda, self.invert = cuda, invert
        self.io: dict[str, tuple[IOMode, tuple[int, ...], Any]] = {}
        for mode, args in ((IOMode.INPUT, self.session.get_inputs()), (IOMode.OUTPUT, self.session.get_outputs())):
            for arg in args:
                shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
                self.io[arg.name] = (mode, shape, _ORT_TYPES[arg.type])
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> IOMode:
        return self.io[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name][1]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.io[name][2]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        rest = self.io[name][1][1:]
        return [(1, *rest), (4, *rest), (8, *rest)]

    def create_execution_context(self) -> OrtContext:
        return OrtContext(self)


class OrtContext:
    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.inputs[name] = tuple(shape)
        return shape[0] <= 8

    def _feeds(self, read: bool) -> dict[str, np.ndarray]:
        feeds = {}
        for name, shape in self.inputs.items():
            dtype = self.engine.io[name][2]
            raw = self.engine.cuda.memory[self.addresses[name]] if read else None
            size = int(np.prod(shape))
            feeds[name] = (
                raw[: size * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
                if raw is not None
                else (np.zeros(shape, dtype))
            )
        return feeds

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.inputs:
            return self.inputs[name]
        index = [o.name for o in self.engine.session.get_outputs()].index(name)
        return tuple(self.engine.session.run(None, self._feeds(read=False))[index].shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        outputs = self.engine.session.run(None, self._feeds(read=True))
        for arg, value in zip(self.engine.session.get_outputs(), outputs, strict=True):
            if arg.name == "prob" and self.engine.invert:
                value = (1 - value).astype(np.float32)  # a broken plan
            flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            self.engine.cuda.memory[self.addresses[arg.name]][: flat.size] = flat
        return True


def _building_trt(cuda: FakeCuda, invert: bool = False) -> Any:
    """A tensorrt stand-in whose builder 'serialises' the ONNX path and whose runtime runs it."""
    trt = fake_trt(cuda)

    class Network:
        def __init__(self) -> None:
            self.path = ""
            self.num_layers = 2

        @property
        def num_inputs(self) -> int:
            return 1

        def get_input(self, index: int) -> Any:
            import onnx

            graph_input = onnx.load(self.path).graph.input[0]
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in graph_input.type.tensor_type.shape.dim)
            return SimpleNamespace(name=graph_input.name, shape=dims)

        def get_layer(self, index: int) -> Any:
            return SimpleNamespace(num_outputs=1, get_output=lambda i: SimpleNamespace(dtype="DataType.FLOAT"))

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            self.network.path = path
            return True

    class Config:
        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.workspace = size

        def add_optimization_profile(self, profile: Any) -> None:
            self.profile = profile

        def create_timing_cache(self, seed: bytes) -> Any:
            return SimpleNamespace(serialize=lambda: b"timing")

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Any:
            return SimpleNamespace(set_shape=lambda name, lo, opt, hi: None)

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            return network.path.encode()

    trt.Builder = Builder
    trt.OnnxParser = Parser
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)
    trt.Runtime = lambda logger: SimpleNamespace(
        deserialize_cuda_engine=lambda data: OrtEngine(bytes(data).decode(), cuda, invert)
    )
    return trt


def _patch_build(monkeypatch: pytest.MonkeyPatch, trt: Any, cuda: FakeCuda) -> None:
    for module in (engines, tensorrt_backend):
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(module, "load_cuda", lambda device=None: cuda)


def test_tensorrt_build_records_plans_that_reproduce_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    _patch_build(monkeypatch, _building_trt(cuda), cuda)
    bundle = make_bundle(tmp_path)
    report = engines.build_engines(bundle, engines.BuildConfig(target="tensorrt", device=0))
    assert report.target == "tensorrt" and report.ok, report.failed
    assert [(m.role, m.precision) for m in report.built] == [("classifier", "fp32"), ("detector", "fp32")]
    assert [m.parity.split(" (")[0] for m in report.built] == ["parity ok at batch 1/8", "parity ok at batch 1/4"]
    plans = [e for e in load_manifest(bundle).models if e.format == "tensorrt"]  # verifies every sha256
    for entry in plans:
        assert entry.build is not None and entry.file.startswith("trt/")
        assert entry.build.parity["passed"] and entry.build.parity["canvases"] == "synthetic"
        assert entry.build.parity["batches"] == [1, entry.build.max_batch]
        assert "strongly-typed" in entry.build.build_flags and "layers=float:2" in entry.build.build_flags
    assert (bundle / report.timing_cache).read_bytes() == b"timing"
    assert cuda.memory == {}  # every parity run released its buffers


def test_tensorrt_build_refuses_a_plan_that_breaks_its_gates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    _patch_build(monkeypatch, _building_trt(cuda, invert=True), cuda)
    bundle = make_bundle(tmp_path)
    report = engines.build_engines(bundle, engines.BuildConfig(target="tensorrt"))
    assert [(f.role, f.precision) for f in report.failed] == [("classifier", "fp32")]
    assert "does not reproduce ONNX Runtime FP32" in report.failed[0].message
    assert "batch 1: max |Δprob|" in report.failed[0].message and "flipped" in report.failed[0].message
    assert [m.role for m in report.built] == ["detector"]
    manifest = load_manifest(bundle)
    assert manifest.find("classifier", "fp32", "tensorrt") is None
    assert sorted(p.name for p in (bundle / "trt").glob("*.plan")) == [
        Path(manifest.find("detector", "fp32", "tensorrt").file).name
    ]  # type: ignore[union-attr]


def test_cli_builds_on_the_chosen_device_and_prints_each_parity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from spine_edge.cli import main

    cuda = FakeCuda()
    trt = _building_trt(cuda)
    asked: list[int | None] = []

    def load(device: int | None = None) -> FakeCuda:
        asked.append(device)
        return cuda

    for module in (engines, tensorrt_backend):
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(module, "load_cuda", load)
    bundle = make_bundle(tmp_path)
    result = CliRunner().invoke(main, ["build-engines", str(bundle), "--target", "tensorrt", "--device", "1"])
    assert result.exit_code == 0, result.output
    assert "device 1" in result.output and result.output.count("parity ok at batch") == 2
    assert set(asked) == {1}  # the build and every parity run used device 1
    result = CliRunner().invoke(main, ["build-engines", str(bundle), "--target", "tensorrt", "--no-parity"])
    assert result.exit_code == 0, result.output
    assert "parity" not in result.output
