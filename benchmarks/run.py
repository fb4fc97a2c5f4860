"""``run_bench``: latency, resources and accuracy of a bundle on this box, with the gates that decide.

Phases, in order (each with a progress bar on stderr):

1. **Images.** With ``data``, the TEST split of a VinDr-layout folder (labels and boxes); without,
   a few synthetic radiographs at the sizes of real VinDr-SpineXR files, written as JPEG 2000 DICOM
   into a temporary folder so the read stage decodes what a real box decodes (latency only;
   :mod:`benchmarks.synthetic`).
2. **Accuracy** (``data`` only): every precision's cascade, detector forced, over the split, each
   image read once (:mod:`benchmarks.accuracy`); FP32 is the reference.
   Then the **guard** (:mod:`benchmarks.guard_eval`): every precision's guarded cascade over the
   split and a generated set of non-radiographs (false and true refusals, decisions compared with
   FP32) and the CAM pointing game; the accuracy and latency phases themselves run unguarded, so
   they measure the models on every image. Then the **decode parity**
   (:mod:`benchmarks.decode_parity`): the reference cascade over the split with the full decode
   and with the reduced-resolution one the cascade uses, compared (|Δprob|, gate flips, box AP).
3. **Latency** per precision: the cascade at batch 1 (stages and end to end), throughput at each
   batch size, and each graph alone on preprocessed canvases (:mod:`benchmarks.latency`), with
   peak host (and GPU) memory and GFLOP/s against the FP32 graph's FLOP count.
4. **Baseline** (torch installed): PyTorch eager on the same checkpoints and images
   (:mod:`benchmarks.baseline_torch`), so each speed-up is a ratio measured in this run.
5. **Gates**: DESIGN.md's accuracy holds against FP32 and the optional latency budgets
   (:func:`benchmarks.results.check_gates`).

What to run is a :class:`~benchmarks.config.BenchConfig`; every cascade is its ``cascade`` settings
with the measurement's precision and batch size. The result is a :class:`~benchmarks.results.BenchReport`.

Example:
    >>> config = BenchConfig(CascadeConfig(Path("runs/bundle")), data=Path("data/synth"))
    >>> report = run_bench(config)  # doctest: +SKIP
    >>> report.passed, [g.message() for g in report.failed_gates]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from spine_edge.backends import BackendChoice, PrecisionChoice, create_backend, select_model
from spine_edge.backends.onnxruntime import available_cores
from spine_edge.benchmarks.accuracy import (
    PrecisionAccuracy,
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
from spine_edge.benchmarks.config import (
    PRECISIONS,
    REFERENCE,
    BenchConfig,
    BenchPlan,
    accuracy_cascade,
    plan_precisions,
    runs_on,
)
from spine_edge.benchmarks.decode_parity import measure_decode_parity
from spine_edge.benchmarks.environment import environment_record, uses_gpu
from spine_edge.benchmarks.flops import count_flops
from spine_edge.benchmarks.guard_eval import evaluate_guard
from spine_edge.benchmarks.latency import (
    ModelTimings,
    ResourceMeter,
    Throughput,
    gpu_memory_note,
    measure_throughput,
    time_cascade,
    time_model,
)
from spine_edge.benchmarks.overlap import measure_overlap
from spine_edge.benchmarks.progress import progress_bar
from spine_edge.benchmarks.results import BenchReport, GateResult, PrecisionBench, check_gates
from spine_edge.benchmarks.synthetic import REAL_SIZES, write_synthetic_radiographs
from spine_edge.bundle import Manifest, load_manifest
from spine_edge.cascade import Cascade
from spine_edge.errors import DatasetError, MissingDependencyError, SpineEdgeError
from spine_edge.imageio import read_image
from spine_edge.preprocess import letterbox
from spine_edge.vindr import read_vindr

#: Decoded images shared by the isolated-model timings and the PyTorch baseline.
SAMPLE_IMAGES = 8


# ------------------------------------------------------------------------------------------ images


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
    info = {
        "source": "vindr-test",
        "root": str(Path(root).resolve()),
        "test_images_in_split": len(dataset.test),
        "problems": len(dataset.problems),
        **truth.describe(),
    }
    return truth, info


def _synthetic_inputs(config: BenchConfig, folder: Path) -> tuple[list[Path], dict[str, Any], str]:
    """Synthetic radiographs written into ``folder``, their description, and the note saying so."""
    with progress_bar(config.progress, config.synthetic_images, "writing synthetic radiographs") as bar:
        paths = write_synthetic_radiographs(folder, config.synthetic_images, progress=bar.update)
    info = {
        "source": "synthetic",
        "images": len(paths),
        "sizes": [list(s) for s in REAL_SIZES],
        "format": "DICOM, JPEG 2000 lossless, 12-bit",
    }
    note = (
        f"no --data: latency only, on {len(paths)} synthetic 12-bit JPEG 2000 DICOM radiographs at "
        "real VinDr-SpineXR sizes; pass --data ROOT for accuracy on a labelled test split"
    )
    return paths, info, note


def _sample_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Decode up to :data:`SAMPLE_IMAGES` images (the isolated-model and baseline inputs)."""
    images = []
    for path in paths:
        images.append(read_image(path).image)
        if len(images) == SAMPLE_IMAGES:
            break
    return images


def _canvases(manifest: Manifest, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``[M, 1, S, S]`` letterboxed inputs of each graph, as the cascade prepares them."""
    sides = {
        "classifier": (manifest.classifier.input_size, manifest.classifier.pad_value),
        "detector": (manifest.detector.input_size, manifest.detector.pad_value),
    }
    return {
        role: np.stack([letterbox(image, size, pad)[0] for image in images])[:, None]
        for role, (size, pad) in sides.items()
    }


# ------------------------------------------------------------------------------------------ accuracy


@dataclass(frozen=True)
class _AccuracyRun:
    """The accuracy phase: images evaluated, every precision's predictions and metrics."""

    truth: TruthSet
    predictions: dict[str, Predictions]
    metrics: dict[str, PrecisionAccuracy]
    backends: dict[str, str]
    notes: tuple[str, ...]


def _run_accuracy(config: BenchConfig, manifest: Manifest, plan: BenchPlan, truth: TruthSet) -> _AccuracyRun:
    """Predictions of every precision (detector forced), metrics against the reference, COCO files if asked."""
    batch = max(config.batch_sizes)
    cascades: dict[str, Cascade] = {}
    try:
        for label, backend, provider in plan.accuracy:
            precision, graph_target = accuracy_cascade(label)
            # The plan's labels and backends come from select_model over this bundle: valid choices.
            settings = replace(
                config.cascade,
                precision=cast(PrecisionChoice, precision),
                backend=cast(BackendChoice, backend),
                provider=provider,
                batch_size=batch,
                force_detector=True,
                heatmaps=False,
                guard=False,
                ood="flag",
                graph_target=graph_target,
            )
            cascades[label] = Cascade.from_config(settings)
        backends = {label: cascade.backend for label, cascade in cascades.items()}
        with progress_bar(config.progress, len(truth), "accuracy (" + ", ".join(cascades) + ")") as bar:
            predictions = collect_predictions(cascades, truth, batch, progress=bar.update)
    finally:
        for cascade in cascades.values():
            cascade.close()
    notes = []
    for label, pred in predictions.items():
        if pred.errors:
            index, reason = pred.errors[0]
            notes.append(
                f"accuracy: {len(pred.errors)} image(s) failed on {label} and were left out of every "
                f"precision's metrics, e.g. {truth.paths[index]}: {reason}"
            )
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


# ------------------------------------------------------------------------------------------ latency


def throughput_images(runs: int, batch: int) -> int:
    """Images timed for throughput at a batch size: about half the latency runs, in whole batches, two at least."""
    return batch * max(2, math.ceil(runs / 2 / batch))


def model_calls(runs: int, batch: int) -> int:
    """Timed calls of a graph alone: ``runs`` at batch 1; larger batches about half as many images, 3 calls at least."""
    return runs if batch == 1 else max(3, math.ceil(runs / 2 / batch))


def _model_timings(
    config: BenchConfig,
    manifest: Manifest,
    precision: str,
    backend: str,
    canvases: Mapping[str, np.ndarray],
    gflops: Mapping[str, float | None],
    progress: Callable[[int], None],
) -> tuple[tuple[ModelTimings, ...], np.ndarray | None, list[str]]:
    """Each graph alone at every batch size; also the classifier's probabilities on the canvases, and notes."""
    settings = config.cascade
    timings = []
    probs = None
    notes = []
    for role in ("classifier", "detector"):
        selection = select_model(manifest, role, precision, backend, settings.provider)  # type: ignore[arg-type]
        with create_backend(settings.bundle_dir, manifest, selection, threads=settings.threads) as graph:
            cap = graph.max_batch
            by_batch = []
            for b in config.batch_sizes:
                progress(1)
                if cap is not None and b > cap:
                    notes.append(
                        f"{precision} {role}: batch {b} exceeds the graph's maximum batch {cap}: not timed "
                        f"alone, and the cascade's b{b} throughput ran batches of {cap}"
                    )
                    continue
                calls = model_calls(config.runs, b)
                by_batch.append(time_model(graph, canvases[role], b, calls, warmup=max(1, min(config.warmup, 2))))
            if role == "classifier":
                name = next(iter(graph.input_specs()))
                prob_name = next(s.name for s in selection.entry.outputs if len(s.shape) == 1)
                probs = np.concatenate([graph.infer({name: c[None]})[prob_name] for c in canvases[role]])
            timing = ModelTimings(role, selection.entry.file, graph.describe(), tuple(by_batch), gflops.get(role))
            timings.append(timing)
    return tuple(timings), probs, notes


def _throughput(config: BenchConfig, cascade: Cascade, label: str, paths: Sequence[Path], gpu: bool) -> Throughput:
    """Images per second through ``predict_many`` at the cascade's batch size, with memory."""
    batch = cascade.config.batch_size
    images = throughput_images(config.runs, batch)
    meter = ResourceMeter(gpu, config.cascade.device)
    with meter, progress_bar(config.progress, images, f"{label} throughput b{batch}") as bar:
        seconds, ok = measure_throughput(cascade, paths, images, progress=bar.update)
    return Throughput(batch, ok, seconds, meter.resources)


def _latency(
    config: BenchConfig,
    manifest: Manifest,
    plan: BenchPlan,
    label: str,
    paths: Sequence[Path],
    canvases: Mapping[str, np.ndarray],
    gflops: Mapping[str, float | None],
    gpu: bool,
) -> tuple[PrecisionBench, np.ndarray | None, list[str]]:
    """Batch-1 latency, throughput per batch size and isolated models of one precision (and notes).

    Memory is measured once the graphs are loaded (the high-water mark restarts at the loaded
    RSS), so it is the steady state a kiosk runs in, not the transient of building a session.
    """
    # The guard's own phase measures its decisions; latency times the models on every image.
    settings = replace(config.cascade, precision=label, backend=plan.backend, guard=False, ood="flag")  # type: ignore[arg-type]
    throughput: dict[int, Throughput] = {}
    with Cascade.from_config(replace(settings, batch_size=1)) as cascade:
        runs = config.runs + config.warmup
        meter = ResourceMeter(gpu, config.cascade.device)
        with meter, progress_bar(config.progress, runs, f"{label} latency") as bar:
            timing = time_cascade(cascade, paths, config.runs, config.warmup, progress=bar.update)
        backend = cascade.backend
        if 1 in config.batch_sizes:  # the same cascade: a second session set would only cost load time
            throughput[1] = _throughput(config, cascade, label, paths, gpu)
    for b in config.batch_sizes:
        if b not in throughput:
            with Cascade.from_config(replace(settings, batch_size=b)) as cascade:
                throughput[b] = _throughput(config, cascade, label, paths, gpu)
    files = {
        role: select_model(manifest, role, label, plan.backend, settings.provider).entry.file  # type: ignore[arg-type]
        for role in ("classifier", "detector")
    }
    with progress_bar(config.progress, 2 * len(config.batch_sizes), f"{label} models alone") as bar:
        models, probs, notes = _model_timings(config, manifest, label, plan.backend, canvases, gflops, bar.update)
    bench = PrecisionBench(
        label=label,
        backend=backend,
        files=files,
        latency=timing,
        throughput=tuple(throughput[b] for b in config.batch_sizes),
        models=models,
        resources=meter.resources,
    )
    return bench, probs, notes


def _flops(manifest: Manifest, bundle: Path) -> tuple[dict[str, float | None], list[str]]:
    """GFLOPs per image of the FP32 graphs (the arithmetic every precision performs)."""
    out: dict[str, float | None] = {}
    notes = []
    for role in ("classifier", "detector"):
        entry = manifest.find(role, "fp32", "onnx")
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
            notes.append(
                f"GFLOP/s is a lower bound: {len(count.uncounted)} {role} node(s) whose shapes ONNX shape "
                f"inference leaves unresolved are not counted (e.g. {count.uncounted[0]})"
            )
    return out, notes


# ------------------------------------------------------------------------------------------ baseline


def _baseline(
    config: BenchConfig, manifest: Manifest, images: Sequence[np.ndarray]
) -> tuple[BaselineTiming | None, str | None]:
    """The PyTorch run, or why it was skipped."""
    if not config.baseline:
        return None, "baseline: skipped (--no-baseline)"
    checkpoints = baseline_checkpoints(config.checkpoints)
    if checkpoints is None:
        return (
            None,
            "baseline: skipped (opt-in: pass --checkpoints CKPT, the trusted folder the bundle was exported from)",
        )
    if not checkpoints.is_dir():
        return None, f"baseline: skipped ({checkpoints} is not a folder; pass --checkpoints CKPT)"
    threads = config.cascade.threads or available_cores()
    runs = 2 * (config.runs + config.warmup)
    try:
        with progress_bar(config.progress, runs, "pytorch baseline") as bar:
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
        torch_ms = baseline.classifier.p50 + baseline.detector_inference.p50
        out["models"] = torch_ms / (cls1.per_image.p50 + det1.per_image.p50)
    return out


def _parity_note(baseline: BaselineTiming, reference_probs: np.ndarray) -> str:
    """How far PyTorch's probabilities are from the FP32 graph's on the same images."""
    parity = max(abs(baseline.probs[i] - float(reference_probs[i])) for i in baseline.probs)
    return f"baseline parity: max |prob(PyTorch) - prob(ONNX fp32)| = {parity:.2e} on {len(baseline.probs)} image(s)"


# ------------------------------------------------------------------------------------------ the run


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a phase (seconds) under ``name``."""
    start = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - start, 2)


def _assemble(
    plan: BenchPlan, benches: Mapping[str, PrecisionBench], acc: _AccuracyRun | None, class_names: Sequence[str]
) -> tuple[PrecisionBench, ...]:
    """One entry per precision, reference first: latency where it ran, accuracy and curves where data was given."""
    labels = dict.fromkeys([REFERENCE, *plan.latency, *(label for label, _, _ in plan.accuracy)])
    out = []
    for label in labels:
        bench = benches.get(label)
        if acc is not None and label in acc.metrics:
            bench = bench or PrecisionBench(label=label, backend=acc.backends[label], files={})
            detections = acc.predictions[label].detections
            bench = replace(
                bench,
                accuracy=acc.metrics[label],
                probs=acc.predictions[label].probs,
                curves=precision_recall_curves(acc.truth.boxes, detections, class_names),
            )
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
    bundle = config.cascade.bundle_dir
    manifest = load_manifest(bundle, verify=False)
    plan = plan_precisions(manifest, config)
    gpu = uses_gpu(plan.backend, config.cascade.provider)
    notes: list[str] = []
    phases: dict[str, float] = {}
    acc: _AccuracyRun | None = None
    guard_gates: list[GateResult] = []
    benches: dict[str, PrecisionBench] = {}
    reference_probs = None
    with tempfile.TemporaryDirectory(prefix="spine-edge-bench-") as tmp:
        if config.data is not None:
            truth, data_info = load_truth(config.data, config.max_images)
            with _timed(phases, "accuracy"):
                acc = _run_accuracy(config, manifest, plan, truth)
            notes += acc.notes
            data_info |= {
                "evaluated": len(acc.truth),
                "detector_conf": manifest.detector.conf_threshold,
                "detector_iou": manifest.detector.iou_threshold,
            }
            with _timed(phases, "guard"):
                guard = evaluate_guard(
                    replace(config.cascade, backend=cast(BackendChoice, plan.backend)), truth,
                    [label for label, _, _ in plan.accuracy if label in PRECISIONS and runs_on(plan.backend, label)],
                    Path(tmp) / "non_radiographs",
                    REFERENCE,
                )  # fmt: skip
            data_info["guard"] = guard.to_dict()
            notes += guard.notes()
            guard_gates = guard.gates()
            with (
                _timed(phases, "decode parity"),
                progress_bar(
                    config.progress, 3 * len(acc.truth), "decode parity (full, reduced, full shifted by a pixel)"
                ) as bar,
            ):
                parity = measure_decode_parity(
                    replace(config.cascade, precision=REFERENCE, backend=cast(BackendChoice, plan.backend)),
                    acc.truth.paths,
                    bar.update,
                )
            data_info["decode_parity"] = parity.to_dict()
            notes += parity.notes()
            paths = list(acc.truth.paths)
        else:
            with _timed(phases, "synthetic images"):
                paths, data_info, synthetic_note = _synthetic_inputs(config, Path(tmp))
            notes.append(synthetic_note)
        with _timed(phases, "overlap"):
            overlap = measure_overlap(
                replace(config.cascade, precision=REFERENCE, backend=cast(BackendChoice, plan.backend)), paths
            )
        data_info["overlap"] = overlap.to_dict()
        notes += overlap.notes()
        images = _sample_images(paths)
        canvases = _canvases(manifest, images)
        gflops, flop_notes = _flops(manifest, bundle)
        notes += flop_notes
        for label in plan.latency:
            with _timed(phases, f"{label} latency"):
                benches[label], probs, latency_notes = _latency(
                    config, manifest, plan, label, paths, canvases, gflops, gpu
                )
            notes += latency_notes
            if label == REFERENCE:
                reference_probs = probs
        if gpu:
            notes.append(gpu_memory_note({label: bench.resources for label, bench in benches.items()}))

    with _timed(phases, "baseline"):
        baseline, baseline_note = _baseline(config, manifest, images)
    if baseline_note:
        notes.append(baseline_note)
    if baseline is not None:
        benches = {
            label: replace(bench, speedup_vs_torch=_speedups(bench, baseline)) for label, bench in benches.items()
        }
        if reference_probs is not None and baseline.probs:
            notes.append(_parity_note(baseline, reference_probs))
    precisions = _assemble(plan, benches, acc, manifest.detector.class_names)
    return BenchReport(
        created=created,
        bundle=bundle,
        bundle_id=manifest.bundle_id,
        environment=environment_record(config, plan.backend, gpu),
        data=data_info,
        input_sizes={"classifier": manifest.classifier.input_size, "detector": manifest.detector.input_size},
        threshold=manifest.classifier.threshold,
        precisions=precisions,
        baseline=baseline,
        gates=check_gates(precisions, config) + tuple(guard_gates),
        labels=None if acc is None else acc.truth.labels,
        notes=tuple(notes),
        phase_seconds=phases,
        seconds=time.perf_counter() - start,
    )
