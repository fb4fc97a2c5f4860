"""``spine-edge infer FOLDER``: run the cascade over a folder of radiographs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import (
    EXIT_DISK_FULL,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_SOME_INPUTS_FAILED,
    EXIT_SOME_REFUSED,
    EXIT_USAGE,
    exit_for_interrupt,
    fail,
)
from spine_edge.config import field_default, literal_values
from spine_edge.errors import SpineEdgeError
from spine_edge.guard import OodPolicy
from spine_edge.infer import (
    CSV_NAME,
    JSONL_NAME,
    InferConfig,
    InferReport,
    PictureFormat,
    ResumeMismatchError,
    run_folder,
)
from spine_edge.results import DiskFullError


def _cascade_default(name: str) -> Any:
    return field_default(CascadeConfig, name)


@click.command()
@click.argument("folder", type=click.Path(exists=True, path_type=Path))
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
    help="Write overlay and heatmap pictures.",
)
@click.option(
    "--picture-format",
    type=click.Choice(literal_values(PictureFormat)),
    default=field_default(InferConfig, "picture_format"),
    show_default=True,
    help="Overlay and heatmap pictures as lossless PNG, or JPEG (quality 95, 4:4:4; about 10x faster to encode, "
    "for boxes with few cores).",
)
@click.option(
    "--resume",
    is_flag=True,
    default=field_default(InferConfig, "resume"),
    help="Skip inputs already ok in OUT/results.jsonl; retry failed ones. Refused when those records "
    "were made by another bundle or precision.",
)
@click.option(
    "--resume-any",
    is_flag=True,
    default=field_default(InferConfig, "resume_any"),
    help="--resume, keeping ok records even when another bundle or precision made them (mixed results).",
)
@click.option(
    "--dicom-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=field_default(InferConfig, "dicom_out"),
    help="Also write each DICOM input's results as DICOM here: a TID 1500 SR and Secondary Captures "
    "(needs spine-edge[dicom]).",
)
@click.option(
    "--full-resolution",
    is_flag=True,
    default=_cascade_default("full_resolution"),
    help="Decode JPEG 2000 at full size, not at the smallest resolution level that covers the models' input "
    "(slower; overlay and heatmap PNGs then have the original size). Results are in original pixels either way.",
)
@click.option(
    "--device",
    type=click.IntRange(min=0),
    default=_cascade_default("device"),
    show_default=True,
    help="CUDA device index for TensorRT and ONNX Runtime's GPU providers.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=_cascade_default("read_workers"),
    show_default=True,
    help="Threads decoding images ahead of the model.",
)
@click.option(
    "--guard/--no-guard",
    default=_cascade_default("guard"),
    show_default=True,
    help="Refuse inputs that are no spine radiograph (another DICOM modality, colour photographs, documents, "
    "blank or noise images, implausible sizes); --no-guard judges every readable input.",
)
@click.option(
    "--ood",
    type=click.Choice(literal_values(OodPolicy)),
    default=_cascade_default("ood"),
    show_default=True,
    help="An image unlike the training radiographs (in-distribution score above the bundle's threshold): "
    "refuse it, or judge it with a warning flag in its record.",
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
    picture_format: PictureFormat,
    resume: bool,
    resume_any: bool,
    dicom_out: Path | None,
    full_resolution: bool,
    device: int,
    workers: int,
    guard: bool,
    ood: OodPolicy,
) -> None:
    """Triage every radiograph under FOLDER (recursive; DICOM, PNG, JPEG, TIFF; or one file) and localise lesions.

    Writes OUT/results.jsonl and OUT/results.csv (one record per input, failures included),
    OUT/overlays/ and OUT/heatmaps/ (PNG or JPEG pictures of positive images). One run per OUT at a time.
    Inputs the bundle must not judge (another modality, a colour photograph, a document, an image
    unlike the training radiographs) get a ``refused`` record with the reason.
    Exit status: 0 all inputs ok, 1 some inputs failed or a sub-folder could not be read (the rest
    are processed), 2 --resume over another bundle's or precision's records, 3 the bundle, backend
    or output folder cannot be used (another run holds it, read-only), 5 the output disk is full
    (finished records kept), 6 none failed but some were refused, 130 Ctrl-C, 143 SIGTERM.
    """
    cascade = CascadeConfig(
        bundle=bundle,
        precision=precision,
        backend=backend,
        provider=provider,
        batch_size=batch_size,
        force_detector=force_detector,
        full_resolution=full_resolution,
        device=device,
        read_workers=workers,
        guard=guard,
        ood=ood,
    )
    config = InferConfig(
        folder=folder,
        out=out,
        resume=resume or resume_any,
        resume_any=resume_any,
        overlays=overlays,
        picture_format=picture_format,
        dicom_out=dicom_out,
        cascade=cascade,
    )
    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    try:
        report = run_folder(config, progress=not quiet)
    except DiskFullError as exc:
        fail(exc, EXIT_DISK_FULL)
        return
    except ResumeMismatchError as exc:
        fail(exc, EXIT_USAGE)
        return
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the group raises Terminated for it)
        click.echo("interrupted: finished records are kept; rerun with --resume to continue", err=True)
        sys.exit(exit_for_interrupt(exc))
    click.echo(_summary(report))
    if report.failed or report.unreadable_dirs:
        sys.exit(EXIT_SOME_INPUTS_FAILED)
    sys.exit(EXIT_SOME_REFUSED if report.refused else EXIT_OK)


def _summary(report: InferReport) -> str:
    """One line: what happened to every input found, and where the results are."""
    parts = [f"{report.found} found: {report.ok} ok ({report.positive} positive)", f"{report.failed} failed"]
    if report.refused:
        parts.append(f"{report.refused} refused")
    if report.skipped:
        parts.append(f"{report.skipped} skipped (done before)")
    line = ", ".join(parts)
    if not report.adds_up:
        line += " (the counts do not add up to the inputs found: please report this with results.jsonl)"
    if report.unreadable_dirs:
        line += f"; {len(report.unreadable_dirs)} sub-folder(s) could not be read (see the warnings)"
    if report.dicom_failed:
        line += f"; DICOM results of {report.dicom_failed} input(s) could not be written (see the warnings)"
    return (
        f"{line}; {report.images_per_second:.1f} images/s on {report.backend} {report.precision}; "
        f"results in {report.out / JSONL_NAME} and {CSV_NAME}"
    )
