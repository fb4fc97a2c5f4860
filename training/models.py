"""DERNet members and the fused module that training validates and export traces.

Three pieces, each defined once:

- :func:`build_backbone` makes a timm classifier with one logit and checks that its head is
  global-average-pool + linear, the shape the CAM below relies on.
- :class:`GrayToModelInput` is the preprocessing the exported graph embeds: uint8 gray → [0, 1] →
  three channels → ``(x - mean) / std`` with the arch's own timm statistics.
- :class:`TTAClassifier` / :class:`DERNetEnsemble` map uint8 ``[N, 1, S, S]`` to ``(prob [N],
  cam [N, h, w])``: TTA views as constant sampling grids, backbone features, linear head, sigmoid,
  mean over views, weighted sum over members. Validation in training and the ONNX export run this
  same module, so the engine computes what the ensemble search measured.

Why the CAM is exact Grad-CAM: with logit ``y = Σ_k w_k · mean_ij(A_k) + b``, Grad-CAM's channel
weight is ``α_k = mean_ij ∂y/∂A_k,ij = w_k / Z`` (Z = h·w), so ``ReLU(Σ_k α_k A_k)`` is the CAM
``ReLU(Σ_k w_k A_k)`` divided by Z; after normalising each map by its maximum the two are equal,
and the heatmap needs no backward pass inside the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data.config import resolve_model_data_config
from timm.layers.adaptive_avgmax_pool import SelectAdaptivePool2d
from torch import nn

from spine_edge.errors import SpineEdgeError
from spine_edge.training.checkpoints import (
    CheckpointError,
    ClassifierCheckpoint,
    ClassifierMeta,
    load_classifier_checkpoint,
)
from spine_edge.tta import DEFAULT_VIEWS, TTAView, views_by_name

#: Floor of the per-image CAM maximum, so an all-zero map stays zero instead of dividing by zero. A
#: normal FP16 number (>= 6.1e-5), so an FP16 engine that flushes subnormals still divides by it.
CAM_EPS = 1e-4


class ArchitectureError(SpineEdgeError):
    """A classifier architecture cannot serve as a DERNet member."""


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a backbone expects, saved with its weights.

    Attributes:
        input_size: Square side the graph receives (the letterbox canvas).
        mean: Per-channel mean of the [0, 1] RGB input (timm's pretrained config).
        std: Per-channel standard deviation.
        interpolation: timm's resize interpolation for this arch. Informational: the one resize
            everywhere is :func:`spine_edge.preprocess.letterbox`.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def resolve_data_config(model: nn.Module, input_size: int) -> DataConfig:
    """The arch's mean/std/interpolation from timm's pretrained config, at our input size.

    Example:
        >>> resolve_data_config(build_backbone("tf_efficientnetv2_b0"), 128).mean
        (0.485, 0.456, 0.406)
    """
    cfg = resolve_model_data_config(model)
    return DataConfig(
        input_size=int(input_size),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg["interpolation"]),
    )


def check_gap_linear_head(model: nn.Module, arch: str) -> nn.Linear:
    """Return the linear head of a model whose head is global average pool + linear.

    Raises:
        ArchitectureError: The head has anything else (a conv after pooling as in MobileNetV3, a
            norm as in ConvNeXt, max pooling), so the in-graph CAM would not be Grad-CAM.
    """
    pool = getattr(model, "global_pool", None)
    # get_classifier is timm's, not nn.Module's: torch's stubs type unknown attributes as Tensor | Module.
    head = cast(Callable[[], nn.Module], model.get_classifier)() if hasattr(model, "get_classifier") else None
    # MobileNetV3-style heads pool without flattening and run a conv on the pooled vector, so the
    # Flatten and the width check below reject them; ConvNeXt-style heads have no top-level pool.
    ok = (
        isinstance(pool, SelectAdaptivePool2d)
        and pool.pool_type == "avg"
        and isinstance(pool.flatten, nn.Flatten)
        and isinstance(head, nn.Linear)
        and head.in_features == getattr(model, "num_features", -1)
    )
    if not ok:
        raise ArchitectureError(
            f"timm model {arch!r} does not end in global-average-pool + linear, so its class-activation "
            "map would not equal Grad-CAM: choose a ResNet, DenseNet or EfficientNet(V2) variant in the profile"
        )
    return head  # type: ignore[return-value]


def build_backbone(arch: str, *, pretrained: Path | None = None, output_stride: int = 32) -> nn.Module:
    """A timm classifier with one logit, built without downloading anything.

    Args:
        arch: timm model name.
        pretrained: Optional local ImageNet weights (a state-dict file: ``.pth``, ``.pt``, ``.bin``
            or ``.safetensors``); the 1000-class head is dropped and the one-logit head keeps timm's
            initialisation.
        output_stride: Feature-map stride, 32 (as published) or 16/8 (later stages dilated, a
            larger class-activation map; the weights are the same tensors).

    Returns:
        The model in train mode, ``in_chans=3`` (the gray image is replicated, so ImageNet
        weights load unchanged).

    Raises:
        ArchitectureError: Unknown arch, a head that is not GAP + linear, or an ``output_stride``
            the arch does not offer.
        CheckpointError: The weights file is unreadable or does not fit the arch.

    Example:
        >>> model = build_backbone("resnet18")
        >>> model.get_classifier().out_features
        1
    """
    if not timm.is_model(arch):
        raise ArchitectureError(
            f"{arch!r} is not a timm model name: check the profile or --arch (timm {timm.__version__})"
        )
    if output_stride not in (8, 16, 32):
        raise ArchitectureError(f"output_stride {output_stride} for {arch!r}: use 32, 16 or 8")
    # Only passed when it differs from 32: some archs (DenseNet) do not take the argument at all.
    options: dict[str, Any] = {} if output_stride == 32 else {"output_stride": output_stride}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=1, in_chans=3, **options)
    except TypeError as exc:
        raise ArchitectureError(
            f"timm {arch!r} does not offer output_stride={output_stride} ({exc}): set output_stride 32 for it in the profile"
        ) from exc
    check_gap_linear_head(model, arch)
    if pretrained is not None:
        load_pretrained_weights(model, arch, pretrained)
    return model


def load_pretrained_weights(model: nn.Module, arch: str, path: Path) -> None:
    """Load local ImageNet weights into ``model`` except its classifier head.

    Raises:
        CheckpointError: The file is missing or unreadable, or its tensors do not match the arch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: pretrained weights file not found (pass a local state-dict file; nothing is downloaded)"
        )
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt or foreign file
        raise CheckpointError(
            f"{path}: cannot read as a state dict ({exc}); pass a .pth/.pt/.safetensors weights file"
        ) from exc
    # timm models carry their pretrained config as a dict (torch's stubs see Tensor | Module).
    head_name = cast(dict[str, Any], model.pretrained_cfg).get("classifier", "")
    prefixes = tuple(f"{name}." for name in ([head_name] if isinstance(head_name, str) else head_name) if name)
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CheckpointError(
            f"{path}: weights do not fit timm {arch!r} ({_first_detail(exc)}); pass ImageNet weights of that exact arch"
        ) from exc
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit timm {arch!r} ({len(missing)} missing, {len(result.unexpected_keys)} unexpected "
            f"keys, e.g. {(missing or result.unexpected_keys)[:3]}); pass ImageNet weights of that exact arch"
        )


#: Weight-file suffixes :func:`find_pretrained` looks for in a folder.
PRETRAINED_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def find_pretrained(path: Path, arch: str) -> Path:
    """The weights file for ``arch``: ``path`` itself, or ``path/<arch><suffix>`` in a folder.

    Raises:
        CheckpointError: A folder without a file for ``arch``.
    """
    path = Path(path)
    if path.is_file():
        return path
    for suffix in PRETRAINED_SUFFIXES:
        candidate = path / f"{arch}{suffix}"
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: no ImageNet weights for {arch!r}; put {arch}.pth (or .pt/.bin/.safetensors) there")


def _first_detail(exc: RuntimeError) -> str:
    """The first specific line of torch's multi-line load_state_dict error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


def zero_head(model: nn.Module) -> nn.Module:
    """Zero the linear head so training starts at prob 0.5 (loss ln 2); returns ``model``.

    timm's EfficientNet init scales head weights by 1/sqrt(fan_out), which for one output draws
    them from U(-1, 1): the cpu profile's EfficientNets then started at training losses of 1.3-2.6
    and were still unstable after six epochs. Zero is the neutral start for every member.
    """
    # timm's get_classifier (unknown to torch's stubs); build_backbone checked that it is a Linear.
    head = cast(Callable[[], nn.Linear], model.get_classifier)()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


class GrayToModelInput(nn.Module):
    """uint8 gray ``[N, 1, S, S]`` → normalised three-channel float ``[N, 3, S, S]``.

    Split in two steps because the TTA warps act between them, on the [0, 1] image whose zero
    padding matches the letterbox's black border.
    """

    # Buffers registered in __init__, declared for the type checker (nn.Module.__getattr__ is Tensor | Module).
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def scale(image: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0–255) ``[N, 1, S, S]`` → float in [0, 1]."""
        return image.to(torch.float32) / 255.0

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        """[0, 1] gray ``[N, 1, S, S]`` → replicated to 3 channels → ``(x - mean) / std``."""
        return (torch.cat([unit, unit, unit], dim=1) - self.mean) / self.std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.scale(image))


def class_activation_map(features: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """``Σ_k w_k A_k`` of features ``[N, C, h, w]`` → ``[N, h, w]`` (no bias, no ReLU)."""
    weight = head.weight.view(1, -1, 1, 1)
    return F.conv2d(features, weight).squeeze(1)


def normalise_cam(cam: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's display form: ``ReLU`` then divide each map by its maximum (→ [0, 1]).

    Dividing by ``max(peak, eps)`` rather than ``peak + eps`` keeps the result independent of the
    map's scale (so CAM and Grad-CAM, which differ by the factor h·w, normalise to the same map).
    """
    positive = F.relu(cam)
    peak = positive.amax(dim=(1, 2), keepdim=True)
    return positive / peak.clamp_min(CAM_EPS)


def _is_identity(view: TTAView) -> bool:
    return all(math.isclose(a, b) for row, ref in zip(view.theta, ((1, 0, 0), (0, 1, 0))) for a, b in zip(row, ref))


class TTAClassifier(nn.Module):
    """One member with its preprocessing and TTA: uint8 ``[N, 1, S, S]`` → ``(prob [N], cam [N, h, w])``.

    Every view is warped from the [0, 1] image with ``grid_sample`` (bilinear, zero padding,
    ``align_corners=False``) on the constant grid of :func:`spine_edge.tta.sampling_grid`; the
    identity view skips the warp (sampling at pixel centres reproduces the image). All views run
    through the backbone as one batch of ``V·N``. The probability is the mean over views of
    ``sigmoid(logit)``; the CAM is the identity view's, normalised to [0, 1] per image, so it is
    aligned with the input canvas without un-warping.

    Args:
        backbone: A model accepted by :func:`check_gap_linear_head`, with ``forward_features``.
        data_cfg: Its preprocessing; ``input_size`` fixes the grids' size.
        views: TTA views; one must be the identity.

    Example:
        >>> backbone = build_backbone("resnet18").eval()
        >>> model = TTAClassifier(backbone, resolve_data_config(backbone, 128))
        >>> prob, cam = model(torch.zeros(2, 1, 128, 128, dtype=torch.uint8))
        >>> prob.shape, cam.shape
        (torch.Size([2]), torch.Size([2, 4, 4]))
    """

    # Buffer registered in __init__, declared for the type checker (nn.Module.__getattr__ is Tensor | Module).
    grids: torch.Tensor

    def __init__(self, backbone: nn.Module, data_cfg: DataConfig, views: Sequence[TTAView] = DEFAULT_VIEWS) -> None:
        super().__init__()
        identity = [i for i, view in enumerate(views) if _is_identity(view)]
        if not identity:
            raise ValueError(f"TTA views {[v.name for v in views]} need an identity view for the CAM")
        self.backbone = backbone
        self.head = check_gap_linear_head(backbone, type(backbone).__name__)
        self.to_input = GrayToModelInput(data_cfg.mean, data_cfg.std)
        self.data_cfg = data_cfg
        self.view_names = tuple(view.name for view in views)
        self.identity_index = identity[0]
        s = data_cfg.input_size
        grids = [torch.from_numpy(view.grid(s, s)) for view in views if not _is_identity(view)]
        self.warped = tuple(not _is_identity(view) for view in views)
        self.register_buffer("grids", torch.stack(grids) if grids else torch.zeros(0, s, s, 2), persistent=False)

    def forward(self, image: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, ...]:
        """``(prob [N], cam [N, h, w])``, plus the identity view's pooled features ``[N, C]`` with ``features``
        (as :class:`DERNetEnsemble` calls its members).

        The pooled features are what the linear head sees; export fits the in-distribution score on them
        (``spine_edge.export.ood``) and computes it inside the same graph, at no extra backbone pass. They
        come out of ``forward`` (not another method) so that the traced graph keeps each member's nodes
        under its module scope, which export's member and sensitivity analysis rely on.
        """
        prob, cam, pooled = self._run(image)
        return (prob, cam, pooled) if features else (prob, cam)

    def _run(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = image.shape[0]
        unit = self.to_input.scale(image)
        batches = []
        grid_index = 0
        for warped in self.warped:
            if warped:
                grid = self.grids[grid_index : grid_index + 1].expand(n, -1, -1, -1)
                batches.append(F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
                grid_index += 1
            else:
                batches.append(unit)
        views = len(batches)
        # forward_features is timm's, not nn.Module's (torch's stubs see Tensor | Module).
        forward_features = cast(Callable[[torch.Tensor], torch.Tensor], self.backbone.forward_features)
        features = forward_features(self.to_input.normalise(torch.cat(batches, dim=0)))
        pooled = features.mean(dim=(2, 3))
        logits = self.head(pooled).view(views, n)
        prob = torch.sigmoid(logits).mean(dim=0)
        identity_features = features[self.identity_index * n : (self.identity_index + 1) * n]
        cam = normalise_cam(class_activation_map(identity_features, self.head))
        return prob, cam, pooled[self.identity_index * n : (self.identity_index + 1) * n]


class DERNetEnsemble(nn.Module):
    """Weighted ensemble: ``prob = Σ_m w_m prob_m``, CAM = the same weighted sum of member CAMs.

    Member CAMs are resized (bilinear, ``align_corners=False``) to the largest member map and the
    sum is renormalised to [0, 1] per image. All members must share one input size: the graph has
    one input.

    Args:
        members: One :class:`TTAClassifier` per member.
        weights: One weight per member (the grid search makes them sum to 1).
    """

    def __init__(self, members: Sequence[TTAClassifier], weights: Sequence[float]) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError(f"need one weight per member, got {len(members)} members and {len(weights)} weights")
        sizes = {m.data_cfg.input_size for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members must share one input size, got {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.weights = tuple(float(w) for w in weights)
        self.input_size = sizes.pop()
        self.has_ood = False

    def set_ood(self, means: Sequence[np.ndarray], whitenings: Sequence[np.ndarray]) -> None:
        """Add the in-distribution score as a third output: ``Σ_m ||(pooled_m - mean_m) whitening_m||²``.

        Export calls this with the fit of ``spine_edge.export.ood`` before tracing; training never does,
        so training and validation run exactly as before. The buffers are not persistent: checkpoints
        do not change.

        Args:
            means: One ``[C_m]`` feature mean per member.
            whitenings: One ``[C_m, C_m]`` whitening matrix per member (the ``1 / (C_m M)`` scaling included).
        """
        if len(means) != len(self.members) or len(whitenings) != len(self.members):
            raise ValueError(f"need one mean and one whitening per member ({len(self.members)}), "
                             f"got {len(means)} and {len(whitenings)}")  # fmt: skip
        for i, (mean, whitening) in enumerate(zip(means, whitenings)):
            self.register_buffer(f"ood_mean_{i}", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer(
                f"ood_whitening_{i}", torch.as_tensor(whitening, dtype=torch.float32), persistent=False
            )
        self.has_ood = True

    def ood_score(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """The in-distribution score ``[N]`` of the members' pooled features (after :meth:`set_ood`)."""
        score = torch.zeros(pooled[0].shape[0], dtype=pooled[0].dtype, device=pooled[0].device)
        for i, features in enumerate(pooled):
            z = (features - getattr(self, f"ood_mean_{i}")) @ getattr(self, f"ood_whitening_{i}")
            score = score + (z * z).sum(dim=1)
        return score

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(prob [N], cam [N, h, w])``, plus ``ood_score [N]`` once :meth:`set_ood` was called."""
        prob, cam, pooled = self.forward_with_features(image)
        if not self.has_ood:
            return prob, cam
        return prob, cam, self.ood_score(pooled)

    def forward_with_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(prob [N], cam [N, h, w], [pooled_m [N, C_m] per member])`` (see :meth:`TTAClassifier.forward`)."""
        outputs = [member(image, features=True) for member in self.members]
        height = max(cam.shape[1] for _, cam, _ in outputs)
        width = max(cam.shape[2] for _, cam, _ in outputs)
        prob = sum(w * p for w, (p, _, _) in zip(self.weights, outputs))
        cam = sum(w * _resize_cam(c, height, width) for w, (_, c, _) in zip(self.weights, outputs))
        # sum() starts from int 0, but there is at least one member (see __init__), so cam is a Tensor.
        return prob, normalise_cam(cast(torch.Tensor, cam)), [pooled for _, _, pooled in outputs]


def _resize_cam(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if cam.shape[1] == height and cam.shape[2] == width:
        return cam
    return F.interpolate(cam.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)


def data_config_from_meta(meta: ClassifierMeta) -> DataConfig:
    """The :class:`DataConfig` recorded in a checkpoint's metadata."""
    return DataConfig(meta.input_size, tuple(meta.mean), tuple(meta.std), meta.interpolation)  # type: ignore[arg-type]


def backbone_from_checkpoint(checkpoint: ClassifierCheckpoint) -> nn.Module:
    """Rebuild a member's backbone from its checkpoint, in eval mode.

    Raises:
        CheckpointError: The weights do not fit the recorded arch.
    """
    model = build_backbone(checkpoint.meta.arch, output_stride=int(checkpoint.meta.recipe.get("output_stride", 32)))
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint.path}: weights do not fit timm {checkpoint.meta.arch!r} ({_first_detail(exc)}); "
            f"re-run spine-edge train classifier with timm {timm.__version__}"
        ) from exc
    return model.eval()


def tta_classifier_from_checkpoint(path: Path, views: Sequence[TTAView] | None = None) -> TTAClassifier:
    """Load ``classifier_<arch>.pt`` as the eval-mode module export traces.

    Args:
        path: The checkpoint.
        views: TTA views; by default the ones recorded in the checkpoint.

    Raises:
        CheckpointError: Unreadable checkpoint, unknown recorded view, or mismatched weights.
    """
    checkpoint = load_classifier_checkpoint(path)
    if views is None:
        try:
            views = views_by_name(checkpoint.meta.tta_views)
        except KeyError as exc:
            raise CheckpointError(f"{path}: unknown TTA view {exc}; re-run spine-edge train classifier") from exc
    return TTAClassifier(backbone_from_checkpoint(checkpoint), data_config_from_meta(checkpoint.meta), views).eval()
