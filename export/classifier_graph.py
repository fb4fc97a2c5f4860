"""The classifier graph: the DERNet ensemble exactly as the ensemble search validated it, as one ONNX file.

``image`` uint8 ``[N, 1, S, S]`` → cast, /255 → TTA views (``GridSample`` on constant grids) →
per member: three channels, ``(x - mean) / std`` with the member's own timm statistics, backbone,
GAP + linear head, sigmoid, mean over views → weighted sum → ``prob [N]`` and the normalised
class-activation map ``cam [N, h, w]``. The traced module is ``training.models.DERNetEnsemble``
built from the checkpoints and ``ensemble.json``: the engine computes what validation measured.

With training images at export, :func:`attach_ood` adds ``ood_score [N]``: the in-distribution score
of :mod:`spine_edge.export.ood` on each member's pooled identity-view features, computed in the same pass (a subtraction, a matrix product and a sum of
squares per member), so every precision and engine built from this graph carries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from spine_edge.errors import SpineEdgeError
from spine_edge.export.bundle_writer import trace_to_onnx
from spine_edge.export.ood import DEFAULT_PERCENTILE, OodThreshold, choose_threshold, fit_ood

if TYPE_CHECKING:
    from spine_edge.training.models import DERNetEnsemble

INPUT_NAME = "image"
PROB_NAME = "prob"
CAM_NAME = "cam"
OOD_NAME = "ood_score"


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as ``ensemble.json`` records it.

    Attributes:
        name: Member name (unique in the ensemble).
        arch: timm architecture.
        weight: Ensemble weight.
        checkpoint: Resolved path of ``classifier_<arch>.pt``.
        val_auroc: The member's validation AUROC, or ``nan`` if not recorded.
    """

    name: str
    arch: str
    weight: float
    checkpoint: Path
    val_auroc: float


@dataclass(frozen=True)
class EnsembleSpec:
    """``ensemble.json`` parsed.

    Attributes:
        members: Members in graph order.
        threshold: Gate threshold τ chosen on validation.
        tta_views: Names of the TTA views.
        input_size: Square input side.
        metrics: Validation metrics recorded by the search.
        path: The file it was read from.
        raw: The whole parsed file, for provenance.
    """

    members: tuple[MemberSpec, ...]
    threshold: float
    tta_views: tuple[str, ...]
    input_size: int
    metrics: dict[str, Any]
    path: Path
    raw: dict[str, Any]


def read_ensemble_spec(checkpoints: Path) -> EnsembleSpec:
    """Read ``CHECKPOINTS/ensemble.json`` (through ``training.ensemble.read_ensemble_json``).

    Members with weight 0 are left out, as ``training.ensemble.load_dernet`` leaves them out of the
    module: they add nothing to the probability or the CAM.

    Raises:
        SpineEdgeError: Missing or malformed file, or a member checkpoint that does not exist.
    """
    from spine_edge.training.ensemble import ENSEMBLE_JSON, read_ensemble_json

    path = Path(checkpoints) / ENSEMBLE_JSON
    raw = read_ensemble_json(Path(checkpoints))
    hint = "run `spine-edge train ensemble` on these checkpoints again"
    try:
        members = []
        for entry in raw["members"]:
            if float(entry["weight"]) <= 0:
                continue
            ckpt = path.parent / entry["checkpoint"]
            if not ckpt.is_file():
                raise SpineEdgeError(f"{path}: member {entry['name']!r} names checkpoint {ckpt}, which does not exist")
            members.append(
                MemberSpec(
                    name=str(entry["name"]),
                    arch=str(entry["arch"]),
                    weight=float(entry["weight"]),
                    checkpoint=ckpt,
                    val_auroc=float(entry.get("val_auroc") or float("nan")),
                )
            )
        spec = EnsembleSpec(
            members=tuple(members),
            threshold=float(raw["threshold"]),
            tta_views=tuple(raw["tta_views"]),
            input_size=int(raw["input_size"]),
            metrics=dict(raw.get("metrics", {})),
            path=path,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpineEdgeError(f"{path}: malformed ({exc!r}); {hint}") from exc
    if not spec.members:
        raise SpineEdgeError(f"{path}: no member has a positive weight; {hint}")
    return spec


def build_ensemble(spec: EnsembleSpec) -> torch.nn.Module:
    """The eval-mode ``DERNetEnsemble`` that validation measured (``training.ensemble.load_dernet``).

    Raises:
        SpineEdgeError: A checkpoint that does not fit, or members trained at another size than
            ``ensemble.json`` records.
    """
    from spine_edge.training.ensemble import load_dernet

    ensemble = load_dernet(spec.path.parent)
    if ensemble.input_size != spec.input_size:
        raise SpineEdgeError(
            f"{spec.path}: says {spec.input_size} px but the members were trained at {ensemble.input_size} px; "
            "re-run the ensemble search on these checkpoints"
        )
    return ensemble


def member_scope(index: int) -> str:
    """The ONNX node-name prefix of member ``index`` (the legacy exporter names nodes by module path)."""
    return f"/members.{index}/"


def pooled_features(ensemble: torch.nn.Module, images: np.ndarray, batch_size: int = 16) -> list[np.ndarray]:
    """Each member's pooled identity-view features ``[N, C_m]`` of uint8 ``[N, 1, S, S]`` canvases."""
    # A DERNetEnsemble (torch's stubs type its members/methods on nn.Module as Tensor | Module).
    ensemble = cast("DERNetEnsemble", ensemble)
    parts: list[list[np.ndarray]] = [[] for _ in ensemble.members]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            for part, features in zip(parts, ensemble.forward_with_features(chunk)[2], strict=True):
                part.append(features.numpy().astype(np.float64))
    return [np.concatenate(p) for p in parts]


def attach_ood(
    ensemble: torch.nn.Module, train_images: np.ndarray, val_images: np.ndarray, percentile: float = DEFAULT_PERCENTILE
) -> OodThreshold:
    """Fit the in-distribution score on training canvases, add it to the ensemble, threshold it on validation.

    After this the ensemble outputs ``(prob, cam, ood_score)`` and :func:`export_classifier_graph`
    writes the third output.

    Args:
        ensemble: The eval-mode ``DERNetEnsemble`` (changed in place: ``set_ood``).
        train_images: uint8 ``[N, 1, S, S]`` letterboxed training images (what the members learned from).
        val_images: uint8 ``[M, 1, S, S]`` validation images (never seen by the fit).
        percentile: Validation percentile that becomes the threshold.

    Returns:
        The threshold with its context (for the manifest).
    """
    train_features = pooled_features(ensemble, train_images)
    val_features = pooled_features(ensemble, val_images)
    # Validation features weigh the members (inverse validation variance, export/ood.py member_weights).
    model = fit_ood(train_features, val_features)
    # A DERNetEnsemble (torch's stubs type set_ood on nn.Module as Tensor | Module).
    cast("DERNetEnsemble", ensemble).set_ood(
        [fit.mean for fit in model.members], [fit.whitening for fit in model.members]
    )
    return choose_threshold(model.score(val_features), model.score(train_features), percentile)


def export_classifier_graph(ensemble: torch.nn.Module, out: Path, input_size: int) -> Path:
    """Trace the ensemble to the FP32 classifier graph.

    Args:
        ensemble: An eval-mode ``DERNetEnsemble`` (see :func:`build_ensemble`); after :func:`attach_ood`
            the graph also outputs ``ood_score``.
        out: ONNX file to write.
        input_size: Side of the square uint8 input.

    Returns:
        ``out``.

    Example:
        >>> spec = read_ensemble_spec(Path("ckpt"))  # doctest: +SKIP
        >>> export_classifier_graph(build_ensemble(spec), Path("bundle/classifier.fp32.onnx"), spec.input_size)  # doctest: +SKIP
    """
    example = torch.zeros((1, 1, input_size, input_size), dtype=torch.uint8)
    outputs = [PROB_NAME, CAM_NAME, *([OOD_NAME] if getattr(ensemble, "has_ood", False) else [])]
    return trace_to_onnx(
        ensemble,
        example,
        out,
        input_names=[INPUT_NAME],
        output_names=outputs,
        dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
    )


def run_ensemble(ensemble: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch reference: ``(prob [N], cam [N, h, w])`` of uint8 ``[N, 1, S, S]`` images."""
    with torch.no_grad():
        prob, cam = ensemble(torch.from_numpy(np.ascontiguousarray(images)))[:2]
    return prob.numpy(), cam.numpy()


def run_ood(ensemble: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The PyTorch reference ``ood_score [N]`` of uint8 ``[N, 1, S, S]`` images (after :func:`attach_ood`)."""
    with torch.no_grad():
        score = ensemble(torch.from_numpy(np.ascontiguousarray(images)))[2]
    out: np.ndarray = score.numpy()
    return out
