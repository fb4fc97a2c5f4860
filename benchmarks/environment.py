"""The box a benchmark ran on: CPU and GPU names, threads, platform and library versions.

A latency figure means nothing without the machine, threads and library versions behind it, so
every report carries :func:`environment_record`.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

from spine_edge.backends.onnxruntime import (
    AUTO_ORDER,
    GPU_PROVIDERS,
    PROVIDERS,
    ProviderChoice,
    available_cores,
    cpu_model_name,
    import_onnxruntime,
)
from spine_edge.benchmarks.config import BenchConfig
from spine_edge.support import package_versions

#: Distributions whose versions a report records (those installed).
RUNTIME_PACKAGES: tuple[str, ...] = ("spine-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx")


def gpu_name() -> str | None:
    """The first GPU's name as ``nvidia-smi`` reports it, or None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def uses_gpu(backend: str, provider: ProviderChoice | None) -> bool:
    """Whether the graphs will run on a GPU (then GPU memory is measured).

    On ONNX Runtime an explicit provider decides (``cuda``, ``tensorrt`` and ``tensorrt-rtx`` run on
    the GPU); the automatic choice does where this onnxruntime offers a GPU provider of
    :data:`~spine_edge.backends.onnxruntime.AUTO_ORDER` (it never picks the TensorRT-RTX plugin).
    """
    if backend != "onnxruntime":
        return backend == "tensorrt"  # OpenVINO runs on the CPU
    if provider is not None:
        return PROVIDERS[provider] in GPU_PROVIDERS
    automatic = {PROVIDERS[p] for p in AUTO_ORDER} & GPU_PROVIDERS
    return bool(automatic & set(import_onnxruntime().get_available_providers()))


def environment_record(config: BenchConfig, backend: str, gpu: bool) -> dict[str, Any]:
    """What the report's ``environment`` holds.

    Args:
        config: The run's settings (requested provider and threads).
        backend: The library the plan resolved (``onnxruntime`` or ``tensorrt``).
        gpu: Whether the graphs run on a GPU (only then is ``nvidia-smi`` asked for its name).
    """
    return {
        "backend": backend,
        "provider_requested": config.cascade.provider or "auto",
        "threads": config.cascade.threads or available_cores(),
        "cores_available": available_cores(),
        "cpu": cpu_model_name(),
        "gpu": gpu_name() if gpu else None,
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), **package_versions(RUNTIME_PACKAGES)},
    }
