"""ONNX Runtime backend: CPU by default, CUDA and TensorRT execution providers where installed.

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start (no driver, missing
CUDA libraries): it logs an error and returns a working session. This backend compares the providers
it asked for with ``session.get_providers()`` and reports what actually runs; when a GPU provider
was asked for explicitly, the fallback is an error instead of a slow surprise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.bundle import TensorSpec
from spine_edge.errors import BackendError, MissingDependencyError

log = logging.getLogger(__name__)

ProviderChoice = Literal["cpu", "cuda", "tensorrt"]

#: Short names accepted by ``--provider`` and the ONNX Runtime provider each selects.
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: Automatic choice: the fastest provider this onnxruntime build offers first.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "cuda", "cpu")

_ORT_DTYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def import_onnxruntime() -> Any:
    """Import onnxruntime, or explain which extra provides it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "The ONNX Runtime backend") from exc
    return onnxruntime


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_model_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (``build-engines`` records it for CPU builds)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def resolve_providers(provider: ProviderChoice | None, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime providers to request, best first, always ending with the CPU.

    Args:
        provider: A short name from ``PROVIDERS``, or None for the fastest available.
        available: ``onnxruntime.get_available_providers()``.

    Raises:
        BackendError: The requested provider is not part of this onnxruntime build.
    """
    if provider is None:
        chosen = [PROVIDERS[p] for p in AUTO_ORDER if PROVIDERS[p] in available]
        return chosen if PROVIDERS["cpu"] in chosen else [*chosen, PROVIDERS["cpu"]]
    if provider not in PROVIDERS:
        raise BackendError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in available:
        raise BackendError(
            f"this onnxruntime build has no {name} (it offers {', '.join(available)}): install "
            "onnxruntime-gpu (pip install 'spine-edge[gpu-ort]') in place of onnxruntime, or use --provider cpu"
        )
    return [name] if provider == "cpu" else [name, PROVIDERS["cpu"]]


def check_providers(path: Path, requested: Sequence[str], actual: Sequence[str], explicit: bool) -> str:
    """Compare requested and running providers; return the one that runs the graph.

    Raises:
        BackendError: An explicitly requested GPU provider did not start.
    """
    wanted, running = requested[0], actual[0] if actual else PROVIDERS["cpu"]
    if wanted != running:
        message = (
            f"{path.name}: {wanted} did not start (no NVIDIA driver, or CUDA/cuDNN/TensorRT libraries not found), "
            f"ONNX Runtime is running it on {running}"
        )
        if explicit:
            raise BackendError(message + "; fix the GPU setup (nvidia-smi must work) or use --provider cpu")
        log.warning("%s", message)
    return running


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX file with ONNX Runtime.

    Args:
        path: The ``.onnx`` file.
        provider: ``cpu``, ``cuda``, ``tensorrt``, or None for the fastest available.
        threads: Intra-op threads; defaults to the cores this process may use.
        pre_optimized: The file is ONNX Runtime's own optimised graph for this CPU (written by
            ``build-engines``), so the session skips re-optimising it.
        fp16: Let the TensorRT provider build FP16 kernels (an FP32 graph becomes an FP16 engine).
        cache_dir: Where the TensorRT provider caches its engines, or None for no cache.

    Example:
        >>> with OnnxRuntimeBackend("classifier.fp32.onnx", provider="cpu") as b:  # doctest: +SKIP
        ...     b.infer({"image": np.zeros((1, 1, 384, 384), np.uint8)})["prob"]
    """

    kind = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        provider: ProviderChoice | None = None,
        threads: int | None = None,
        pre_optimized: bool = False,
        fp16: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(path)
        self.requested_provider = provider
        self.threads = threads or available_cores()
        self.pre_optimized = pre_optimized
        self.fp16 = fp16
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._session: Any = None
        self._specs: dict[str, TensorSpec] = {}
        self._outputs: tuple[str, ...] = ()
        self._running = ""

    def _activate(self) -> None:
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise BackendError(f"{self.path}: model file not found; copy the whole bundle folder again")
        requested = resolve_providers(self.requested_provider, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One graph per session and batches run one after another: inter-op threads would only compete.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if self.pre_optimized else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=[(p, self._provider_options(p)) for p in requested]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({exc}); re-export the bundle") from exc
        self._running = check_providers(
            self.path, requested, self._session.get_providers(), explicit=self.requested_provider not in (None, "cpu")
        )
        self._specs = {
            arg.name: TensorSpec(arg.name, tuple(d if isinstance(d, int) else str(d) for d in arg.shape), _ORT_DTYPES.get(arg.type, arg.type))
            for arg in self._session.get_inputs()
        }
        self._outputs = tuple(arg.name for arg in self._session.get_outputs())
        log.info("%s: onnxruntime %s on %s, %d threads", self.path.name, ort.__version__, self._running, self.threads)

    def _provider_options(self, provider: str) -> dict[str, Any]:
        if provider != PROVIDERS["tensorrt"]:
            return {}
        options: dict[str, Any] = {"trt_fp16_enable": self.fp16}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.cache_dir)}
        return options

    def _input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def _output_names(self) -> tuple[str, ...]:
        return self._outputs

    def _provider(self) -> str:
        return self._running

    def _max_batch(self) -> int | None:
        batch = next(iter(self._specs.values())).shape[0]
        return batch if isinstance(batch, int) and batch > 0 else None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(list(self._outputs), {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as exc:  # onnxruntime's error types live in its C extension
            raise BackendError(f"{self.path.name}: ONNX Runtime failed to run a batch ({exc})") from exc
        return dict(zip(self._outputs, outputs, strict=True))

    def _deactivate(self) -> None:
        self._session = None
