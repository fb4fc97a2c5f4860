"""``spine-edge bench``: prove on this box that latency and accuracy hold against the FP32 reference."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from spine_edge.backends import BackendChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.bundle import Precision
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, EXIT_USAGE, fail
from spine_edge.config import field_default, literal_values
from spine_edge.errors import SpineEdgeError
from spine_edge.support import import_optional

#: Default work folder of ``bench --paper-size`` (random-weight checkpoints, graphs, model caches).
PAPER_SIZE_DIR = "runs/paper-size"
#: Import names of the ``bench`` extra's packages that accuracy needs.
_ACCURACY_MODULES = ("sklearn", "pycocotools")


def _cascade_default(name: str) -> Any:
    """The default of a CascadeConfig field (the runtime module: imported here, unlike benchmarks)."""
    return field_default(CascadeConfig, name)


def _bench_default(name: str, to_option: Callable[[Any], Any] | None = None) -> Callable[[], Any]:
    """The default of a BenchConfig field, read when click asks for it (options with ``cls=_LazyDefault``).

    ``spine_edge`` imports benchmarks only inside a command (docs/CONTRACTS.md), so BenchConfig is
    imported when the default is needed, not when this module loads.

    Args:
        name: A BenchConfig field.
        to_option: Turns the field's value into what the option parses (e.g. ``(1, 4, 8)`` into ``"1,4,8"``).
    """

    def read() -> Any:
        from spine_edge.benchmarks.config import BenchConfig

        value = field_default(BenchConfig, name)
        return value if to_option is None else to_option(value)

    return read


class _LazyDefault(click.Option):
    """An option whose default is a :func:`_bench_default`, resolved for ``--help`` too (else "(dynamic)")."""

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return super().get_default(ctx, call=True)


def _comma_separated(sizes: tuple[int, ...]) -> str:
    """``(1, 4, 8)`` as ``--batch-sizes`` takes it: ``"1,4,8"``."""
    return ",".join(map(str, sizes))


def _stage_budget_options(budgets: tuple[tuple[str, float], ...]) -> tuple[str, ...]:
    """``(("classifier", 200.0),)`` as ``--stage-budget`` takes it: ``("classifier=200",)``."""
    return tuple(f"{stage}={ms:g}" for stage, ms in budgets)


def _bench_paper_size(
    work: Path, quick: bool, threads: int | None, baseline: bool, json_path: Path | None, progress: bool
) -> None:
    """``bench --paper-size``: build random-weight paper-size graphs, bench them, print the table."""
    try:
        from spine_edge.benchmarks.paper_size import (
            PaperSizeConfig,
            format_paper_size,
            run_paper_size,
            write_paper_size_json,
        )

        settings: dict[str, Any] = {"threads": threads, "baseline": baseline, "progress": progress}
        config = PaperSizeConfig.quick_preset(work, **settings) if quick else PaperSizeConfig(work, **settings)
        report = run_paper_size(config)
        if json_path is not None:
            write_paper_size_json(report, json_path)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    except KeyboardInterrupt:
        click.echo("interrupted: no report written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(format_paper_size(report))
    if json_path is not None:
        click.echo(f"report: {json_path}", err=True)


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,4,8") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be at least 1")
    return tuple(dict.fromkeys(sizes))


def _stage_budgets(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    from spine_edge.benchmarks.config import BUDGET_STAGES

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
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=_cascade_default("bundle"),
    help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    cls=_LazyDefault,
    default=_bench_default("data"),
    help="VinDr-layout folder whose TEST split measures accuracy. Without it: latency only, on "
    "synthetic radiographs at real sizes.",
)
@click.option(
    "--precision",
    "precisions",
    type=click.Choice((*literal_values(Precision), "bf16")),
    multiple=True,
    cls=_LazyDefault,
    default=_bench_default("precisions"),
    help="Precision to benchmark (repeat for several) [default: all the bundle has, and bf16 with "
    "--backend openvino on a CPU with BF16 units]. With --data, fp32 always runs as the reference.",
)
@click.option(
    "--backend",
    type=click.Choice(literal_values(BackendChoice)),
    default=_cascade_default("backend"),
    show_default=True,
)
@click.option(
    "--provider",
    type=click.Choice(literal_values(ProviderChoice)),
    default=_cascade_default("provider"),
    help="ONNX Runtime execution provider [default: fastest available].",
)
@click.option(
    "--batch-sizes",
    cls=_LazyDefault,
    default=_bench_default("batch_sizes", _comma_separated),
    show_default=True,
    callback=_batch_sizes,
    help="Batch sizes for throughput and the models alone.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    cls=_LazyDefault,
    default=_bench_default("runs"),
    show_default=True,
    help="Timed images per measurement.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    cls=_LazyDefault,
    default=_bench_default("warmup"),
    show_default=True,
    help="Untimed images first.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    cls=_LazyDefault,
    default=_bench_default("max_images"),
    help="Evaluate at most N test images.",
)
@click.option(
    "--baseline/--no-baseline",
    cls=_LazyDefault,
    default=_bench_default("baseline"),
    show_default=True,
    help="Also time PyTorch eager on the --checkpoints given (needs torch; skipped with a note otherwise).",
)
@click.option(
    "--checkpoints",
    type=click.Path(file_okay=False, path_type=Path),
    cls=_LazyDefault,
    default=_bench_default("checkpoints"),
    help="Trusted checkpoint folder for the PyTorch baseline, which runs only when this is given: "
    "ultralytics unpickles detector.pt, so it is never taken from the bundle's manifest.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=_cascade_default("threads"),
    help="Intra-op threads [default: cores available].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the full report as JSON.",
)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write ROC, precision-recall and latency PNGs into this folder.",
)
@click.option(
    "--save-predictions",
    type=click.Path(file_okay=False, path_type=Path),
    cls=_LazyDefault,
    default=_bench_default("save_predictions"),
    help="Write ground truth and each precision's predictions as COCO JSON (needs --data).",
)
@click.option(
    "--budget-ms",
    type=click.FloatRange(min=0, min_open=True),
    cls=_LazyDefault,
    default=_bench_default("budget_ms"),
    help="Fail (exit 4) when a precision's end-to-end p95 latency exceeds this.",
)
@click.option(
    "--stage-budget",
    "stage_budgets",
    multiple=True,
    cls=_LazyDefault,
    default=_bench_default("stage_budgets", _stage_budget_options),
    callback=_stage_budgets,
    metavar="STAGE=MS",
    help="Fail when a stage's p95 exceeds MS (stages: read, preprocess, classifier, detector, "
    "postprocess, end_to_end); repeatable.",
)
@click.option(
    "--paper-size",
    "paper_size",
    type=click.Path(file_okay=False, path_type=Path),
    is_flag=False,
    flag_value=PAPER_SIZE_DIR,
    default=None,
    metavar="[WORK]",
    help="Instead of a bundle: export the paper-profile graphs with RANDOM weights into WORK "
    f"[{PAPER_SIZE_DIR}] and bench them (ONNX Runtime, OpenVINO, PyTorch eager): latency, not "
    "accuracy. Tens of minutes on 2 cores; needs the train extra.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="With --paper-size: 4 calibration images, 4 timed runs in 2 interleaved rounds, batch 1 only.",
)
def bench(
    bundle: Path | None,
    data: Path | None,
    precisions: tuple[str, ...],
    backend: BackendChoice,
    provider: ProviderChoice | None,
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
    paper_size: Path | None,
    quick: bool,
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
    if paper_size is not None:
        _bench_paper_size(paper_size, quick, threads, baseline, json_path, progress=not quiet)
        return
    try:
        if data is not None:
            for module in _ACCURACY_MODULES:
                import_optional(module, "bench", "Measuring AUROC and mAP (spine-edge bench --data)")
        if plots is not None:
            import_optional("matplotlib", "bench", "Writing benchmark plots (spine-edge bench --plots)")
        from spine_edge.benchmarks.config import BenchConfig
        from spine_edge.benchmarks.report import format_table, write_json, write_plots
        from spine_edge.benchmarks.run import run_bench

        config = BenchConfig(
            cascade=CascadeConfig(bundle=bundle, backend=backend, provider=provider, threads=threads),
            data=data,
            precisions=precisions,
            batch_sizes=batch_sizes,
            runs=runs,
            warmup=warmup,
            max_images=max_images,
            baseline=baseline,
            checkpoints=checkpoints,
            budget_ms=budget_ms,
            stage_budgets=stage_budgets,
            save_predictions=save_predictions,
            progress=not quiet,
        )
        if data is None:
            click.echo(
                "no --data given: benchmarking latency only, on synthetic radiographs at real VinDr-SpineXR "
                "sizes (pass --data ROOT to measure accuracy)",
                err=True,
            )
        report = run_bench(config)
        if json_path is not None:
            write_json(report, json_path)
        written = write_plots(report, plots) if plots is not None else []
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    except OSError as exc:  # an output folder that cannot be written: the measurements are lost, say where
        click.echo(
            f"error: cannot write {exc.filename or 'an output file'} ({exc.strerror or exc}); choose "
            "another --json/--plots/--save-predictions location",
            err=True,
        )
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
    for gate in report.inconclusive_gates:
        click.echo(f"warning: {gate.message()}", err=True)
    sys.exit(EXIT_OK if report.passed else EXIT_GATE_FAILED)
