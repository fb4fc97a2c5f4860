"""The first-GPU proof: build, check, time and measure a bundle on an NVIDIA box in one run.

``bash benchmarks/gpu_check.sh BUNDLE`` (or ``python -m spine_edge.benchmarks.gpu_check BUNDLE``)
runs, against a copy of the bundle so the original stays as it was:

1. ``build``: TensorRT plans for every precision the bundle offers (``build-engines --target
   tensorrt``), each deserialised and compared with ONNX Runtime FP32 on the parity canvases at the
   profile's min and max batch; a plan that breaks its gates is refused, and that fails the step.
2. ``tensorrt``: latency of every plan at batch 1 and at the profile's max batch (p50/p95 over
   repeated runs after warm-up, as the model stage sees it: host copies included), and peak GPU
   memory through NVML.
3. ``cascade``: the whole cascade per precision on the plans (detector forced on every image), as
   the kiosk runs it: p50/p95 per stage (preprocess, classifier, detector, postprocess, total);
   device 0 only (reported as skipped otherwise) until the cascade takes a device setting.
4. ``ort-cuda`` / ``ort-tensorrt``: the same ONNX graphs through ONNX Runtime's CUDA and TensorRT
   execution providers, strict (no CPU fallback): parity with FP32 and latency the same way
   (``--ort-provider tensorrt-rtx`` checks the TensorRT-RTX plugin instead, in its own environment).

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. Exit status: 0 every step
passed; 1 a GPU is present and a step failed (never a silent skip: a provider missing from the
installed onnxruntime is a failure unless ``--skip-ort`` was given); 2 usage error; 6 no NVIDIA GPU
on this box (the report says so). Steps past ``--budget-s`` are failed, not run, so one run stays
under ten minutes.

Example:
    >>> main(["runs/bundle", "--out", "runs/gpu-check"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.bundle import PRECISIONS, Manifest, ModelEntry, Precision, load_manifest
from spine_edge.errors import BackendError, BundleError, SpineEdgeError
from spine_edge.gpu_memory import GpuMemorySampler, load_nvml
from spine_edge.support import json_safe, package_versions

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: Distinct from every ``spine-edge`` exit code (0-5, 130, 143): there is nothing to check on this box.
EXIT_NO_GPU = 6

#: Packages whose versions the report records.
VERSIONS = (
    "spine-edge",
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "cuda-bindings",
    "onnxruntime",
    "onnxruntime-gpu",
    "nvidia-ml-py",
    "numpy",
)

Status = Literal["ok", "failed", "skipped"]
GpuProvider = Literal["cuda", "tensorrt", "tensorrt-rtx"]
GPU_PROVIDER_CHOICES: tuple[GpuProvider, ...] = ("cuda", "tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class GpuCheckConfig:
    """What the check runs.

    Attributes:
        bundle: The bundle folder (copied into ``out`` unless ``in_place``).
        out: Folder for the report (and the bundle copy).
        device: CUDA device index.
        precisions: Precisions to build and time (empty: every one the bundle offers).
        iterations: Timed runs per model and batch, after ``warmup`` untimed ones.
        warmup: Untimed runs first.
        budget_s: Wall-clock budget; steps that would start after it are failed.
        workspace_mib: TensorRT builder workspace.
        in_place: Build in the bundle itself instead of a copy.
        skip_ort: Leave out ONNX Runtime's GPU providers (on purpose, so it is no failure).
        ort_providers: ONNX Runtime providers to check (``cuda``, ``tensorrt``, ``tensorrt-rtx``).
    """

    bundle: Path
    out: Path
    device: int = 0
    precisions: tuple[Precision, ...] = ()
    iterations: int = 30
    warmup: int = 5
    budget_s: float = 540.0
    workspace_mib: int = 1024
    in_place: bool = False
    skip_ort: bool = False
    ort_providers: tuple[GpuProvider, ...] = ("cuda", "tensorrt")

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.warmup < 0 or self.budget_s <= 0 or self.device < 0:
            raise ValueError("iterations must be >= 1, warmup and device >= 0, budget_s > 0")
        if not self.ort_providers:
            raise ValueError("name at least one ONNX Runtime provider, or pass --skip-ort")


@dataclass(frozen=True)
class GpuPresence:
    """Whether this box has an NVIDIA GPU, and how that was decided."""

    present: bool
    how: str
    names: tuple[str, ...] = ()
    driver: str = ""


@dataclass(frozen=True)
class StepResult:
    """One step of the check.

    Attributes:
        name: ``build``, ``tensorrt``, ``cascade``, ``ort-cuda``, ``ort-tensorrt`` or ``ort-tensorrt-rtx``.
        status: ``ok``, ``failed`` or ``skipped`` (only when asked to).
        seconds: Wall time of the step.
        detail: One line: what failed, or what was done.
        data: The step's measurements (JSON-ready).
    """

    name: str
    status: Status
    seconds: float
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuCheckReport:
    """Everything one run found."""

    config: GpuCheckConfig
    gpu: GpuPresence
    started: str
    seconds: float
    environment: Mapping[str, Any]
    steps: tuple[StepResult, ...] = ()

    @property
    def ok(self) -> bool:
        """A GPU is present and no step failed."""
        return self.gpu.present and all(s.status != "failed" for s in self.steps)

    def exit_code(self) -> int:
        """The process exit status for this report."""
        if not self.gpu.present:
            return EXIT_NO_GPU
        return EXIT_OK if self.ok else EXIT_FAILED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data: dict[str, Any] = json_safe(
            {
                "ok": self.ok,
                "exit_code": self.exit_code(),
                "started": self.started,
                "seconds": self.seconds,
                "config": self.config,
                "gpu": self.gpu,
                "environment": self.environment,
                "steps": self.steps,
            }
        )
        return data

    def to_markdown(self) -> str:
        """A readable summary: steps, then latency and parity tables."""
        verdict = "PASSED" if self.ok else ("NO GPU" if not self.gpu.present else "FAILED")
        lines = [
            f"# spine-edge GPU check: {verdict}",
            "",
            f"- started {self.started}, {self.seconds:.0f} s; bundle `{self.config.bundle}`, device {self.config.device}",
            f"- GPU: {', '.join(self.gpu.names) or 'none'} (driver {self.gpu.driver or '?'}; {self.gpu.how})",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in self.environment.get("versions", {}).items()),
            "",
        ]
        if not self.gpu.present:
            return "\n".join([*lines, "No NVIDIA GPU on this box: nothing was run."]) + "\n"
        lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {_cell(s.detail)} |" for s in self.steps]
        rows = [row for s in self.steps for row in s.data.get("models", ())]
        if rows:
            lines += [
                "",
                "| step | role | precision | batch | p50 ms | p95 ms | images/s | peak GPU MiB (process / device rise) "
                "| max Δprob | flips | box AP |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for row in rows:
                for run in row.get("latency", ()):
                    lines.append(
                        f"| {row['step']} | {row['role']} | {row['precision']} | {run['batch']} | {_num(run['p50_ms'])} | "
                        f"{_num(run['p95_ms'])} | {_num(run['images_per_s'])} | {_num(row.get('peak_process_mib'))} / "
                        f"{_num(row.get('peak_rise_mib'))} | {_num(_worst(row, 'max_abs_dprob'))} | "
                        f"{_worst(row, 'flips', default='–')} | {_num(_worst(row, 'ap', best=True))} |"
                    )
        cascade = [row for s in self.steps for row in s.data.get("cascade", ())]
        if cascade:
            lines += [
                "",
                "| cascade precision | " + " | ".join(f"{st} p50/p95 ms" for st in CASCADE_STAGES) + " |",
                "|---|" + "---|" * len(CASCADE_STAGES),
            ]
            for row in cascade:
                cells = [
                    f"{_num(row['stages'][st]['p50_ms'])} / {_num(row['stages'][st]['p95_ms'])}"
                    if st in row["stages"]
                    else "–"
                    for st in CASCADE_STAGES
                ]
                lines.append(f"| {row['precision']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _worst(row: Mapping[str, Any], key: str, best: bool = False, default: Any = None) -> Any:
    """The worst value of ``key`` over a model row's parity comparisons (max, or min with ``best``)."""
    values = [
        c[key]
        for c in row.get("parity", {}).get("classifier" if key != "ap" else "detector", ())
        if c.get(key) is not None
    ]
    if not values:
        return default
    return min(values) if best else max(values)


def latency_stats(times_ms: Sequence[float], batch: int) -> dict[str, Any]:
    """p50/p95/mean of per-call times and throughput at that batch.

    Raises:
        ValueError: No times.
    """
    if not times_ms:
        raise ValueError("no timings to summarise")
    values = np.asarray(times_ms, dtype=np.float64)
    p50 = float(np.percentile(values, 50))
    return {
        "batch": batch,
        "runs": int(values.size),
        "p50_ms": p50,
        "p95_ms": float(np.percentile(values, 95)),
        "mean_ms": float(values.mean()),
        "images_per_s": batch * 1000.0 / p50 if p50 > 0 else None,
    }


def time_backend(backend: Backend, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> list[float]:
    """Milliseconds per ``infer`` call of an active backend, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        backend.infer(feeds)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        backend.infer(feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def detect_gpu() -> GpuPresence:
    """Whether an NVIDIA GPU is here: NVML first, then the driver's device node and nvidia-smi."""
    nvml = load_nvml()
    if nvml is not None:
        try:
            count = nvml.nvmlDeviceGetCount()
            names = []
            for index in range(count):
                name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
            driver = nvml.nvmlSystemGetDriverVersion()
            return GpuPresence(
                count > 0, "NVML", tuple(names), driver.decode() if isinstance(driver, bytes) else str(driver)
            )
        except nvml.NVMLError as exc:
            log.debug("NVML query failed: %s", exc)
        finally:
            nvml.nvmlShutdown()
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        # A GPU that NVML cannot read is still a GPU: the steps will fail and say why.
        return GpuPresence(True, "device node or nvidia-smi present, NVML unavailable")
    return GpuPresence(False, "no NVML, no /dev/nvidia0, no nvidia-smi")


def environment() -> dict[str, Any]:
    """Python, platform and package versions for the report."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(VERSIONS),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def parse_args(argv: Sequence[str] | None = None) -> GpuCheckConfig:
    """The command line as a :class:`GpuCheckConfig` (argparse exits 2 on a usage error)."""
    parser = argparse.ArgumentParser(
        prog="gpu_check", description="Build, check, time and measure a spine-edge bundle on this NVIDIA GPU."
    )
    parser.add_argument("bundle", type=Path, help="bundle folder (copied into --out unless --in-place)")
    parser.add_argument("--out", "-o", type=Path, default=Path("runs/gpu-check"), help="report folder")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument(
        "--precision",
        dest="precisions",
        action="append",
        choices=PRECISIONS,
        default=[],
        help="precision to build and time (repeatable; default: all the bundle offers)",
    )
    parser.add_argument("--iterations", type=int, default=30, help="timed runs per model and batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole check")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace (MiB)")
    parser.add_argument("--in-place", action="store_true", help="build in BUNDLE itself, not in a copy")
    parser.add_argument("--skip-ort", action="store_true", help="leave out ONNX Runtime's GPU providers")
    parser.add_argument(
        "--ort-provider",
        dest="ort_providers",
        action="append",
        choices=GPU_PROVIDER_CHOICES,
        default=[],
        help="ONNX Runtime provider to check (repeatable; default: cuda and tensorrt)",
    )
    args = parser.parse_args(argv)
    try:
        return GpuCheckConfig(
            bundle=args.bundle,
            out=args.out,
            device=args.device,
            precisions=tuple(dict.fromkeys(args.precisions)),
            iterations=args.iterations,
            warmup=args.warmup,
            budget_s=args.budget_s,
            workspace_mib=args.workspace_mb,
            in_place=args.in_place,
            skip_ort=args.skip_ort,
            ort_providers=tuple(dict.fromkeys(args.ort_providers)) or ("cuda", "tensorrt"),
        )
    except ValueError as exc:
        parser.error(str(exc))


def write_report(report: GpuCheckReport, out: Path) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(report.to_markdown(), encoding="utf-8")
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Steps (they need a GPU; each returns a StepResult and never raises a project error).


class _Clock:
    """The run's budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def _step(name: str, clock: _Clock, body: Callable[[], tuple[str, dict[str, Any]]]) -> StepResult:
    """Run one step: failed on any error, or when the budget is spent before it starts."""
    if clock.left() <= 0:
        return StepResult(name, "failed", 0.0, f"not run: the {clock.budget_s:.0f} s budget was spent")
    start = time.monotonic()
    try:
        detail, data = body()
    except (SpineEdgeError, RuntimeError, OSError, ValueError, KeyError) as exc:
        log.error("%s failed: %s", name, exc)
        return StepResult(name, "failed", time.monotonic() - start, f"{type(exc).__name__}: {exc}")
    failed = [m for m in data.get("models", ()) if m.get("error") or m.get("parity", {}).get("passed") is False]
    status: Status = "failed" if failed or data.get("failed") else "ok"
    return StepResult(name, status, time.monotonic() - start, detail, data)


def _precisions(manifest: Manifest, config: GpuCheckConfig, fmt: str) -> list[ModelEntry]:
    wanted = config.precisions or PRECISIONS
    return [e for e in manifest.models if e.format == fmt and e.precision in wanted]


def _build_step(bundle: Path, config: GpuCheckConfig, clock: _Clock) -> tuple[str, dict[str, Any]]:
    """One ``build-engines --target tensorrt`` per precision, so the budget can stop between them."""
    from spine_edge.export.engines import BuildConfig, build_engines

    built: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    reason = ""
    for precision in config.precisions or PRECISIONS:
        if clock.left() <= 0:
            failed.append({"role": "*", "precision": precision, "message": "not built: the time budget was spent"})
            continue
        build = BuildConfig(
            target="tensorrt", precisions=(precision,), workspace_mib=config.workspace_mib, device=config.device
        )
        report = build_engines(bundle, build)
        reason = report.reason
        built += [
            {"role": m.role, "precision": m.precision, "file": m.file, "seconds": m.seconds, "parity": m.parity}
            for m in report.built
        ]
        skipped += [{"role": s.role, "precision": s.precision, "reason": s.reason} for s in report.skipped]
        failed += [{"role": f.role, "precision": f.precision, "message": f.message} for f in report.failed]
    plans = [e for e in load_manifest(bundle).models if e.format == "tensorrt"]
    data = {
        "reason": reason,
        "built": built,
        "skipped": skipped,
        "failed": failed,
        "parity": {f"{e.role}/{e.precision}": e.build.parity for e in plans if e.build is not None},
    }
    detail = f"{len(built)} plans built, {len(failed)} failed, {len(skipped)} skipped"
    if failed:
        detail += ": " + "; ".join(f"{f['role']} {f['precision']}: {f['message']}" for f in failed)
    return detail, data


def _measure(
    step: str,
    open_model: Callable[[], Backend],
    manifest: Manifest,
    entry: ModelEntry,
    bundle: Path,
    batches: tuple[int, ...],
    config: GpuCheckConfig,
) -> dict[str, Any]:
    """Parity and latency of one model at each batch, with peak GPU memory, as one report row."""
    from spine_edge.export.engines import check_parity, load_parity_set, reference_outputs, take_batch

    row: dict[str, Any] = {"step": step, "role": entry.role, "precision": entry.precision, "file": entry.file}
    try:
        parity = load_parity_set(bundle, entry.role, entry.inputs[0])
        reference = parity.reference or reference_outputs(bundle, manifest, entry.role, parity.canvases)
        with GpuMemorySampler(config.device) as memory, open_model() as model:
            row["provider"] = model.describe()
            assignment = getattr(model, "node_assignment", None)
            if assignment:
                row["node_assignment"] = assignment
            row["parity"] = check_parity(model, manifest, entry, parity, reference, batches).to_record()
            image = entry.inputs[0].name
            row["latency"] = [
                latency_stats(
                    time_backend(model, {image: take_batch(parity.canvases, b)}, config.warmup, config.iterations),
                    b,
                )
                for b in batches
            ]
        seen = memory.report()
        row |= {"peak_process_mib": seen.peak_process_mib, "peak_rise_mib": seen.peak_rise_mib}
    except (SpineEdgeError, RuntimeError, OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _tensorrt_step(bundle: Path, config: GpuCheckConfig) -> tuple[str, dict[str, Any]]:
    from spine_edge.backends.tensorrt import TensorRTBackend

    manifest = load_manifest(bundle)
    plans = _precisions(manifest, config, "tensorrt")
    if not plans:
        raise BundleError(f"{bundle}: no TensorRT plan to time (the build step built none)")
    rows = []
    for entry in plans:
        assert entry.build is not None
        batches = tuple(sorted({1, entry.build.max_batch}))
        rows.append(
            _measure(
                "tensorrt",
                functools.partial(TensorRTBackend, bundle / entry.file, entry.build, bundle, config.device),
                manifest,
                entry,
                bundle,
                batches,
                config,
            )
        )
    errors = [r for r in rows if r.get("error")]
    return f"{len(rows)} plans timed, {len(errors)} failed", {"models": rows}


#: Per-image stages the cascade reports (``StageLatency`` fields) plus their total.
CASCADE_STAGES = ("preprocess", "classifier", "detector", "postprocess", "total")


def cascade_rows(bundle: Path, precisions: Sequence[Precision], backend: str, iterations: int) -> list[dict[str, Any]]:
    """Per-stage latency of the whole cascade at each precision, on the classifier's parity canvases.

    The detector is forced on every image so that its stage is always timed, and the input guard is
    off and out-of-distribution scores only flag: parity canvases are model inputs, not radiographs
    a kiosk would receive, and a refused image would time nothing.
    """
    from spine_edge.cascade import Cascade
    from spine_edge.export.engines import load_parity_set

    manifest = load_manifest(bundle)
    classifier = next(e for e in manifest.models if e.role == "classifier" and e.format == "onnx")
    images = load_parity_set(bundle, "classifier", classifier.inputs[0]).canvases[:, 0]
    rows = []
    for precision in precisions:
        with Cascade.from_bundle(
            bundle, precision=precision, backend=backend, force_detector=True, heatmaps=False, guard=False, ood="flag"
        ) as cascade:
            cascade.warmup()
            results = [cascade.predict(images[i % len(images)]) for i in range(iterations)]
        errors = [r.error or (r.refusal and str(r.refusal)) or r.status for r in results if r.status != "ok"]
        stages = {}
        for stage in CASCADE_STAGES:
            values = [getattr(r.latency_ms, stage) for r in results if r.status == "ok"]
            values = [v for v in values if v is not None]
            if values:
                stages[stage] = latency_stats(values, 1)
        rows.append(
            {
                "precision": precision,
                "backend": cascade.backend,
                "images": len(results),
                "stages": stages,
                "error": f"{len(errors)} of {len(results)} images failed: {errors[0]}" if errors else None,
            }
        )
    return rows


def _cascade_step(bundle: Path, config: GpuCheckConfig) -> tuple[str, dict[str, Any]]:
    manifest = load_manifest(bundle)
    both = [
        p
        for p in config.precisions or PRECISIONS
        if all(manifest.find(role, p, "tensorrt") for role in ("classifier", "detector"))
    ]
    if not both:
        raise BundleError(f"{bundle}: no precision has TensorRT plans for both models")
    rows = cascade_rows(bundle, both, "tensorrt", config.iterations)
    return f"cascade timed at {', '.join(both)}", {"cascade": rows, "failed": [r for r in rows if r["error"]]}


def _ort_step(provider: GpuProvider, bundle: Path, config: GpuCheckConfig) -> tuple[str, dict[str, Any]]:
    from spine_edge.backends.base import DEFAULT_BATCH
    from spine_edge.backends.onnxruntime import (
        PROVIDERS,
        GpuSettings,
        OnnxRuntimeBackend,
        import_onnxruntime,
        ort_tensorrt_cache_dir,
        ort_tensorrt_timing_dir,
    )

    ort = import_onnxruntime()
    # The TensorRT-RTX plugin is registered when its first session starts (or the row says why not).
    if provider != "tensorrt-rtx" and PROVIDERS[provider] not in ort.get_available_providers():
        raise BackendError(
            f"this onnxruntime {ort.__version__} has no {PROVIDERS[provider]} (it offers "
            f"{', '.join(ort.get_available_providers())}): install spine-edge[gpu-ort-cu12], or pass --skip-ort"
        )
    manifest = load_manifest(bundle)
    target = "onnxruntime" if provider == "cuda" else "tensorrt"
    graphs = [e for e in _precisions(manifest, config, "onnx") if e.target in (target, "any")]
    rows = []
    for entry in graphs:
        profile = DEFAULT_BATCH[entry.role]
        settings = GpuSettings(
            device=config.device,
            batch=profile,
            workspace_mib=config.workspace_mib,
            engine_cache=ort_tensorrt_cache_dir(bundle, entry),
            timing_cache=ort_tensorrt_timing_dir(bundle),
            int8=entry.precision == "int8",
        )
        rows.append(
            _measure(
                f"ort-{provider}",
                functools.partial(
                    OnnxRuntimeBackend, bundle / entry.file, provider=provider, gpu=settings, inputs=entry.inputs
                ),
                manifest,
                entry,
                bundle,
                tuple(sorted({1, profile.max})),
                config,
            )
        )
    errors = [r for r in rows if r.get("error")]
    return f"{len(rows)} graphs on {PROVIDERS[provider]}, {len(errors)} failed", {"models": rows}


def run_check(
    config: GpuCheckConfig,
    gpu: GpuPresence | None = None,
    progress: Callable[[GpuCheckReport], object] | None = None,
) -> GpuCheckReport:
    """Run every step (or none, without a GPU) and return the report.

    Args:
        config: What to run.
        gpu: The GPU found (None: :func:`detect_gpu`).
        progress: Called with the report so far after every step (``main`` writes it, so a run
            killed by the wrapper's timeout still leaves the steps it finished on disk).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = _Clock(config.budget_s)
    gpu = gpu or detect_gpu()
    env = environment()
    if not gpu.present:
        return GpuCheckReport(config, gpu, started, 0.0, env)
    load_manifest(config.bundle, verify=False)  # a missing bundle is a usage problem, reported before copying
    bundle = config.bundle
    if not config.in_place:
        bundle = config.out / "bundle"
        if bundle.exists():
            shutil.rmtree(bundle)
        shutil.copytree(config.bundle, bundle)
    plan: list[Callable[[], StepResult]] = [
        lambda: _step("build", clock, lambda: _build_step(bundle, config, clock)),
        lambda: _step("tensorrt", clock, lambda: _tensorrt_step(bundle, config)),
    ]
    if config.device == 0:
        plan.append(lambda: _step("cascade", clock, lambda: _cascade_step(bundle, config)))
    else:
        # CascadeConfig has no device setting yet, so whole-cascade timings exist only for device 0.
        plan.append(lambda: StepResult("cascade", "skipped", 0.0, "the cascade runs on device 0 only"))
    if config.skip_ort:
        plan.append(lambda: StepResult("ort", "skipped", 0.0, "--skip-ort"))
    else:
        plan += [
            functools.partial(_step, f"ort-{p}", clock, functools.partial(_ort_step, p, bundle, config))
            for p in config.ort_providers
        ]
    steps: list[StepResult] = []
    report = GpuCheckReport(config, gpu, started, 0.0, env)
    for run in plan:
        steps.append(run())
        report = GpuCheckReport(config, gpu, started, time.monotonic() - clock.start, env, tuple(steps))
        if progress is not None:
            progress(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the check, write the report, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        report = run_check(config, progress=lambda partial: write_report(partial, config.out))
    except SpineEdgeError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    json_path, md_path = write_report(report, config.out)
    if not report.gpu.present:
        print(
            f"gpu_check: no NVIDIA GPU on this box ({report.gpu.how}); nothing to check. Report: {json_path}",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    for step in report.steps:
        print(f"{step.name:<13} {step.status:<8} {step.seconds:7.1f} s  {step.detail}")
    print(f"report: {json_path} and {md_path}")
    if not report.ok:
        print("gpu_check: FAILED (see the failed steps above)", file=sys.stderr)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
