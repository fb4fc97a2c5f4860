"""``spine-edge infer FOLDER``: run the cascade over a folder of radiographs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_OK, EXIT_SETUP, EXIT_SOME_INPUTS_FAILED, fail
from spine_edge.config import field_default, literal_values
from spine_edge.errors import SpineEdgeError
from spine_edge.infer import CSV_NAME, JSONL_NAME, InferConfig, run_folder

#: Conventional exit status of a program stopped by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


def _cascade_default(name: str) -> Any:
    return field_default(CascadeConfig, name)


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=field_default(InferConfig, "out"),
    help="Output folder [default: FOLDER_results next to FOLDER].",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=_cascade_default("bundle"),
    help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
)
@click.option(
    "--precision",
    type=click.Choice(literal_values(PrecisionChoice)),
    default=_cascade_default("precision"),
    show_default=True,
    help="auto: TensorRT's fastest built plan, or fp32 on ONNX Runtime.",
)
@click.option(
    "--backend",
    type=click.Choice(literal_values(BackendChoice)),
    default=_cascade_default("backend"),
    show_default=True,
    help="auto: TensorRT when the bundle has plans and tensorrt is installed.",
)
@click.option(
    "--provider",
    type=click.Choice(literal_values(ProviderChoice)),
    default=_cascade_default("provider"),
    help="ONNX Runtime execution provider [default: fastest available].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_cascade_default("batch_size"),
    show_default=True,
    help="Images per model call.",
)
@click.option(
    "--force-detector",
    is_flag=True,
    default=_cascade_default("force_detector"),
    help="Run the detector on every image, not only above the gate.",
)
@click.option(
    "--overlays/--no-overlays",
    default=field_default(InferConfig, "overlays"),
    show_default=True,
    help="Write overlay and heatmap PNGs.",
)
@click.option(
    "--resume",
    is_flag=True,
    default=field_default(InferConfig, "resume"),
    help="Skip inputs already ok in OUT/results.jsonl; retry failed ones.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=_cascade_default("read_workers"),
    show_default=True,
    help="Threads decoding images ahead of the model.",
)
def infer(
    folder: Path,
    out: Path | None,
    bundle: Path | None,
    precision: PrecisionChoice,
    backend: BackendChoice,
    provider: ProviderChoice | None,
    batch_size: int,
    force_detector: bool,
    overlays: bool,
    resume: bool,
    workers: int,
) -> None:
    """Triage every radiograph under FOLDER (recursive; DICOM, PNG, JPEG, TIFF) and localise lesions.

    Writes OUT/results.jsonl and OUT/results.csv (one record per input, failures included),
    OUT/overlays/ and OUT/heatmaps/ (PNGs for positive images). Exit status: 0 all inputs ok,
    1 some inputs failed (the rest are processed), 3 the bundle or backend cannot run here.
    """
    cascade = CascadeConfig(
        bundle=bundle,
        precision=precision,
        backend=backend,
        provider=provider,
        batch_size=batch_size,
        force_detector=force_detector,
        read_workers=workers,
    )
    config = InferConfig(folder=folder, out=out, resume=resume, overlays=overlays, cascade=cascade)
    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    try:
        report = run_folder(config, progress=not quiet)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    except KeyboardInterrupt:
        click.echo("interrupted: finished records are kept; rerun with --resume to continue", err=True)
        sys.exit(EXIT_INTERRUPTED)
    skipped = f", {report.skipped} skipped (done before)" if report.skipped else ""
    click.echo(
        f"{report.ok} ok ({report.positive} positive), {report.failed} failed{skipped}; "
        f"{report.images_per_second:.1f} images/s on {report.backend} {report.precision}; "
        f"results in {report.out / JSONL_NAME} and {CSV_NAME}"
    )
    sys.exit(EXIT_SOME_INPUTS_FAILED if report.failed else EXIT_OK)
