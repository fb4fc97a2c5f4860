"""``spine-edge explain IMAGE...``: LIME or CAM explanations of the triage, and the pointing game."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.cli import EXIT_OK, EXIT_SOME_INPUTS_FAILED, fail
from spine_edge.config import literal_values
from spine_edge.errors import SpineEdgeError
from spine_edge.explain import METHODS, ExplainConfig, LimeConfig, Method, evaluate_pointing, run_explain
from spine_edge.imageio import scan_folder
from spine_edge.io_utils import write_bytes_atomic


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="lime",
    show_default=True,
    help="lime: superpixel perturbations through the classifier graph; cam: its class-activation map.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=10),
    default=LimeConfig.samples,
    show_default=True,
    help="LIME perturbations per image.",
)
@click.option(
    "--segments",
    type=click.IntRange(min=2),
    default=LimeConfig.segments,
    show_default=True,
    help="LIME superpixels (SLIC) per image.",
)
@click.option("--seed", type=int, default=LimeConfig.seed, show_default=True, help="LIME's random seed.")
@click.option(
    "--eval",
    "evaluate",
    is_flag=True,
    help="IMAGES is one VinDr-layout folder: pointing game of CAM and LIME on its abnormal test images.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="--eval: abnormal test images scored (the first by image id).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("explanations"),
    show_default=True,
    help="Output folder (PNG + JSON per image; pointing_game.json with --eval).",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
)
@click.option("--precision", type=click.Choice(literal_values(PrecisionChoice)), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(literal_values(BackendChoice)), default="auto", show_default=True)
@click.option(
    "--provider",
    type=click.Choice(literal_values(ProviderChoice)),
    default=None,
    help="ONNX Runtime execution provider [default: fastest available].",
)
def explain(
    images: tuple[Path, ...],
    method: Method,
    samples: int,
    segments: int,
    seed: int,
    evaluate: bool,
    max_images: int,
    out: Path,
    bundle: Path | None,
    precision: PrecisionChoice,
    backend: BackendChoice,
    provider: ProviderChoice | None,
) -> None:
    """Explain the triage of IMAGES (files or folders; DICOM, PNG, JPEG, TIFF).

    Writes OUT/<name>.<method>.png (LIME: top superpixels outlined; CAM: smooth heatmap with a colour
    bar) and OUT/<name>.<method>.json (every region's weight). LIME prints its time estimate first.
    Exit status: 0 all explained, 1 some inputs could not be read, 3 bundle or backend problem.
    """
    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    config = ExplainConfig(
        bundle=bundle, precision=precision, backend=backend, provider=provider, method=method,
        lime=LimeConfig(samples=samples, segments=segments, seed=seed), progress=not quiet,
    )  # fmt: skip
    try:
        if evaluate:
            if len(images) != 1:
                raise click.UsageError("--eval takes exactly one VinDr-layout folder")
            report = evaluate_pointing(images[0], config, max_images)
            path = write_bytes_atomic(
                out / "pointing_game.json", (json.dumps(report.to_dict(), indent=1) + "\n").encode()
            )
            for score in report.scores:
                click.echo(f"{score.method}: pointing game {score.hits}/{score.images} = {score.score:.3f} "
                           f"(random baseline {score.random_baseline:.3f})")  # fmt: skip
            click.echo(f"{report.sampled}; written to {path}")
            raise SystemExit(EXIT_OK)
        paths = [p for image in images for p in (scan_folder(image).images if image.is_dir() else (image,))]
        outcomes = run_explain(paths, out, config, announce=lambda line: click.echo(line, err=True))
    except SpineEdgeError as exc:
        fail(exc)
        return
    failed = 0
    for outcome in outcomes:
        if outcome.error is not None:
            failed += 1
            click.echo(f"error: {outcome.error}", err=True)
        elif outcome.hottest is not None:
            box = ", ".join(f"{v:.0f}" for v in outcome.hottest.box)
            click.echo(f"{outcome.source}: hottest region [{box}] -> {outcome.picture}")
    raise SystemExit(EXIT_SOME_INPUTS_FAILED if failed else EXIT_OK)
