"""Checkpoints → bundle: graphs in every precision, measured against FP32, described by a manifest.

:func:`run_export` runs one function per step, each taking what it needs and returning a frozen
result; nothing is shared between steps but those results:

1. the checkpoints and data (:mod:`~spine_edge.export.sources`) and the evaluation split
   (:mod:`~spine_edge.export.evaluation`);
2. the in-distribution score, fitted on the training split's images and thresholded on the
   evaluation split (:mod:`~spine_edge.export.ood`), added to the ensemble as its third output;
   FP32 graphs (classifier ensemble, detector), checked against PyTorch on a few images, and their
   outputs on the evaluation split: the reference (:mod:`~spine_edge.export.variants`);
3. FP16 graphs (convolutional body in float16), measured through an exact FP16 emulation on ORT CPU;
4. INT8 Q/DQ graphs for TensorRT (symmetric) and ONNX Runtime (U8S8), calibrated once per graph on
   train images (:mod:`~spine_edge.export.calibration`); the fewest, most sensitive layers that bring
   a graph inside its gates stay FP32 (:mod:`~spine_edge.export.sensitivity`);
5. at the end, once: the report rows, ``accuracy_report.json`` / ``.md``, the TensorRT operator check
   and manifest entry of every graph, a few letterboxed validation images per role on which
   ``build-engines`` checks each plan (``parity/<role>.npz``), and ``manifest.json``, written last;
   then the engine caches of graphs the new manifest no longer lists are cleared.

Example:
    >>> config = ExportConfig(Path("runs/ckpt"), Path("runs/bundle"), eval_data=Path("runs/prep"))  # doctest: +SKIP
    >>> run_export(config).gates_hold  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch

from spine_edge.bundle import ROLES as MODEL_ROLES
from spine_edge.bundle import ModelEntry, OodInfo, load_manifest, write_manifest
from spine_edge.export.bundle_writer import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    AccuracyReport,
    build_manifest,
    parity_set_files,
    write_accuracy_report,
)
from spine_edge.export.calibration import CalibrationSet, calibrate_graphs
from spine_edge.export.classifier_graph import attach_ood, build_ensemble, read_ensemble_spec
from spine_edge.export.config import ExportConfig
from spine_edge.export.detector_graph import build_detector_module, read_detector_json
from spine_edge.export.engines import clear_stale_caches, parity_path, write_parity_set
from spine_edge.export.evaluation import (
    EvalSet,
    EvalSettings,
    Evaluation,
    accuracy_row,
    assemble_report,
    evaluate_fp32,
    read_eval_set,
)
from spine_edge.export.ood import choose_threshold
from spine_edge.export.sources import ExportSources, check_sources, resolve_data
from spine_edge.export.variants import (
    FILE_NAMES,
    INT8_VARIANTS,
    ROLES,
    Fp32Graphs,
    Parity,
    Variant,
    build_fp16_variant,
    build_int8_variant,
    export_fp32_graphs,
    model_entry_of,
)

log = logging.getLogger(__name__)

#: Most training images the in-distribution score is fitted on (their pooled features are held in memory).
OOD_FIT_IMAGES = 4000
#: Validation images stored per role for ``build-engines``' plan check (it looks for broken plans, not
#: for accuracy, so a dozen real images are enough and keep the bundle small).
PARITY_CANVASES = 12


@dataclass(frozen=True)
class ExportResult:
    """What :func:`run_export` wrote.

    Attributes:
        bundle: The bundle folder.
        manifest: Its ``manifest.json``.
        files: Every file written, manifest last.
        accuracy: The accuracy report (None without evaluation data).
        seconds: Wall time.
        timings: Seconds per step.
    """

    bundle: Path
    manifest: Path
    files: tuple[Path, ...]
    accuracy: AccuracyReport | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gates_hold(self) -> bool | None:
        """Whether every precision met DESIGN.md's accuracy gates (None: not measured)."""
        return None if self.accuracy is None else self.accuracy.gates_hold


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a step, log it and keep the time for :attr:`ExportResult.timings`."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log.info("export: %s took %.1f s", name, timings[name])


def run_export(config: ExportConfig) -> ExportResult:
    """Export the checkpoints of ``spine-edge train`` into a bundle.

    Args:
        config: Checkpoints, bundle folder, precisions, data and evaluation settings.

    Returns:
        What was written, with the accuracy report.

    Raises:
        SpineEdgeError: Missing or malformed checkpoints; INT8 requested without data.
        DatasetError: The evaluation or calibration folder is unusable.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(config.out)
    paths = resolve_data(config)
    spec = read_ensemble_spec(Path(config.checkpoints))
    detector_meta = read_detector_json(Path(config.checkpoints) / "detector.json")
    detector_module, detector_source = build_detector_module(Path(config.checkpoints) / "detector.pt")
    sources = check_sources(config, spec, detector_meta, detector_source)
    data = None
    if paths.eval_data is not None:
        data = read_eval_set(
            paths.eval_data, config.eval_split, spec.input_size, sources.detector_size, config.eval_limit
        )
    out.mkdir(parents=True, exist_ok=True)
    ensemble = build_ensemble(spec)
    ood = None
    if paths.calib_data is not None and data is not None:
        with _timed(timings, "in-distribution score"):
            ood = _fit_ood(ensemble, paths.calib_data, sources, data)
    else:
        log.warning("export: no training and validation images, so the bundle has no in-distribution score")
    with _timed(timings, "fp32 graphs"):
        fp32 = export_fp32_graphs(
            ensemble,
            detector_module,
            detector_source,
            (spec.input_size, sources.detector_size),
            len(spec.members),
            out,
            data,
            config.parity_images,
        )
        del detector_module  # the traced module is the largest object of the run; nothing needs it now
        evaluation = _evaluate_reference(config, sources, fp32, data, ood is not None) if data is not None else None
    variants: list[Variant] = []
    if "fp16" in config.precisions:
        with _timed(timings, "fp16 graphs"):
            variants.append(build_fp16_variant(fp32, out, evaluation))
    calibration = None
    if "int8" in config.precisions:
        assert evaluation is not None and paths.calib_data is not None  # resolve_data: INT8 needs both
        calibration, int8 = _int8_variants(config, sources, fp32, evaluation, paths.calib_data, timings)
        variants.extend(int8)
    if ood is not None:
        ood = _per_graph_thresholds(ood, variants)
    graphs = [fp32.classifier, fp32.detector, *(g for v in variants for g in v.graphs)]
    entries = [model_entry_of(out, graph) for graph in graphs]
    report = build_accuracy_report(evaluation, variants, fp32.parity, sources.trained_on)
    written = [g.path for g in graphs] + (list(write_accuracy_report(out, report)) if report else [])
    if data is not None:
        written.extend(write_parity_sets(out, data))
    remove_stale_files(out, written)
    manifest = _write_manifest(out, sources, fp32, entries, calibration, report, ood)
    # Re-exported graphs have new hashes; engines cached for the old ones would otherwise be loadable.
    clear_stale_caches(out, load_manifest(out, verify=False))
    return ExportResult(
        bundle=out,
        manifest=manifest,
        files=(*written, manifest),
        accuracy=report,
        seconds=round(time.perf_counter() - start, 1),
        timings=timings,
    )


def _per_graph_thresholds(ood: OodInfo, variants: Sequence[Variant]) -> OodInfo:
    """Each lower-precision classifier graph's own threshold, by FP32's rule on its own validation scores.

    The scores are those of the run that judged the graph (:attr:`ClassifierComparison.ood_scores`),
    so each graph is scored as export judged it: FP16 tensors through the exact FP16 emulation (the
    FP16 graph, the TensorRT INT8 graph's FP16 body), the ONNX Runtime INT8 graph as it is.
    """
    per_graph: dict[str, float] = {}
    for variant in variants:
        scores = None if variant.classifier is None else variant.classifier.ood_scores
        if scores is None:
            continue
        graph = next(g for g in variant.graphs if g.role == "classifier")
        chosen = choose_threshold(scores, np.empty(0), ood.percentile)
        per_graph[graph.path.name] = chosen.threshold
        log.info(
            "export: in-distribution threshold of %s: %.3f (FP32 graph %.3f; median score %.3f)",
            graph.path.name, chosen.threshold, ood.threshold, chosen.val_median,
        )  # fmt: skip
    return replace(ood, per_graph=per_graph)


def _fit_ood(ensemble: torch.nn.Module, train_data: Path, sources: ExportSources, data: EvalSet) -> OodInfo:
    """Fit the in-distribution score on the training split's images and threshold it on the evaluation split."""
    train = read_eval_set(train_data, "train", sources.spec.input_size, sources.detector_size, OOD_FIT_IMAGES)
    chosen = attach_ood(ensemble, train.classifier_canvases, data.classifier_canvases)
    log.info(
        "export: in-distribution score fitted on %d training images; threshold %.3f = %g-th percentile of %d "
        "validation images by a log-normal fit (sample percentile %.3f; median %.3f; training median %.3f)",
        len(train.image_ids), chosen.threshold, chosen.percentile, chosen.n_val, chosen.empirical, chosen.val_median,
        chosen.train_median,
    )  # fmt: skip
    return OodInfo(
        threshold=chosen.threshold,
        percentile=chosen.percentile,
        n_val=chosen.n_val,
        val_median=chosen.val_median,
        train_median=chosen.train_median,
    )


def _evaluate_reference(
    config: ExportConfig, sources: ExportSources, fp32: Fp32Graphs, data: EvalSet, ood_score: bool
) -> Evaluation:
    """Run the FP32 graphs on the evaluation set: the reference of every lower precision."""
    settings = EvalSettings(
        threshold=sources.spec.threshold,
        class_names=sources.detector_source.class_names,
        member_tensors=fp32.member_tensors,
        batch_size=config.batch_size,
        map_conf=config.map_conf,
        iou=sources.iou,
        agreement_conf=sources.conf,
        ood_score=ood_score,
    )
    return evaluate_fp32(fp32.classifier.path, fp32.detector.path, data, settings)


def _int8_variants(
    config: ExportConfig,
    sources: ExportSources,
    fp32: Fp32Graphs,
    evaluation: Evaluation,
    calib_data: Path,
    timings: dict[str, float],
) -> tuple[CalibrationSet, list[Variant]]:
    """Calibrate both FP32 graphs once, then build each INT8 target's graphs from the same ranges."""
    with tempfile.TemporaryDirectory(prefix="spine-edge-export-") as tmp:
        with _timed(timings, "calibration"):
            calibration = calibrate_graphs(
                fp32.classifier.path,
                sources.spec.input_size,
                fp32.detector.path,
                sources.detector_size,
                calib_data,
                config.calib_images,
                config.calib_method,
                Path(tmp),
                sources.detector_source.class_names,
            )
        built = []
        for variant in INT8_VARIANTS:
            with _timed(timings, f"{variant} graphs"):
                built.append(
                    build_int8_variant(
                        variant, fp32, calibration, Path(config.out), evaluation, config.sensitivity_images
                    )
                )
    return calibration, built


def build_accuracy_report(
    evaluation: Evaluation | None, variants: Sequence[Variant], parity: Parity, trained_on: str
) -> AccuracyReport | None:
    """The accuracy report, built once from the variants' measurements (None without an evaluation set).

    Its rows are the data the manifest's ``accuracy`` summarises (:meth:`AccuracyReport.summary`), so
    the two cannot disagree.
    """
    if evaluation is None:
        return None
    rows = [
        accuracy_row(v.variant, v.target, v.how, v.classifier, v.detector, v.coverage)
        for v in variants
        if v.classifier is not None and v.detector is not None
    ]
    sensitivity = {graph: record for v in variants for graph, record in v.sensitivity.items()}
    return assemble_report(evaluation, rows, parity.to_dict(), sensitivity, trained_on)


def remove_stale_files(out: Path, written: Sequence[Path]) -> list[Path]:
    """Delete export files of an earlier run in ``out`` that this run did not write (e.g. INT8 graphs
    when only FP32 was asked for, parity sets when there was no evaluation data), so the folder holds
    no graph the new manifest does not describe.
    Files with other names (engines, timing caches, the user's own) are left alone.

    Returns:
        The files deleted.
    """
    ours = {out / FILE_NAMES[variant].format(role=role) for role in ROLES for variant in FILE_NAMES}
    ours |= {out / REPORT_JSON, out / REPORT_MARKDOWN} | {parity_path(out, role) for role in MODEL_ROLES}
    removed = []
    for path in sorted(ours - {Path(p) for p in written}):
        if path.is_file():
            log.info("export: removing %s from an earlier export", path)
            path.unlink()
            removed.append(path)
    return removed


def write_parity_sets(out: Path, data: EvalSet, count: int = PARITY_CANVASES) -> list[Path]:
    """Store up to ``count`` letterboxed validation images per role for ``build-engines``' plan check.

    Abnormal and normal images alternate, so the detector's boxes are compared on images with lesions
    and the classifier's decisions on both classes; the same images serve both roles. The FP32
    reference is not stored: ``build-engines`` computes it from the bundle's current FP32 graph.

    Returns:
        The files written, classifier first.
    """
    abnormal, normal = np.flatnonzero(data.labels == 1), np.flatnonzero(data.labels != 1)
    order = [int(i) for pair in zip_longest(abnormal, normal) for i in pair if i is not None][:count]
    return [
        write_parity_set(out, "classifier", data.classifier_canvases[order]),
        write_parity_set(out, "detector", data.detector_canvases[order]),
    ]


def _write_manifest(
    out: Path,
    sources: ExportSources,
    fp32: Fp32Graphs,
    entries: Sequence[ModelEntry],
    calibration: CalibrationSet | None,
    report: AccuracyReport | None,
    ood: OodInfo | None,
) -> Path:
    """Assemble ``manifest.json`` once from the steps' results and write it, last."""
    cam = next(e for e in entries if e.file == fp32.classifier.path.name).output("cam")
    manifest = build_manifest(
        entries,
        sources.classifier_info((int(cam.shape[1]), int(cam.shape[2])), ood),
        sources.detector_info(),
        [fp32.classifier.path, fp32.detector.path],
        calibration.summary() if calibration else {},
        report.summary() if report else {"skipped": "no evaluation data (pass --eval-data)"},
        sources.provenance(),
        parity_set_files(out),
    )
    return write_manifest(out, manifest)
