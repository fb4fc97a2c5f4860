"""A :class:`~benchmarks.results.BenchReport` as JSON, as Markdown tables, and as PNG plots.

The first table reads like ``yolo benchmark``'s: one row per precision with its input size,
accuracy, latency, throughput, deltas against FP32 and gate status; the PyTorch eager peer gets its
own row. Further tables give the per-stage latencies, the classifier's operating point and the mAPs,
AP@0.5 per class, and the models alone (GFLOP/s, memory, speed-up over PyTorch). Every file is
written atomically.

matplotlib (extra ``bench``) is used through its object API (``Figure``), never ``pyplot``, so
plotting neither needs a display nor touches global state.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spine_edge.benchmarks.latency import END_TO_END, STAGES
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.support import import_optional, json_safe

if TYPE_CHECKING:
    from spine_edge.benchmarks.results import BenchReport, PrecisionBench

DASH = "–"


def write_json(report: BenchReport, path: str | Path) -> Path:
    """Write the whole report as JSON (atomically); returns the path."""
    return write_text_atomic(path, json.dumps(json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n")


def _num(value: float | None, digits: int = 4) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _delta(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:+.2f}"


def _ms(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _gate_status(report: BenchReport, label: str) -> str:
    gates = [g for g in report.gates if g.precision == label]
    if not gates:
        return "reference" if label == "fp32" and report.labels is not None else DASH
    failed = [g for g in gates if g.passed is False]
    if failed:
        return "FAIL (" + "; ".join(g.name.removeprefix(f"{label} ") for g in failed) + ")"
    if any(g.verdict == "inconclusive" for g in gates):
        return (
            "inconclusive ("
            + "; ".join(g.name.removeprefix(f"{label} ") for g in gates if g.verdict == "inconclusive")
            + ")"
        )
    return "pass" if any(g.passed for g in gates) else "not measured"


def _summary_row(report: BenchReport, bench: PrecisionBench) -> list[str]:
    acc = bench.accuracy
    ref = bench.label == "fp32"
    best = bench.best_throughput()
    e2e = bench.latency.end_to_end if bench.latency else None
    return [
        bench.label,
        bench.backend,
        f"{report.input_sizes['classifier']}/{report.input_sizes['detector']}",
        _num(acc.classification.auroc) if acc else DASH,
        _num(acc.detector.map50) if acc else DASH,
        _num(acc.cascade.map50) if acc else DASH,
        _ms(e2e.p50) if e2e else DASH,
        _ms(e2e.p95) if e2e else DASH,
        f"{best.images_per_second:.2f} (b{best.batch_size})" if best else DASH,
        ("ref" if ref else _delta(acc.delta_auroc_pt)) if acc else DASH,
        ("ref" if ref else _delta(acc.delta_map50_pt)) if acc else DASH,
        ("ref" if ref else str(acc.flips)) if acc else DASH,
        _gate_status(report, bench.label),
    ]


def _accuracy_tables(report: BenchReport) -> list[str]:
    """Classifier operating point and mAP per precision, then AP@0.5 per class (detector alone)."""
    scored = [b for b in report.precisions if b.accuracy is not None]
    if not scored:
        return []
    rows = []
    for bench in scored:
        acc = bench.accuracy
        assert acc is not None
        cls = acc.classification
        rows.append(
            [
                bench.label,
                _num(cls.auroc),
                _num(cls.sensitivity),
                _num(cls.specificity),
                _num(cls.f1),
                str(acc.positives),
                _num(acc.detector.map50),
                _num(acc.detector.map50_95),
                _num(acc.cascade.map50),
                _num(acc.cascade.map50_95),
                _delta(acc.delta_cascade_map50_pt),
                str(acc.flips),
            ]
        )
    header = [
        "Precision",
        "AUROC",
        "Sens@τ",
        "Spec@τ",
        "F1@τ",
        "Positives",
        "mAP@0.5 det",
        "mAP@.5:.95 det",
        "mAP@0.5 cascade",
        "mAP@.5:.95 cascade",
        "Δ cascade mAP@0.5 pt",
        "Flips",
    ]
    n_images = report.data.get("evaluated", len(report.labels) if report.labels is not None else 0)
    parts = [
        f"Accuracy on {n_images} test images (τ = {report.threshold:g}; boxes at the bundle's confidence "
        "threshold; the cascade keeps boxes only above τ):",
        "",
        _table(header, rows),
        "",
    ]
    names = list(scored[0].accuracy.detector.per_class)  # type: ignore[union-attr]
    class_rows = []
    for name in names:
        first = scored[0].accuracy.detector.per_class[name]  # type: ignore[union-attr]
        cells = [_num(b.accuracy.detector.per_class[name].ap50) for b in scored]  # type: ignore[union-attr]
        class_rows.append([name, str(first.n_ground_truth), *cells])
    parts += [
        "AP@0.5 per class, detector alone:",
        "",
        _table(["Class", "GT boxes", *(b.label for b in scored)], class_rows),
        "",
    ]
    return parts


def _decode_parity_table(report: BenchReport) -> list[str]:
    """Reduced-resolution against full decode (``data`` only; see :mod:`benchmarks.decode_parity`)."""
    parity = report.data.get("decode_parity")
    if not parity:
        return []
    targets = parity["targets"]
    row = [
        f"{parity['reduced_images']} / {parity['images']}",
        str(parity["long_side"]),
        f"{parity['read_ms_full']:.0f} → {parity['read_ms_reduced']:.0f} ({parity['read_speedup']:.1f}x)",
        f"{parity['images_per_second_full']:.1f} → {parity['images_per_second_reduced']:.1f}",
        _num(parity["max_abs_dprob"]),
        str(parity["gate_flips"]),
        _num(parity["box_ap"]),
        "pass" if parity["meets_targets"] else "MISSED",
    ]
    shift = parity.get("shift_baseline")
    row.append(
        "–"
        if not shift
        else f"AP {_num(shift['box_ap'])}, {shift['gate_flips']} flip(s), max |Δprob| {_num(shift['max_abs_dprob'])}"
        + (" (reduced within)" if parity.get("within_shift_floor") else " (reduced beyond)")
    )
    header = ["Reduced / images", "Long side px", "Read ms p50", "images/s", "max |Δprob|", "Gate flips",
              "Box AP vs full", f"Targets (≤ {targets['max_flips']} flips, AP ≥ {targets['min_box_ap']})",
              "Full decode shifted 1 px (models' sensitivity)"]  # fmt: skip
    return [
        "Decode at the models' resolution against the full decode (reference precision, detector forced):",
        "",
        _table(header, [row]),
        "",
    ]


def format_table(report: BenchReport) -> str:
    """Markdown: the summary table, per-stage latency, models alone, gates and notes.

    Example:
        >>> print(format_table(run_bench(config)))  # doctest: +SKIP
        | Precision | Backend | Input (cls/det) | AUROC | ...
    """
    env = report.environment
    parts = [
        f"spine-edge bench: bundle {report.bundle_id} ({report.bundle}), {report.data.get('source')} data, "
        f"{env.get('cpu')}"
        + (f", {env['gpu']}" if env.get("gpu") else "")
        + f", {env.get('threads')} threads, τ = {report.threshold:g}",
        "",
    ]
    header = [
        "Precision",
        "Backend",
        "Input (cls/det)",
        "AUROC",
        "mAP@0.5 det",
        "mAP@0.5 cascade",
        "ms/img p50",
        "ms/img p95",
        "images/s",
        "ΔAUROC pt",
        "ΔmAP@0.5 pt",
        "Flips",
        "Gate",
    ]
    rows = [_summary_row(report, bench) for bench in report.precisions]
    if report.baseline is not None:
        b = report.baseline
        rows.append(
            [
                "PyTorch eager",
                f"torch {b.versions.get('torch', '')} CPU",
                f"{report.input_sizes['classifier']}/{report.input_sizes['detector']}",
                DASH,
                DASH,
                DASH,
                _ms(b.classifier.p50 + b.detector_predict.p50) + " (classifier + predict)",
                *[DASH] * 6,
            ]
        )
    parts += [_table(header, rows), ""]

    stage_rows = []
    for bench in report.precisions:
        if bench.latency is None:
            continue
        cells = []
        for stage in (*STAGES, END_TO_END):
            stats = bench.latency.end_to_end if stage == END_TO_END else bench.latency.stages.get(stage)
            cells.append(f"{_ms(stats.p50)} / {_ms(stats.p95)}" if stats else DASH)
        stage_rows.append([bench.label, *cells])
    if stage_rows:
        parts += [
            "Latency per stage at batch 1, ms p50 / p95 (detector and postprocess over the images the gate passed):",
            "",
            _table(["Precision", *STAGES, "end to end"], stage_rows),
            "",
        ]

    parts += _accuracy_tables(report)
    parts += _decode_parity_table(report)

    model_rows = []
    for bench in report.precisions:
        cls, det = bench.model("classifier"), bench.model("detector")
        if cls is None and det is None:
            continue
        row = [bench.label]
        for timing in (cls, det):
            one = timing.at(1) if timing else None
            row += [_ms(one.per_image.p50) if one else DASH, _num(timing.achieved_gflops(1), 2) if timing else DASH]
        row.append(_ms(bench.resources.peak_rss_mb) if bench.resources else DASH)
        speedups = bench.speedup_vs_torch
        row += [f"{speedups[k]:.2f}x" if k in speedups else DASH for k in ("classifier", "detector")]
        model_rows.append(row)
    if model_rows:
        parts += [
            "Models alone at batch 1 (preprocessed input): ms per image, achieved GFLOP/s, peak RSS MiB, "
            "speed-up over PyTorch eager:",
            "",
            _table(
                [
                    "Precision",
                    "Classifier ms",
                    "Classifier GFLOP/s",
                    "Detector ms",
                    "Detector GFLOP/s",
                    "Peak RSS MiB",
                    "vs PyTorch classifier",
                    "vs PyTorch detector",
                ],
                model_rows,
            ),
            "",
        ]

    if report.gates:
        parts += ["Gates:"] + [f"- {g.message()}" for g in report.gates] + [""]
    if report.notes:
        parts += ["Notes:"] + [f"- {note}" for note in report.notes] + [""]
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failed_gates)} gate(s))"
    parts.append(f"Result: {verdict} in {report.seconds:.0f} s")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float) -> Any:
    figure_cls = import_optional("matplotlib.figure", "bench", "Writing benchmark plots").Figure
    return figure_cls(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())


def plot_roc(report: BenchReport, path: Path) -> Path | None:
    """ROC curve of every precision on the evaluated images (None without labels)."""
    benches = [b for b in report.precisions if b.probs is not None]
    if report.labels is None or not benches or len(np.unique(report.labels)) < 2:
        return None
    roc_curve = import_optional("sklearn.metrics", "bench", "Plotting ROC curves").roc_curve
    figure = _figure(5.5, 5)
    ax = figure.add_subplot()
    for bench in benches:
        fpr, tpr, _ = roc_curve(report.labels, bench.probs)
        auroc = bench.accuracy.classification.auroc if bench.accuracy else math.nan
        ax.plot(fpr, tpr, label=f"{bench.label} (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set(
        xlabel="False-positive rate (1 - specificity)",
        ylabel="True-positive rate (sensitivity)",
        title=f"Classifier ROC, {len(report.labels)} images",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    return _save(figure, path)


def plot_precision_recall(bench: PrecisionBench, path: Path) -> Path | None:
    """Per-class precision–recall curves of a precision's detector (IoU 0.5); None without curves."""
    if not bench.curves:
        return None
    figure = _figure(6.5, 5)
    ax = figure.add_subplot()
    for name, curve in bench.curves.items():
        ax.plot(curve.recall, curve.precision, label=f"{name} (AP50 {curve.ap50:.3f})")
    ax.set(
        xlabel="Recall",
        ylabel="Precision",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"Detector precision-recall at IoU 0.5, {bench.label}",
    )
    ax.legend(loc="upper right", fontsize="small")
    return _save(figure, path)


def plot_latency(report: BenchReport, path: Path) -> Path | None:
    """Box plots of the per-image latency of every stage, one panel per precision (None without samples)."""
    benches = [b for b in report.precisions if b.latency is not None]
    if not benches:
        return None
    figure = _figure(4 + 2.2 * len(benches), 4.5)
    axes = figure.subplots(1, len(benches), sharey=True, squeeze=False)[0]
    for ax, bench in zip(axes, benches, strict=True):
        samples = bench.latency.samples  # type: ignore[union-attr]
        stages = [stage for stage in (*STAGES, END_TO_END) if samples.get(stage)]
        ax.boxplot([samples[stage] for stage in stages])
        ax.set_xticks(range(1, len(stages) + 1), [s.replace("_", "-") for s in stages])
        ax.set_yscale("log")
        ax.set_title(f"{bench.label}: {bench.backend}", fontsize="small")
        ax.tick_params(axis="x", labelrotation=45)
    axes[0].set_ylabel("ms per image (log scale)")
    return _save(figure, path)


def write_plots(report: BenchReport, folder: str | Path) -> list[Path]:
    """Write ``roc.png``, ``pr_<precision>.png`` and ``latency.png`` into ``folder``; returns what was written.

    Raises:
        MissingDependencyError: matplotlib (or scikit-learn for the ROC) is not installed.
    """
    out = Path(folder)
    written = [plot_roc(report, out / "roc.png")]
    written += [plot_precision_recall(bench, out / f"pr_{bench.label}.png") for bench in report.precisions]
    written.append(plot_latency(report, out / "latency.png"))
    return [path for path in written if path is not None]
