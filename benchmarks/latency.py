"""Latency, throughput and memory of the cascade and of each graph on its own.

Three measurements, each after a warm-up:

- **Cascade latency** (:func:`time_cascade`): one image at a time through
  :meth:`spine_edge.cascade.Cascade.predict`, so the stages (read, preprocess, classifier, detector,
  postprocess) are the runtime's own per-image timings and ``end_to_end`` is the wall time of the
  call, gate included (the detector runs only where the gate opens, as deployed).
- **Throughput** (:func:`measure_throughput`): images per second through ``predict_many`` at a
  batch size, with reading overlapped with inference as ``spine-edge infer`` runs it.
- **Models in isolation** (:func:`time_model`): one backend fed preprocessed canvases, so the cost
  of the graph is separable from decoding and letterboxing.

Peak host memory is the resident-set high-water mark (``VmHWM``), reset between measurements where
Linux allows it (``/proc/self/clear_refs``); GPU memory is sampled through NVML
(:mod:`spine_edge.gpu_memory`) while a GPU backend runs, and reported as ``not measured`` where NVML
does not answer.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import cycle, islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from spine_edge.backends import Backend
from spine_edge.cascade import Cascade
from spine_edge.errors import BackendError
from spine_edge.gpu_memory import GpuMemoryReport, GpuMemorySampler
from spine_edge.results import StageLatency

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

#: Per-image stages of the cascade, in pipeline order, then the wall time of the whole call.
STAGES: tuple[str, ...] = ("read", "preprocess", "classifier", "detector", "postprocess")
END_TO_END = "end_to_end"


@dataclass(frozen=True)
class LatencyStats:
    """Summary of latency samples in milliseconds (percentiles interpolate linearly, as numpy does).

    Attributes:
        n: Number of samples.
        mean: Arithmetic mean.
        p50: Median.
        p95: 95th percentile.
        p99: 99th percentile.
        min: Fastest sample.
        max: Slowest sample.
    """

    n: int
    mean: float
    p50: float
    p95: float
    p99: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready dict, milliseconds rounded to microseconds."""
        return {k: v if isinstance(v, int) else round(v, 3) for k, v in asdict(self).items()}


def summarize_latency(samples: Sequence[float] | np.ndarray) -> LatencyStats:
    """Mean and percentiles of latency samples.

    Args:
        samples: Milliseconds; at least one.

    Raises:
        ValueError: No samples, or a non-finite one.

    Example:
        >>> summarize_latency([1.0, 2.0, 3.0, 4.0]).p50
        2.5
    """
    values = np.asarray(samples, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no latency samples to summarise")
    if not np.isfinite(values).all():
        raise ValueError("latency samples must be finite")
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return LatencyStats(
        n=int(values.size),
        mean=float(values.mean()),
        p50=float(p50),
        p95=float(p95),
        p99=float(p99),
        min=float(values.min()),
        max=float(values.max()),
    )


#: Stages that exist only for images the gate sent to the detector (decode + NMS is the detector's).
DETECTOR_STAGES: frozenset[str] = frozenset({"detector", "postprocess"})


def stage_samples(latencies: Sequence[StageLatency]) -> dict[str, list[float]]:
    """Per-stage samples from cascade results; ``detector`` and ``postprocess`` only where the detector ran."""
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for latency in latencies:
        ran = latency.detector is not None
        for stage in STAGES:
            if ran or stage not in DETECTOR_STAGES:
                samples[stage].append(float(getattr(latency, stage)))
    return samples


# ------------------------------------------------------------------------------------------ memory


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark to its current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Resident-set high-water mark in MiB (since the last reset, or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        # ru_maxrss is in KiB on Linux; it cannot be reset, so it is the process-wide peak.
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


#: Status of a measurement's GPU memory figures, as reports print it.
GPU_NOT_USED, GPU_MEASURED, GPU_NOT_MEASURED = "not used", "measured", "not measured"


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class Resources:
    """Memory used while a measurement ran.

    Attributes:
        peak_rss_mb: Resident-set high-water mark of the process (MiB).
        rss_reset: Whether the mark was reset before the measurement (else: peak since start).
        gpu: What NVML saw on the GPU the graphs ran on (None where they ran on the CPU).
    """

    peak_rss_mb: float
    rss_reset: bool
    gpu: GpuMemoryReport | None = None

    @property
    def gpu_status(self) -> str:
        """``not used`` (CPU run), ``measured``, or ``not measured`` (a GPU run where NVML did not answer)."""
        if self.gpu is None:
            return GPU_NOT_USED
        return GPU_MEASURED if self.gpu.available else GPU_NOT_MEASURED

    @property
    def gpu_peak_mb(self) -> float | None:
        """Rise of the GPU's device-wide used memory (MiB; includes other processes'), or None."""
        return None if self.gpu is None else self.gpu.peak_rise_mib

    @property
    def gpu_process_mb(self) -> float | None:
        """Peak GPU memory NVML attributed to this process (MiB), or None where it cannot attribute it."""
        return None if self.gpu is None else self.gpu.peak_process_mib

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_reset": self.rss_reset,
            "gpu_memory": self.gpu_status,
            "gpu_peak_mb": _mib(self.gpu_peak_mb),
            "gpu_process_mb": _mib(self.gpu_process_mb),
        }


class ResourceMeter:
    """Context manager measuring :class:`Resources` of the block it wraps.

    Args:
        gpu: Also sample GPU memory (through NVML: :class:`~spine_edge.gpu_memory.GpuMemorySampler`).
        device: GPU index the graphs run on.
    """

    def __init__(self, gpu: bool, device: int = 0) -> None:
        self._gpu = GpuMemorySampler(device=device) if gpu else None
        self._reset = False
        self.resources: Resources | None = None

    def __enter__(self) -> Self:
        self._reset = reset_peak_rss()
        if self._gpu is not None:
            self._gpu.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gpu = None
        if self._gpu is not None:
            self._gpu.__exit__(exc_type, exc, tb)
            gpu = self._gpu.report()
        self.resources = Resources(peak_rss_mb=peak_rss_mb(), rss_reset=self._reset, gpu=gpu)


def gpu_memory_note(resources: Mapping[str, Resources | None]) -> str:
    """One report line on GPU memory during each labelled measurement (e.g. the batch-1 run per precision).

    Example:
        >>> gpu_memory_note({"fp32": Resources(1.0, True, GpuMemoryReport(device=0))})
        'GPU memory not measured: NVML did not answer (it needs nvidia-ml-py from the GPU extras; Jetson has none)'
    """
    peaks, missing = [], []
    gpu: GpuMemoryReport | None = None
    for label, measured in resources.items():
        if measured is None or measured.gpu is None:
            continue
        if not measured.gpu.available:
            missing.append(label)
            continue
        gpu = measured.gpu
        # A device-wide rise alone would count other processes' memory, so the process figure comes first.
        process = "not attributable" if gpu.peak_process_mib is None else f"{gpu.peak_process_mib:.0f} MiB"
        peaks.append(f"{label} {process} by this process (+{gpu.peak_rise_mib or 0:.0f} MiB device-wide)")
    if gpu is None:
        return (
            "GPU memory not measured: NVML did not answer (it needs nvidia-ml-py from the GPU extras; Jetson has none)"
        )
    unmeasured = f"; not measured for {', '.join(missing)}" if missing else ""
    return f"GPU memory (NVML, GPU {gpu.device} {gpu.name}, {gpu.total_mib or 0:.0f} MiB): peak {'; '.join(peaks)}{unmeasured}"


# ------------------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class CascadeTiming:
    """Per-image latency of the cascade at batch 1.

    Attributes:
        stages: Stats per stage (``detector`` and ``postprocess`` over the images the gate sent to the
            detector; absent if it never ran).
        end_to_end: Wall time of each ``predict`` call (read to boxes).
        samples: The raw per-image milliseconds by stage and ``end_to_end`` (for plots).
        detector_runs: Timed images the gate sent to the detector.
        errors: Timed images that failed (their reasons, first few).
    """

    stages: dict[str, LatencyStats]
    end_to_end: LatencyStats
    samples: dict[str, list[float]]
    detector_runs: int
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (samples rounded to microseconds)."""
        return {
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "end_to_end": self.end_to_end.to_dict(),
            "detector_runs": self.detector_runs,
            "errors": list(self.errors),
            "samples_ms": {k: [round(x, 3) for x in v] for k, v in self.samples.items()},
        }


def cycle_to(items: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` items of ``items`` repeated (an image list shorter than the runs wanted)."""
    if not items:
        raise ValueError("no items to cycle through")
    return list(islice(cycle(items), n))


def time_cascade(
    cascade: Cascade,
    sources: Sequence[str | Path],
    runs: int,
    warmup: int,
    progress: Callable[[int], None] | None = None,
) -> CascadeTiming:
    """Time ``runs`` single-image ``predict`` calls after ``warmup`` untimed ones.

    Args:
        cascade: A loaded cascade (its batch size does not matter: one image per call).
        sources: Image files, cycled through when fewer than ``runs + warmup``.
        runs: Timed calls.
        warmup: Untimed calls after :meth:`Cascade.warmup`.
        progress: Called with 1 after each call (a progress bar's ``update``).

    Raises:
        ValueError: ``runs`` < 1 or no sources.
        BackendError: Every timed image failed.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    cascade.warmup()
    order = cycle_to(sources, warmup + runs)
    for source in order[:warmup]:
        cascade.predict(source)
        if progress:
            progress(1)
    latencies: list[StageLatency] = []
    walls: list[float] = []
    errors: list[str] = []
    ran = 0
    for source in order[warmup:]:
        start = time.perf_counter()
        result = cascade.predict(source)
        wall = (time.perf_counter() - start) * 1e3
        if progress:
            progress(1)
        if not result.ok:
            errors.append(f"{source}: {result.error}")
            continue
        latencies.append(result.latency_ms)
        walls.append(wall)
        ran += int(result.detector_ran)
    if not walls:
        raise BackendError(f"every timed image failed on the {cascade.precision} cascade, e.g. {errors[0]}")
    samples = stage_samples(latencies)
    samples[END_TO_END] = walls
    return CascadeTiming(
        stages={stage: summarize_latency(v) for stage, v in samples.items() if stage != END_TO_END and v},
        end_to_end=summarize_latency(walls),
        samples=samples,
        detector_runs=ran,
        errors=tuple(errors[:5]),
    )


@dataclass(frozen=True)
class Throughput:
    """Images per second through ``predict_many`` at one batch size.

    Attributes:
        batch_size: Images per model call.
        images: Images timed.
        seconds: Wall time.
        resources: Memory while it ran (the cascade's own load included).
    """

    batch_size: int
    images: int
    seconds: float
    resources: Resources | None = None

    @property
    def images_per_second(self) -> float:
        """``images / seconds``."""
        return self.images / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "batch_size": self.batch_size,
            "images": self.images,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images_per_second, 3),
            "resources": None if self.resources is None else self.resources.to_dict(),
        }


def measure_throughput(
    cascade: Cascade, sources: Sequence[str | Path], images: int, progress: Callable[[int], None] | None = None
) -> tuple[float, int]:
    """Seconds to run ``images`` sources (cycled) through ``predict_many``, after one warm-up batch.

    Args:
        cascade: A loaded cascade; its batch size is the one measured.
        sources: Image files.
        images: Images timed.
        progress: Called with 1 after each image.

    Returns:
        ``(seconds, images that came back ok)``.
    """
    cascade.warmup()
    batch = cascade.config.batch_size
    for _ in cascade.predict_many(cycle_to(sources, batch)):
        pass
    order = cycle_to(sources, images)
    ok = 0
    start = time.perf_counter()
    for result in cascade.predict_many(order):
        ok += int(result.ok)
        if progress:
            progress(1)
    return time.perf_counter() - start, ok


@dataclass(frozen=True)
class ModelTiming:
    """One graph fed preprocessed canvases at one batch size.

    Attributes:
        batch_size: Images per call.
        per_call: Stats of each call (ms).
        per_image: ``per_call / batch_size`` (ms per image).
    """

    batch_size: int
    per_call: LatencyStats
    per_image: LatencyStats

    @property
    def images_per_second(self) -> float:
        """Throughput of the graph alone at the median call time."""
        return 1e3 / self.per_image.p50 if self.per_image.p50 > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "batch_size": self.batch_size,
            "per_call": self.per_call.to_dict(),
            "per_image": self.per_image.to_dict(),
            "images_per_second": round(self.images_per_second, 3),
        }


def time_model(
    backend: Backend,
    canvases: np.ndarray,
    batch_size: int,
    runs: int,
    warmup: int,
) -> ModelTiming:
    """Time ``runs`` calls of an active backend on batches cut from ``canvases`` (cycled).

    Args:
        backend: Active backend with one uint8 image input.
        canvases: ``[M, 1, S, S]`` uint8 preprocessed images (letterboxed as the cascade does).
        batch_size: Images per call.
        runs: Timed calls.
        warmup: Untimed calls first.

    Raises:
        ValueError: ``runs`` < 1, or the backend has more than one input.
    """
    return timing_of(batch_size, time_model_calls(backend, canvases, batch_size, runs, warmup))


def time_model_calls(backend: Backend, canvases: np.ndarray, batch_size: int, runs: int, warmup: int) -> list[float]:
    """The milliseconds of each of ``runs`` timed calls (:func:`time_model`'s samples, for pooling runs)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    specs = backend.input_specs()
    if len(specs) != 1:
        raise ValueError(f"{backend.path.name}: expected one image input, got {sorted(specs)}")
    name = next(iter(specs))
    batches = list(_batches(canvases, batch_size, warmup + runs))
    for feed in batches[:warmup]:
        backend.infer({name: feed})
    calls = []
    for feed in batches[warmup:]:
        start = time.perf_counter()
        backend.infer({name: feed})
        calls.append((time.perf_counter() - start) * 1e3)
    return calls


def timing_of(batch_size: int, calls: Sequence[float]) -> ModelTiming:
    """A :class:`ModelTiming` from per-call milliseconds at ``batch_size``."""
    per_call = np.asarray(calls, dtype=np.float64)
    return ModelTiming(batch_size, summarize_latency(per_call), summarize_latency(per_call / batch_size))


def _batches(canvases: np.ndarray, batch_size: int, count: int) -> Iterator[np.ndarray]:
    """``count`` contiguous batches of ``batch_size`` canvases, cycling through the available ones."""
    indices = cycle(range(len(canvases)))
    for _ in range(count):
        yield np.ascontiguousarray(canvases[[next(indices) for _ in range(batch_size)]])


@dataclass(frozen=True)
class ModelTimings:
    """A graph's timings at every batch size, with its arithmetic.

    Attributes:
        role: ``classifier`` or ``detector``.
        file: Bundle-relative file that ran.
        provider: What executed it.
        by_batch: Timing per batch size.
        gflops_per_image: FLOPs of one image in units of 1e9 (None where not counted).
    """

    role: str
    file: str
    provider: str
    by_batch: tuple[ModelTiming, ...]
    gflops_per_image: float | None = None

    def at(self, batch_size: int) -> ModelTiming | None:
        """The timing at a batch size, or None."""
        return next((t for t in self.by_batch if t.batch_size == batch_size), None)

    def achieved_gflops(self, batch_size: int) -> float | None:
        """GFLOP/s at the median per-image time of a batch size (None where unknown)."""
        timing = self.at(batch_size)
        if timing is None or self.gflops_per_image is None or timing.per_image.p50 <= 0:
            return None
        return self.gflops_per_image / (timing.per_image.p50 / 1e3)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "role": self.role,
            "file": self.file,
            "provider": self.provider,
            "gflops_per_image": self.gflops_per_image,
            "by_batch": [
                {**t.to_dict(), "achieved_gflops_per_s": _round(self.achieved_gflops(t.batch_size))}
                for t in self.by_batch
            ],
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
