"""Native TensorRT backend (TensorRT 10/11 named-tensor API, ``execute_async_v3``).

A plan only runs on the TensorRT version and GPU model it was built with. The bundle records both
(``BuildInfo``), and :func:`check_plan_compatible` compares them with this box *before*
deserialising, so a mismatch is one clear line instead of a TensorRT stack trace.

Buffers are allocated once, for the optimisation profile's largest shapes, and reused: device
memory per tensor, page-locked host memory per tensor, one CUDA stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.backends.cuda import CudaApi, GpuInfo, load_cuda
from spine_edge.bundle import BuildInfo, TensorSpec
from spine_edge.errors import BackendError, BundleError, MissingDependencyError

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """Import tensorrt, or explain which extra provides it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "gpu", "The native TensorRT backend") from exc
    except OSError as exc:  # the wheel is there but libnvinfer or CUDA libraries are not
        raise BackendError(f"tensorrt is installed but its libraries do not load ({exc}); reinstall spine-edge[gpu]") from exc
    return tensorrt


def check_plan_compatible(path: Path, build: BuildInfo | None, gpu: GpuInfo, trt_version: str, bundle: Path) -> None:
    """Refuse a plan built for another GPU or another TensorRT version.

    TensorRT plans are specific to the exact TensorRT version and GPU model they were built with
    (unless built as version/hardware compatible, which ``build-engines`` does not do: those trade
    speed for portability, and the box builds its own plans anyway).

    Args:
        path: The plan file.
        build: Its build record from the manifest.
        gpu: This box's GPU.
        trt_version: ``tensorrt.__version__`` here.
        bundle: The bundle folder, for the command in the message.

    Raises:
        BundleError: Naming what differs and the ``spine-edge build-engines`` command to run.
    """
    rebuild = f"rebuild the engines on this box: spine-edge build-engines {bundle}"
    if build is None or build.builder != "tensorrt":
        raise BundleError(f"{path}: the manifest has no TensorRT build record for this plan; {rebuild}")
    if build.builder_version != trt_version:
        raise BundleError(
            f"{path}: built with TensorRT {build.builder_version}, this box has TensorRT {trt_version}; {rebuild}"
        )
    if build.compute_capability != gpu.compute_capability or build.device != gpu.name:
        raise BundleError(
            f"{path}: built for {build.device} (compute capability {build.compute_capability}), this box has "
            f"{gpu.name} (compute capability {gpu.compute_capability}); {rebuild}"
        )


@dataclass(frozen=True)
class _Binding:
    """One I/O tensor with its reused buffers."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # engine shape, -1 for dynamic axes
    max_shape: tuple[int, ...]
    device: int  # device address
    host: np.ndarray  # pinned, flat uint8, max_shape's bytes


class TensorRTBackend(Backend):
    """Runs a TensorRT plan built by ``spine-edge build-engines`` for this box.

    Args:
        path: The ``.plan`` file.
        build: Its manifest build record (checked against this GPU and TensorRT before loading).
        bundle: The bundle folder (named in error messages).
        device: CUDA device index.

    Example:
        >>> with TensorRTBackend(plan, entry.build, bundle) as b:  # doctest: +SKIP
        ...     probs = b.infer({"image": batch})["prob"]
    """

    kind = "tensorrt"

    def __init__(self, path: str | Path, build: BuildInfo | None, bundle: str | Path, device: int = 0) -> None:
        super().__init__(path)
        self.build = build
        self.bundle = Path(bundle)
        self.device = device
        self._cuda: CudaApi | None = None
        self._gpu: GpuInfo | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._bindings: dict[str, _Binding] = {}

    def _activate(self) -> None:
        trt = import_tensorrt()
        cuda = load_cuda()
        gpu = cuda.device_info(self.device)
        check_plan_compatible(self.path, self.build, gpu, trt.__version__, self.bundle)
        self._cuda, self._gpu = cuda, gpu
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BundleError(
                f"{self.path}: TensorRT could not deserialise the plan (see its log above); "
                f"rebuild it: spine-edge build-engines {self.bundle}"
            )
        self._context = self._engine.create_execution_context()
        try:
            self._allocate(trt)
        except BaseException:
            self._deactivate()
            raise
        log.info("%s: TensorRT %s on %s (%s)", self.path.name, trt.__version__, gpu.name, cuda.binding)

    def _allocate(self, trt: Any) -> None:
        engine, context, cuda = self._engine, self._context, self._cuda
        assert cuda is not None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        input_max: dict[str, tuple[int, ...]] = {}
        for name in inputs:
            shape = tuple(engine.get_tensor_shape(name))
            input_max[name] = tuple(engine.get_tensor_profile_shape(name, 0)[2]) if -1 in shape else shape
            context.set_input_shape(name, input_max[name])
        self._stream = cuda.stream_create()
        for name in names:
            is_input = name in input_max
            max_shape = input_max[name] if is_input else tuple(context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            nbytes = max(1, math.prod(max_shape) * dtype.itemsize)
            device = cuda.malloc(nbytes)
            try:
                host = cuda.malloc_host(nbytes)
            except BaseException:
                cuda.free(device)
                raise
            self._bindings[name] = _Binding(
                name, is_input, dtype, tuple(engine.get_tensor_shape(name)), max_shape, device, host
            )
            context.set_tensor_address(name, device)

    def _input_specs(self) -> dict[str, TensorSpec]:
        return {
            b.name: TensorSpec(b.name, tuple("batch" if d == -1 else d for d in b.shape), b.dtype.name)
            for b in self._bindings.values()
            if b.is_input
        }

    def _output_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self._bindings.values() if not b.is_input)

    def _provider(self) -> str:
        assert self._gpu is not None
        return self._gpu.name

    def _max_batch(self) -> int | None:
        return next(b.max_shape[0] for b in self._bindings.values() if b.is_input)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context = self._cuda, self._context
        assert cuda is not None
        for name, array in feeds.items():
            binding = self._bindings[name]
            if any(d > m for d, m in zip(array.shape, binding.max_shape, strict=True)):
                raise BackendError(f"{self.path.name}: input {name!r} shape {array.shape} exceeds the plan's {binding.max_shape}")
            if not context.set_input_shape(name, array.shape):
                raise BackendError(f"{self.path.name}: TensorRT rejected input shape {array.shape} for {name!r}")
            staged = binding.host[: array.nbytes]
            np.copyto(staged.view(binding.dtype).reshape(array.shape), array)
            cuda.memcpy_htod_async(binding.device, staged, self._stream)
        if not context.execute_async_v3(cuda.stream_handle(self._stream)):
            raise BackendError(f"{self.path.name}: TensorRT execution failed (see its log above)")
        shapes: dict[str, tuple[int, ...]] = {}
        for binding in self._bindings.values():
            if binding.is_input:
                continue
            shapes[binding.name] = tuple(context.get_tensor_shape(binding.name))
            nbytes = math.prod(shapes[binding.name]) * binding.dtype.itemsize
            cuda.memcpy_dtoh_async(binding.host[:nbytes], binding.device, self._stream)
        cuda.stream_synchronize(self._stream)
        # Copies: the pinned buffers are overwritten by the next batch.
        return {
            name: binding.host[: math.prod(shapes[name]) * binding.dtype.itemsize].view(binding.dtype).reshape(shapes[name]).copy()
            for name, binding in self._bindings.items()
            if not binding.is_input
        }

    def _deactivate(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            if self._stream is not None:
                cuda.stream_synchronize(self._stream)
            for binding in self._bindings.values():
                cuda.free(binding.device)
                cuda.free_host(binding.host)
            if self._stream is not None:
                cuda.stream_destroy(self._stream)
        self._bindings = {}
        self._stream = None
        # Context before engine before runtime: TensorRT's ownership order.
        self._context = None
        self._engine = None
        self._runtime = None
