"""``spine-edge train``: the DERNet classifiers, the ensemble search, the detector, or all three.

Training needs ``spine-edge[train]`` (torch, timm, ultralytics); the modules are imported inside
each command, so ``spine-edge --help`` works on a runtime-only install.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from spine_edge.cli import EXIT_SETUP, fail
from spine_edge.errors import SpineEdgeError
from spine_edge.support import import_optional

_FOLDER = click.Path(file_okay=False, path_type=Path)


def _import_training(module: str) -> ModuleType:
    return import_optional(module, "train", f"spine-edge train ({module})")


def _profile(name: str) -> Any:
    try:
        return _import_training("spine_edge.training.profiles").get_profile(name)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--profile") from None


def _common(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--profile",
            "profile_name",
            default="cpu",
            show_default=True,
            help="Training profile: paper (GPU), cpu (demo on a few cores) or tiny (tests).",
        ),
        click.option(
            "--data", "prepared", required=True, type=_FOLDER, help="Prepared cache written by spine-edge data prepare."
        ),
        click.option("--out", required=True, type=_FOLDER, help="Checkpoint folder (CKPT)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
def train() -> None:
    """Train the DERNet classifiers, the ensemble and the detector (needs spine-edge[train])."""


@train.command()
@_common
@click.option(
    "--arch", "archs", multiple=True, help="Member to train (repeatable; default: every member of the profile)."
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's maximum epochs.")
@click.option("--resume", is_flag=True, help="Continue from CKPT/resume/ (optimizer, scheduler, epoch, RNG).")
@click.option(
    "--pretrained",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Local ImageNet weights: a state-dict file (with one --arch) or a folder of <arch>.pth/.pt/.safetensors.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of initialisation, augmentation and shuffling."
)
def classifier(
    profile_name: str,
    prepared: Path,
    out: Path,
    archs: tuple[str, ...],
    epochs: int | None,
    resume: bool,
    pretrained: Path | None,
    seed: int,
) -> None:
    """Train DERNet members; writes CKPT/classifier_<arch>.pt, CKPT/resume/ and CKPT/logs/."""
    profile = _profile(profile_name)
    try:
        _train_classifiers(profile, prepared, out, archs, epochs, resume, pretrained, seed)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)


@train.command()
@_common
def ensemble(profile_name: str, prepared: Path, out: Path) -> None:
    """Search ensemble weights and the gate threshold on validation; writes CKPT/ensemble.json."""
    profile = _profile(profile_name)
    try:
        _train_ensemble(profile, prepared, out)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)


@train.command()
@_common
@click.option("--resume", is_flag=True, help="Continue the detector from its last checkpoint.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the detector's training.")
def detector(profile_name: str, prepared: Path, out: Path, resume: bool, seed: int) -> None:
    """Train the YOLO11 detector; writes CKPT/detector.pt and CKPT/detector.json."""
    profile = _profile(profile_name)
    try:
        _train_detector(profile, prepared, out, resume, seed)
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)


@train.command(name="all")
@_common
@click.option("--resume", is_flag=True, help="Resume the classifiers and the detector where they stopped.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the classifiers and the detector.")
def train_all(profile_name: str, prepared: Path, out: Path, resume: bool, seed: int) -> None:
    """Classifiers, then the ensemble search, then the detector, with timing per stage."""
    profile = _profile(profile_name)
    stages: list[tuple[str, Callable[[], None]]] = [
        ("classifiers", lambda: _train_classifiers(profile, prepared, out, (), None, resume, None, seed)),
        ("ensemble", lambda: _train_ensemble(profile, prepared, out)),
        ("detector", lambda: _train_detector(profile, prepared, out, resume, seed)),
    ]
    timings = []
    started = time.perf_counter()
    try:
        for number, (name, run) in enumerate(stages, start=1):
            click.echo(f"=== [{number}/{len(stages)}] {name} (profile {profile.name}) ===")
            stage_started = time.perf_counter()
            run()
            timings.append((name, time.perf_counter() - stage_started))
            click.echo(f"=== {name} done in {timings[-1][1]:.1f}s ===")
    except SpineEdgeError as exc:
        fail(exc, EXIT_SETUP)
    summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings)
    click.echo(f"all stages done in {time.perf_counter() - started:.1f}s ({summary}); checkpoints in {out}")


def _train_classifiers(
    profile: Any,
    prepared: Path,
    out: Path,
    archs: tuple[str, ...],
    epochs: int | None,
    resume: bool,
    pretrained: Path | None,
    seed: int,
) -> None:
    classifier_module = _import_training("spine_edge.training.classifier")
    models = _import_training("spine_edge.training.models")
    profiles = _import_training("spine_edge.training.profiles")
    selected = archs or tuple(recipe.arch for recipe in profile.classifiers)
    if pretrained is not None and pretrained.is_file() and len(selected) != 1:
        raise click.BadParameter(
            "a weights file fits one arch: add --arch, or pass a folder of <arch>.pth files", param_hint="--pretrained"
        )
    for arch in selected:
        try:
            recipe = profiles.with_overrides(profile.classifier(arch), epochs=epochs)
        except KeyError as exc:
            raise click.BadParameter(str(exc.args[0]), param_hint="--arch") from None
        weights = models.find_pretrained(pretrained, arch) if pretrained is not None else None
        result = classifier_module.train_classifier(
            prepared, out, recipe, resume=resume, pretrained=weights, seed=seed, profile_name=profile.name
        )
        stopped = ", stopped early" if result.stopped_early else ""
        click.echo(
            f"classifier {arch}: best val AUROC {result.best_val_auroc:.4f} at epoch {result.best_epoch}/{result.epochs_run}"
            f"{stopped}, {result.seconds:.1f}s -> {result.checkpoint}"
        )


def _train_ensemble(profile: Any, prepared: Path, out: Path) -> None:
    result = _import_training("spine_edge.training.ensemble").train_ensemble(prepared, out, profile)
    weights = ", ".join(f"{arch} {w:.2f}" for arch, w in zip(result.archs, result.weights))
    m = result.metrics["ensemble"]
    click.echo(
        f"ensemble: weights {weights}; val AUROC {result.auroc:.4f}, threshold {result.threshold:.4f} "
        f"(sensitivity {m.sensitivity:.3f}, specificity {m.specificity:.3f}, F1 {m.f1:.3f}), {result.seconds:.1f}s -> {result.path}"
    )


def _train_detector(profile: Any, prepared: Path, out: Path, resume: bool, seed: int) -> None:
    detector_module = _import_training("spine_edge.training.detector")
    result = detector_module.train_detector(
        prepared, out, profile.detector, resume=resume, profile_name=profile.name, seed=seed
    )
    click.echo(
        f"detector: val mAP@0.5 {result.map50:.4f}, mAP@0.5:0.95 {result.map50_95:.4f} after {result.epochs} epochs, "
        f"{result.seconds:.1f}s -> {result.checkpoint}"
    )
