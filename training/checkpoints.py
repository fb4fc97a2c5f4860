"""Classifier checkpoints (the contract with export) and the resumable training state.

``CKPT/classifier_<arch>.pt`` holds the best epoch's weights and plain-typed metadata, so
``torch.load(weights_only=True)`` reads it in a process that has never imported this package.
``CKPT/resume/classifier_<arch>.pt`` holds the last epoch's full state (optimizer, scheduler, RNG,
early-stopping counters, history) for ``--resume``. Both are written atomically: a crash mid-write
leaves the previous file intact.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spine_edge.errors import SpineEdgeError
from spine_edge.io_utils import write_bytes_atomic

CLASSIFIER_FORMAT = "spine-edge-classifier/1"
TRAIN_STATE_FORMAT = "spine-edge-classifier-state/1"


class CheckpointError(SpineEdgeError):
    """A checkpoint or weights file is missing, unreadable, or does not fit what reads it."""


def classifier_checkpoint_path(ckpt_dir: Path, arch: str) -> Path:
    """Where the best weights of ``arch`` live: ``CKPT/classifier_<arch>.pt``."""
    return Path(ckpt_dir) / f"classifier_{arch}.pt"


def train_state_path(ckpt_dir: Path, arch: str) -> Path:
    """Where the last epoch's resumable state of ``arch`` lives."""
    return Path(ckpt_dir) / "resume" / f"classifier_{arch}.pt"


@dataclass(frozen=True)
class ClassifierMeta:
    """What export needs to rebuild a member, in plain types only.

    Attributes:
        arch: timm model name.
        input_size: Square input side of the deployed graph.
        mean: Per-channel normalisation mean (timm's config for the arch).
        std: Per-channel normalisation standard deviation.
        interpolation: timm's interpolation for the arch (informational; letterbox resizes).
        in_chans: Channels the backbone takes (the gray image is replicated to them).
        recipe: The :class:`~training.profiles.ClassifierRecipe` as a dict.
        data_fingerprint: ``prepare.json``'s fingerprint of the data it was trained on.
        val_metrics: Validation metrics of this epoch (``auroc``, ``loss``, ``views``).
        tta_views: Names of the TTA views the member is deployed with.
        epoch: The epoch (1-based) these weights come from.
        profile: Profile name the recipe came from ("" when unknown).
        pretrained: Path of the ImageNet weights it started from, or "" for random init.
        num_params: Parameter count.
        versions: torch and timm versions that wrote it.
    """

    arch: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    in_chans: int
    recipe: dict[str, Any]
    data_fingerprint: str
    val_metrics: dict[str, Any]
    tta_views: tuple[str, ...]
    epoch: int
    profile: str = ""
    pretrained: str = ""
    num_params: int = 0
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists instead of tuples (what ``weights_only`` and JSON accept)."""
        data = asdict(self)
        data["mean"], data["std"], data["tta_views"] = list(self.mean), list(self.std), list(self.tta_views)
        data["recipe"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.recipe.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierMeta:
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError: A required key is missing.
        """
        return cls(
            arch=str(data["arch"]),
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data["interpolation"]),
            in_chans=int(data["in_chans"]),
            recipe=dict(data["recipe"]),
            data_fingerprint=str(data["data_fingerprint"]),
            val_metrics=dict(data["val_metrics"]),
            tta_views=tuple(data["tta_views"]),
            epoch=int(data["epoch"]),
            profile=str(data.get("profile", "")),
            pretrained=str(data.get("pretrained", "")),
            num_params=int(data.get("num_params", 0)),
            versions=dict(data.get("versions", {})),
        )


@dataclass(frozen=True)
class ClassifierCheckpoint:
    """A loaded ``classifier_<arch>.pt``.

    Attributes:
        path: The file it came from.
        state_dict: Backbone weights (CPU tensors).
        meta: Its metadata.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: ClassifierMeta


def save_torch_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` into memory, then write the bytes atomically; returns ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def save_classifier_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], meta: ClassifierMeta) -> Path:
    """Write a classifier checkpoint in the CONTRACTS.md format; returns ``path``."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    payload = {"format": CLASSIFIER_FORMAT, "arch": meta.arch, "state_dict": weights, "meta": meta.to_dict()}
    return save_torch_atomic(payload, path)


def _load_weights_only(path: Path, what: str, hint: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found ({hint})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(f"{path}: not a readable {what} ({exc}); {hint}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a {what} (top level is {type(payload).__name__}); {hint}")
    return payload


def load_classifier_checkpoint(path: Path) -> ClassifierCheckpoint:
    """Read and check a ``classifier_<arch>.pt``.

    Raises:
        CheckpointError: Missing, unreadable, or not in the ``spine-edge-classifier/1`` format.
    """
    hint = "re-run spine-edge train classifier"
    payload = _load_weights_only(path, "classifier checkpoint", hint)
    if payload.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}: format {payload.get('format')!r} is not {CLASSIFIER_FORMAT!r}; {hint}")
    try:
        meta = ClassifierMeta.from_dict(payload["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata incomplete ({exc!r}); {hint}") from exc
    return ClassifierCheckpoint(path=Path(path), state_dict=payload["state_dict"], meta=meta)


def save_train_state(path: Path, state: dict[str, Any]) -> Path:
    """Write the resumable state (a dict of tensors and plain types); returns ``path``."""
    return save_torch_atomic({"format": TRAIN_STATE_FORMAT, **state}, path)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read a resumable state written by :func:`save_train_state`.

    Raises:
        CheckpointError: Missing, unreadable or of another format.
    """
    hint = "delete it and train without --resume"
    payload = _load_weights_only(path, "resume state", hint)
    if payload.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{path}: format {payload.get('format')!r} is not {TRAIN_STATE_FORMAT!r}; {hint}")
    return payload
