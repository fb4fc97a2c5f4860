"""``spine-edge bench``: prove on this box that latency and accuracy hold against the FP32 reference."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from spine_edge.bundle import default_bundle_path
from spine_edge.cli import EXIT_GATE_FAILED, EXIT_OK, EXIT_SETUP, EXIT_USAGE, fail
from spine_edge.cli.infer import EXIT_INTERRUPTED
from spine_edge.errors import MissingDependencyError, SpineEdgeError

#: Import name → pip package, for the ``bench`` extra's packages that accuracy needs.
_ACCURACY_PACKAGES = {"sklearn": "scikit-learn", "pycocotools": "pycocotools"}


def _require(packages: dict[str, str], purpose: str) -> None:
    """Import each package or raise MissingDependencyError naming the ``bench`` extra."""
    for module, package in packages.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingDependencyError(package, "bench", purpose) from exc


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,4,8") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be at least 1")
    return tuple(dict.fromkeys(sizes))


def _stage_budgets(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    from spine_edge.benchmarks.run import BUDGET_STAGES

    budgets = []
    for item in value:
        stage, _, ms = item.partition("=")
        try:
            budget = float(ms)
        except ValueError:
            raise click.BadParameter(f"{item!r}: write STAGE=MS, e.g. classifier=200") from None
        if stage not in BUDGET_STAGES:
            raise click.BadParameter(f"{item!r}: the stage must be one of {', '.join(BUDGET_STAGES)}")
        budgets.append((stage, budget))
    return tuple(budgets)


@click.command()
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="VinDr-layout folder whose TEST split measures accuracy. Without it: latency only, on "
                   "synthetic radiographs at real sizes.")
@click.option("--precision", "precisions", type=click.Choice(["fp32", "fp16", "int8"]), multiple=True,
              help="Precision to benchmark (repeat for several) [default: all the bundle has]. With --data, "
                   "fp32 always runs as the reference.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="ONNX Runtime execution provider [default: fastest available].")
@click.option("--batch-sizes", default="1,4,8", show_default=True, callback=_batch_sizes,
              help="Batch sizes for throughput and the models alone.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed images per measurement.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed images first.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Evaluate at most N test images.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also time PyTorch eager on the same checkpoints (needs torch; skipped with a note otherwise).")
@click.option("--checkpoints", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint folder of the baseline [default: the one the manifest records].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads [default: cores available].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report as JSON.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write ROC, precision-recall and latency PNGs into this folder.")
@click.option("--save-predictions", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write ground truth and each precision's predictions as COCO JSON (needs --data).")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail (exit 4) when a precision's end-to-end p95 latency exceeds this.")
@click.option("--stage-budget", "stage_budgets", multiple=True, callback=_stage_budgets, metavar="STAGE=MS",
              help="Fail when a stage's p95 exceeds MS (stages: read, preprocess, classifier, detector, "
                   "postprocess, end_to_end); repeatable.")
def bench(
    bundle: Path | None,
    data: Path | None,
    precisions: tuple[str, ...],
    backend: str,
    provider: str | None,
    batch_sizes: tuple[int, ...],
    runs: int,
    warmup: int,
    max_images: int | None,
    baseline: bool,
    checkpoints: Path | None,
    threads: int | None,
    json_path: Path | None,
    plots: Path | None,
    save_predictions: Path | None,
    budget_ms: float | None,
    stage_budgets: tuple[tuple[str, float], ...],
) -> None:
    """Benchmark a bundle on this box: latency per stage, throughput, memory, and (with --data) AUROC and
    mAP of every precision against FP32, with a PyTorch eager baseline where torch is installed.

    Prints a Markdown table. Exit status: 0 every gate held; 4 an accuracy gate (DESIGN.md: FP16
    |ΔAUROC| ≤ 0.3 pt, |ΔmAP@0.5| ≤ 0.5 pt; INT8 ≤ 1.0 / 1.5 pt) or a latency budget failed; 3 the
    bundle, data or backend cannot run here.
    """
    if save_predictions is not None and data is None:
        click.echo("error: --save-predictions needs --data ROOT (a labelled test split)", err=True)
        sys.exit(EXIT_USAGE)
    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    try:
        if data is not None:
            _require(_ACCURACY_PACKAGES, "Measuring AUROC and mAP (spine-edge bench --data)")
        if plots is not None:
            _require({"matplotlib": "matplotlib"}, "Writing benchmark plots (spine-edge bench --plots)")
        from spine_edge.benchmarks.report import format_table, write_json, write_plots
        from spine_edge.benchmarks.run import BenchConfig, run_bench

        config = BenchConfig(
            bundle=bundle if bundle is not None else default_bundle_path(),
            data=data,
            precisions=precisions,
            backend=backend,  # type: ignore[arg-type]
            provider=provider,  # type: ignore[arg-type]
            batch_sizes=batch_sizes,
            runs=runs,
            warmup=warmup,
            max_images=max_images,
            baseline=baseline,
            checkpoints=checkpoints,
            threads=threads,
            budget_ms=budget_ms,
            stage_budgets=stage_budgets,
            save_predictions=save_predictions,
            progress=not quiet,
        )
        if data is None:
            click.echo("no --data given: benchmarking latency only, on synthetic radiographs at real VinDr-SpineXR "
                       "sizes (pass --data ROOT to measure accuracy)", err=True)
        report = run_bench(config)
        if json_path is not None:
            write_json(report, json_path)
        written = write_plots(report, plots) if plots is not None else []
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    except OSError as exc:  # an output folder that cannot be written: the measurements are lost, say where
        click.echo(f"error: cannot write {exc.filename or 'an output file'} ({exc.strerror or exc}); choose "
                   "another --json/--plots/--save-predictions location", err=True)
        sys.exit(EXIT_SETUP)
    except KeyboardInterrupt:
        click.echo("interrupted: no report written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(format_table(report))
    if json_path is not None:
        click.echo(f"report: {json_path}", err=True)
    if written:
        click.echo(f"plots: {', '.join(str(p) for p in written)}", err=True)
    if save_predictions is not None:
        click.echo(f"predictions (COCO JSON): {save_predictions}", err=True)
    for gate in report.failed_gates:
        click.echo(f"gate failed: {gate.message()}", err=True)
    sys.exit(EXIT_OK if report.passed else EXIT_GATE_FAILED)
