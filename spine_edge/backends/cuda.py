"""The few CUDA runtime calls the TensorRT backend needs, behind one small interface.

NVIDIA's ``cuda-bindings`` (``from cuda.bindings import runtime``) is the binding, imported lazily
by :func:`load_cuda`. The current device is per thread in CUDA, so callers that may run on another
thread than the one that loaded a plan call :meth:`CudaApi.set_device` first.
"""

from __future__ import annotations

import abc
import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from spine_edge.errors import BackendError
from spine_edge.support import import_optional

#: The extra that installs TensorRT and cuda-bindings for CUDA 12 (works on R535+ drivers; see README).
GPU_EXTRA = "gpu-cu12"
#: What to do when CUDA does not start: the usual cause on a kiosk is a driver older than the wheels' CUDA.
DRIVER_HINT = (
    "check the NVIDIA driver with nvidia-smi: the CUDA 13 wheels (spine-edge[gpu-cu13]) need driver R580 or "
    "newer, the CUDA 12 ones (spine-edge[gpu-cu12]) R535 or newer; on Jetson use JetPack's TensorRT"
)


#: cudaError_t names that mean the driver, not the program, is the problem.
_DRIVER_ERRORS = frozenset(
    {
        "cudaErrorInsufficientDriver",
        "cudaErrorNoDevice",
        "cudaErrorInitializationError",
        "cudaErrorStubLibrary",
        "cudaErrorSystemDriverMismatch",
        "cudaErrorCompatNotSupportedOnDevice",
        "cudaErrorCallRequiresNewerDriver",
    }
)


def _hint(err: Any) -> str:
    """What to do about a CUDA error, by its kind."""
    name = getattr(err, "name", "")
    if name in _DRIVER_ERRORS:
        return DRIVER_HINT
    if name == "cudaErrorMemoryAllocation":
        return "not enough GPU memory: close other GPU programs, or rebuild the engines with a smaller --max-batch"
    return "check the GPU with nvidia-smi; restart the program after an illegal-address or launch error"


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a TensorRT plan runs on: what ``build-engines`` records and the runtime checks.

    Attributes:
        name: Marketing name, e.g. ``NVIDIA GeForce RTX 3050``.
        compute_capability: ``"major.minor"``, e.g. ``"8.6"``.
    """

    name: str
    compute_capability: str


class CudaApi(abc.ABC):
    """Device memory, pinned host memory, one stream and asynchronous copies."""

    #: Which binding implements it.
    binding: str = ""

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of usable CUDA devices."""

    @abc.abstractmethod
    def device_info(self, device: int = 0) -> GpuInfo:
        """Name and compute capability of a device."""

    @abc.abstractmethod
    def set_device(self, device: int) -> None:
        """Make ``device`` current for the calling thread (TensorRT runs on the current device)."""

    @abc.abstractmethod
    def malloc(self, nbytes: int) -> int:
        """Allocate device memory; returns its address."""

    @abc.abstractmethod
    def free(self, ptr: int) -> None:
        """Free device memory from :meth:`malloc`."""

    @abc.abstractmethod
    def malloc_host(self, nbytes: int) -> np.ndarray:
        """Allocate page-locked host memory, returned as a flat uint8 array."""

    @abc.abstractmethod
    def free_host(self, array: np.ndarray) -> None:
        """Free host memory from :meth:`malloc_host`."""

    @abc.abstractmethod
    def stream_create(self) -> Any:
        """Create a stream."""

    @abc.abstractmethod
    def stream_handle(self, stream: Any) -> int:
        """The raw ``cudaStream_t`` of a stream, as TensorRT's ``execute_async_v3`` takes it."""

    @abc.abstractmethod
    def stream_destroy(self, stream: Any) -> None:
        """Destroy a stream."""

    @abc.abstractmethod
    def stream_synchronize(self, stream: Any) -> None:
        """Wait for all work queued on a stream."""

    @abc.abstractmethod
    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        """Queue a copy of ``src`` (contiguous, ideally pinned) to device address ``dst``."""

    @abc.abstractmethod
    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        """Queue a copy from device address ``src`` into ``dst`` (contiguous, ideally pinned)."""


class CudaBindingsApi(CudaApi):
    """NVIDIA ``cuda-bindings`` (cuda-python 12.8+ / 13)."""

    binding = "cuda-bindings"

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart
        self._host: dict[int, int] = {}  # id(array) -> pinned address, so free_host finds the allocation

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            reason = text.decode() if isinstance(text, bytes) else str(text)
            raise BackendError(f"CUDA {what} failed: {reason} ({_hint(err)})")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def device_count(self) -> int:
        return int(self._check(self._rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def device_info(self, device: int = 0) -> GpuInfo:
        props = self._check(self._rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name.strip(), compute_capability=f"{props.major}.{props.minor}")

    def set_device(self, device: int) -> None:
        self._check(self._rt.cudaSetDevice(device), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> np.ndarray:
        ptr = int(self._check(self._rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        self._host[id(array)] = ptr
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._check(self._rt.cudaFreeHost(self._host.pop(id(array))), "cudaFreeHost")

    def stream_create(self) -> Any:
        return self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def stream_synchronize(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync")


def load_cuda(device: int | None = None) -> CudaApi:
    """NVIDIA's ``cuda-bindings``, checked to see a CUDA device.

    pycuda is deliberately not supported: its context is bound to the thread that imports it,
    while a :class:`~spine_edge.cascade.Cascade` may be called from any thread. cuda-bindings'
    runtime API uses the device's primary context, which every thread shares.

    Args:
        device: Make this device current for the calling thread (None: leave the current one).

    Raises:
        MissingDependencyError: cuda-bindings is not installed.
        BackendError: The driver does not start, no CUDA device is usable, or ``device`` is not one.
    """
    cudart = import_optional("cuda.bindings.runtime", GPU_EXTRA, "The native TensorRT backend")
    api = CudaBindingsApi(cudart)
    count = api.device_count()
    if not count:
        raise BackendError("no CUDA device found: run on the GPU box, or use --backend onnxruntime")
    if device is not None:
        if not 0 <= device < count:
            raise BackendError(
                f"CUDA device {device} does not exist (this box has {count}: 0..{count - 1}); fix --device"
            )
        api.set_device(device)
    return api
