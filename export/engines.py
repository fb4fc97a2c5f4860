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
deprecated since TensorRT 10.1 and gone in 11.

Atomicity. New files get content-addressed names (``<role>.<precision>.<sha12>...``) next to the
old ones, the manifest is then replaced atomically, and only after that are the replaced files
deleted; a build interrupted at any point leaves the previous manifest and its files valid.

Example:
    >>> report = build_engines(Path("runs/bundle"), BuildConfig(target="auto"))  # doctest: +SKIP
    >>> report.reason  # doctest: +SKIP
    'TensorRT not installed: prepared ONNX Runtime CPU models'
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from spine_edge.bundle import (
    BuildInfo,
    Manifest,
    ModelEntry,
    ModelFormat,
    Precision,
    Role,
    load_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from spine_edge.backends.cuda import GpuInfo, load_cuda
from spine_edge.backends.onnxruntime import available_cores, cpu_model_name, import_onnxruntime
from spine_edge.backends.tensorrt import import_tensorrt
from spine_edge.errors import BackendError, MissingDependencyError
from spine_edge.io_utils import write_bytes_atomic

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
class BatchRange:
    """Batch sizes of a TensorRT optimisation profile: the plan accepts ``min``…``max``, tuned for ``opt``."""

    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def capped(self, max_batch: int) -> BatchRange:
        """The same range with its largest batch set to ``max_batch`` (``min``/``opt`` lowered to fit)."""
        return BatchRange(min(self.min, max_batch), min(self.opt, max_batch), max_batch)


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
    """

    target: Target = "auto"
    precisions: tuple[Precision, ...] = ()
    classifier_batch: BatchRange = BatchRange(1, 4, 8)
    detector_batch: BatchRange = BatchRange(1, 1, 4)
    workspace_mib: int = 1024
    timing_cache: str = DEFAULT_TIMING_CACHE
    threads: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("auto", "tensorrt", "onnxruntime-cpu"):
            raise ValueError(f"target must be auto, tensorrt or onnxruntime-cpu, got {self.target!r}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
        if self.workspace_mib < 1 or self.threads < 0:
            raise ValueError(f"workspace_mib must be >= 1 and threads >= 0, got {self.workspace_mib}, {self.threads}")

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
    """One file that was built and recorded in the manifest."""

    role: Role
    precision: Precision
    file: str
    source: str
    size_bytes: int
    seconds: float


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
        return ("this TensorRT builds FP16 only from an FP16 graph (strong typing) and the bundle has none: "
                "re-export the bundle with FP16 graphs (spine-edge export)")
    return f"the bundle has no {precision} ONNX graph for the {role}; re-export with that precision to build it"


# ---------------------------------------------------------------------------------------------
# Which builder this machine offers.


def _tensorrt_or_none() -> Any:
    """The tensorrt module, or None when it is missing or its libraries do not load."""
    try:
        return import_tensorrt()
    except (MissingDependencyError, OSError) as exc:
        log.debug("tensorrt not importable: %s", exc)
        return None


def _resolve_target(requested: Target) -> tuple[BuiltTarget, str, Any, GpuInfo | None]:
    """(target, why, tensorrt module or None, GPU or None) for the requested target."""
    if requested == "onnxruntime-cpu":
        return "onnxruntime-cpu", "--target onnxruntime-cpu: prepared ONNX Runtime CPU models", None, None
    trt = _tensorrt_or_none()
    if trt is None:
        if requested == "tensorrt":
            raise MissingDependencyError("tensorrt", "gpu", "Building TensorRT engines (--target tensorrt)")
        return "onnxruntime-cpu", "TensorRT not installed: prepared ONNX Runtime CPU models", None, None
    try:
        # The same query the TensorRT backend makes, so the recorded GPU matches what it checks.
        gpu = load_cuda().device_info(0)
    except (MissingDependencyError, BackendError) as exc:
        if requested == "tensorrt":
            raise EngineBuildError(
                f"TensorRT is installed but no GPU is usable ({exc}); build on the GPU box, "
                "or use --target onnxruntime-cpu"
            ) from exc
        return ("onnxruntime-cpu", f"TensorRT installed but no usable CUDA GPU ({exc}): prepared ONNX Runtime CPU "
                "models", None, None)
    return ("tensorrt", f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}): "
            "built TensorRT plans", trt, gpu)


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
            notes=("ONNX Runtime ORT_ENABLE_ALL graph (may hold NCHWc/fused nodes): valid only for this CPU and "
                   "ONNX Runtime version; any batch size runs, the range records the batching prepared for"),
        )

    def finish(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# TensorRT.


class _TensorRTBuilder:
    """Builds plain TensorRT plans (no metadata prefix: trtexec and Triton load them as they are)."""

    def __init__(self, bundle: Path, config: BuildConfig, trt: Any, gpu: GpuInfo) -> None:
        self._trt = trt
        self._bundle = bundle
        self._config = config
        self._gpu = gpu
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._builder = trt.Builder(self._logger)
        self._cache: Any = None
        self.version = str(trt.__version__)
        self.device = gpu.name
        # TensorRT 11 removed the precision builder flags; 10.x still has them (deprecated since 10.12).
        self.fp16_flag = hasattr(trt.BuilderFlag, "FP16")

    def _network(self, job: BuildJob) -> tuple[Any, tuple[str, ...]]:
        trt = self._trt
        if job.typing == "fp16-flag":
            return self._builder.create_network(0), ("fp16-flag",)
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        # TensorRT 10 needs the flag; 11 types every network strongly and ignores (or drops) it.
        return self._builder.create_network(0 if strong is None else 1 << int(strong)), ("strongly-typed",)

    def _attach_timing_cache(self, builder_config: Any) -> None:
        """Reuse one timing cache across this run's builds, seeded from the bundle's file."""
        path = self._bundle / self._config.timing_cache
        if self._cache is None:
            seed = path.read_bytes() if path.is_file() else b""
            try:
                self._cache = builder_config.create_timing_cache(seed)
            except Exception as exc:  # a damaged cache only costs build time: start afresh
                log.warning("%s: unreadable timing cache (%s); starting a new one", path, exc)
                self._cache = builder_config.create_timing_cache(b"")
        if not builder_config.set_timing_cache(self._cache, False):
            # Made on another GPU or TensorRT version: its timings would mislead tactic selection.
            log.warning("%s: timing cache from another GPU or TensorRT version; starting a new one", path)
            self._cache = builder_config.create_timing_cache(b"")
            builder_config.set_timing_cache(self._cache, False)

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
        builder_config = self._builder.create_builder_config()
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self._config.workspace_mib << 20)
        if "fp16-flag" in flags:
            builder_config.set_flag(trt.BuilderFlag.FP16)
        if job.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            # The FP32 plan is the accuracy reference: TF32's 10-bit mantissa would blur what FP16 loses.
            builder_config.clear_flag(trt.BuilderFlag.TF32)
            flags += ("no-tf32",)
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
        return ModelEntry(
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
                build_flags=(*flags, f"workspace={self._config.workspace_mib}MiB"),
                min_batch=batch.min,
                opt_batch=batch.opt,
                max_batch=batch.max,
                timing_cache=self._config.timing_cache,
            ),
            notes="plain TensorRT plan (no metadata prefix); runs only with this TensorRT version and GPU",
        )

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
        f"List every unsupported op with `python -m export.opcheck {source}` on the export machine, then re-export"
    )


def _optional_call(obj: Any, name: str) -> Any:
    """Call an accessor that older TensorRT 10 releases may not have."""
    method = getattr(obj, name, None)
    return method() if callable(method) else None


# ---------------------------------------------------------------------------------------------
# The entry point.


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
    target, reason, trt, gpu = _resolve_target(config.target)
    builder: _Builder = (
        _TensorRTBuilder(folder, config, trt, gpu) if target == "tensorrt" else _OrtCpuBuilder(folder, config)
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
            built.append(BuiltModel(job.role, job.precision, entry.file, job.source.file,
                                    (folder / entry.file).stat().st_size, time.perf_counter() - start))
        timing_cache = builder.finish()
        if entries:
            write_manifest(folder, _with_entries(manifest, entries))
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
