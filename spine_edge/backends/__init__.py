"""Inference backends and the choice of model file from a bundle.

:func:`select_model` decides, from the manifest and what this box has, which file runs a role at a
precision and with which library; :func:`create_backend` verifies that file's sha256 and wraps it
in a (not yet active) :class:`Backend`. :func:`open_backend` does both.

Automatic choices (``backend="auto"``, ``precision="auto"``):

- backend: native TensorRT when the bundle holds a plan for the role, ``tensorrt`` imports and a
  CUDA GPU answers; else OpenVINO where ``build-engines`` measured it faster than ONNX Runtime for
  the role and precision on this CPU with this OpenVINO (an ``openvino`` entry); else ONNX Runtime,
  which stays the default wherever openvino is absent. BF16 runs on OpenVINO only.
- precision: TensorRT takes the first plan of fp16, int8, fp32 that ``build-engines`` made;
  ONNX Runtime and OpenVINO take fp32 (FP16 is not faster on a CPU; INT8 and BF16 are deliberate
  choices whose accuracy the bundle's report and build record show).
- ONNX Runtime on the CPU loads the ``onnx-optimized`` file when ``build-engines`` prepared one with
  this onnxruntime version on this CPU model, else the plain ``onnx`` file (with a warning).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spine_edge.backends.base import DEFAULT_BATCH, Backend, BatchRange
from spine_edge.backends.cuda import load_cuda
from spine_edge.backends.onnxruntime import (
    ORT_TENSORRT_CACHE,
    PROVIDERS,
    TENSORRT_PROVIDERS,
    GpuSettings,
    OnnxRuntimeBackend,
    ProviderChoice,
    cpu_model_name,
    import_onnxruntime,
    ort_tensorrt_cache_dir,
    ort_tensorrt_timing_dir,
    resolve_providers,
)
from spine_edge.backends.openvino import ComputePrecision, OpenVinoBackend, import_openvino, openvino_cache_dir
from spine_edge.backends.tensorrt import TensorRTBackend, create_runtime, import_tensorrt, trt_logger
from spine_edge.bundle import Manifest, ModelEntry, Precision, Role, verify_files
from spine_edge.errors import BackendError, BundleError, MissingDependencyError

log = logging.getLogger(__name__)

BackendChoice = Literal["auto", "onnxruntime", "tensorrt", "openvino"]
#: Who a bundle's ONNX graph was written for (a manifest entry's ``target``).
GraphTarget = Literal["onnxruntime", "tensorrt"]
#: A bundle precision, ``bf16`` (the FP32 graph computed in BF16 by OpenVINO, where the CPU has it) or
#: ``auto`` (the rules in the module docstring).
PrecisionChoice = Literal["auto", "bf16"] | Precision

#: Why ``bf16`` is refused on ONNX Runtime and TensorRT.
BF16_ON_OPENVINO_ONLY = "bf16 runs on OpenVINO only: use --backend openvino (or auto) with spine-edge[openvino]"
#: Order in which ``precision="auto"`` tries TensorRT plans.
TENSORRT_AUTO_PRECISIONS: tuple[Precision, ...] = ("fp16", "int8", "fp32")

__all__ = [
    "ORT_TENSORRT_CACHE",
    "Backend",
    "BackendChoice",
    "GraphTarget",
    "ModelSelection",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "PrecisionChoice",
    "TensorRTBackend",
    "create_backend",
    "open_backend",
    "select_model",
]


@dataclass(frozen=True)
class ModelSelection:
    """Which file runs a role, and how.

    Attributes:
        entry: The manifest entry of the file.
        backend: ``onnxruntime``, ``tensorrt`` or ``openvino``.
        provider: ONNX Runtime provider short name requested (None: automatic); unused by TensorRT.
        pre_optimized: The file is ONNX Runtime's saved optimised graph for this CPU.
        fp16_build: Ask ONNX Runtime's TensorRT provider for FP16 kernels (FP16 from an FP32 graph).
        compute: OpenVINO's precision hint for the non-quantised ops (``bf16``: BF16 from an FP32 graph).
    """

    entry: ModelEntry
    backend: str
    provider: ProviderChoice | None = None
    pre_optimized: bool = False
    fp16_build: bool = False
    compute: ComputePrecision = "fp32"

    @property
    def precision(self) -> str:
        """Precision the role runs at."""
        if self.compute == "bf16":
            return "bf16"
        return "fp16" if self.fp16_build else self.entry.precision


def _missing(manifest: Manifest, role: Role, what: str, fmt: str | None = None) -> BundleError:
    have = ", ".join(
        f"{e.precision} {e.format}" for e in manifest.models if e.role == role and (fmt is None or e.format == fmt)
    )
    return BundleError(f"the bundle has no {role} {what} (it has: {have or 'nothing'})")


def _select_tensorrt(manifest: Manifest, role: Role, precision: PrecisionChoice) -> ModelSelection:
    if precision == "bf16":
        raise BundleError(BF16_ON_OPENVINO_ONLY)
    candidates = TENSORRT_AUTO_PRECISIONS if precision == "auto" else (precision,)
    for p in candidates:
        entry = manifest.find(role, p, "tensorrt")
        if entry is not None:
            return ModelSelection(entry, "tensorrt")
    err = _missing(manifest, role, f"TensorRT plan at precision {precision}", "tensorrt")
    raise BundleError(
        f"{err}; build the plans on this box with `spine-edge build-engines`, or use --backend onnxruntime"
    )


def _select_onnxruntime(
    manifest: Manifest,
    role: Role,
    precision: PrecisionChoice,
    provider: ProviderChoice | None,
    graph_target: GraphTarget | None = None,
) -> ModelSelection:
    if precision == "bf16":
        raise BundleError(BF16_ON_OPENVINO_ONLY)
    ort = import_onnxruntime()
    running = resolve_providers(provider, ort.get_available_providers())[0]
    want = "fp32" if precision == "auto" else precision
    if running == PROVIDERS["cpu"] and graph_target is None:
        optimized = manifest.find(role, want, "onnx-optimized")
        if optimized is not None:
            build = optimized.build
            here = (ort.__version__, cpu_model_name())
            if build is not None and (build.builder_version, build.device) == here:
                return ModelSelection(optimized, "onnxruntime", provider, pre_optimized=True)
            built = (build.builder_version, build.device) if build else ("?", "?")
            log.warning(
                "%s: prepared for onnxruntime %s on %s, this box has onnxruntime %s on %s; using the plain ONNX "
                "file (slower start): rerun `spine-edge build-engines` here",
                optimized.file,
                *built,
                *here,
            )
    # Symmetric Q/DQ graphs are what TensorRT fuses; U8S8 ones are what the CPU runs fast.
    target = graph_target or ("tensorrt" if running in TENSORRT_PROVIDERS else "onnxruntime")
    entry = manifest.find(role, want, "onnx", target=target)
    if entry is not None:
        return ModelSelection(entry, "onnxruntime", provider)
    if want == "fp16" and running == PROVIDERS["tensorrt"]:
        fp32 = manifest.find(role, "fp32", "onnx", target=target)
        if fp32 is not None:
            return ModelSelection(fp32, "onnxruntime", provider, fp16_build=True)
    raise _missing(manifest, role, f"ONNX file at precision {want} for {running}", "onnx")


def _select_openvino(manifest: Manifest, role: Role, precision: PrecisionChoice) -> ModelSelection:
    """OpenVINO runs the ONNX file itself: FP32 (also for BF16, a compile hint) or the symmetric INT8 graph."""
    import_openvino()
    if precision == "fp16":
        raise BundleError(
            "OpenVINO on a CPU runs fp32, bf16 or int8, not fp16: choose one of those, or --backend tensorrt"
        )
    want: Precision = "int8" if precision == "int8" else "fp32"
    # The symmetric Q/DQ graph is the one TensorRT builds: one INT8 graph, proven at export, on the GPU and the CPU.
    entry = manifest.find(role, want, "onnx", target="tensorrt")
    if entry is None:
        raise _missing(
            manifest, role, f"ONNX file at precision {want} for OpenVINO (the TensorRT-target graph)", "onnx"
        )
    return ModelSelection(entry, "openvino", compute="bf16" if precision == "bf16" else "fp32")


def _openvino_measured_faster(manifest: Manifest, role: Role, precision: PrecisionChoice) -> bool:
    """Whether ``build-engines`` recorded OpenVINO as faster for the role here (this CPU, this OpenVINO)."""
    want = "fp32" if precision in ("auto", "bf16") else precision
    entry = next((e for e in manifest.models if (e.role, e.precision, e.format) == (role, want, "openvino")), None)
    if entry is None or entry.build is None or importlib.util.find_spec("openvino") is None:
        return False
    here = (str(import_openvino().__version__), cpu_model_name())
    if (entry.build.builder_version, entry.build.device) != here:
        log.info(
            "%s: OpenVINO was measured faster with openvino %s on %s; this box has openvino %s on %s: using ONNX "
            "Runtime (rerun `spine-edge build-engines` here)",
            role,
            entry.build.builder_version,
            entry.build.device,
            *here,
        )
        return False
    return True


def _tensorrt_usable() -> bool:
    """Whether tensorrt imports, a CUDA GPU answers and TensorRT starts CUDA (auto never fails on a CPU box)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        trt = import_tensorrt()
        load_cuda()
        # A driver older than the wheel's CUDA passes the device query but fails inside TensorRT.
        create_runtime(trt, trt_logger(trt))
        return True
    except (MissingDependencyError, BackendError) as exc:
        log.info("TensorRT plans present but not usable here (%s): using ONNX Runtime", exc)
        return False


def select_model(
    manifest: Manifest,
    role: Role,
    precision: PrecisionChoice = "auto",
    backend: BackendChoice = "auto",
    provider: ProviderChoice | None = None,
    graph_target: GraphTarget | None = None,
) -> ModelSelection:
    """Choose the file and library that run ``role`` (rules in the module docstring).

    ``graph_target`` makes ONNX Runtime load the graph written for that target instead of its
    provider's own (``bench`` runs the TensorRT Q/DQ graph on the CPU to measure its accuracy).

    Raises:
        BundleError: The bundle has no file for this role/precision/backend.
        MissingDependencyError: The chosen library is not installed.
    """
    if backend == "auto":
        has_plan = any(e.role == role and e.format == "tensorrt" for e in manifest.models)
        on_cpu = provider in (None, "cpu") and graph_target is None
        if precision == "bf16":
            backend = "openvino"
        elif has_plan and _tensorrt_usable():
            backend = "tensorrt"
        elif on_cpu and _openvino_measured_faster(manifest, role, precision):
            backend = "openvino"
        else:
            backend = "onnxruntime"
    if backend == "tensorrt":
        return _select_tensorrt(manifest, role, precision)
    if backend == "onnxruntime":
        return _select_onnxruntime(manifest, role, precision, provider, graph_target)
    if backend == "openvino":
        return _select_openvino(manifest, role, precision)
    raise BundleError(f"unknown backend {backend!r}: choose auto, onnxruntime, tensorrt or openvino")


def _batch_profile(manifest: Manifest, role: Role) -> BatchRange:
    """The role's batch profile: that of its native plans where built here, else the default."""
    for entry in manifest.models:
        if entry.role == role and entry.format == "tensorrt" and entry.build is not None:
            return BatchRange(entry.build.min_batch, entry.build.opt_batch, entry.build.max_batch)
    return DEFAULT_BATCH[role]


def create_backend(
    bundle: str | Path, manifest: Manifest, selection: ModelSelection, threads: int | None = None, device: int = 0
) -> Backend:
    """Verify the selected file's sha256 and wrap it in a backend (activate it with ``with``).

    Args:
        bundle: The bundle folder.
        manifest: Its manifest.
        selection: What :func:`select_model` chose.
        threads: ONNX Runtime / OpenVINO intra-op threads (None: the cores available).
        device: CUDA device index for TensorRT and ONNX Runtime's GPU providers.

    Raises:
        BundleError: The file is missing or its hash does not match the manifest.
    """
    verify_files(bundle, manifest, (selection.entry,))
    entry = selection.entry
    path = Path(bundle) / entry.file
    if selection.backend == "tensorrt":
        return TensorRTBackend(path, entry.build, bundle, device=device)
    if selection.backend == "openvino":
        # Compiling a paper-size graph takes seconds: the compiled model is cached in the bundle, keyed by
        # the graph's sha256 (build-engines fills it).
        return OpenVinoBackend(
            path,
            precision=selection.compute,
            threads=threads,
            cache_dir=openvino_cache_dir(bundle, entry),
            inputs=entry.inputs,
        )
    gpu = GpuSettings(
        device=device,
        batch=_batch_profile(manifest, entry.role),
        # The provider builds its engines at session start (minutes): cache them in the bundle, keyed
        # by this graph's sha256 so a re-exported graph never meets an engine of the old weights.
        engine_cache=ort_tensorrt_cache_dir(bundle, entry),
        timing_cache=ort_tensorrt_timing_dir(bundle),
        fp16=selection.fp16_build,
        int8=entry.precision == "int8",
    )
    return OnnxRuntimeBackend(
        path,
        provider=selection.provider,
        threads=threads,
        pre_optimized=selection.pre_optimized,
        gpu=gpu,
        inputs=entry.inputs,
        # The TensorRT INT8 graph (FP16 body, float16 Q/DQ scales) on ONNX Runtime: an accuracy check.
        fake_quant=entry.precision == "int8" and entry.target == "tensorrt",
    )


def open_backend(
    bundle: str | Path,
    manifest: Manifest,
    role: Role,
    precision: PrecisionChoice = "auto",
    backend: BackendChoice = "auto",
    provider: ProviderChoice | None = None,
    device: int = 0,
) -> Backend:
    """The backend that runs ``role`` from a bundle (not yet active: use ``with``).

    Example:
        >>> manifest = load_manifest("runs/bundle", verify=False)  # doctest: +SKIP
        >>> with open_backend("runs/bundle", manifest, "classifier", "fp32") as b:  # doctest: +SKIP
        ...     prob = b.infer({"image": batch})["prob"]
    """
    return create_backend(bundle, manifest, select_model(manifest, role, precision, backend, provider), device=device)
