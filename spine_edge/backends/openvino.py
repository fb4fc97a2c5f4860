"""OpenVINO backend: the bundle's ONNX graphs on Intel and AMD CPUs, using VNNI, AVX-512 BF16 and AMX.

OpenVINO reads the ONNX files of the bundle directly (no conversion step, no second file to keep in
step with the manifest). Three ways to run them:

- ``fp32``: the FP32 graph with ``INFERENCE_PRECISION_HINT=f32``. The hint is always set: on CPUs
  with AVX-512 BF16 or AMX the CPU plugin's default is BF16, which would silently change the numbers.
- ``bf16``: the same FP32 graph with ``INFERENCE_PRECISION_HINT=bf16``, only where the CPU reports
  ``BF16`` in ``OPTIMIZATION_CAPABILITIES``; elsewhere the plugin would quietly compute in FP32, so
  the backend refuses instead (:func:`check_precision_supported`).
- ``int8``: the symmetric Q/DQ graph the exporter writes for TensorRT (target ``tensorrt``). OpenVINO
  turns each Q/DQ pair into a FakeQuantize and runs the quantised convolutions with integer kernels
  (VNNI / AMX-INT8); what stays outside the Q/DQ pairs runs in FP32 (hint ``f32``), as on ONNX Runtime,
  so the graph whose accuracy export measured is the graph that runs. One INT8 graph then serves
  TensorRT on the GPU and OpenVINO on the CPU.

Compiling a paper-size graph takes seconds; the compiled blob is cached in the bundle under
``cache/openvino/<sha256[:16]>`` (:func:`openvino_cache_dir`). OpenVINO's own cache key already hashes
the model and the compile settings, so one folder holds the FP32 and BF16 blobs of a graph; the
folder is keyed by the graph's sha256 all the same so that stale folders of re-exported graphs can be
found and deleted, as for ONNX Runtime's TensorRT provider.

One stream, ``PERFORMANCE_HINT=LATENCY`` and a fixed thread count: the cascade runs one batch after
another and overlaps decoding on other cores, so throughput streams would only compete with it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.backends.onnxruntime import CACHE_KEY_CHARS, available_cores
from spine_edge.bundle import ModelEntry, TensorSpec
from spine_edge.errors import BackendError
from spine_edge.support import import_optional

log = logging.getLogger(__name__)

#: The ``spine-edge[...]`` extra that installs OpenVINO.
OPENVINO_EXTRA = "openvino"
#: Bundle-relative folder of OpenVINO's compiled-model caches, one sub-folder per graph sha256.
OPENVINO_CACHE = "cache/openvino"

#: How the floating-point part of a graph is computed: ``fp32`` (also used for INT8 Q/DQ graphs) or ``bf16``.
ComputePrecision = Literal["fp32", "bf16"]
COMPUTE_PRECISIONS: tuple[ComputePrecision, ...] = get_args(ComputePrecision)
#: ``INFERENCE_PRECISION_HINT`` value of each compute precision.
_PRECISION_HINTS: dict[ComputePrecision, str] = {"fp32": "f32", "bf16": "bf16"}
#: ``OPTIMIZATION_CAPABILITIES`` entry a device must report for each compute precision.
_CAPABILITY: dict[ComputePrecision, str] = {"fp32": "FP32", "bf16": "BF16"}
#: Layers of a compiled model that compute nothing, left out of :attr:`OpenVinoBackend.runtime_precisions`.
_NOT_COMPUTE = frozenset({"Input", "Output", "Const"})


def import_openvino() -> Any:
    """Import openvino, or explain which extra provides it."""
    return import_optional("openvino", OPENVINO_EXTRA, "The OpenVINO backend")


def openvino_cache_dir(bundle: str | Path, entry: ModelEntry) -> Path:
    """OpenVINO's compiled-model cache folder for one ONNX graph, keyed by its sha256."""
    return Path(bundle) / OPENVINO_CACHE / entry.sha256[:CACHE_KEY_CHARS]


def device_capabilities(core: Any, device: str = "CPU") -> tuple[str, ...]:
    """What the device can compute fast (``OPTIMIZATION_CAPABILITIES``: ``FP32``, ``BF16``, ``INT8``, ...).

    Raises:
        BackendError: OpenVINO does not offer the device on this box.
    """
    check_device(core, device)
    return tuple(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))


def device_name(core: Any, device: str = "CPU") -> str:
    """The device as OpenVINO names it (``FULL_DEVICE_NAME``, e.g. ``Intel(R) Xeon(R) Processor``)."""
    check_device(core, device)
    return str(core.get_property(device, "FULL_DEVICE_NAME"))


def check_device(core: Any, device: str) -> None:
    """Raise unless ``device`` is one of ``core.available_devices``.

    Raises:
        BackendError: Not offered here (e.g. ``GPU`` without Intel's graphics driver).
    """
    available = tuple(core.available_devices)
    if device not in available:
        raise BackendError(
            f"OpenVINO offers no {device} device on this box (it has: {', '.join(available) or 'none'}); use "
            "device CPU, or install the device's driver"
        )


def computes_natively(precision: ComputePrecision, capabilities: Sequence[str]) -> bool:
    """Whether a device with these ``OPTIMIZATION_CAPABILITIES`` computes ``precision`` in its own units."""
    return _CAPABILITY.get(precision) in capabilities


def check_precision_supported(precision: ComputePrecision, capabilities: Sequence[str], device: str = "CPU") -> None:
    """Raise unless the device computes ``precision`` natively.

    Raises:
        BackendError: E.g. BF16 on a CPU without AVX-512 BF16 or AMX, where OpenVINO would silently
            compute in FP32 and the accuracy record would describe a run that never happened.
    """
    if precision not in _CAPABILITY:
        raise BackendError(
            f"unknown OpenVINO compute precision {precision!r}: choose one of {', '.join(COMPUTE_PRECISIONS)}"
        )
    if not computes_natively(precision, capabilities):
        raise BackendError(
            f"this {device} has no native {precision.upper()} (OpenVINO reports {', '.join(capabilities)}): BF16 needs "
            "AVX-512 BF16 or AMX (Intel Xeon 3rd gen+, Core Ultra 200; AMD Zen 4+); use --precision fp32 or int8"
        )


def compile_config(precision: ComputePrecision, threads: int, cache_dir: Path | None) -> dict[str, Any]:
    """The ``compile_model`` properties of one graph.

    Args:
        precision: Compute precision of the non-quantised ops.
        threads: ``INFERENCE_NUM_THREADS``.
        cache_dir: Compiled-model cache folder, or None for none.
    """
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
    }
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


class OpenVinoBackend(Backend):
    """Runs an ONNX file with OpenVINO.

    Args:
        path: The ``.onnx`` file (FP32, or the symmetric INT8 Q/DQ graph).
        precision: ``fp32`` or ``bf16`` for the non-quantised ops (see the module docstring).
        threads: ``INFERENCE_NUM_THREADS``; defaults to the cores this process may use.
        cache_dir: Compiled-model cache folder (:func:`openvino_cache_dir`), or None for none.
        device: OpenVINO device; ``CPU`` is the one this backend is measured on.
        inputs: The graph's inputs as the manifest records them: OpenVINO does not keep the names of
            dynamic axes, so :meth:`input_specs` takes them from here (else ``?``).

    Example:
        >>> with OpenVinoBackend("classifier.fp32.onnx", precision="bf16") as b:  # doctest: +SKIP
        ...     b.infer({"image": np.zeros((1, 1, 384, 384), np.uint8)})["prob"]
    """

    kind = "openvino"

    def __init__(
        self,
        path: str | Path,
        precision: ComputePrecision = "fp32",
        threads: int | None = None,
        cache_dir: Path | None = None,
        device: str = "CPU",
        inputs: Sequence[TensorSpec] = (),
    ) -> None:
        super().__init__(path)
        self.precision = precision
        self.threads = threads or available_cores()
        self.cache_dir = cache_dir
        self.device = device
        self.inputs = tuple(inputs)
        self._compiled: Any = None
        self._request: Any = None
        self._specs: dict[str, TensorSpec] = {}
        self._outputs: tuple[str, ...] = ()
        self._running = ""

    @property
    def runtime_precisions(self) -> dict[str, int]:
        """Executed layers per runtime precision (``{"i8": 53, "f32": 20, ...}``), as the compiled model reports.

        Shows whether the Q/DQ graph really runs integer kernels and whether BF16 took effect.
        """
        self._require_active("runtime_precisions")
        counts: Counter[str] = Counter()
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and info["layerType"].astype(str) not in _NOT_COMPUTE:
                counts[info["runtimePrecision"].astype(str)] += 1
        return dict(counts)

    def _activate(self) -> None:
        ov = import_openvino()
        if not self.path.is_file():
            raise BackendError(f"{self.path}: model file not found; copy the whole bundle folder again")
        core = ov.Core()
        check_precision_supported(self.precision, device_capabilities(core, self.device), self.device)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            # From the path, not a read Model: with a cache the plugin can then skip reading the ONNX file.
            self._compiled = core.compile_model(
                str(self.path), self.device, compile_config(self.precision, self.threads, self.cache_dir)
            )
            self._request = self._compiled.create_infer_request()
        except RuntimeError as exc:  # OpenVINO reports parse and compile failures as RuntimeError
            raise BackendError(
                f"{self.path}: OpenVINO {ov.__version__} cannot compile it ({exc}); re-export the bundle"
            ) from exc
        named = {spec.name: spec for spec in self.inputs}
        self._specs = {}
        for port in self._compiled.inputs:
            name = port.get_any_name()
            recorded = named[name].shape if name in named else ()
            shape = tuple(
                dim.get_length() if dim.is_static else (str(recorded[i]) if i < len(recorded) else "?")
                for i, dim in enumerate(port.get_partial_shape())
            )
            self._specs[name] = TensorSpec(name, shape, np.dtype(port.get_element_type().to_dtype()).name)
        self._outputs = tuple(port.get_any_name() for port in self._compiled.outputs)
        self._running = ", ".join(str(d) for d in self._compiled.get_property("EXECUTION_DEVICES"))
        log.info(
            "%s: openvino %s on %s, %s, %d threads",
            self.path.name,
            ov.__version__,
            self._running,
            self.precision,
            self.threads,
        )

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
            # share_outputs=False: the arrays must outlive the next call, which reuses the request's buffers.
            results = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_outputs=False)
        except RuntimeError as exc:
            raise BackendError(f"{self.path.name}: OpenVINO failed to run a batch ({exc})") from exc
        return {port.get_any_name(): np.asarray(value) for port, value in results.items()}

    def _deactivate(self) -> None:
        self._request = None
        self._compiled = None
