"""Build target-specific model files from a bundle's ONNX graphs, on the target box.

``spine-edge build-engines`` runs here. It reads the bundle's ONNX graphs and, for this machine,
either builds TensorRT plans (a GPU and TensorRT are present) or saves ONNX Runtime's optimised CPU
graphs, records each file in the manifest with what it was built with and for, and persists the
TensorRT timing cache in the bundle so that the next build on the same box is faster.

This module runs on the target box: it never imports torch (or ``onnx``), and it imports
tensorrt, onnxruntime and the CUDA binding only inside the functions that use them.

Precision on TensorRT. TensorRT 11 builds strongly typed networks only: the precision comes from
the ONNX graph (an FP16 graph, or an INT8 Q/DQ graph). TensorRT 10 accepts that too, and is asked
for it explicitly (``STRONGLY_TYPED``) whenever the bundle has a graph of the wanted precision, so
the plan computes what the export measured. Only when the bundle has no FP16 graph and the builder
still offers ``BuilderFlag.FP16`` (TensorRT 10) is an FP16 plan built from the FP32 graph with that
flag. INT8 is always explicit quantisation from the symmetric Q/DQ graph; implicit calibration is
deprecated since TensorRT 10.1 and gone in 11. Under strong typing every op outside a Q/DQ pair
runs in the graph's own type, so an INT8 plan is only faster than FP16 when its graph has an FP16
body (Q/DQ around FP16 ops; export's precision step writes it): this builder takes such a graph as
it is, records the layer precisions it found (``layers=...`` in the build flags) and warns when an
INT8 plan's body is FP32.

Proof before use. Each plan is deserialised and run right after it is built, on the bundle's parity
canvases (``parity/<role>.npz``, written at export by :func:`write_parity_set`; seeded synthetic
canvases when the bundle has none) at the profile's min and max batch, and compared with ONNX
Runtime FP32 on the same canvases (:mod:`spine_edge.fidelity`). The result goes into the entry's
``build.parity``; a plan that breaks :data:`~spine_edge.fidelity.PLAN_GATES` is refused (reported as
failed, never recorded).

Caches. ONNX Runtime's TensorRT provider caches engines under a key of file and tensor names, so the
runtime keys its cache folder by the graph's sha256; :func:`clear_stale_caches` deletes the folders of
graphs the manifest no longer lists (export calls it after writing a bundle, ``build_engines`` on
every run).

OpenVINO. On a CPU build with openvino installed, :func:`build_openvino` compiles the FP32 graph and
the symmetric INT8 graph into the bundle's OpenVINO cache, races each against ONNX Runtime on the
parity canvases, checks its outputs against ONNX Runtime FP32, and records an ``openvino`` entry (the
same ONNX file, the OpenVINO version, this CPU, both times) only where OpenVINO won: that entry is
what makes ``--backend auto`` choose OpenVINO on this CPU; a later build where it loses removes it.

Atomicity. New files get content-addressed names (``<role>.<precision>.<sha12>...``) next to the
old ones, the manifest is then replaced atomically, and only after that are the replaced files
deleted; a build interrupted at any point leaves the previous manifest and its files valid.

Example:
    >>> report = build_engines(Path("runs/bundle"), BuildConfig(target="auto"))  # doctest: +SKIP
    >>> report.reason  # doctest: +SKIP
    'TensorRT not installed: prepared ONNX Runtime CPU models'
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from spine_edge.backends.base import DEFAULT_BATCH, BatchRange
from spine_edge.backends.cuda import GPU_EXTRA, GpuInfo, load_cuda
from spine_edge.backends.onnxruntime import (
    CACHE_KEY_CHARS,
    ORT_TENSORRT_CACHE,
    TIMING_CACHE_DIR,
    available_cores,
    cpu_model_name,
    import_onnxruntime,
)
from spine_edge.backends.openvino import OPENVINO_CACHE
from spine_edge.backends.tensorrt import TensorRTBackend, create_builder, import_tensorrt, trt_logger
from spine_edge.bundle import (
    MANIFEST_NAME,
    BuildInfo,
    Manifest,
    ModelEntry,
    ModelFormat,
    Precision,
    Role,
    TensorSpec,
    load_manifest,
    parity_file,
    sha256_file,
    verify_files,
    verify_parity_set,
    write_manifest,
)
from spine_edge.errors import BackendError, BundleError, MissingDependencyError
from spine_edge.fidelity import (
    PLAN_GATES,
    ClassifierFidelity,
    DetectionFidelity,
    compare_classifier,
    compare_detections,
    gate_violations,
)
from spine_edge.io_utils import write_bytes_atomic
from spine_edge.postprocess import decode_yolo
from spine_edge.support import json_safe

log = logging.getLogger(__name__)

Target = Literal["auto", "tensorrt", "onnxruntime-cpu"]
BuiltTarget = Literal["tensorrt", "onnxruntime-cpu"]

PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
ROLES: tuple[Role, ...] = ("classifier", "detector")
#: Bundle sub-folders for built files.
TRT_DIR = "trt"
CPU_DIR = "cpu"
#: Bundle-relative path of the persisted TensorRT timing cache.
DEFAULT_TIMING_CACHE = f"{TRT_DIR}/timing.cache"
#: Canvases generated when the bundle has no parity set (seeded, so reruns compare the same inputs).
SYNTHETIC_CANVASES = 8

#: Which ONNX graphs each target may build from, most specific first.
_SOURCE_TARGETS: dict[BuiltTarget, tuple[str, ...]] = {
    "tensorrt": ("tensorrt", "any"),
    "onnxruntime-cpu": ("onnxruntime", "any"),
}
_OUTPUT_FORMAT: dict[BuiltTarget, ModelFormat] = {"tensorrt": "tensorrt", "onnxruntime-cpu": "onnx-optimized"}

#: How a TensorRT network gets its precision: from the graph's types, or from a builder flag.
TypingMode = Literal["graph", "fp16-flag"]


class EngineBuildError(BackendError):
    """A model could not be built or prepared for this machine."""


@dataclass(frozen=True)
class BuildConfig:
    """What ``build_engines`` builds, and with which limits.

    Attributes:
        target: ``auto`` (TensorRT if it and a CUDA GPU are present, else ONNX Runtime CPU),
            ``tensorrt`` or ``onnxruntime-cpu``.
        precisions: Precisions to build; empty means every precision the bundle provides for the
            target (on TensorRT 10 that includes FP16 from the FP32 graph).
        classifier_batch: Optimisation profile of the classifier plans (the cascade batches images).
        detector_batch: Optimisation profile of the detector plans (only gate-positive images).
        workspace_mib: TensorRT builder workspace limit; 1 GiB leaves room on a 4 GB card.
        timing_cache: Bundle-relative path of the TensorRT timing cache, reused across builds.
        threads: ONNX Runtime intra-op threads; 0 uses every core available to this process.
        device: CUDA device to build on (the plans run on the same GPU model).
        parity: Run and compare each TensorRT plan before recording it (needs onnxruntime for the
            FP32 reference unless the parity set stores it); off only to rebuild quickly by hand.
        openvino: On CPU builds where openvino is installed, race it against ONNX Runtime and record
            the roles it runs faster (:func:`build_openvino`); off for a build that must not depend
            on timings.
    """

    target: Target = "auto"
    precisions: tuple[Precision, ...] = ()
    classifier_batch: BatchRange = DEFAULT_BATCH["classifier"]
    detector_batch: BatchRange = DEFAULT_BATCH["detector"]
    workspace_mib: int = 1024
    timing_cache: str = DEFAULT_TIMING_CACHE
    threads: int = 0
    device: int = 0
    parity: bool = True
    openvino: bool = True

    def __post_init__(self) -> None:
        if self.target not in ("auto", "tensorrt", "onnxruntime-cpu"):
            raise ValueError(f"target must be auto, tensorrt or onnxruntime-cpu, got {self.target!r}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
        if self.workspace_mib < 1 or self.threads < 0 or self.device < 0:
            raise ValueError(
                f"workspace_mib must be >= 1, threads and device >= 0, got {self.workspace_mib}, {self.threads}, "
                f"{self.device}"
            )

    def batch_for(self, role: Role) -> BatchRange:
        """The optimisation profile for a role."""
        return self.classifier_batch if role == "classifier" else self.detector_batch


@dataclass(frozen=True)
class BuildJob:
    """One file to build: a role and precision, the ONNX entry it comes from, and how it is typed."""

    role: Role
    precision: Precision
    source: ModelEntry
    typing: TypingMode = "graph"


@dataclass(frozen=True)
class BuiltModel:
    """One file that was built and recorded in the manifest.

    Attributes:
        parity: One line on how the file compared with ONNX Runtime FP32 (empty when not checked).
    """

    role: Role
    precision: Precision
    file: str
    source: str
    size_bytes: int
    seconds: float
    parity: str = ""


@dataclass(frozen=True)
class SkippedModel:
    """A role/precision that was not built, and why."""

    role: Role
    precision: Precision
    reason: str


@dataclass(frozen=True)
class FailedModel:
    """A role/precision whose build failed; the manifest keeps its previous entry, if any."""

    role: Role
    precision: Precision
    source: str
    message: str


@dataclass(frozen=True)
class BuildReport:
    """Result of :func:`build_engines`.

    Attributes:
        bundle: The bundle folder.
        target: ``tensorrt`` or ``onnxruntime-cpu``: the path that was taken.
        reason: One line saying which path was taken and why.
        builder_version: TensorRT or ONNX Runtime version.
        device: GPU or CPU name.
        built: Files built and recorded in the manifest.
        skipped: Role/precision pairs not built, with the reason.
        failed: Role/precision pairs whose build failed.
        timing_cache: Bundle-relative timing-cache path (TensorRT only).
    """

    bundle: Path
    target: BuiltTarget
    reason: str
    builder_version: str
    device: str
    built: tuple[BuiltModel, ...]
    skipped: tuple[SkippedModel, ...] = ()
    failed: tuple[FailedModel, ...] = ()
    timing_cache: str = ""

    @property
    def ok(self) -> bool:
        """True when every planned build succeeded."""
        return not self.failed


# ---------------------------------------------------------------------------------------------
# Planning: pure functions of the manifest, testable without any builder installed.


def _sources(manifest: Manifest, target: BuiltTarget) -> dict[tuple[Role, Precision], ModelEntry]:
    """The ONNX graph each (role, precision) builds from on ``target``, preferring a dedicated one."""
    allowed = _SOURCE_TARGETS[target]
    chosen: dict[tuple[Role, Precision], ModelEntry] = {}
    for entry in manifest.models:
        if entry.format != "onnx" or entry.target not in allowed:
            continue
        key = (entry.role, entry.precision)
        if key not in chosen or allowed.index(entry.target) < allowed.index(chosen[key].target):
            chosen[key] = entry
    return chosen


def plan_builds(
    manifest: Manifest,
    target: BuiltTarget,
    precisions: tuple[Precision, ...] = (),
    fp16_flag: bool = False,
) -> tuple[tuple[BuildJob, ...], tuple[SkippedModel, ...]]:
    """Decide which files to build for a target.

    Args:
        manifest: The bundle's manifest.
        target: ``tensorrt`` or ``onnxruntime-cpu``.
        precisions: Wanted precisions; empty for every precision the bundle has for a role, plus
            FP16 on TensorRT.
        fp16_flag: Whether the TensorRT builder still has ``BuilderFlag.FP16`` (TensorRT 10), so an
            FP16 plan can come from the FP32 graph when the bundle has no FP16 graph.

    Returns:
        The jobs, in role then precision order, and the wanted pairs that cannot be built here.
    """
    sources = _sources(manifest, target)
    roles = [r for r in ROLES if any(e.role == r and e.format == "onnx" for e in manifest.models)]
    jobs: list[BuildJob] = []
    skipped: list[SkippedModel] = []
    for role in roles:
        # By default: every precision exported for the role (those meant for the other target are
        # reported as skipped), plus FP16 on TensorRT, the usual GPU precision: built, or explained.
        present = {e.precision for e in manifest.models if e.role == role and e.format == "onnx"}
        if target == "tensorrt" and "fp32" in present:
            present.add("fp16")
        for precision in precisions or tuple(p for p in PRECISIONS if p in present):
            source = sources.get((role, precision))
            if source is not None:
                jobs.append(BuildJob(role, precision, source))
            elif precision == "fp16" and target == "tensorrt" and fp16_flag and (role, "fp32") in sources:
                jobs.append(BuildJob(role, precision, sources[(role, "fp32")], typing="fp16-flag"))
            else:
                skipped.append(SkippedModel(role, precision, _missing_reason(manifest, role, precision, target)))
    return tuple(jobs), tuple(skipped)


def _missing_reason(manifest: Manifest, role: Role, precision: Precision, target: BuiltTarget) -> str:
    others = sorted(
        {e.target for e in manifest.models if e.role == role and e.precision == precision and e.format == "onnx"}
    )
    if others:
        why = " (U8S8 INT8 is for ONNX Runtime, symmetric Q/DQ for TensorRT)" if precision == "int8" else ""
        return f"the bundle's {precision} graph is meant for {', '.join(others)} only{why}, not for {target}"
    if precision == "fp16" and target == "tensorrt":
        return (
            "this TensorRT builds FP16 only from an FP16 graph (strong typing) and the bundle has none: "
            "re-export the bundle with FP16 graphs (spine-edge export)"
        )
    return f"the bundle has no {precision} ONNX graph for the {role}; re-export with that precision to build it"


# ---------------------------------------------------------------------------------------------
# Which builder this machine offers.


def _tensorrt_or_none() -> Any:
    """The tensorrt module, or None when it is not installed.

    Raises:
        BackendError: tensorrt is installed but its libraries do not load (a broken install is
            reported, not silently replaced by a CPU build).
    """
    try:
        return import_tensorrt()
    except MissingDependencyError as exc:
        log.debug("tensorrt not importable: %s", exc)
        return None


@dataclass(frozen=True)
class _Resolved:
    """The path ``build_engines`` takes, and what it needs for it."""

    target: BuiltTarget
    reason: str
    trt: Any = None
    gpu: GpuInfo | None = None
    builder: Any = None
    logger: Any = None  # the builder's; TensorRT expects one logger for the builder, parser and runtime


def _resolve_target(requested: Target, device: int = 0) -> _Resolved:
    """Which builder runs, and why (``auto`` falls back to the CPU at every TensorRT failure).

    Raises:
        MissingDependencyError: ``--target tensorrt`` without tensorrt or cuda-bindings.
        EngineBuildError: ``--target tensorrt`` and TensorRT cannot start on a GPU here.
    """
    if requested == "onnxruntime-cpu":
        return _Resolved("onnxruntime-cpu", "--target onnxruntime-cpu: prepared ONNX Runtime CPU models")
    try:
        trt = _tensorrt_or_none()
        if trt is None:
            if requested == "tensorrt":
                raise MissingDependencyError("tensorrt", GPU_EXTRA, "Building TensorRT engines (--target tensorrt)")
            return _Resolved("onnxruntime-cpu", "TensorRT not installed: prepared ONNX Runtime CPU models")
        # The same query the TensorRT backend makes, so the recorded GPU matches what it checks.
        gpu = load_cuda(device).device_info(device)
        # Creating the builder is where a driver too old for the wheel's CUDA shows.
        logger = trt_logger(trt)
        builder = create_builder(trt, logger)
    except (MissingDependencyError, BackendError) as exc:
        if requested == "tensorrt":
            if isinstance(exc, MissingDependencyError):
                raise
            raise EngineBuildError(
                f"TensorRT cannot build on a GPU here ({exc}); build on the GPU box, or use --target onnxruntime-cpu"
            ) from exc
        return _Resolved("onnxruntime-cpu", f"TensorRT not usable here ({exc}): prepared ONNX Runtime CPU models")
    return _Resolved(
        "tensorrt",
        f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}, device {device}): "
        "built TensorRT plans",
        trt,
        gpu,
        builder,
        logger,
    )


# ---------------------------------------------------------------------------------------------
# Files.


def _temp_file(folder: Path, job: BuildJob, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{job.role}.{job.precision}.", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def _store(tmp: Path, bundle: Path, subdir: str, job: BuildJob, suffix: str) -> tuple[str, str, int]:
    """Move a finished temp file to its content-addressed name; return (bundle-relative path, sha256, size)."""
    digest = sha256_file(tmp)
    relative = f"{subdir}/{job.role}.{job.precision}.{digest[:12]}{suffix}"
    size = tmp.stat().st_size
    # mkstemp makes owner-only files; the kiosk service reading the bundle may run as another user.
    tmp.chmod(0o644)
    os.replace(tmp, bundle / relative)
    return relative, digest, size


class _Builder(Protocol):
    version: str
    device: str
    fp16_flag: bool

    def build(self, job: BuildJob) -> ModelEntry: ...

    def finish(self) -> str: ...


# ---------------------------------------------------------------------------------------------
# ONNX Runtime CPU.


class _OrtCpuBuilder:
    """Saves ONNX Runtime's fully optimised graph of each ONNX file for this CPU."""

    fp16_flag = False

    def __init__(self, bundle: Path, config: BuildConfig) -> None:
        self._ort = import_onnxruntime()
        self._bundle = bundle
        self._config = config
        self.version = str(self._ort.__version__)
        self.device = cpu_model_name()
        self.threads = config.threads or available_cores()

    def build(self, job: BuildJob) -> ModelEntry:
        ort = self._ort
        source = self._bundle / job.source.file
        tmp = _temp_file(self._bundle / CPU_DIR, job, ".tmp.onnx")
        try:
            options = ort.SessionOptions()
            # ENABLE_ALL adds layout (NCHWc) and fused nodes that are only valid for this CPU and ORT
            # version; both are recorded, and the runtime falls back to the source graph on a mismatch.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(tmp)
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3  # ORT warns that the saved graph is hardware specific: known, recorded
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
            # Load what was saved before the manifest points at it: proves it runs on this box.
            check = ort.SessionOptions()
            check.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            check.log_severity_level = 3
            ort.InferenceSession(str(tmp), check, providers=["CPUExecutionProvider"])
            relative, digest, _ = _store(tmp, self._bundle, CPU_DIR, job, ".opt.onnx")
        except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, …)
            tmp.unlink(missing_ok=True)
            raise EngineBuildError(
                f"{source}: ONNX Runtime {self.version} could not optimise it ({exc}); check that the file "
                "loads with onnxruntime, or re-export the bundle"
            ) from exc
        batch = self._config.batch_for(job.role)
        return ModelEntry(
            role=job.role,
            precision=job.precision,
            format="onnx-optimized",
            file=relative,
            sha256=digest,
            inputs=job.source.inputs,
            outputs=job.source.outputs,
            target="onnxruntime",
            build=BuildInfo(
                builder="onnxruntime",
                builder_version=self.version,
                device=self.device,
                source=job.source.file,
                build_flags=("graph_optimization_level=ORT_ENABLE_ALL", f"intra_op_num_threads={self.threads}"),
                min_batch=batch.min,
                opt_batch=batch.opt,
                max_batch=batch.max,
                threads=self.threads,
            ),
            notes=(
                "ONNX Runtime ORT_ENABLE_ALL graph (may hold NCHWc/fused nodes): valid only for this CPU and "
                "ONNX Runtime version; any batch size runs, the range records the batching prepared for"
            ),
        )

    def finish(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# Caches and parity: plain functions, testable without a GPU.


def clear_stale_caches(bundle: Path, manifest: Manifest) -> tuple[Path, ...]:
    """Delete engine and compiled-model cache folders of graphs the manifest no longer lists.

    The runtime keys each graph's cache folder by its sha256, under ``cache/ort-tensorrt`` for ONNX
    Runtime's TensorRT provider (:func:`spine_edge.backends.onnxruntime.ort_tensorrt_cache_dir`) and
    under ``cache/openvino`` for OpenVINO (:func:`spine_edge.backends.openvino.openvino_cache_dir`);
    anything else there (folders of replaced graphs, engines of the old name-keyed layout) could only
    ever be loaded by mistake. The TensorRT provider's shared timing cache stays.

    Args:
        bundle: The bundle folder.
        manifest: The manifest that is (or is about to be) current.

    Returns:
        The paths removed.
    """
    current = {e.sha256[:CACHE_KEY_CHARS] for e in manifest.models if e.format == "onnx"}
    removed: list[Path] = []
    for cache, keep in ((ORT_TENSORRT_CACHE, current | {TIMING_CACHE_DIR}), (OPENVINO_CACHE, current)):
        root = Path(bundle) / cache
        if not root.is_dir():
            continue
        stale = [child for child in sorted(root.iterdir()) if not (child.name in keep and child.is_dir())]
        for child in stale:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if stale:
            log.info("removed %d stale cache entries under %s", len(stale), root)
        removed.extend(stale)
    return tuple(removed)


@dataclass(frozen=True)
class ParitySet:
    """Canvases a built model must reproduce, with the FP32 reference outputs where known.

    Attributes:
        role: The model role.
        canvases: ``[N, ...]`` inputs with the graph's input shape and dtype.
        reference: ONNX Runtime FP32 outputs of all canvases by output name (empty: compute them).
        source: ``bundle`` (export's real, letterboxed images) or ``synthetic`` (seeded noise: weak
            evidence for boxes, since a detector finds little in noise).
    """

    role: Role
    canvases: np.ndarray
    reference: Mapping[str, np.ndarray]
    source: str


def parity_path(bundle: Path, role: Role) -> Path:
    """Where a role's parity set lives in a bundle (``<role>.npz``: ``canvases`` and ``reference/<output>`` arrays)."""
    return Path(bundle) / parity_file(role)


def write_parity_set(
    bundle: Path, role: Role, canvases: np.ndarray, reference: Mapping[str, np.ndarray] | None = None
) -> Path:
    """Store the canvases (and optionally their FP32 outputs) every build of ``role`` is checked on.

    Export calls this with a few real letterboxed validation images per role (8–16 are enough: the
    check looks for broken plans, not for accuracy); storing the FP32 reference as well lets a target
    box without the CPU onnxruntime run the check.

    Returns:
        The file written.
    """
    arrays = {"canvases": np.ascontiguousarray(canvases)}
    for name, value in (reference or {}).items():
        if len(value) != len(canvases):
            raise ValueError(f"reference {name!r} has {len(value)} rows for {len(canvases)} canvases")
        arrays[f"reference/{name}"] = np.ascontiguousarray(value)
    path = parity_path(bundle, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz", delete=False) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stubs type **kwds loosely
    os.replace(f.name, path)
    return path


def _synthetic_canvases(image: TensorSpec, count: int) -> np.ndarray:
    shape = tuple(d for d in image.shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise EngineBuildError(f"input {image.name!r} has dynamic axes besides the batch {image.shape}: re-export it")
    rng = np.random.default_rng(20240601)
    dims = (count, *(int(d) for d in shape))
    # Smooth gradients with noise and a bright block: more like an X-ray than white noise.
    ramp = np.linspace(0, 1, dims[-1], dtype=np.float32)
    base = rng.uniform(0.2, 0.8, (count,) + (1,) * (len(dims) - 1)).astype(np.float32) * ramp
    values: np.ndarray = np.clip(base + rng.normal(0, 0.08, dims).astype(np.float32), 0, 1)
    values[..., dims[-2] // 4 : dims[-2] // 2, dims[-1] // 3 : dims[-1] // 2] = 0.95
    scaled: np.ndarray = (values * 255).astype(np.uint8) if np.dtype(image.dtype) == np.uint8 else values
    return scaled.astype(image.dtype)


def load_parity_set(bundle: Path, role: Role, image: TensorSpec, manifest: Manifest | None = None) -> ParitySet:
    """The role's parity set from the bundle, or seeded synthetic canvases (with a warning).

    A stored set is checked against the sha256 and size the manifest records for it first
    (:func:`~spine_edge.bundle.verify_parity_set`); one the manifest does not record (an older
    export, or a folder without a manifest) is used unverified, with a warning.

    Args:
        bundle: The bundle folder.
        role: Whose set.
        image: The graph input the canvases must fit.
        manifest: The bundle's manifest (read from ``bundle`` when not given).

    Raises:
        BundleError: The stored set is recorded but missing, does not match its recorded sha256, or
            does not fit the graph's input.
    """
    path = parity_path(bundle, role)
    if manifest is None and (Path(bundle) / MANIFEST_NAME).is_file():
        manifest = load_manifest(bundle, verify=False)
    if manifest is not None and (path.is_file() or any(p.role == role for p in manifest.parity_sets)):
        verify_parity_set(bundle, manifest, role)
    elif path.is_file():
        log.warning("%s: no %s next to the parity set: it is used unverified", bundle, MANIFEST_NAME)
    if not path.is_file():
        log.warning(
            "%s: no parity canvases in the bundle (re-export writes them); checking built plans on %d "
            "synthetic canvases",
            path,
            SYNTHETIC_CANVASES,
        )
        return ParitySet(role, _synthetic_canvases(image, SYNTHETIC_CANVASES), {}, "synthetic")
    with np.load(path) as data:
        canvases = data["canvases"]
        reference = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("reference/")}
    expected = tuple(image.shape[1:])
    if canvases.dtype != np.dtype(image.dtype) or tuple(canvases.shape[1:]) != expected or not len(canvases):
        raise BundleError(
            f"{path}: canvases {canvases.dtype} {canvases.shape} do not fit input {image.name!r} "
            f"({image.dtype} [N, {', '.join(map(str, expected))}]); re-export the bundle"
        )
    return ParitySet(role, canvases, reference, "bundle")


def take_batch(array: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` rows of ``array``, repeated cyclically when it has fewer."""
    return np.ascontiguousarray(array[np.arange(size) % len(array)])


def reference_outputs(bundle: Path, manifest: Manifest, role: Role, canvases: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime FP32 (CPU) outputs of the role's FP32 graph on ``canvases``.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        BundleError: The bundle has no FP32 ONNX graph for the role.
    """
    from spine_edge.backends.onnxruntime import OnnxRuntimeBackend

    entry = manifest.find(role, "fp32", "onnx")
    if entry is None:
        raise BundleError(f"{bundle}: no FP32 ONNX {role} graph to check the built plans against; re-export the bundle")
    verify_files(bundle, manifest, (entry,))
    try:
        with OnnxRuntimeBackend(bundle / entry.file, provider="cpu") as reference:
            return reference.infer({entry.inputs[0].name: canvases})
    except MissingDependencyError as exc:
        raise MissingDependencyError(
            exc.package,
            "cpu",
            "Checking built TensorRT plans against ONNX Runtime FP32 (or re-export with a stored reference)",
        ) from exc


@dataclass(frozen=True)
class ParityResult:
    """How a built model compared with ONNX Runtime FP32, batch by batch.

    Attributes:
        precision: The built model's precision (selects the gates).
        source: Where the canvases came from (``bundle`` or ``synthetic``).
        batches: The batch sizes run (the profile's min and max).
        classifier: One comparison per batch (classifier models).
        detector: One comparison per batch (detector models).
        violations: Broken gates, one sentence each, prefixed with the batch.
    """

    precision: Precision
    source: str
    batches: tuple[int, ...]
    classifier: tuple[ClassifierFidelity, ...] = ()
    detector: tuple[DetectionFidelity, ...] = ()
    violations: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Every gate held at every batch."""
        return not self.violations

    def to_record(self) -> dict[str, Any]:
        """The manifest's ``build.parity`` record."""
        gates = PLAN_GATES[self.precision]
        record: dict[str, Any] = json_safe(
            {
                "reference": "onnxruntime fp32 (CPU)",
                "canvases": self.source,
                "batches": list(self.batches),
                "gates": gates,
                "passed": self.passed,
                "violations": list(self.violations),
                "classifier": [f.to_dict() for f in self.classifier],
                "detector": [f.to_dict() for f in self.detector],
            }
        )
        return record


def check_parity(
    candidate: Any,
    manifest: Manifest,
    entry: ModelEntry,
    parity: ParitySet,
    reference: Mapping[str, np.ndarray],
    batches: tuple[int, ...] = (),
) -> ParityResult:
    """Run an active backend on the parity canvases at the entry's min and max batch and compare.

    Args:
        candidate: An active :class:`~spine_edge.backends.base.Backend` running the built model.
        manifest: The bundle's manifest (gate threshold, detector thresholds).
        entry: The model's entry (role, precision, batch range of a built file, output roles).
        parity: The canvases.
        reference: FP32 outputs of every canvas, by output name.
        batches: Batch sizes to run; empty for the build record's min and max (1 without one).

    Returns:
        The comparisons and any gate broken (:data:`~spine_edge.fidelity.PLAN_GATES`).
    """
    if not batches:
        build = entry.build
        batches = (build.min_batch, build.max_batch) if build is not None else (1,)
    batches = tuple(sorted(set(batches)))
    gates = PLAN_GATES[entry.precision]
    image = entry.inputs[0].name
    classifier: list[ClassifierFidelity] = []
    detector: list[DetectionFidelity] = []
    violations: list[str] = []
    for size in batches:
        out = candidate.infer({image: take_batch(parity.canvases, size)})
        if entry.role == "classifier":
            name = entry.output("probability").name
            fid = compare_classifier(
                take_batch(reference[name], size), out[name], manifest.classifier.threshold, gates.max_abs_dprob
            )
            classifier.append(fid)
            broken = gate_violations(gates, classifier=fid)
        else:
            name = entry.output("yolo_raw").name
            d = manifest.detector
            ref = decode_yolo(take_batch(reference[name], size), d.conf_threshold, d.iou_threshold, d.max_det)
            # Candidate boxes down to half the threshold: a box whose score moved across the threshold still
            # meets its reference twin, while extra low-score boxes rank last and barely move AP.
            cand = decode_yolo(out[name], d.conf_threshold / 2, d.iou_threshold, d.max_det)
            det = compare_detections(ref, cand)
            detector.append(det)
            broken = gate_violations(gates, detector=det)
        violations += [f"batch {size}: {problem}" for problem in broken]
    return ParityResult(entry.precision, parity.source, batches, tuple(classifier), tuple(detector), tuple(violations))


def parity_summary(record: Mapping[str, Any]) -> str:
    """One line from a ``build.parity`` record (empty for an empty record)."""
    if not record:
        return ""
    parts = [
        f"parity {'ok' if record.get('passed') else 'FAILED'} at batch {'/'.join(map(str, record['batches']))} "
        f"({record['canvases']} canvases)"
    ]
    classifier, detector = record.get("classifier") or [], record.get("detector") or []
    if classifier:
        worst = [c["max_abs_dprob"] for c in classifier]
        dprob = "inf" if None in worst else f"{max(worst):.2g}"
        parts.append(f"max |Δprob| {dprob}, {max(c['flips'] for c in classifier)} flips")
    if detector:
        parts.append(f"box AP {min(d['ap'] for d in detector):.3f} vs FP32")
    return ", ".join(parts)


def layer_precisions(network: Any) -> dict[str, int]:
    """Layers per output data type of a parsed TensorRT network (``{"HALF": 212, "INT8": 40, ...}``)."""
    counts: Counter[str] = Counter()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.num_outputs:
            counts[str(layer.get_output(0).dtype).rsplit(".", 1)[-1]] += 1
    return dict(sorted(counts.items()))


def precision_note(precision: Precision, layers: Mapping[str, int]) -> str:
    """A warning for an INT8 plan whose unquantised body is FP32 (empty when there is nothing to say)."""
    if precision == "int8" and layers and not layers.get("HALF"):
        return (
            "INT8 plan with an FP32 body: under strong typing every op outside the Q/DQ pairs runs in FP32, so "
            "it is unlikely to beat the FP16 plan; export the TensorRT INT8 graph with an FP16 body"
        )
    return ""


# ---------------------------------------------------------------------------------------------
# TensorRT.


class _TensorRTBuilder:
    """Builds plain TensorRT plans (no metadata prefix: trtexec and Triton load them as they are)."""

    def __init__(self, bundle: Path, config: BuildConfig, manifest: Manifest, resolved: _Resolved) -> None:
        assert resolved.trt is not None and resolved.gpu is not None and resolved.builder is not None
        trt = resolved.trt
        self._trt = trt
        self._bundle = bundle
        self._config = config
        self._manifest = manifest
        self._gpu = resolved.gpu
        self._logger = resolved.logger
        self._builder = resolved.builder
        self._cache: Any = None
        self._parity: dict[Role, tuple[ParitySet, Mapping[str, np.ndarray]]] = {}
        self.version = str(trt.__version__)
        self.device = resolved.gpu.name
        # TensorRT 11 removed the precision builder flags; 10.x still has them (deprecated since 10.12).
        self.fp16_flag = hasattr(trt.BuilderFlag, "FP16")

    def _network(self, job: BuildJob) -> tuple[Any, tuple[str, ...]]:
        trt = self._trt
        if job.typing == "fp16-flag":
            return self._builder.create_network(0), ("fp16-flag",)
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        # TensorRT 10 needs the flag; 11 types every network strongly and ignores (or drops) it.
        return self._builder.create_network(0 if strong is None else 1 << int(strong)), ("strongly-typed",)

    def _new_timing_cache(self, builder_config: Any, seed: bytes, path: Path) -> Any:
        try:
            cache = builder_config.create_timing_cache(seed)
        except (RuntimeError, TypeError) as exc:  # pybind11's mapping of TensorRT's failure for bad bytes
            cache, reason = None, str(exc)
        else:
            reason = "TensorRT returned no cache"
        if cache is None and seed:
            # A damaged cache only costs build time: discard it (finish() overwrites the file).
            log.warning("%s: unreadable timing cache (%s); discarding it and starting a new one", path, reason)
            return self._new_timing_cache(builder_config, b"", path)
        if cache is None:
            raise EngineBuildError(f"TensorRT {self.version} could not create an empty timing cache ({reason})")
        return cache

    def _attach_timing_cache(self, builder_config: Any) -> None:
        """Reuse one timing cache across this run's builds, seeded from the bundle's file."""
        path = self._bundle / self._config.timing_cache
        if self._cache is None:
            self._cache = self._new_timing_cache(builder_config, path.read_bytes() if path.is_file() else b"", path)
        if not builder_config.set_timing_cache(self._cache, False):
            # Made on another GPU or TensorRT version: its timings would mislead tactic selection.
            log.warning("%s: timing cache from another GPU or TensorRT version; starting a new one", path)
            self._cache = self._new_timing_cache(builder_config, b"", path)
            if not builder_config.set_timing_cache(self._cache, False):
                raise EngineBuildError(f"TensorRT {self.version} refused a new, empty timing cache")

    def _add_profile(self, network: Any, builder_config: Any, job: BuildJob, source: Path) -> BatchRange:
        """Profile over the batch axis of every dynamic input; other axes must be fixed."""
        batch = self._config.batch_for(job.role)
        profile = self._builder.create_optimization_profile()
        dynamic = False
        fixed: set[int] = set()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise EngineBuildError(
                    f"{source}: input '{tensor.name}' has dynamic axes besides the batch {shape}; "
                    "re-export it with a fixed image size"
                )
            if shape and shape[0] < 0:
                rest = shape[1:]
                profile.set_shape(tensor.name, (batch.min, *rest), (batch.opt, *rest), (batch.max, *rest))
                dynamic = True
            elif shape:
                fixed.add(shape[0])
        if dynamic:
            builder_config.add_optimization_profile(profile)
            return batch
        size = max(fixed, default=1)
        return BatchRange(size, size, size)

    def build(self, job: BuildJob) -> ModelEntry:
        trt = self._trt
        source = self._bundle / job.source.file
        network, flags = self._network(job)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(source)):
            raise EngineBuildError(_parser_message(parser, source, self.version))
        layers = layer_precisions(network)
        note = precision_note(job.precision, layers)
        if note:
            log.warning("%s: %s", source, note)
        builder_config = self._builder.create_builder_config()
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self._config.workspace_mib << 20)
        if "fp16-flag" in flags:
            builder_config.set_flag(trt.BuilderFlag.FP16)
        if job.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            # The FP32 plan is the accuracy reference: TF32's 10-bit mantissa would blur what FP16 loses.
            builder_config.clear_flag(trt.BuilderFlag.TF32)
            flags += ("no-tf32",)
        flags += ("layers=" + ",".join(f"{k.lower()}:{v}" for k, v in layers.items()),)
        batch = self._add_profile(network, builder_config, job, source)
        self._attach_timing_cache(builder_config)
        plan = self._builder.build_serialized_network(network, builder_config)
        if plan is None:
            raise EngineBuildError(
                f"{source}: TensorRT {self.version} could not build a {job.precision} engine on {self.device} "
                f"(see TensorRT's messages above); try a smaller --max-batch or a larger --workspace-mb "
                f"(now {self._config.workspace_mib})"
            )
        tmp = _temp_file(self._bundle / TRT_DIR, job, ".tmp.plan")
        try:
            tmp.write_bytes(memoryview(plan))
            relative, digest, _ = _store(tmp, self._bundle, TRT_DIR, job, ".plan")
        finally:
            tmp.unlink(missing_ok=True)
        entry = ModelEntry(
            role=job.role,
            precision=job.precision,
            format="tensorrt",
            file=relative,
            sha256=digest,
            inputs=job.source.inputs,
            outputs=job.source.outputs,
            target="tensorrt",
            build=BuildInfo(
                builder="tensorrt",
                builder_version=self.version,
                device=self.device,
                source=job.source.file,
                compute_capability=self._gpu.compute_capability,
                build_flags=(*flags, f"workspace={self._config.workspace_mib}MiB", f"device={self._config.device}"),
                min_batch=batch.min,
                opt_batch=batch.opt,
                max_batch=batch.max,
                timing_cache=self._config.timing_cache,
            ),
            notes="plain TensorRT plan (no metadata prefix); runs only with this TensorRT version and GPU"
            + (f"; {note}" if note else ""),
        )
        if not self._config.parity:
            return entry
        try:
            result = self._prove(entry)
        except BaseException:
            (self._bundle / relative).unlink(missing_ok=True)
            raise
        if not result.passed:
            (self._bundle / relative).unlink(missing_ok=True)
            raise EngineBuildError(
                f"{source}: the {job.precision} TensorRT plan does not reproduce ONNX Runtime FP32 on the "
                f"{result.source} parity canvases ({'; '.join(result.violations)}); it was not recorded. "
                "Build another precision, or re-export the bundle"
            )
        assert entry.build is not None
        return replace(entry, build=replace(entry.build, parity=result.to_record()))

    def _prove(self, entry: ModelEntry) -> ParityResult:
        """Deserialise the new plan and check it against ONNX Runtime FP32 on the parity canvases."""
        try:
            if entry.role not in self._parity:
                parity = load_parity_set(self._bundle, entry.role, entry.inputs[0], self._manifest)
                reference = parity.reference or reference_outputs(
                    self._bundle, self._manifest, entry.role, parity.canvases
                )
                self._parity[entry.role] = (parity, reference)
            parity, reference = self._parity[entry.role]
            with TensorRTBackend(self._bundle / entry.file, entry.build, self._bundle, self._config.device) as plan:
                return check_parity(plan, self._manifest, entry, parity, reference)
        except BundleError as exc:
            raise EngineBuildError(f"{entry.file}: cannot check the plan ({exc}); it was not recorded") from exc
        except EngineBuildError:
            raise
        except BackendError as exc:
            raise EngineBuildError(
                f"{entry.file}: the freshly built plan does not run ({exc}); it was not recorded"
            ) from exc

    def finish(self) -> str:
        """Persist the timing cache; return its bundle-relative path."""
        if self._cache is None:
            return ""
        write_bytes_atomic(self._bundle / self._config.timing_cache, bytes(memoryview(self._cache.serialize())))
        return self._config.timing_cache


def _parser_message(parser: Any, source: Path, version: str) -> str:
    details = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = _optional_call(error, "node_name") or f"#{_optional_call(error, 'node')}"
        op = _optional_call(error, "node_operator") or "?"
        details.append(f"node '{node}' ({op}): {error.desc()}")
    return (
        f"{source}: TensorRT {version}'s ONNX parser refused the graph: {'; '.join(details) or 'no detail given'}. "
        f"List every unsupported op with `python -m spine_edge.export.opcheck {source}` on the export machine, then re-export"
    )


def _optional_call(obj: Any, name: str) -> Any:
    """Call an accessor that older TensorRT 10 releases may not have."""
    method = getattr(obj, name, None)
    return method() if callable(method) else None


# ---------------------------------------------------------------------------------------------
# The entry point.


# ---------------------------------------------------------------------------------------------
# OpenVINO on the CPU: compiled into the bundle's model cache, raced against ONNX Runtime, recorded
# where it won.

#: Timed batch-1 calls per library when ``build-engines`` races OpenVINO against ONNX Runtime.
OPENVINO_RACE_RUNS = 5


def _median_batch1_ms(backend: Any, canvases: np.ndarray, runs: int) -> float:
    """Median milliseconds of ``runs`` batch-1 calls of an active backend (one untimed call first)."""
    name = next(iter(backend.input_specs()))
    feeds = [{name: take_batch(canvases[i % len(canvases) :], 1)} for i in range(runs + 1)]
    backend.infer(feeds[0])
    samples = []
    for feed in feeds[1:]:
        start = time.perf_counter()
        backend.infer(feed)
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


@dataclass(frozen=True)
class OpenVinoOutcome:
    """What the OpenVINO step did with one role and precision.

    OpenVINO is an optional accelerator: where it cannot compile a graph, computes it differently
    from ONNX Runtime FP32 or is slower, nothing is recorded and the build still succeeds on ONNX Runtime.

    Attributes:
        entry: The manifest entry to record (OpenVINO was faster and its parity held), else None.
        built: Its line in the build report.
        skipped: Why nothing was recorded (slower, parity broken, compile failure, no source graph), else None.
    """

    entry: ModelEntry | None = None
    built: BuiltModel | None = None
    skipped: SkippedModel | None = None


def build_openvino(
    bundle: Path, manifest: Manifest, config: BuildConfig, runs: int = OPENVINO_RACE_RUNS
) -> list[OpenVinoOutcome]:
    """Compile the CPU graphs with OpenVINO, race them against ONNX Runtime here, record the winners.

    For each role at FP32 and INT8 (or ``config.precisions``): OpenVINO runs the graph the TensorRT
    target uses (FP32; the symmetric INT8 Q/DQ graph), ONNX Runtime its own (FP32; U8S8 INT8), both
    at batch 1 on the parity canvases with ``config.threads``. OpenVINO's compiled model goes into
    the bundle's cache (:func:`~spine_edge.backends.openvino.openvino_cache_dir`) and its outputs
    are checked against ONNX Runtime FP32 (:func:`check_parity`). Where OpenVINO was faster and
    its parity held, an entry of format ``openvino`` is recorded (the ONNX file it runs, the
    OpenVINO version, this CPU, both times): ``--backend auto`` then picks OpenVINO for that role
    on this CPU with this OpenVINO. BF16 (the FP32 graph with OpenVINO's BF16 hint) is timed and
    checked too where the CPU has it, against FP16's plan gates, and recorded in the FP32 entry.

    Raises:
        MissingDependencyError: openvino is not installed.
    """
    from spine_edge.backends.onnxruntime import OnnxRuntimeBackend
    from spine_edge.backends.openvino import (
        OpenVinoBackend,
        computes_natively,
        device_capabilities,
        import_openvino,
        openvino_cache_dir,
    )

    ov = import_openvino()
    version, cpu = str(ov.__version__), cpu_model_name()
    bf16 = computes_natively("bf16", device_capabilities(ov.Core()))
    threads = config.threads or available_cores()
    outcomes: list[OpenVinoOutcome] = []
    cpu_precisions: tuple[Precision, ...] = ("fp32", "int8")
    for role in ROLES:
        for precision in cpu_precisions:
            if config.precisions and precision not in config.precisions:
                continue
            source = manifest.find(role, precision, "onnx", target="tensorrt")
            rival = manifest.find(role, precision, "onnx", target="onnxruntime")
            if source is None or rival is None:
                continue  # nothing to race: the bundle has no such graph, as the CPU build's own plan reports
            start = time.perf_counter()
            try:
                parity = load_parity_set(bundle, role, source.inputs[0], manifest)
                reference = parity.reference or reference_outputs(bundle, manifest, role, parity.canvases)
                cache = openvino_cache_dir(bundle, source)
                with OnnxRuntimeBackend(bundle / rival.file, provider="cpu", threads=threads) as backend:
                    ort_ms = _median_batch1_ms(backend, parity.canvases, runs)
                with OpenVinoBackend(bundle / source.file, "fp32", threads, cache, inputs=source.inputs) as backend:
                    ov_ms = _median_batch1_ms(backend, parity.canvases, runs)
                    result = check_parity(
                        backend, manifest, source, parity, reference, batches=(1, len(parity.canvases))
                    )
                record = result.to_record() | {
                    "latency_ms_batch1": {"openvino": round(ov_ms, 3), "onnxruntime": round(ort_ms, 3)}
                }
                if bf16 and precision == "fp32":
                    with OpenVinoBackend(bundle / source.file, "bf16", threads, cache, inputs=source.inputs) as backend:
                        bf16_ms = _median_batch1_ms(backend, parity.canvases, runs)
                        # BF16 keeps 8 mantissa bits to FP16's 11: held to FP16's plan gates until it has its own.
                        as_fp16 = replace(source, precision="fp16")
                        bf16_result = check_parity(
                            backend, manifest, as_fp16, parity, reference, batches=(1, len(parity.canvases))
                        )
                    record["latency_ms_batch1"]["openvino_bf16"] = round(bf16_ms, 3)
                    record["bf16"] = bf16_result.to_record() | {"gates_of": "fp16"}
            except (BackendError, BundleError) as exc:
                log.warning("%s %s: OpenVINO not used: %s", role, precision, exc)
                outcomes.append(OpenVinoOutcome(skipped=SkippedModel(role, precision, f"OpenVINO failed: {exc}")))
                continue
            if not result.passed:
                message = f"OpenVINO {version} outputs differ from ONNX Runtime FP32: {'; '.join(result.violations)}"
                log.warning("%s %s: %s", role, precision, message)
                outcomes.append(OpenVinoOutcome(skipped=SkippedModel(role, precision, message)))
                continue
            if ov_ms >= ort_ms:
                reason = (
                    f"OpenVINO {version} is not faster on this CPU ({ov_ms:.1f} ms vs ONNX Runtime {ort_ms:.1f} ms "
                    "at batch 1): not recorded, ONNX Runtime stays the automatic choice"
                )
                outcomes.append(OpenVinoOutcome(skipped=SkippedModel(role, precision, reason)))
                continue
            flags = (
                "INFERENCE_PRECISION_HINT=f32",
                "PERFORMANCE_HINT=LATENCY",
                "NUM_STREAMS=1",
                f"INFERENCE_NUM_THREADS={threads}",
                f"CACHE_DIR={cache.relative_to(bundle)}",
                *(("bf16=available",) if bf16 and precision == "fp32" else ()),
            )
            entry = ModelEntry(
                role=role,
                precision=precision,
                format="openvino",
                file=source.file,
                sha256=source.sha256,
                inputs=source.inputs,
                outputs=source.outputs,
                target=source.target,
                build=BuildInfo(
                    builder="openvino",
                    builder_version=version,
                    device=cpu,
                    source=source.file,
                    build_flags=flags,
                    threads=threads,
                    parity=record,
                ),
                notes=(
                    f"OpenVINO runs the ONNX file itself, compiled into {cache.relative_to(bundle)}; measured faster "
                    f"than ONNX Runtime here ({ov_ms:.1f} vs {ort_ms:.1f} ms at batch 1, {threads} threads)"
                ),
            )
            size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            built = BuiltModel(
                role,
                precision,
                str(cache.relative_to(bundle)),
                source.file,
                size,
                time.perf_counter() - start,
                parity_summary(record),
            )
            outcomes.append(OpenVinoOutcome(entry=entry, built=built))
    return outcomes


def build_engines(bundle: Path, config: BuildConfig = BuildConfig()) -> BuildReport:
    """Build TensorRT plans or ONNX Runtime CPU models for this machine and record them in the bundle.

    Args:
        bundle: The bundle folder (``manifest.json`` and the exported ONNX graphs).
        config: Target, precisions, batch ranges and limits.

    Returns:
        What was built, skipped or failed, and which path was taken and why. A failed model keeps
        its previous manifest entry; the others are recorded.

    Raises:
        BundleError: No manifest, or a source graph missing or altered (sha256 mismatch).
        MissingDependencyError: The requested builder (tensorrt, onnxruntime) is not installed.
        EngineBuildError: ``--target tensorrt`` without a usable GPU, or nothing to build.

    Example:
        >>> report = build_engines(Path("runs/bundle"))  # doctest: +SKIP
        >>> [m.file for m in report.built]  # doctest: +SKIP
        ['cpu/classifier.fp32.3f1c2a9be0d4.opt.onnx', ...]
    """
    folder = Path(bundle)
    manifest = load_manifest(folder, verify=False)
    # Only the graphs built from must match; stale built files are about to be replaced anyway.
    verify_files(folder, manifest, tuple(e for e in manifest.models if e.format == "onnx"))
    clear_stale_caches(folder, manifest)
    resolved = _resolve_target(config.target, config.device)
    target, reason = resolved.target, resolved.reason
    builder: _Builder = (
        _TensorRTBuilder(folder, config, manifest, resolved) if target == "tensorrt" else _OrtCpuBuilder(folder, config)
    )
    jobs, skipped = plan_builds(manifest, target, config.precisions, fp16_flag=builder.fp16_flag)
    if not jobs:
        why = "; ".join(f"{s.role} {s.precision}: {s.reason}" for s in skipped) or "the manifest lists no ONNX graphs"
        raise EngineBuildError(f"{folder}: nothing to build for {target}: {why}")

    entries: list[ModelEntry] = []
    built: list[BuiltModel] = []
    failed: list[FailedModel] = []
    try:
        for job in jobs:
            start = time.perf_counter()
            try:
                entry = builder.build(job)
            except EngineBuildError as exc:
                failed.append(FailedModel(job.role, job.precision, job.source.file, str(exc)))
                continue
            entries.append(entry)
            built.append(
                BuiltModel(
                    job.role,
                    job.precision,
                    entry.file,
                    job.source.file,
                    (folder / entry.file).stat().st_size,
                    time.perf_counter() - start,
                    parity_summary(entry.build.parity) if entry.build else "",
                )
            )
        timing_cache = builder.finish()
        slower: set[tuple[str, str]] = set()
        if target == "onnxruntime-cpu" and config.openvino and importlib.util.find_spec("openvino") is not None:
            for outcome in build_openvino(folder, manifest, config):
                if outcome.entry is not None and outcome.built is not None:
                    entries.append(outcome.entry)
                    built.append(outcome.built)
                if outcome.skipped is not None:
                    skipped = (*skipped, outcome.skipped)
                    # A record from an earlier race OpenVINO now lost must not keep steering `auto`.
                    slower.add((outcome.skipped.role, outcome.skipped.precision))
        if entries or slower:
            updated = _with_entries(manifest, entries)
            kept = tuple(e for e in updated.models if not (e.format == "openvino" and (e.role, e.precision) in slower))
            write_manifest(folder, updated.with_models(kept))
    except BaseException:
        _discard(folder, manifest, entries)
        raise
    _remove_replaced(folder, manifest, entries)
    return BuildReport(
        bundle=folder,
        target=target,
        reason=reason,
        builder_version=builder.version,
        device=builder.device,
        built=tuple(built),
        skipped=skipped,
        failed=tuple(failed),
        timing_cache=timing_cache,
    )


def _key(entry: ModelEntry) -> tuple[str, str, str]:
    return entry.role, entry.precision, entry.format


def _with_entries(manifest: Manifest, entries: Iterable[ModelEntry]) -> Manifest:
    """The manifest with new entries replacing those of the same (role, precision, format)."""
    new = tuple(entries)
    replaced = {_key(e) for e in new}
    return manifest.with_models(tuple(e for e in manifest.models if _key(e) not in replaced) + new)


def _remove_replaced(folder: Path, manifest: Manifest, entries: Iterable[ModelEntry]) -> None:
    """Delete the files of replaced entries, once the new manifest no longer references them."""
    new = tuple(entries)
    replaced = {_key(e) for e in new}
    still_used = {e.file for e in _with_entries(manifest, new).models}
    for old in manifest.models:
        if _key(old) in replaced and old.file not in still_used:
            (folder / old.file).unlink(missing_ok=True)


def _discard(folder: Path, manifest: Manifest, entries: Iterable[ModelEntry]) -> None:
    """Remove files of an interrupted run that the (unchanged) manifest does not reference."""
    referenced = {e.file for e in manifest.models}
    for entry in entries:
        if entry.file not in referenced:
            (folder / entry.file).unlink(missing_ok=True)
