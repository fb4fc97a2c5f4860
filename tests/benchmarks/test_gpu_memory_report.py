"""GPU memory in ``bench`` through NVML: figures where it answers, "not measured" where it does not (CPU-side)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import spine_edge.gpu_memory as gpu_memory
from spine_edge.benchmarks import environment, run
from spine_edge.benchmarks.config import BenchConfig
from spine_edge.benchmarks.environment import uses_gpu
from spine_edge.benchmarks.latency import ResourceMeter, Resources, gpu_memory_note
from spine_edge.benchmarks.report import format_table
from spine_edge.cascade import CascadeConfig
from spine_edge.gpu_memory import GpuMemoryReport
from tests.spine_edge.bundle_factory import make_bundle


class FakeNvml:
    """The few pynvml calls the sampler makes: 1000 MiB used at start, 1400 MiB after, 300 MiB ours."""

    NVMLError = RuntimeError

    def __init__(self) -> None:
        self.calls = 0

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"Fake RTX 3050"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        used = 1000 if self.calls == 0 else 1400
        self.calls += 1
        return SimpleNamespace(total=4096 << 20, used=used << 20)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [SimpleNamespace(pid=42, usedGpuMemory=300 << 20)]

    def nvmlShutdown(self) -> None:
        pass


def test_without_nvml_a_gpu_run_reports_none_and_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_memory, "load_nvml", lambda: None)
    with ResourceMeter(gpu=True, device=1) as meter:
        pass
    resources = meter.resources
    assert resources is not None and resources.gpu is not None and resources.gpu.device == 1
    assert resources.gpu_peak_mb is None and resources.gpu_process_mb is None
    record = resources.to_dict()
    assert record["gpu_memory"] == "not measured"
    assert record["gpu_peak_mb"] is None and record["gpu_process_mb"] is None
    assert gpu_memory_note({"fp32": resources}).startswith("GPU memory not measured: NVML did not answer")


def test_a_cpu_run_samples_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("NVML asked on a CPU run")

    monkeypatch.setattr(gpu_memory, "load_nvml", fail)
    with ResourceMeter(gpu=False) as meter:
        pass
    assert meter.resources is not None and meter.resources.gpu is None
    assert meter.resources.to_dict()["gpu_memory"] == "not used"


def test_nvml_figures_reach_the_record_and_the_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_memory, "load_nvml", FakeNvml)
    monkeypatch.setattr(gpu_memory.os, "getpid", lambda: 42)
    with ResourceMeter(gpu=True) as meter:
        pass
    assert meter.resources is not None
    record = meter.resources.to_dict()
    assert record["gpu_memory"] == "measured"
    assert (record["gpu_peak_mb"], record["gpu_process_mb"]) == (400.0, 300.0)
    unmeasured = Resources(1.0, True, GpuMemoryReport(device=0))
    note = gpu_memory_note({"fp32": meter.resources, "fp16": unmeasured, "int8": None})
    assert note == (
        "GPU memory (NVML, GPU 0 Fake RTX 3050, 4096 MiB): peak fp32 300 MiB by this process "
        "(+400 MiB device-wide); not measured for fp16"
    )


def test_uses_gpu_counts_every_gpu_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uses_gpu("tensorrt", None)
    assert uses_gpu("onnxruntime", "tensorrt-rtx")
    assert uses_gpu("onnxruntime", "cuda") and uses_gpu("onnxruntime", "tensorrt")
    assert not uses_gpu("onnxruntime", "cpu") and not uses_gpu("openvino", None)
    offered: list[str] = []
    monkeypatch.setattr(
        environment, "import_onnxruntime", lambda: SimpleNamespace(get_available_providers=lambda: offered)
    )
    offered[:] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert uses_gpu("onnxruntime", None)
    # The automatic choice never takes the TensorRT-RTX plugin, so its presence alone means a CPU run.
    offered[:] = ["NvTensorRTRTXExecutionProvider", "CPUExecutionProvider"]
    assert not uses_gpu("onnxruntime", None)


def test_bench_report_says_not_measured_without_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    # The toy graphs run on the CPU; the run is told it is a GPU run, on a box without NVML.
    monkeypatch.setattr(run, "uses_gpu", lambda backend, provider: True)
    monkeypatch.setattr(gpu_memory, "load_nvml", lambda: None)
    config = BenchConfig(CascadeConfig(bundle, threads=1), precisions=("fp32",), batch_sizes=(1,), runs=2, warmup=0,
                         baseline=False, synthetic_images=1, progress=False)  # fmt: skip
    report = run.run_bench(config)
    fp32 = report.precision("fp32")
    assert fp32 is not None and fp32.resources is not None
    assert fp32.to_dict()["resources"]["gpu_memory"] == "not measured"
    assert fp32.to_dict()["resources"]["gpu_peak_mb"] is None
    assert all(t.resources is not None and t.resources.gpu_peak_mb is None for t in fp32.throughput)
    assert "GPU memory not measured: NVML did not answer" in format_table(report)
