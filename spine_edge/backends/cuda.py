"""The few CUDA runtime calls the TensorRT backend needs, behind one small interface.

NVIDIA's ``cuda-bindings`` (``from cuda.bindings import runtime``) is the supported binding; pycuda is
used when only it is installed. Both are imported lazily by :func:`load_cuda`.
"""

from __future__ import annotations

import abc
import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from spine_edge.errors import BackendError, MissingDependencyError


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
            raise BackendError(f"CUDA {what} failed: {reason} (check the NVIDIA driver with nvidia-smi)")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def device_count(self) -> int:
        return int(self._check(self._rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def device_info(self, device: int = 0) -> GpuInfo:
        props = self._check(self._rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name.strip(), compute_capability=f"{props.major}.{props.minor}")

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


class PyCudaApi(CudaApi):
    """pycuda, for boxes that have it and not cuda-bindings (it creates its own context on device 0)."""

    binding = "pycuda"

    def __init__(self, driver: Any) -> None:
        self._drv = driver
        self._device: dict[int, Any] = {}  # address -> DeviceAllocation, kept alive until free()

    def device_count(self) -> int:
        return int(self._drv.Device.count())

    def device_info(self, device: int = 0) -> GpuInfo:
        dev = self._drv.Device(device)
        major, minor = dev.compute_capability()
        return GpuInfo(name=dev.name().strip(), compute_capability=f"{major}.{minor}")

    def malloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(nbytes)
        self._device[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._device.pop(ptr).free()

    def malloc_host(self, nbytes: int) -> np.ndarray:
        return self._drv.pagelocked_empty(nbytes, np.uint8)

    def free_host(self, array: np.ndarray) -> None:
        array.base.free()

    def stream_create(self) -> Any:
        return self._drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_destroy(self, stream: Any) -> None:
        stream.synchronize()

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._drv.memcpy_htod_async(dst, src, stream)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._drv.memcpy_dtoh_async(dst, src, stream)


def load_cuda() -> CudaApi:
    """The installed CUDA binding: cuda-bindings, else pycuda.

    Raises:
        MissingDependencyError: Neither is installed.
        BackendError: The binding loads but no CUDA device is usable.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        api: CudaApi = CudaBindingsApi(cudart)
    else:
        api = _load_pycuda()
    if not api.device_count():
        raise BackendError("no CUDA device found: run on the GPU box, or use --backend onnxruntime")
    return api


def _load_pycuda() -> PyCudaApi:
    try:
        import pycuda.autoinit  # noqa: F401  (creates the context pycuda's calls need)
        import pycuda.driver as driver
    except ImportError as exc:
        raise MissingDependencyError("cuda-bindings", "gpu", "The native TensorRT backend") from exc
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError when no device or driver
        raise BackendError(f"pycuda cannot open a CUDA device ({exc}); check the NVIDIA driver with nvidia-smi") from exc
    return PyCudaApi(driver)
