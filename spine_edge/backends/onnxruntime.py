"""ONNX Runtime backend: CPU by default, CUDA and TensorRT execution providers where installed.

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start (no driver, missing
CUDA libraries): it logs an error and returns a working session. This backend compares the providers
it asked for with ``session.get_providers()`` and reports what actually runs. When a GPU provider
was asked for explicitly, the CPU is not registered and ``session.disable_cpu_ep_fallback`` is set,
so a node the GPU cannot run is an error instead of a slow surprise; with the automatic choice the
nodes left on the CPU are reported (where this onnxruntime records the assignment).

GPU providers (:class:`GpuSettings`): TensorRT first, then CUDA for what TensorRT does not take,
then the CPU. The TensorRT provider gets the same batch profile as the native plans, a workspace
limit, and engine and timing caches; its engine cache is keyed by the source graph's sha256
(:func:`ort_tensorrt_cache_dir`), because the provider's own cache key is built from file and
tensor names, not weights, so a re-exported bundle would otherwise load engines of the old weights.
The CUDA provider gets the device, a memory limit and the arena strategy, so two sessions fit a
4 GB card.

``tensorrt-rtx``: NVIDIA's TensorRT-RTX provider, for GeForce/RTX boxes (Ampere sm86 — the RTX 3050 —
Ada, Blackwell). It compiles engines just in time in seconds instead of minutes, and its runtime
cache is portable across RTX GPUs, so a kiosk fleet of mixed RTX cards needs no per-box
``build-engines``. It is a plugin (``spine-edge[gpu-rtx-cu12]``: the CPU onnxruntime >= 1.24 plus
NVIDIA's ``onnxruntime-ep-nv-tensorrt-rtx`` wheel, never with onnxruntime-gpu) registered through
``register_execution_provider_library`` and attached with ``add_provider_for_devices``. Like native
TensorRT 11 it types networks strongly: FP16 comes from FP16 graphs and INT8 from the symmetric Q/DQ
graphs meant for TensorRT. It does not run on Jetson, data-centre GPUs or Turing (device-specific
builds only), where native TensorRT or the TensorRT provider remain the choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spine_edge.backends.base import Backend, BatchRange
from spine_edge.bundle import ModelEntry, TensorSpec
from spine_edge.errors import BackendError, SpineEdgeError
from spine_edge.support import import_optional

log = logging.getLogger(__name__)

ProviderChoice = Literal["cpu", "cuda", "tensorrt", "tensorrt-rtx"]

#: Short names accepted by ``--provider`` and the ONNX Runtime provider each selects.
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
}
#: The TensorRT-RTX plugin's Python module, and the extra that installs it.
RTX_PLUGIN = "onnxruntime_ep_nv_tensorrt_rtx"
RTX_EXTRA = "gpu-rtx-cu12"
#: Automatic choice: the fastest provider this onnxruntime build offers first.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
#: Providers that run on an NVIDIA GPU.
GPU_PROVIDERS = frozenset({PROVIDERS["tensorrt"], PROVIDERS["cuda"], PROVIDERS["tensorrt-rtx"]})
#: Providers that build TensorRT engines (they take the symmetric Q/DQ graphs meant for TensorRT).
TENSORRT_PROVIDERS = frozenset({PROVIDERS["tensorrt"], PROVIDERS["tensorrt-rtx"]})

#: Bundle-relative folder of the TensorRT provider's caches: one sub-folder per source graph sha256,
#: plus ``timing`` (timings depend on layer shapes and the GPU, not on weights, so they are shared).
ORT_TENSORRT_CACHE = "cache/ort-tensorrt"
#: Characters of the sha256 that name a graph's engine-cache folder.
CACHE_KEY_CHARS = 16
TIMING_CACHE_DIR = "timing"

ArenaStrategy = Literal["kSameAsRequested", "kNextPowerOfTwo"]


def ort_tensorrt_cache_dir(bundle: str | Path, entry: ModelEntry) -> Path:
    """The TensorRT provider's engine-cache folder for one ONNX graph, keyed by its sha256."""
    return Path(bundle) / ORT_TENSORRT_CACHE / entry.sha256[:CACHE_KEY_CHARS]


def ort_tensorrt_timing_dir(bundle: str | Path) -> Path:
    """The TensorRT provider's timing-cache folder, shared by the bundle's graphs."""
    return Path(bundle) / ORT_TENSORRT_CACHE / TIMING_CACHE_DIR


@dataclass(frozen=True)
class GpuSettings:
    """How ONNX Runtime's CUDA and TensorRT providers are set up.

    Attributes:
        device: CUDA device index (``device_id`` of both providers).
        batch: TensorRT provider optimisation profile over the batch axis (None: the provider
            builds an engine per new input shape, at run time).
        workspace_mib: TensorRT builder workspace limit.
        gpu_mem_limit_mib: Cap of the CUDA provider's memory arena (None: no cap). Two sessions on a
            4 GB card need one.
        arena_extend_strategy: ``kSameAsRequested`` grows the arena by what is asked (less waste on a
            small card); ``kNextPowerOfTwo`` is ONNX Runtime's default.
        engine_cache: TensorRT provider engine-cache folder (None: no cache; engines rebuilt per session).
        timing_cache: TensorRT provider timing-cache folder (None: none).
        fp16: Let the TensorRT provider build FP16 kernels from an FP32 graph.
        int8: The graph is an INT8 Q/DQ graph (the TensorRT provider needs INT8 mode to honour it).
    """

    device: int = 0
    batch: BatchRange | None = None
    workspace_mib: int = 1024
    gpu_mem_limit_mib: int | None = None
    arena_extend_strategy: ArenaStrategy = "kSameAsRequested"
    engine_cache: Path | None = None
    timing_cache: Path | None = None
    fp16: bool = False
    int8: bool = False

    def __post_init__(self) -> None:
        if (
            self.device < 0
            or self.workspace_mib < 1
            or (self.gpu_mem_limit_mib is not None and self.gpu_mem_limit_mib < 1)
        ):
            raise ValueError(
                f"device must be >= 0 and sizes >= 1 MiB, got device {self.device}, workspace {self.workspace_mib}, "
                f"memory limit {self.gpu_mem_limit_mib}"
            )


def profile_shapes(inputs: Iterable[TensorSpec], batch: int, separator: str = ",") -> str:
    """A TensorRT provider profile string (``name:4x1x384x384,...``) with the batch axis at ``batch``.

    ``separator`` joins inputs: ``,`` for the TensorRT provider, ``;`` for TensorRT-RTX.

    Raises:
        BackendError: An input has a dynamic axis other than the batch.
    """
    parts = []
    for spec in inputs:
        dims = [batch, *spec.shape[1:]]
        if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            raise BackendError(
                f"input {spec.name!r} has dynamic axes besides the batch {spec.shape}: the TensorRT provider needs "
                "fixed image sizes; re-export the bundle"
            )
        parts.append(f"{spec.name}:{'x'.join(str(d) for d in dims)}")
    return separator.join(parts)


def tensorrt_provider_options(settings: GpuSettings, inputs: Sequence[TensorSpec] = ()) -> dict[str, Any]:
    """``TensorrtExecutionProvider`` options for ``settings`` (profile from ``inputs``' batch axes).

    Booleans stay Python bools: the provider parses ``"True"``/``"False"``.
    """
    options: dict[str, Any] = {
        "device_id": settings.device,
        "trt_max_workspace_size": settings.workspace_mib << 20,
        "trt_fp16_enable": settings.fp16,
        "trt_int8_enable": settings.int8,
    }
    if settings.engine_cache is not None:
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(settings.engine_cache)}
    if settings.timing_cache is not None:
        options |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": str(settings.timing_cache)}
    dynamic = [s for s in inputs if s.shape and not isinstance(s.shape[0], int)]
    if settings.batch is not None and dynamic:
        batch = settings.batch
        options |= {
            "trt_profile_min_shapes": profile_shapes(dynamic, batch.min),
            "trt_profile_opt_shapes": profile_shapes(dynamic, batch.opt),
            "trt_profile_max_shapes": profile_shapes(dynamic, batch.max),
        }
    return options


def rtx_provider_options(settings: GpuSettings, inputs: Sequence[TensorSpec] = ()) -> dict[str, str]:
    """``NvTensorRTRTXExecutionProvider`` options (all strings, as the plugin reads them).

    The engine-cache folder becomes the plugin's runtime cache, so it is keyed by the graph's sha256
    like the TensorRT provider's. Precision comes from the graph (strong typing): no FP16/INT8 switch.
    """
    options = {"device_id": str(settings.device), "nv_max_workspace_size": str(settings.workspace_mib << 20)}
    if settings.engine_cache is not None:
        options["nv_runtime_cache_path"] = str(settings.engine_cache)
    dynamic = [s for s in inputs if s.shape and not isinstance(s.shape[0], int)]
    if settings.batch is not None and dynamic:
        batch = settings.batch
        options |= {
            "nv_profile_min_shapes": profile_shapes(dynamic, batch.min, ";"),
            "nv_profile_opt_shapes": profile_shapes(dynamic, batch.opt, ";"),
            "nv_profile_max_shapes": profile_shapes(dynamic, batch.max, ";"),
        }
    return options


@functools.cache
def _register_rtx_plugin(ort: Any) -> str:
    """Register NVIDIA's TensorRT-RTX plugin with onnxruntime once per process; return its provider name."""
    plugin = import_optional(RTX_PLUGIN, RTX_EXTRA, "The TensorRT-RTX provider")
    register = getattr(ort, "register_execution_provider_library", None)
    if register is None:
        raise BackendError(
            f"onnxruntime {ort.__version__} cannot load plugin providers (TensorRT-RTX needs onnxruntime >= 1.24): "
            f"pip install 'spine-edge[{RTX_EXTRA}]'"
        )
    name = str(plugin.get_ep_name())
    try:
        register(name, plugin.get_library_path())
    except Exception as exc:  # onnxruntime's pybind errors; re-raised as the project's
        raise BackendError(
            f"the TensorRT-RTX plugin does not load ({exc}); check the NVIDIA driver with nvidia-smi"
        ) from exc
    return name


def cuda_provider_options(settings: GpuSettings) -> dict[str, Any]:
    """``CUDAExecutionProvider`` options for ``settings``."""
    options: dict[str, Any] = {
        "device_id": settings.device,
        "arena_extend_strategy": settings.arena_extend_strategy,
    }
    if settings.gpu_mem_limit_mib is not None:
        options["gpu_mem_limit"] = settings.gpu_mem_limit_mib << 20
    return options


def summarise_assignment(subgraphs: Iterable[Any]) -> dict[str, dict[str, int]]:
    """Nodes per execution provider and op type, from ``session.get_provider_graph_assignment_info()``.

    Args:
        subgraphs: Objects with ``ep_name`` and ``get_nodes()``, whose nodes have ``op_type``.
    """
    counts: dict[str, Counter[str]] = {}
    for subgraph in subgraphs:
        counts.setdefault(subgraph.ep_name, Counter()).update(node.op_type for node in subgraph.get_nodes())
    return {ep: dict(sorted(ops.items())) for ep, ops in counts.items()}


@functools.cache
def _preload_gpu_libraries(ort: Any, tensorrt: bool) -> None:
    """Load GPU libraries from NVIDIA's pip wheels once per process, before the first GPU session.

    CUDA/cuDNN come from ``onnxruntime-gpu[cuda,cudnn]`` through ``preload_dlls()``. The TensorRT
    provider opens ``libnvinfer`` by name, which the ``tensorrt-cu1x`` wheels keep inside
    site-packages: importing ``tensorrt`` loads it, and the loader then resolves the provider's
    request to the library already in the process.
    """
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        try:
            preload()
        except (OSError, RuntimeError) as exc:  # a missing wheel only means the system's libraries are used
            log.debug("onnxruntime.preload_dlls() failed (%s): relying on the system's CUDA libraries", exc)
    if tensorrt and importlib.util.find_spec("tensorrt") is not None:
        try:
            importlib.import_module("tensorrt")
        except (ImportError, OSError) as exc:  # the provider then reports what it cannot load
            log.debug("tensorrt does not import (%s): the TensorRT provider looks for libnvinfer itself", exc)


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
    """Import onnxruntime with its telemetry off, or explain which extra provides it.

    Every caller creates its sessions after this, so no session ever records telemetry events: a
    kiosk must not leave data behind that nobody asked for (the switch exists on the builds that
    can send any; elsewhere there is nothing to turn off).
    """
    ort = import_optional("onnxruntime", "cpu", "The ONNX Runtime backend")
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    return ort


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
    """The ONNX Runtime providers to request, best first.

    Automatic: every available provider of ``AUTO_ORDER``, ending with the CPU. Explicit ``cuda``:
    CUDA alone; explicit ``tensorrt``: TensorRT, then CUDA (where offered) for the nodes TensorRT
    does not take. Explicit GPU choices leave the CPU out: the session is created with CPU fallback
    disabled, so a node that cannot run on the GPU fails loudly (see :func:`strict_fallback`).

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
    if provider == "tensorrt-rtx":
        # A plugin: onnxruntime lists it only once registered, which activation does (or explains).
        return [name]
    if name not in available:
        raise BackendError(
            f"this onnxruntime build has no {name} (it offers {', '.join(available)}): install "
            "onnxruntime-gpu (pip install 'spine-edge[gpu-ort]') in place of onnxruntime, or use --provider cpu"
        )
    if provider == "tensorrt" and PROVIDERS["cuda"] in available:
        return [name, PROVIDERS["cuda"]]
    return [name]


def strict_fallback(provider: ProviderChoice | None) -> bool:
    """Whether the session must refuse to run nodes on the CPU: a GPU provider was asked for by name."""
    return provider in ("cuda", "tensorrt", "tensorrt-rtx")


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
        gpu: CUDA/TensorRT provider settings (device, batch profile, caches, memory limit); the
            defaults where None.
        inputs: The graph's inputs as the manifest records them; the TensorRT provider's batch
            profile is built from them (without them it builds engines per new shape).
        fake_quant: Run Q/DQ nodes as the plain ops they are (``session.disable_quant_qdq``)
            instead of fusing them into ONNX Runtime's integer kernels. For the TensorRT INT8 graph,
            which runs on a CPU only to have its accuracy measured: its Q/DQ carry float16 scales
            (FP16 body), and ONNX Runtime's CPU fusions mishandle those (measured with ONNX Runtime
            1.32: a fused QLinearConcat with float16 scales fails to load; the fused classifier drifted
            to 0.10 |Δprob| from FP32, the unfused one stays within 0.005 of the exact FP16 emulation).

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
        gpu: GpuSettings | None = None,
        inputs: Sequence[TensorSpec] = (),
        fake_quant: bool = False,
    ) -> None:
        super().__init__(path)
        self.fake_quant = fake_quant
        self.requested_provider = provider
        self.threads = threads or available_cores()
        self.pre_optimized = pre_optimized
        self.gpu = gpu or GpuSettings()
        self.inputs = tuple(inputs)
        self._session: Any = None
        self._specs: dict[str, TensorSpec] = {}
        self._outputs: tuple[str, ...] = ()
        self._running = ""
        self._assignment: dict[str, dict[str, int]] = {}

    @property
    def node_assignment(self) -> dict[str, dict[str, int]]:
        """Nodes per execution provider and op type, where this onnxruntime records it (else empty)."""
        self._require_active("node_assignment")
        return {ep: dict(ops) for ep, ops in self._assignment.items()}

    def _activate(self) -> None:
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise BackendError(f"{self.path}: model file not found; copy the whole bundle folder again")
        requested = resolve_providers(self.requested_provider, ort.get_available_providers())
        strict = strict_fallback(self.requested_provider)
        if {PROVIDERS["tensorrt"], PROVIDERS["cuda"]} & set(requested):  # the RTX plugin bundles its own
            _preload_gpu_libraries(ort, tensorrt=PROVIDERS["tensorrt"] in requested)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One graph per session and batches run one after another: inter-op threads would only compete.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if self.pre_optimized
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if strict:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if self.fake_quant:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            if self.requested_provider == "tensorrt-rtx":
                self._session = self._rtx_session(ort, options)
            else:
                self._session = ort.InferenceSession(
                    str(self.path), sess_options=options, providers=[(p, self._provider_options(p)) for p in requested]
                )
        except SpineEdgeError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
            if strict:
                raise BackendError(
                    f"{self.path}: ONNX Runtime cannot run it on {' + '.join(requested)} alone ({exc}); check the GPU "
                    "setup (nvidia-smi), or omit --provider to let nodes the GPU cannot run fall back to the CPU"
                ) from exc
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({exc}); re-export the bundle") from exc
        self._running = check_providers(self.path, requested, self._session.get_providers(), explicit=strict)
        self._assignment = self._read_assignment()
        on_cpu = self._assignment.get(PROVIDERS["cpu"], {})
        if self._running in GPU_PROVIDERS and on_cpu:
            log.warning(
                "%s: %d nodes run on the CPU, not on %s: %s",
                self.path.name,
                sum(on_cpu.values()),
                self._running,
                ", ".join(f"{op}×{n}" for op, n in on_cpu.items()),
            )
        self._specs = {
            arg.name: TensorSpec(
                arg.name,
                tuple(d if isinstance(d, int) else str(d) for d in arg.shape),
                _ORT_DTYPES.get(arg.type, arg.type),
            )
            for arg in self._session.get_inputs()
        }
        self._outputs = tuple(arg.name for arg in self._session.get_outputs())
        log.info("%s: onnxruntime %s on %s, %d threads", self.path.name, ort.__version__, self._running, self.threads)

    def _rtx_session(self, ort: Any, options: Any) -> Any:
        """A session on the TensorRT-RTX plugin, attached to the chosen GPU."""
        name = _register_rtx_plugin(ort)
        devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
        if not devices:
            raise BackendError(
                "TensorRT-RTX found no supported GPU (it needs a GeForce/RTX card of the Ampere generation or newer "
                "and a current NVIDIA driver): use --provider tensorrt or cuda, or --backend tensorrt"
            )
        if self.gpu.device >= len(devices):
            raise BackendError(f"TensorRT-RTX sees {len(devices)} GPU(s); device {self.gpu.device} does not exist")
        if self.gpu.engine_cache is not None:
            self.gpu.engine_cache.mkdir(parents=True, exist_ok=True)
        # The device is chosen by which EP device is attached; device_id repeats it for the plugin.
        options.add_provider_for_devices([devices[self.gpu.device]], rtx_provider_options(self.gpu, self.inputs))
        return ort.InferenceSession(str(self.path), sess_options=options)

    def _read_assignment(self) -> dict[str, dict[str, int]]:
        read = getattr(self._session, "get_provider_graph_assignment_info", None)  # onnxruntime >= 1.23
        if read is None:
            return {}
        try:
            return summarise_assignment(read())
        except RuntimeError as exc:  # recording is best effort: it only feeds a log line and the GPU report
            log.debug("%s: node assignment not available (%s)", self.path.name, exc)
            return {}

    def _provider_options(self, provider: str) -> dict[str, Any]:
        if provider == PROVIDERS["tensorrt"]:
            for folder in (self.gpu.engine_cache, self.gpu.timing_cache):
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
            return tensorrt_provider_options(self.gpu, self.inputs)
        if provider == PROVIDERS["cuda"]:
            return cuda_provider_options(self.gpu)
        return {}

    def _input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def _output_names(self) -> tuple[str, ...]:
        return self._outputs

    def _provider(self) -> str:
        return self._running

    def _max_batch(self) -> int | None:
        batch = next(iter(self._specs.values())).shape[0]
        if isinstance(batch, int) and batch > 0:
            return batch
        # A TensorRT provider's engine accepts only its profile's batches.
        if self._running in TENSORRT_PROVIDERS and self.gpu.batch is not None and self.inputs:
            return self.gpu.batch.max
        return None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(list(self._outputs), {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as exc:  # onnxruntime's error types live in its C extension
            raise BackendError(f"{self.path.name}: ONNX Runtime failed to run a batch ({exc})") from exc
        return dict(zip(self._outputs, outputs, strict=True))

    def _deactivate(self) -> None:
        self._session = None
        self._assignment = {}
