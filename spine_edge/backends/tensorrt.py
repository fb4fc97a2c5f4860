"""Native TensorRT backend (TensorRT 10/11 named-tensor API, ``execute_async_v3``).

A plan only runs on the TensorRT version and GPU model it was built with. The bundle records both
(``BuildInfo``), and :func:`check_plan_compatible` compares them with this box *before*
deserialising, so a mismatch is one clear line instead of a TensorRT stack trace.

Buffers are allocated once, for the optimisation profile's largest shapes, and reused: device
memory per tensor, page-locked host memory per tensor, one CUDA stream. Every TensorRT call whose
result says "failed" (a None object, a False return) is checked and turned into a
:class:`~spine_edge.errors.BackendError` naming what to do, and teardown frees every buffer even
after a CUDA error, reporting the first error rather than the teardown's.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.backends.cuda import DRIVER_HINT, GPU_EXTRA, CudaApi, GpuInfo, load_cuda
from spine_edge.bundle import BuildInfo, TensorSpec
from spine_edge.errors import BackendError, BundleError
from spine_edge.support import import_optional

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """Import tensorrt, or explain which extra provides it.

    Raises:
        MissingDependencyError: tensorrt is not installed.
        BackendError: The wheel is there but its libraries (libnvinfer, CUDA) do not load.
    """
    try:
        return import_optional("tensorrt", GPU_EXTRA, "The native TensorRT backend")
    except OSError as exc:
        raise BackendError(
            f"tensorrt is installed but its libraries do not load ({exc}); reinstall spine-edge[{GPU_EXTRA}] "
            "(or spine-edge[gpu-cu13] with an R580+ driver)"
        ) from exc


@functools.cache
def trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger.

    TensorRT keeps the first logger it is given for every builder, runtime and parser, and warns
    when it meets another.
    """
    return trt.Logger(trt.Logger.WARNING)


def _started(factory: Any, logger: Any, what: str) -> Any:
    """``factory(logger)``, or the driver hint when TensorRT cannot initialise CUDA.

    ``trt.Runtime``/``trt.Builder`` return a null object when CUDA does not start (typically a
    driver older than the wheel's CUDA); pybind11 surfaces that as None or as a TypeError.
    """
    try:
        created = factory(logger)
    except TypeError as exc:
        raise BackendError(f"TensorRT could not create its {what}: CUDA did not start ({exc}); {DRIVER_HINT}") from exc
    if created is None:
        raise BackendError(f"TensorRT could not create its {what}: CUDA did not start; {DRIVER_HINT}")
    return created


def create_runtime(trt: Any, logger: Any) -> Any:
    """A ``trt.Runtime``.

    Raises:
        BackendError: CUDA did not start inside TensorRT (with the driver hint).
    """
    return _started(trt.Runtime, logger, "runtime")


def create_builder(trt: Any, logger: Any) -> Any:
    """A ``trt.Builder``.

    Raises:
        BackendError: CUDA did not start inside TensorRT (with the driver hint).
    """
    return _started(trt.Builder, logger, "builder")


def buffer_shape(name: str, engine_shape: tuple[int, ...], profile_max: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape to allocate an input for: the engine's, with dynamic axes at the profile's maximum.

    Raises:
        BackendError: A dynamic axis without a profile maximum, or profile and engine ranks differ.
    """
    if all(d >= 0 for d in engine_shape):
        return engine_shape
    if profile_max is None or len(profile_max) != len(engine_shape) or any(d < 0 for d in profile_max):
        raise BackendError(
            f"input {name!r} has dynamic shape {engine_shape} but the plan's optimisation profile gives no maximum "
            f"({profile_max}); rebuild it with spine-edge build-engines"
        )
    return profile_max


def buffer_nbytes(name: str, shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of a buffer for ``shape`` (at least 1, so an empty tensor still has an address).

    Raises:
        BackendError: A dimension is still dynamic (-1): its size is only known after execution
            (a data-dependent output), which this backend does not support.
    """
    if any(d < 0 for d in shape):
        raise BackendError(
            f"tensor {name!r} has shape {shape} even at the profile's largest input: a data-dependent output "
            "(e.g. NonMaxSuppression in the graph) needs an output allocator; export the detector with NMS in numpy"
        )
    return max(1, math.prod(shape) * itemsize)


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
        device: CUDA device index; made current on every call, since CUDA's current device is per thread.

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
        self._first_error: BaseException | None = None

    def _activate(self) -> None:
        trt = import_tensorrt()
        cuda = load_cuda(self.device)
        gpu = cuda.device_info(self.device)
        check_plan_compatible(self.path, self.build, gpu, trt.__version__, self.bundle)
        self._cuda, self._gpu, self._first_error = cuda, gpu, None
        try:
            self._runtime = create_runtime(trt, trt_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise BundleError(
                    f"{self.path}: TensorRT could not deserialise the plan (see its log above); "
                    f"rebuild it: spine-edge build-engines {self.bundle}"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(
                    f"{self.path}: TensorRT could not create an execution context (usually: not enough free GPU "
                    "memory; close other GPU programs, or rebuild with a smaller --max-batch)"
                )
            self._allocate(trt)
        except BaseException as exc:
            self._first_error = exc
            self._deactivate()
            raise
        log.info(
            "%s: TensorRT %s on %s (device %d, %s)",
            self.path.name,
            trt.__version__,
            gpu.name,
            self.device,
            cuda.binding,
        )

    def _allocate(self, trt: Any) -> None:
        engine, context, cuda = self._engine, self._context, self._cuda
        assert cuda is not None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        input_max: dict[str, tuple[int, ...]] = {}
        for name in inputs:
            shape = tuple(engine.get_tensor_shape(name))
            profile = tuple(engine.get_tensor_profile_shape(name, 0)[2]) if -1 in shape else None
            input_max[name] = buffer_shape(name, shape, profile)
            if not context.set_input_shape(name, input_max[name]):
                raise BackendError(
                    f"{self.path.name}: TensorRT rejected the profile's largest shape {input_max[name]} "
                    f"for input {name!r}; rebuild the plan with spine-edge build-engines {self.bundle}"
                )
        self._stream = cuda.stream_create()
        for name in names:
            is_input = name in input_max
            # With every input at its largest shape, TensorRT resolves each output's largest shape.
            max_shape = input_max[name] if is_input else tuple(context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            nbytes = buffer_nbytes(name, max_shape, dtype.itemsize)
            device = cuda.malloc(nbytes)
            try:
                host = cuda.malloc_host(nbytes)
            except BaseException:
                cuda.free(device)
                raise
            self._bindings[name] = _Binding(
                name, is_input, dtype, tuple(engine.get_tensor_shape(name)), max_shape, device, host
            )
            if not context.set_tensor_address(name, device):
                raise BackendError(f"{self.path.name}: TensorRT refused the buffer address of tensor {name!r}")

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
        try:
            return self._run(feeds)
        except BackendError as exc:
            # A CUDA error can be sticky: keep the first one, teardown will report failures of its own only then.
            self._first_error = self._first_error or exc
            raise

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context = self._cuda, self._context
        assert cuda is not None
        cuda.set_device(self.device)
        for name, array in feeds.items():
            binding = self._bindings[name]
            if any(d > m for d, m in zip(array.shape, binding.max_shape, strict=True)):
                raise BackendError(
                    f"{self.path.name}: input {name!r} shape {array.shape} exceeds the plan's {binding.max_shape}"
                )
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
            nbytes = buffer_nbytes(binding.name, shapes[binding.name], binding.dtype.itemsize)
            cuda.memcpy_dtoh_async(binding.host[:nbytes], binding.device, self._stream)
        cuda.stream_synchronize(self._stream)
        # Copies: the pinned buffers are overwritten by the next batch.
        return {
            name: binding.host[: math.prod(shapes[name]) * binding.dtype.itemsize]
            .view(binding.dtype)
            .reshape(shapes[name])
            .copy()
            for name, binding in self._bindings.items()
            if not binding.is_input
        }

    def _deactivate(self) -> None:
        cuda = self._cuda
        failures: list[BackendError] = []

        def attempt(call: Any, *args: Any) -> None:
            # After a sticky CUDA error every call fails; keep going so every buffer is at least released.
            try:
                call(*args)
            except BackendError as exc:
                failures.append(exc)

        if cuda is not None:
            attempt(cuda.set_device, self.device)
            if self._stream is not None:
                attempt(cuda.stream_synchronize, self._stream)
            for binding in self._bindings.values():
                attempt(cuda.free, binding.device)
                attempt(cuda.free_host, binding.host)
            if self._stream is not None:
                attempt(cuda.stream_destroy, self._stream)
        self._bindings = {}
        self._stream = None
        # Context before engine before runtime: TensorRT's ownership order.
        self._context = None
        self._engine = None
        self._runtime = None
        if not failures:
            return
        if self._first_error is not None:
            for failure in failures:
                log.warning("%s: while releasing after an earlier error: %s", self.path.name, failure)
            return
        raise BackendError(
            f"{self.path.name}: releasing the plan's GPU buffers failed ({len(failures)} calls): {failures[0]}"
        )
