"""``spine-edge data``: make a synthetic dataset, check a VinDr-SpineXR folder, build the training cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from spine_edge import vindr
from spine_edge.cli import EXIT_SETUP, EXIT_SOME_INPUTS_FAILED, fail
from spine_edge.errors import SpineEdgeError
from spine_edge.support import import_optional

_FOLDER = click.Path(file_okay=False, path_type=Path)


@click.group()
def data() -> None:
    """Datasets in the VinDr-SpineXR layout: synthesise, check, prepare for training."""


@data.command()
@click.argument("out", type=_FOLDER)
@click.option("--n-train", default=300, show_default=True, type=click.IntRange(min=0), help="Training images.")
@click.option("--n-test", default=100, show_default=True, type=click.IntRange(min=0), help="Test images.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Random seed; the same seed writes the same files."
)
@click.option(
    "--difficulty",
    type=float,
    default=None,
    help="0 (obvious lesions) to 1 (subtle lesions, more noise); default: the generator's.",
)
@click.option(
    "--scale",
    type=float,
    default=None,
    help="Image size factor relative to real VinDr sizes (default: the generator's).",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: one per CPU core).")
def synth(
    out: Path, n_train: int, n_test: int, seed: int, difficulty: float | None, scale: float | None, workers: int | None
) -> None:
    """Write a synthetic dataset in the VinDr-SpineXR layout to OUT."""
    given = {"difficulty": difficulty, "scale": scale, "workers": workers}
    try:
        synth_module = import_optional("spine_edge.training.data.synth", "train", "Generating a synthetic dataset")
        config = synth_module.SynthConfig(
            n_train=n_train, n_test=n_test, seed=seed, **{k: v for k, v in given.items() if v is not None}
        )
        report = synth_module.generate_dataset(out, config, progress=True)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
    click.echo(str(report))


@data.command()
@click.argument("vindr_root", type=_FOLDER)
def check(vindr_root: Path) -> None:
    """Validate VINDR_ROOT and print counts, class imbalance and problems found.

    Exits non-zero only when the layout cannot be read (missing folder, CSV or columns);
    problems with single rows or files are listed, and the exit code stays 0.
    """
    try:
        summary = vindr.summarize_dataset(vindr.read_vindr(vindr_root))
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
    click.echo(vindr.format_summary(summary))


@data.command()
@click.argument("vindr_root", type=_FOLDER)
@click.argument("out", type=_FOLDER)
@click.option(
    "--long-side", default=512, show_default=True, type=click.IntRange(min=16), help="Longest side of the cached PNGs."
)
@click.option(
    "--val-fraction",
    default=0.15,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="Share of training images held out for validation (split by study).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/validation split.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: one per CPU core).")
def prepare(vindr_root: Path, out: Path, long_side: int, val_fraction: float, seed: int, workers: int | None) -> None:
    """Convert VINDR_ROOT into the training cache OUT (PNGs, YOLO labels, dataset.yaml).

    Re-running with the same data and settings only converts what is missing. Exit code 1 when
    some images could not be read (they are left out of the cache and listed).
    """
    try:
        prepare_module = import_optional("spine_edge.training.data.prepare", "train", "Preparing the training cache")
        config = prepare_module.PrepareConfig(
            long_side=long_side, val_fraction=val_fraction, seed=seed, workers=workers
        )
        report = prepare_module.prepare_dataset(vindr_root, out, config, progress=True)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
    for name in prepare_module.CACHE_SPLITS:
        c = report.counts[name]
        click.echo(
            f"{name:<6}{c['images']:>7} images ({c['normal']} normal, {c['abnormal']} abnormal), {sum(c['boxes'].values())} boxes"
        )
    rebuilt = " (earlier cache had other data or settings: rebuilt)" if report.rebuilt else ""
    click.echo(f"converted {report.converted}, already cached {report.skipped}, failed {report.failed}{rebuilt}")
    if report.problems:
        by_kind = Counter(p.kind.value for p in report.problems).most_common()
        click.echo(
            f"problems: {', '.join(f'{kind} {n}' for kind, n in by_kind)} (details in {report.out / 'prepare.json'})"
        )
    click.echo(f"dataset: {report.dataset_yaml}")
    if report.failed:
        click.echo(f"error: {report.failed} image(s) could not be read and were left out", err=True)
        raise SystemExit(EXIT_SOME_INPUTS_FAILED)
