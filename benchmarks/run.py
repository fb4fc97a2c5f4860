"""``run_bench``: latency, resources and accuracy of a bundle on this box, with the gates that decide.

Phases, in order (each with a progress bar on stderr):

1. **Images.** With ``data``, the TEST split of a VinDr-layout folder (labels and boxes); without,
   a few synthetic radiographs at the sizes of real VinDr-SpineXR files, written as JPEG 2000 DICOM
   into a temporary folder so the read stage decodes what a real box decodes (latency only).
2. **Accuracy** (``data`` only): every precision's cascade, detector forced, over the split, each
   image read once (:mod:`benchmarks.accuracy`); FP32 is the reference.
3. **Latency** per precision: the cascade at batch 1 (stages and end to end), throughput at each
   batch size, and each graph alone on preprocessed canvases (:mod:`benchmarks.latency`), with
   peak host (and GPU) memory and GFLOP/s against the FP32 graph's FLOP count.
4. **Baseline** (torch installed): PyTorch eager on the same checkpoints and images
   (:mod:`benchmarks.baseline_torch`), so each speed-up is a ratio measured in this run.
5. **Gates**: DESIGN.md's accuracy holds against FP32 and the optional latency budgets.

Example:
    >>> report = run_bench(BenchConfig(bundle=Path("runs/bundle"), data=Path("data/synth")))  # doctest: +SKIP
    >>> report.passed, [g.message() for g in report.failed_gates]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import math
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spine_edge.benchmarks.accuracy import (
    PrecisionAccuracy,
    PrecisionRecall,
    Predictions,
    TruthSet,
    collect_predictions,
    evaluate_accuracy,
    precision_recall_curves,
    truth_from_records,
    valid_indices,
    write_coco_files,
)
from spine_edge.benchmarks.baseline_torch import BaselineTiming, baseline_checkpoints, run_torch_baseline
from spine_edge.benchmarks.flops import count_flops
from spine_edge.benchmarks.latency import (
    END_TO_END,
    STAGES,
    CascadeTiming,
    ModelTimings,
    ResourceMeter,
    Resources,
    Throughput,
    measure_throughput,
    time_cascade,
    time_model,
)
from spine_edge.backends import BackendChoice, create_backend, select_model
from spine_edge.backends.onnxruntime import PROVIDERS, ProviderChoice, available_cores, cpu_model_name, import_onnxruntime
from spine_edge.bundle import Manifest, load_manifest
from spine_edge.cascade import Cascade
from spine_edge.errors import BundleError, DatasetError, MissingDependencyError, SpineEdgeError
from spine_edge.imageio import read_image
from spine_edge.metrics import ACCURACY_GATES
from spine_edge.preprocess import letterbox
from spine_edge.vindr import read_vindr

#: The precision every other is compared with.
REFERENCE = "fp32"
#: Decoded images shared by the isolated-model timings and the PyTorch baseline.
SAMPLE_IMAGES = 8
#: (rows, columns) of the two public VinDr-SpineXR samples (DESIGN.md), used for synthetic images.
REAL_SIZES: tuple[tuple[int, int], ...] = ((1485, 1172), (2949, 1470))
#: Stages a per-stage budget may name.
BUDGET_STAGES: tuple[str, ...] = (*STAGES, END_TO_END)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how hard.

    Attributes:
        bundle: The bundle folder.
        data: VinDr-layout folder whose TEST split measures accuracy; None: latency only, on
            synthetic images.
        precisions: Precisions to benchmark (empty: every one the bundle has for the backend).
            With ``data``, FP32 always runs as the accuracy reference.
        backend: ``auto``, ``onnxruntime`` or ``tensorrt``.
        provider: ONNX Runtime provider (``cpu``, ``cuda``, ``tensorrt``), None for automatic.
        batch_sizes: Batch sizes of the throughput and isolated-model measurements.
        runs: Timed images per latency measurement.
        warmup: Untimed images before each.
        max_images: Evaluate at most this many test images (the first by image id).
        baseline: Run the PyTorch eager peer where torch is installed.
        checkpoints: Checkpoint folder of the baseline (default: the one the manifest records).
        threads: Intra-op threads for ONNX Runtime and torch (None: the cores available).
        budget_ms: Budget on each precision's end-to-end p95 latency (ms), or None.
        stage_budgets: ``(stage, ms)`` budgets on per-stage p95 latencies.
        save_predictions: Folder for COCO/probability JSON of every precision, or None.
        synthetic_images: Synthetic radiographs used without ``data``.
        progress: Progress bars on stderr.
    """

    bundle: Path
    data: Path | None = None
    precisions: tuple[str, ...] = ()
    backend: BackendChoice = "auto"
    provider: ProviderChoice | None = None
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    runs: int = 20
    warmup: int = 3
    max_images: int | None = None
    baseline: bool = True
    checkpoints: Path | None = None
    threads: int | None = None
    budget_ms: float | None = None
    stage_budgets: tuple[tuple[str, float], ...] = ()
    save_predictions: Path | None = None
    synthetic_images: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.runs >= 1, f"runs must be at least 1, got {self.runs}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (bool(self.batch_sizes) and min(self.batch_sizes) >= 1, f"batch sizes must be >= 1, got {self.batch_sizes}"),
            (self.max_images is None or self.max_images >= 1, f"max_images must be >= 1, got {self.max_images}"),
            (self.synthetic_images >= 1, f"synthetic_images must be >= 1, got {self.synthetic_images}"),
            (set(self.precisions) <= {"fp32", "fp16", "int8"}, f"unknown precision in {self.precisions}"),
            (all(s in BUDGET_STAGES for s, _ in self.stage_budgets), f"stage budgets name one of {BUDGET_STAGES}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class GateResult:
    """One pass/fail criterion.

    Attributes:
        name: What is checked, e.g. ``int8 |ΔAUROC| vs fp32``.
        precision: The precision concerned.
        measured: The value (points for accuracy deltas, ms for latency).
        limit: The bound: ``|measured| ≤ limit`` for deltas, ``measured ≤ limit`` for latency.
        unit: ``pt`` or ``ms``.
        passed: True/False, or None when the value could not be measured (not a failure).
    """

    name: str
    precision: str
    measured: float
    limit: float
    unit: str
    passed: bool | None

    @property
    def excess(self) -> float:
        """How far past the limit (≤ 0 when within)."""
        value = abs(self.measured) if self.unit == "pt" else self.measured
        return value - self.limit

    def message(self) -> str:
        """One line: the gate, its value, its limit and by how much it failed."""
        if self.passed is None:
            return f"{self.name}: not measurable (limit {self.limit:g} {self.unit})"
        bound = f"±{self.limit:g}" if self.unit == "pt" else f"≤ {self.limit:g}"
        sign = "+" if self.unit == "pt" else ""
        value = f"{self.measured:{sign}.2f} {self.unit} (limit {bound} {self.unit})"
        return f"{self.name}: {value} " + ("ok" if self.passed else f"FAILED by {self.excess:.2f} {self.unit}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {"name": self.name, "precision": self.precision,
                "measured": self.measured if math.isfinite(self.measured) else None,
                "limit": self.limit, "unit": self.unit, "passed": self.passed, "message": self.message()}


@dataclass(frozen=True)
class PrecisionBench:
    """Everything measured for one precision.

    Attributes:
        label: ``fp32``, ``fp16`` or ``int8``.
        backend: Library/provider that ran it (``Cascade.backend``), e.g. ``onnxruntime/CPUExecutionProvider``.
        files: Bundle files of the classifier and detector that ran.
        latency: Cascade latency at batch 1 (None when only accuracy ran: the FP32 reference of a
            run restricted to other precisions).
        throughput: Images/s at each batch size.
        models: The classifier and the detector timed alone.
        resources: Memory during the batch-1 latency run.
        accuracy: Accuracy against the reference (None without data).
        probs: Probabilities on the evaluated images (for the ROC plot; None without data).
        curves: Detector-alone precision–recall per class (for the plot).
        speedup_vs_torch: Ratios ``torch ms / this ms`` (classifier, detector, models).
    """

    label: str
    backend: str
    files: dict[str, str]
    latency: CascadeTiming | None = None
    throughput: tuple[Throughput, ...] = ()
    models: tuple[ModelTimings, ...] = ()
    resources: Resources | None = None
    accuracy: PrecisionAccuracy | None = None
    probs: np.ndarray | None = None
    curves: dict[str, PrecisionRecall] = field(default_factory=dict)
    speedup_vs_torch: dict[str, float] = field(default_factory=dict)

    def model(self, role: str) -> ModelTimings | None:
        """The isolated timing of a role, or None."""
        return next((m for m in self.models if m.role == role), None)

    def best_throughput(self) -> Throughput | None:
        """The throughput entry with the most images per second."""
        return max(self.throughput, key=lambda t: t.images_per_second, default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "label": self.label,
            "backend": self.backend,
            "files": dict(self.files),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "throughput": [t.to_dict() for t in self.throughput],
            "models": [m.to_dict() for m in self.models],
            "resources": None if self.resources is None else self.resources.to_dict(),
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
            "speedup_vs_torch": {k: round(v, 3) for k, v in self.speedup_vs_torch.items()},
        }


@dataclass(frozen=True)
class BenchReport:
    """The result of :func:`run_bench`.

    Attributes:
        created: ISO-8601 UTC time the run started.
        bundle: Bundle folder.
        bundle_id: Its id.
        environment: CPU/GPU names, threads, library versions.
        data: What the images were (source, counts, notes).
        input_sizes: ``{"classifier": S, "detector": S}``.
        threshold: Gate τ.
        precisions: One entry per precision, reference first.
        baseline: PyTorch timings, or None.
        gates: Every gate checked.
        labels: Ground-truth labels of the evaluated images (None without data).
        notes: What was skipped or worth knowing, one line each.
        phase_seconds: Wall time of each phase (accuracy, each precision's latency, baseline).
        seconds: Wall time of the run.
    """

    created: str
    bundle: Path
    bundle_id: str
    environment: dict[str, Any]
    data: dict[str, Any]
    input_sizes: dict[str, int]
    threshold: float
    precisions: tuple[PrecisionBench, ...]
    baseline: BaselineTiming | None
    gates: tuple[GateResult, ...]
    labels: np.ndarray | None = None
    notes: tuple[str, ...] = ()
    phase_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        """Gates that failed."""
        return tuple(g for g in self.gates if g.passed is False)

    @property
    def passed(self) -> bool:
        """No gate failed."""
        return not self.failed_gates

    def precision(self, label: str) -> PrecisionBench | None:
        """The entry of a precision, or None."""
        return next((p for p in self.precisions if p.label == label), None)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (plots' raw arrays excepted; latency samples included)."""
        return {
            "created": self.created,
            "bundle": str(self.bundle),
            "bundle_id": self.bundle_id,
            "passed": self.passed,
            "environment": self.environment,
            "data": self.data,
            "input_sizes": self.input_sizes,
            "threshold": self.threshold,
            "reference": REFERENCE,
            "precisions": [p.to_dict() for p in self.precisions],
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "gates": [g.to_dict() for g in self.gates],
            "notes": list(self.notes),
            "phase_seconds": dict(self.phase_seconds),
            "seconds": round(self.seconds, 2),
        }


# ------------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class _Plan:
    """What runs where.

    Attributes:
        backend: The library every benchmarked precision runs on (``onnxruntime`` or ``tensorrt``).
        latency: Precisions whose latency is measured.
        accuracy: ``(precision, backend, provider)`` of each cascade of the accuracy phase, reference first.
    """

    backend: str
    latency: tuple[str, ...]
    accuracy: tuple[tuple[str, str, ProviderChoice | None], ...]


def _available(manifest: Manifest, backend: str) -> tuple[str, ...]:
    fmt = "tensorrt" if backend == "tensorrt" else "onnx"
    both = set(manifest.precisions("classifier", fmt)) & set(manifest.precisions("detector", fmt))  # type: ignore[arg-type]
    return tuple(p for p in ("fp32", "fp16", "int8") if p in both)


def plan_precisions(manifest: Manifest, config: BenchConfig) -> _Plan:
    """Resolve the backend and the precisions to run.

    Raises:
        BundleError: A requested precision has no file for both roles on the chosen backend.
    """
    backend = select_model(manifest, "classifier", "auto", config.backend, config.provider).backend
    available = _available(manifest, backend)
    wanted = config.precisions or available
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BundleError(
            f"{config.bundle}: no {backend} files for precision {', '.join(missing)} (for both classifier and "
            f"detector, it has: {', '.join(available) or 'none'}); choose --precision among those"
            + (", or build plans with `spine-edge build-engines`" if backend == "tensorrt" else "")
        )
    accuracy: list[tuple[str, str, ProviderChoice | None]] = []
    if config.data is not None:
        if REFERENCE in available:
            accuracy.append((REFERENCE, backend, config.provider))
        elif REFERENCE in _available(manifest, "onnxruntime"):
            accuracy.append((REFERENCE, "onnxruntime", "cpu"))  # the FP32 ONNX graph is the reference anywhere
        else:
            raise BundleError(f"{config.bundle}: no FP32 graphs to compare with; re-export the bundle")
        accuracy += [(p, backend, config.provider) for p in wanted if p != REFERENCE]
    return _Plan(backend, tuple(wanted), tuple(accuracy))


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("spine-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return found


def _gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _uses_gpu(backend: str, provider: ProviderChoice | None) -> bool:
    """Whether the graphs will run on a GPU (then GPU memory is measured)."""
    if backend == "tensorrt" or provider in ("cuda", "tensorrt"):
        return True
    if provider == "cpu":
        return False
    gpu_providers = {PROVIDERS["cuda"], PROVIDERS["tensorrt"]}
    return bool(gpu_providers & set(import_onnxruntime().get_available_providers()))


def write_synthetic_radiographs(
    folder: Path, count: int, seed: int = 0, progress: Callable[[int], None] | None = None
) -> list[Path]:
    """Write ``count`` 12-bit JPEG 2000 lossless DICOM radiographs at real VinDr-SpineXR sizes.

    The content is a smooth spine-like column with soft tissue and mild noise: enough for the
    decoder to do realistic work (noise-free images compress to nothing and decode too fast), with
    no claim to look like a lesion or not.

    Returns:
        The files, in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        rows, cols = REAL_SIZES[i % len(REAL_SIZES)]
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
        centre = cols * (0.5 + 0.05 * np.sin(y / rows * np.pi * (1 + i)))
        column = np.exp(-(((x - centre) / (cols * 0.12)) ** 2))
        bodies = 0.5 + 0.5 * np.cos(y / (rows / (7 + i)) * 2 * np.pi) ** 2
        tissue = np.exp(-(((x - cols / 2) / (cols * 0.45)) ** 2))
        pixels = 600 + 900 * tissue + 1800 * column * bodies + rng.normal(0, 12, (rows, cols))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.set_pixel_data(pixels.clip(0, 4095).astype(np.uint16), "MONOCHROME2", 12, generate_instance_uid=False)
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelSpacing = [0.14, 0.14]
        ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        path = folder / f"synthetic_{i:02d}.dicom"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        if progress:
            progress(1)
    return paths


def load_truth(root: Path, max_images: int | None) -> tuple[TruthSet, dict[str, Any]]:
    """The test split of a VinDr-layout folder as a :class:`TruthSet`, with a description.

    Raises:
        DatasetError: Not a VinDr layout, or no usable test image.
    """
    dataset = read_vindr(root)
    records = dataset.test[:max_images] if max_images else dataset.test
    if not records:
        example = f" (e.g. {dataset.problems[0]})" if dataset.problems else ""
        raise DatasetError(
            f"{root}: the test split has no usable image ({len(dataset.problems)} problems found{example}); "
            "check annotations/test.csv and test_images/, e.g. with `spine-edge data check`"
        )
    truth = truth_from_records(records)
    info = {"source": "vindr-test", "root": str(Path(root).resolve()), "test_images_in_split": len(dataset.test),
            "problems": len(dataset.problems), **truth.describe()}
    return truth, info


@contextmanager
def _bar(config: BenchConfig, total: int, desc: str) -> Iterator[tqdm]:
    """A progress bar on stderr for one phase; log lines are printed above it instead of through it."""
    with (
        logging_redirect_tqdm(),
        tqdm(total=total, desc=desc, unit="img", disable=not config.progress, dynamic_ncols=True, leave=False) as bar,
    ):
        yield bar


# ------------------------------------------------------------------------------------------ phases


def _cascade(config: BenchConfig, precision: str, backend: str, provider: ProviderChoice | None, batch: int,
             force: bool = False) -> Cascade:
    return Cascade.from_bundle(
        config.bundle, precision=precision, backend=backend, provider=provider,  # type: ignore[arg-type]
        batch_size=batch, force_detector=force, heatmaps=not force, threads=config.threads,
    )


@dataclass(frozen=True)
class _AccuracyRun:
    """The accuracy phase: images evaluated, every precision's predictions and metrics."""

    truth: TruthSet
    predictions: dict[str, Predictions]
    metrics: dict[str, PrecisionAccuracy]
    backends: dict[str, str]
    notes: tuple[str, ...]


def _run_accuracy(config: BenchConfig, manifest: Manifest, plan: _Plan, truth: TruthSet) -> _AccuracyRun:
    """Predictions of every precision (detector forced), metrics against the reference, COCO files if asked."""
    cascades: dict[str, Cascade] = {}
    try:
        for label, backend, provider in plan.accuracy:
            cascades[label] = _cascade(config, label, backend, provider, max(config.batch_sizes), force=True)
        backends = {label: cascade.backend for label, cascade in cascades.items()}
        with _bar(config, len(truth), "accuracy (" + ", ".join(cascades) + ")") as bar:
            predictions = collect_predictions(cascades, truth, max(config.batch_sizes), progress=bar.update)
    finally:
        for cascade in cascades.values():
            cascade.close()
    notes = []
    for label, pred in predictions.items():
        if pred.errors:
            index, reason = pred.errors[0]
            notes.append(f"accuracy: {len(pred.errors)} image(s) failed on {label} and were left out of every "
                         f"precision's metrics, e.g. {truth.paths[index]}: {reason}")
    keep = valid_indices(predictions)
    if not keep:
        raise DatasetError(f"{config.data}: no test image could be processed ({notes[0]})")
    if len(keep) < len(truth):
        truth = truth.subset(keep)
        predictions = {label: pred.subset(keep) for label, pred in predictions.items()}
    threshold, names = manifest.classifier.threshold, manifest.detector.class_names
    metrics = evaluate_accuracy(truth, predictions, REFERENCE, threshold, names)
    if config.save_predictions is not None:
        write_coco_files(config.save_predictions, truth, predictions, threshold, names)
    return _AccuracyRun(truth, predictions, metrics, backends, tuple(notes))


def _sample_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Decode up to :data:`SAMPLE_IMAGES` images (the isolated-model and baseline inputs)."""
    images = []
    for path in paths:
        images.append(read_image(path).image)
        if len(images) == SAMPLE_IMAGES:
            break
    return images


def _model_timings(
    config: BenchConfig, manifest: Manifest, precision: str, backend: str, canvases: Mapping[str, np.ndarray],
    gflops: Mapping[str, float | None], progress: Callable[[int], None],
) -> tuple[tuple[ModelTimings, ...], np.ndarray | None, list[str]]:
    """Each graph alone at every batch size; also the classifier's probabilities on the canvases, and notes."""
    timings = []
    probs = None
    notes = []
    for role in ("classifier", "detector"):
        selection = select_model(manifest, role, precision, backend, config.provider)  # type: ignore[arg-type]
        with create_backend(config.bundle, manifest, selection, threads=config.threads) as graph:
            cap = graph.max_batch
            by_batch = []
            for b in config.batch_sizes:
                progress(1)
                if cap is not None and b > cap:
                    notes.append(f"{precision} {role}: batch {b} exceeds the graph's maximum batch {cap}: not timed "
                                 f"alone, and the cascade's b{b} throughput ran batches of {cap}")
                    continue
                calls = model_calls(config.runs, b)
                by_batch.append(time_model(graph, canvases[role], b, calls, warmup=max(1, min(config.warmup, 2))))
            if role == "classifier":
                name = next(iter(graph.input_specs()))
                prob_name = next(s.name for s in selection.entry.outputs if len(s.shape) == 1)
                probs = np.concatenate([graph.infer({name: c[None]})[prob_name] for c in canvases[role]])
            timings.append(ModelTimings(role, selection.entry.file, graph.describe(), tuple(by_batch), gflops.get(role)))
    return tuple(timings), probs, notes


def throughput_images(runs: int, batch: int) -> int:
    """Images timed for throughput at a batch size: about half the latency runs, in whole batches, two at least."""
    return batch * max(2, math.ceil(runs / 2 / batch))


def model_calls(runs: int, batch: int) -> int:
    """Timed calls of a graph alone: ``runs`` at batch 1; at larger batches about half as many images, three calls at least."""
    return runs if batch == 1 else max(3, math.ceil(runs / 2 / batch))


def _throughput(config: BenchConfig, cascade: Cascade, label: str, paths: Sequence[Path], gpu: bool) -> Throughput:
    batch = cascade.config.batch_size
    images = throughput_images(config.runs, batch)
    with ResourceMeter(gpu) as meter, _bar(config, images, f"{label} throughput b{batch}") as bar:
        seconds, ok = measure_throughput(cascade, paths, images, progress=bar.update)
    return Throughput(batch, ok, seconds, meter.resources)


def _latency(
    config: BenchConfig, manifest: Manifest, plan: _Plan, label: str, paths: Sequence[Path],
    canvases: Mapping[str, np.ndarray], gflops: Mapping[str, float | None], gpu: bool,
) -> tuple[PrecisionBench, np.ndarray | None, list[str]]:
    """Batch-1 latency, throughput per batch size and isolated models of one precision (and notes).

    Memory is measured once the graphs are loaded (the high-water mark restarts at the loaded
    RSS), so it is the steady state a kiosk runs in, not the transient of building a session.
    """
    throughput: dict[int, Throughput] = {}
    with _cascade(config, label, plan.backend, config.provider, 1) as cascade:
        with ResourceMeter(gpu) as meter, _bar(config, config.runs + config.warmup, f"{label} latency") as bar:
            timing = time_cascade(cascade, paths, config.runs, config.warmup, progress=bar.update)
        backend = cascade.backend
        if 1 in config.batch_sizes:  # the same cascade: a second session set would only cost load time
            throughput[1] = _throughput(config, cascade, label, paths, gpu)
    for b in config.batch_sizes:
        if b not in throughput:
            with _cascade(config, label, plan.backend, config.provider, b) as cascade:
                throughput[b] = _throughput(config, cascade, label, paths, gpu)
    files = {role: select_model(manifest, role, label, plan.backend, config.provider).entry.file  # type: ignore[arg-type]
             for role in ("classifier", "detector")}
    with _bar(config, 2 * len(config.batch_sizes), f"{label} models alone") as bar:
        models, probs, notes = _model_timings(config, manifest, label, plan.backend, canvases, gflops, bar.update)
    bench = PrecisionBench(label=label, backend=backend, files=files, latency=timing,
                           throughput=tuple(throughput[b] for b in config.batch_sizes), models=models,
                           resources=meter.resources)
    return bench, probs, notes


def _flops(manifest: Manifest, bundle: Path) -> tuple[dict[str, float | None], list[str]]:
    """GFLOPs per image of the FP32 graphs (the arithmetic every precision performs)."""
    out: dict[str, float | None] = {}
    notes = []
    for role in ("classifier", "detector"):
        entry = manifest.find(role, "fp32", "onnx")  # type: ignore[arg-type]
        if entry is None:
            out[role] = None
            notes.append(f"GFLOP/s: no FP32 ONNX {role} graph in the bundle to count")
            continue
        try:
            count = count_flops(bundle / entry.file)
        except MissingDependencyError:
            return {"classifier": None, "detector": None}, ["GFLOP/s not reported: the onnx package is not installed"]
        out[role] = count.gflops
        if count.uncounted:
            notes.append(f"GFLOP/s is a lower bound: {len(count.uncounted)} {role} node(s) whose shapes ONNX shape "
                         f"inference leaves unresolved are not counted (e.g. {count.uncounted[0]})")
    return out, notes


def _baseline(
    config: BenchConfig, manifest: Manifest, images: Sequence[np.ndarray]
) -> tuple[BaselineTiming | None, str | None]:
    """The PyTorch run, or why it was skipped."""
    if not config.baseline:
        return None, "baseline: skipped (--no-baseline)"
    checkpoints = baseline_checkpoints(manifest, config.checkpoints)
    if checkpoints is None:
        return None, "baseline: skipped (the manifest records no checkpoints; pass --checkpoints CKPT)"
    if not checkpoints.is_dir():
        return None, f"baseline: skipped ({checkpoints} is not a folder; pass --checkpoints CKPT)"
    threads = config.threads or available_cores()
    try:
        with _bar(config, 2 * (config.runs + config.warmup), "pytorch baseline") as bar:
            timing = run_torch_baseline(checkpoints, manifest, images, config.runs, config.warmup, threads, bar.update)
    except SpineEdgeError as exc:  # optional and informational: never lose the measured run over it
        return None, f"baseline: skipped ({exc})"
    return timing, None


def _speedups(bench: PrecisionBench, baseline: BaselineTiming) -> dict[str, float]:
    """``torch ms / this ms`` at batch 1, per model and for both models together."""
    cls, det = bench.model("classifier"), bench.model("detector")
    cls1 = cls.at(1) if cls else None
    det1 = det.at(1) if det else None
    out = {}
    if cls1:
        out["classifier"] = baseline.classifier.p50 / cls1.per_image.p50
    if det1:
        out["detector"] = baseline.detector_inference.p50 / det1.per_image.p50
    if cls1 and det1:
        out["models"] = (baseline.classifier.p50 + baseline.detector_inference.p50) / (cls1.per_image.p50 + det1.per_image.p50)
    return out


# ------------------------------------------------------------------------------------------ gates


def check_gates(precisions: Sequence[PrecisionBench], config: BenchConfig) -> tuple[GateResult, ...]:
    """DESIGN.md's accuracy holds for every lower precision, and the optional latency budgets."""
    gates = []
    for bench in precisions:
        acc = bench.accuracy
        gate = ACCURACY_GATES.get(bench.label)
        if acc is not None and gate is not None:
            for name, delta, limit, holds in (
                ("|ΔAUROC|", acc.delta_auroc_pt, gate.auroc_pt, gate.auroc_holds(acc.delta_auroc_pt)),
                ("|ΔmAP@0.5| (detector)", acc.delta_map50_pt, gate.map50_pt, gate.map50_holds(acc.delta_map50_pt)),
            ):
                gates.append(GateResult(f"{bench.label} {name} vs {REFERENCE}", bench.label, delta, limit, "pt", holds))
        if bench.latency is None:
            continue
        budgets = ([(END_TO_END, config.budget_ms)] if config.budget_ms is not None else []) + list(config.stage_budgets)
        for stage, limit in budgets:
            stats = bench.latency.end_to_end if stage == END_TO_END else bench.latency.stages.get(stage)
            measured = stats.p95 if stats is not None else math.nan
            passed = None if math.isnan(measured) else measured <= limit
            gates.append(GateResult(f"{bench.label} {stage.replace('_', '-')} p95", bench.label, measured, limit, "ms", passed))
    return tuple(gates)


# ------------------------------------------------------------------------------------------ the run


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a phase (seconds) under ``name``."""
    start = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - start, 2)


def _canvases(manifest: Manifest, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``[M, 1, S, S]`` letterboxed inputs of each graph, as the cascade prepares them."""
    sides = {"classifier": (manifest.classifier.input_size, manifest.classifier.pad_value),
             "detector": (manifest.detector.input_size, manifest.detector.pad_value)}
    return {
        role: np.stack([letterbox(image, size, pad)[0] for image in images])[:, None]
        for role, (size, pad) in sides.items()
    }


def _assemble(
    plan: _Plan, benches: Mapping[str, PrecisionBench], acc: _AccuracyRun | None, class_names: Sequence[str]
) -> tuple[PrecisionBench, ...]:
    """One entry per precision, reference first: latency where it ran, accuracy and curves where data was given."""
    labels = dict.fromkeys([REFERENCE, *plan.latency, *(label for label, _, _ in plan.accuracy)])
    out = []
    for label in labels:
        bench = benches.get(label)
        if acc is not None and label in acc.metrics:
            bench = bench or PrecisionBench(label=label, backend=acc.backends[label], files={})
            detections = acc.predictions[label].detections
            bench = replace(bench, accuracy=acc.metrics[label], probs=acc.predictions[label].probs,
                            curves=precision_recall_curves(acc.truth.boxes, detections, class_names))
        if bench is not None:
            out.append(bench)
    return tuple(out)


def run_bench(config: BenchConfig) -> BenchReport:
    """Benchmark a bundle: latency, resources, accuracy per precision, the PyTorch peer, and the gates.

    Args:
        config: What to run.

    Returns:
        The report; :attr:`BenchReport.passed` says whether every gate held.

    Raises:
        BundleError: Missing/corrupt bundle, or no file for a requested precision.
        BackendError: The inference library cannot run a graph here.
        DatasetError: ``data`` is not a usable VinDr-layout folder.
        MissingDependencyError: scikit-learn / pycocotools missing for accuracy, or the backend's library.
    """
    start = time.perf_counter()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = load_manifest(config.bundle, verify=False)
    plan = plan_precisions(manifest, config)
    gpu = _uses_gpu(plan.backend, config.provider)
    notes: list[str] = []
    phases: dict[str, float] = {}
    acc: _AccuracyRun | None = None
    benches: dict[str, PrecisionBench] = {}
    reference_probs = None
    with tempfile.TemporaryDirectory(prefix="spine-edge-bench-") as tmp:
        if config.data is not None:
            truth, data_info = load_truth(config.data, config.max_images)
            with _timed(phases, "accuracy"):
                acc = _run_accuracy(config, manifest, plan, truth)
            notes += acc.notes
            data_info |= {"evaluated": len(acc.truth), "detector_conf": manifest.detector.conf_threshold,
                          "detector_iou": manifest.detector.iou_threshold}
            paths = list(acc.truth.paths)
        else:
            with (
                _timed(phases, "synthetic images"),
                _bar(config, config.synthetic_images, "writing synthetic radiographs") as bar,
            ):
                paths = write_synthetic_radiographs(Path(tmp), config.synthetic_images, progress=bar.update)
            data_info = {"source": "synthetic", "images": len(paths), "sizes": [list(s) for s in REAL_SIZES],
                         "format": "DICOM, JPEG 2000 lossless, 12-bit"}
            notes.append(f"no --data: latency only, on {len(paths)} synthetic 12-bit JPEG 2000 DICOM radiographs at "
                         "real VinDr-SpineXR sizes; pass --data ROOT for accuracy on a labelled test split")
        images = _sample_images(paths)
        canvases = _canvases(manifest, images)
        gflops, flop_notes = _flops(manifest, config.bundle)
        notes += flop_notes
        for label in plan.latency:
            with _timed(phases, f"{label} latency"):
                benches[label], probs, latency_notes = _latency(config, manifest, plan, label, paths, canvases, gflops, gpu)
            notes += latency_notes
            if label == REFERENCE:
                reference_probs = probs

    with _timed(phases, "baseline"):
        baseline, baseline_note = _baseline(config, manifest, images)
    if baseline_note:
        notes.append(baseline_note)
    if baseline is not None:
        benches = {label: replace(bench, speedup_vs_torch=_speedups(bench, baseline)) for label, bench in benches.items()}
        if reference_probs is not None and baseline.probs:
            parity = max(abs(baseline.probs[i] - float(reference_probs[i])) for i in baseline.probs)
            notes.append(f"baseline parity: max |prob(PyTorch) - prob(ONNX fp32)| = {parity:.2e} "
                         f"on {len(baseline.probs)} image(s)")
    precisions = _assemble(plan, benches, acc, manifest.detector.class_names)
    return BenchReport(
        created=created,
        bundle=Path(config.bundle),
        bundle_id=manifest.bundle_id,
        environment=_environment(config, plan, gpu),
        data=data_info,
        input_sizes={"classifier": manifest.classifier.input_size, "detector": manifest.detector.input_size},
        threshold=manifest.classifier.threshold,
        precisions=precisions,
        baseline=baseline,
        gates=check_gates(precisions, config),
        labels=None if acc is None else acc.truth.labels,
        notes=tuple(notes),
        phase_seconds=phases,
        seconds=time.perf_counter() - start,
    )


def _environment(config: BenchConfig, plan: _Plan, gpu: bool) -> dict[str, Any]:
    return {
        "backend": plan.backend,
        "provider_requested": config.provider or "auto",
        "threads": config.threads or available_cores(),
        "cores_available": available_cores(),
        "cpu": cpu_model_name(),
        "gpu": _gpu_name() if gpu else None,
        "platform": platform.platform(),
        "versions": _versions(),
    }
