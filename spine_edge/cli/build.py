"""``spine-edge build-engines``: build TensorRT plans or ONNX Runtime CPU models on the target box."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spine_edge.bundle import PRECISIONS, Precision, default_bundle_path
from spine_edge.cli import EXIT_SETUP, fail
from spine_edge.errors import SpineEdgeError


@click.command("build-engines")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option(
    "--target",
    type=click.Choice(["auto", "tensorrt", "onnxruntime-cpu"]),
    default="auto",
    show_default=True,
    help="auto: TensorRT when it and a CUDA GPU are present, else ONNX Runtime on the CPU.",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(PRECISIONS),
    help="Build only this precision (repeatable). Default: every precision the bundle provides.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Largest batch the engines accept (default: 8 classifier, 4 detector).",
)
@click.option(
    "--workspace-mb",
    type=click.IntRange(min=16),
    default=1024,
    show_default=True,
    help="TensorRT builder workspace limit in MiB (1024 fits a 4 GB card).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="ONNX Runtime intra-op threads; 0 uses every available core.",
)
@click.option(
    "--device",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="CUDA device to build the TensorRT plans on (they run on that GPU model).",
)
@click.option(
    "--parity/--no-parity",
    default=True,
    show_default=True,
    help="Run each new TensorRT plan on the bundle's parity images and refuse it unless it reproduces "
    "ONNX Runtime FP32; --no-parity only for quick rebuilds by hand.",
)
def build_engines(
    bundle: Path | None,
    target: str,
    precisions: tuple[Precision, ...],
    max_batch: int | None,
    workspace_mb: int,
    threads: int,
    device: int,
    parity: bool,
) -> None:
    """Build this box's engines from BUNDLE's ONNX graphs and record them in its manifest.

    BUNDLE defaults to $SPINE_EDGE_BUNDLE or runs/bundle.
    """
    from spine_edge.export.engines import BuildConfig
    from spine_edge.export.engines import build_engines as run_build

    defaults = BuildConfig()
    config = BuildConfig(
        target=target,  # type: ignore[arg-type]  # click.Choice restricts it to the Target literals
        precisions=precisions,
        classifier_batch=defaults.classifier_batch.capped(max_batch) if max_batch else defaults.classifier_batch,
        detector_batch=defaults.detector_batch.capped(max_batch) if max_batch else defaults.detector_batch,
        workspace_mib=workspace_mb,
        threads=threads,
        device=device,
        parity=parity,
    )
    folder = bundle if bundle is not None else default_bundle_path()
    try:
        report = run_build(folder, config)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    click.echo(report.reason)
    click.echo(f"{'file':<48} {'precision':<9} {'size':>10} {'seconds':>8}")
    for model in report.built:
        size = (
            f"{model.size_bytes / 2**20:.1f} MiB"
            if model.size_bytes >= 2**20
            else f"{model.size_bytes / 2**10:.1f} KiB"
        )
        click.echo(f"{model.file:<48} {model.precision:<9} {size:>10} {model.seconds:>8.2f}")
        if model.parity:
            click.echo(f"  {model.parity}")
    for skipped in report.skipped:
        click.echo(f"skipped {skipped.role} {skipped.precision}: {skipped.reason}")
    if report.timing_cache:
        click.echo(f"timing cache: {report.timing_cache}")
    if report.built:
        click.echo(f"manifest updated: {folder / 'manifest.json'}")
    for failed in report.failed:
        click.echo(f"error: {failed.role} {failed.precision}: {failed.message}", err=True)
    if report.failed:
        sys.exit(EXIT_SETUP)
