"""Inference backends and the choice of model file from a bundle.

:func:`select_model` decides, from the manifest and what this box has, which file runs a role at a
precision and with which library; :func:`create_backend` verifies that file's sha256 and wraps it
in a (not yet active) :class:`Backend`. :func:`open_backend` does both.

Automatic choices (``backend="auto"``, ``precision="auto"``):

- backend: native TensorRT when the bundle holds a plan for the role, ``tensorrt`` imports and a
  CUDA GPU answers, else ONNX Runtime.
- precision: TensorRT takes the first plan of fp16, int8, fp32 that ``build-engines`` made;
  ONNX Runtime takes fp32 (FP16 is not faster on a CPU, and INT8 is a deliberate choice whose
  accuracy the bundle's report shows).
- ONNX Runtime on the CPU loads the ``onnx-optimized`` file when ``build-engines`` prepared one with
  this onnxruntime version on this CPU model, else the plain ``onnx`` file (with a warning).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spine_edge.backends.base import Backend
from spine_edge.backends.onnxruntime import (
    PROVIDERS,
    OnnxRuntimeBackend,
    ProviderChoice,
    cpu_model_name,
    import_onnxruntime,
    resolve_providers,
)
from spine_edge.backends.cuda import load_cuda
from spine_edge.backends.tensorrt import TensorRTBackend, import_tensorrt
from spine_edge.bundle import Manifest, ModelEntry, Role, verify_files
from spine_edge.errors import BackendError, BundleError, MissingDependencyError

log = logging.getLogger(__name__)

BackendChoice = Literal["auto", "onnxruntime", "tensorrt"]
PrecisionChoice = Literal["auto", "fp32", "fp16", "int8"]

#: Bundle-relative folder of the engines ONNX Runtime's TensorRT provider caches (created on first use).
ORT_TENSORRT_CACHE = "cache/ort-tensorrt"

#: Order in which ``precision="auto"`` tries TensorRT plans.
TENSORRT_AUTO_PRECISIONS: tuple[str, ...] = ("fp16", "int8", "fp32")

__all__ = [
    "Backend",
    "BackendChoice",
    "ModelSelection",
    "OnnxRuntimeBackend",
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
        backend: ``onnxruntime`` or ``tensorrt``.
        provider: ONNX Runtime provider short name requested (None: automatic); unused by TensorRT.
        pre_optimized: The file is ONNX Runtime's saved optimised graph for this CPU.
        fp16_build: Ask ONNX Runtime's TensorRT provider for FP16 kernels (FP16 from an FP32 graph).
    """

    entry: ModelEntry
    backend: str
    provider: ProviderChoice | None = None
    pre_optimized: bool = False
    fp16_build: bool = False

    @property
    def precision(self) -> str:
        """Precision the role runs at."""
        return "fp16" if self.fp16_build else self.entry.precision


def _missing(manifest: Manifest, role: Role, what: str, fmt: str | None = None) -> BundleError:
    have = ", ".join(f"{e.precision} {e.format}" for e in manifest.models if e.role == role and (fmt is None or e.format == fmt))
    return BundleError(f"the bundle has no {role} {what} (it has: {have or 'nothing'})")


def _select_tensorrt(manifest: Manifest, role: Role, precision: PrecisionChoice) -> ModelSelection:
    candidates = TENSORRT_AUTO_PRECISIONS if precision == "auto" else (precision,)
    for p in candidates:
        entry = manifest.find(role, p, "tensorrt")  # type: ignore[arg-type]
        if entry is not None:
            return ModelSelection(entry, "tensorrt")
    err = _missing(manifest, role, f"TensorRT plan at precision {precision}", "tensorrt")
    raise BundleError(f"{err}; build the plans on this box with `spine-edge build-engines`, or use --backend onnxruntime")


def _select_onnxruntime(manifest: Manifest, role: Role, precision: PrecisionChoice, provider: ProviderChoice | None) -> ModelSelection:
    ort = import_onnxruntime()
    running = resolve_providers(provider, ort.get_available_providers())[0]
    want = "fp32" if precision == "auto" else precision
    if running == PROVIDERS["cpu"]:
        optimized = manifest.find(role, want, "onnx-optimized")  # type: ignore[arg-type]
        if optimized is not None:
            build = optimized.build
            here = (ort.__version__, cpu_model_name())
            if build is not None and (build.builder_version, build.device) == here:
                return ModelSelection(optimized, "onnxruntime", provider, pre_optimized=True)
            built = (build.builder_version, build.device) if build else ("?", "?")
            log.warning(
                "%s: prepared for onnxruntime %s on %s, this box has onnxruntime %s on %s; using the plain ONNX "
                "file (slower start): rerun `spine-edge build-engines` here",
                optimized.file, *built, *here,
            )
    # Symmetric Q/DQ graphs are what TensorRT fuses; U8S8 ones are what the CPU runs fast.
    target = "tensorrt" if running == PROVIDERS["tensorrt"] else "onnxruntime"
    entry = manifest.find(role, want, "onnx", target=target)  # type: ignore[arg-type]
    if entry is not None:
        return ModelSelection(entry, "onnxruntime", provider)
    if want == "fp16" and running == PROVIDERS["tensorrt"]:
        fp32 = manifest.find(role, "fp32", "onnx", target=target)
        if fp32 is not None:
            return ModelSelection(fp32, "onnxruntime", provider, fp16_build=True)
    raise _missing(manifest, role, f"ONNX file at precision {want} for {running}", "onnx")


def _tensorrt_usable() -> bool:
    """Whether tensorrt imports and a CUDA GPU answers (the automatic choice never fails on a CPU box)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import_tensorrt()
        return load_cuda().device_count() > 0
    except (MissingDependencyError, BackendError) as exc:
        log.info("TensorRT plans present but not usable here (%s): using ONNX Runtime", exc)
        return False


def select_model(
    manifest: Manifest,
    role: Role,
    precision: PrecisionChoice = "auto",
    backend: BackendChoice = "auto",
    provider: ProviderChoice | None = None,
) -> ModelSelection:
    """Choose the file and library that run ``role`` (rules in the module docstring).

    Raises:
        BundleError: The bundle has no file for this role/precision/backend.
        MissingDependencyError: The chosen library is not installed.
    """
    if backend == "auto":
        has_plan = any(e.role == role and e.format == "tensorrt" for e in manifest.models)
        backend = "tensorrt" if has_plan and _tensorrt_usable() else "onnxruntime"
    if backend == "tensorrt":
        return _select_tensorrt(manifest, role, precision)
    if backend == "onnxruntime":
        return _select_onnxruntime(manifest, role, precision, provider)
    raise BundleError(f"unknown backend {backend!r}: choose auto, onnxruntime or tensorrt")


def create_backend(bundle: str | Path, manifest: Manifest, selection: ModelSelection, threads: int | None = None) -> Backend:
    """Verify the selected file's sha256 and wrap it in a backend (activate it with ``with``).

    Raises:
        BundleError: The file is missing or its hash does not match the manifest.
    """
    verify_files(bundle, manifest, (selection.entry,))
    path = Path(bundle) / selection.entry.file
    if selection.backend == "tensorrt":
        return TensorRTBackend(path, selection.entry.build, bundle)
    return OnnxRuntimeBackend(
        path,
        provider=selection.provider,
        threads=threads,
        pre_optimized=selection.pre_optimized,
        fp16=selection.fp16_build,
        # ONNX Runtime's TensorRT provider builds its engines at session start (minutes): keep them
        # next to the plans build-engines writes, so only the first start pays.
        cache_dir=Path(bundle) / ORT_TENSORRT_CACHE,
    )


def open_backend(
    bundle: str | Path,
    manifest: Manifest,
    role: Role,
    precision: PrecisionChoice = "auto",
    backend: BackendChoice = "auto",
    provider: ProviderChoice | None = None,
) -> Backend:
    """The backend that runs ``role`` from a bundle (not yet active: use ``with``).

    Example:
        >>> manifest = load_manifest("runs/bundle", verify=False)  # doctest: +SKIP
        >>> with open_backend("runs/bundle", manifest, "classifier", "fp32") as b:  # doctest: +SKIP
        ...     prob = b.infer({"image": batch})["prob"]
    """
    return create_backend(bundle, manifest, select_model(manifest, role, precision, backend, provider))
