"""``spine-edge export``: checkpoints → bundle (ONNX graphs per precision, accuracy report, manifest)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from spine_edge.bundle import CalibrationMethod, Precision, default_bundle_path
from spine_edge.cli import EXIT_GATE_FAILED, EXIT_SETUP, fail
from spine_edge.config import literal_values
from spine_edge.errors import MissingDependencyError, SpineEdgeError
from spine_edge.support import import_optional

#: ``ExportConfig.precisions`` / ``calib_method`` choices. click needs them when the command is declared,
#: when the export package may not be imported, so they come from the runtime's ``Literal`` types, which
#: the export package's own names are checked against (tests/export/test_pipeline.py).
PRECISION_CHOICES = literal_values(Precision)
CALIBRATION_CHOICES = literal_values(CalibrationMethod)


class ConfigDefault:
    """An option default read from ``ExportConfig``'s field when click needs it, not when this module loads.

    ``spine_edge.cli`` imports on a runtime-only box without importing ``spine_edge.export``
    (tests/spine_edge/test_torch_free.py), so the dataclass is read lazily: click calls the object
    for the value and shows ``str()`` of it in ``--help``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> Any:
        from spine_edge.export.config import ExportConfig, field_default

        return field_default(ExportConfig, self.name)

    def __str__(self) -> str:
        value = self()
        return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _points(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.2f}"


@click.command("export")
@click.argument("checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    "bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Bundle folder to write (default: $SPINE_EDGE_BUNDLE or runs/bundle).",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(PRECISION_CHOICES),
    default=ConfigDefault("precisions"),
    show_default=True,
    help="Precision to export (repeatable; fp32 is always written).",
)
@click.option(
    "--calib-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=ConfigDefault("calib_data"),
    help="Prepared cache whose train PNGs calibrate INT8 (default: --eval-data).",
)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=ConfigDefault("calib_images"),
    show_default=True,
    help="Number of calibration images.",
)
@click.option(
    "--calib-method",
    type=click.Choice(CALIBRATION_CHOICES),
    default=ConfigDefault("calib_method"),
    show_default=True,
    help="Activation-range calibration.",
)
@click.option(
    "--eval-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=ConfigDefault("eval_data"),
    help="Prepared cache whose val split the accuracy report uses (default: the one recorded in the checkpoints).",
)
@click.option(
    "--eval-limit",
    type=click.IntRange(min=1),
    default=ConfigDefault("eval_limit"),
    help="Evaluate at most this many images [default: all].",
)
def export(
    checkpoints: Path,
    bundle: Path | None,
    precisions: tuple[str, ...],
    calib_data: Path | None,
    calib_images: int,
    calib_method: str,
    eval_data: Path | None,
    eval_limit: int | None,
) -> None:
    """Export CHECKPOINTS (from `spine-edge train`) into a bundle for `build-engines` and `infer`.

    Writes FP32, FP16 and INT8 (TensorRT and ONNX Runtime variants) ONNX graphs, an accuracy report
    against FP32 and manifest.json. Exits with 4 when a precision's verdict is `fail` (the bundle is
    still written), 0 with a warning when it is `inconclusive` (too few evaluation images to tell).
    """
    out = bundle if bundle is not None else default_bundle_path()
    try:
        from spine_edge.export.config import ExportConfig

        pipeline = import_optional("spine_edge.export.pipeline", "train", "spine-edge export")
        config = ExportConfig(
            checkpoints=checkpoints,
            out=out,
            precisions=tuple(dict.fromkeys(("fp32", *precisions))),
            calib_data=calib_data,
            eval_data=eval_data,
            calib_images=calib_images,
            calib_method=calib_method,  # type: ignore[arg-type]  # click.Choice restricts it
            eval_limit=eval_limit,
        )
        report = pipeline.run_export(config)
    except ImportError as exc:
        fail(MissingDependencyError(exc.name or "torch", "train", "spine-edge export"), EXIT_SETUP)
        return
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
        return
    for path in report.files:
        click.echo(f"wrote {path}")
    accuracy = report.accuracy
    if accuracy is None:
        click.echo("no accuracy report: pass --eval-data PREPARED to measure the precisions against FP32")
    else:
        click.echo(
            f"FP32: AUROC {accuracy.classifier_fp32.auroc:.4f}, mAP@0.5 {accuracy.detector_fp32.map50:.4f} "
            f"on {accuracy.eval_data['images']} images"
        )
        for row in accuracy.variants:
            click.echo(
                f"{row.variant:<9} ΔAUROC {_points(row.delta_auroc_pt):>7} pt  flips {row.flips:>3}  "
                f"ΔmAP@0.5 {_points(row.delta_map50_pt):>7} pt  {row.verdict}"
            )
    click.echo(f"bundle {out} written in {report.seconds:.0f} s")
    if report.gates_hold is False:
        click.echo("error: a precision misses its accuracy gate; see accuracy_report.md", err=True)
        raise SystemExit(EXIT_GATE_FAILED)
    if accuracy is not None and accuracy.verdict == "inconclusive":
        click.echo(
            "warning: a precision's accuracy is inconclusive (too few evaluation images to tell, or a metric "
            "not measurable); see accuracy_report.md",
            err=True,
        )
