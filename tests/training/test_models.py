"""DERNet members, the fused TTA + CAM module and the ensemble module."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from spine_edge.training.checkpoints import CheckpointError
from spine_edge.training.models import (
    ArchitectureError,
    DERNetEnsemble,
    GrayToModelInput,
    TTAClassifier,
    build_backbone,
    count_parameters,
    normalise_cam,
    resolve_data_config,
    zero_head,
)
from spine_edge.training.profiles import PROFILES
from spine_edge.tta import DEFAULT_VIEWS, views_by_name

pytestmark = pytest.mark.usefixtures("single_thread")

#: Parameter counts quoted by the paper (1000-class ImageNet heads).
PAPER_PARAMS = {"densenet121": 7.98e6, "tf_efficientnetv2_s": 21.46e6, "resnet50": 25.56e6}


def _eval_backbone(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(arch).eval()
    # A random head can make Σ w_k A_k negative everywhere (an all-zero CAM proves nothing): give it
    # mostly positive weights, some negative channels, and a bias.
    with torch.no_grad():
        head = model.get_classifier()
        head.weight.copy_(torch.randn_like(head.weight).abs() * 0.2)
        head.weight[:, ::3] *= -1
        head.bias.fill_(0.3)
    return model


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_paper_members_have_the_papers_parameter_counts(arch: str) -> None:
    with torch.device("meta"):
        imagenet = timm.create_model(arch, pretrained=False)
        ours = build_backbone(arch)
    full = count_parameters(imagenet)
    assert abs(full - PAPER_PARAMS[arch]) / PAPER_PARAMS[arch] < 0.01
    # Our one-logit head replaces the 1000-way one: 999 fewer output rows and biases.
    assert count_parameters(ours) == full - 999 * (ours.num_features + 1)


def test_every_profile_member_has_a_gap_linear_head() -> None:
    archs = {recipe.arch for profile in PROFILES.values() for recipe in profile.classifiers}
    with torch.device("meta"):
        for arch in archs:
            assert build_backbone(arch).get_classifier().out_features == 1


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "convnext_atto", "no_such_model"])
def test_heads_other_than_gap_linear_are_refused(arch: str) -> None:
    with torch.device("meta"), pytest.raises(ArchitectureError, match=arch):
        build_backbone(arch)


def test_data_config_comes_from_timm() -> None:
    with torch.device("meta"):
        effnet = resolve_data_config(build_backbone("tf_efficientnetv2_s"), 384)
        resnet = resolve_data_config(build_backbone("resnet50"), 384)
    assert effnet.mean == (0.5, 0.5, 0.5) and effnet.std == (0.5, 0.5, 0.5) and effnet.input_size == 384
    assert resnet.mean == (0.485, 0.456, 0.406) and resnet.std == (0.229, 0.224, 0.225)
    assert resnet.interpolation == "bicubic"


def test_gray_to_model_input_replicates_and_normalises() -> None:
    pre = GrayToModelInput((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    image = torch.tensor([[[[0, 51], [255, 102]]]], dtype=torch.uint8)
    out = pre(image)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    assert out[0, 1, 1, 0].item() == pytest.approx((1.0 - 0.456) / 0.224, abs=1e-6)
    assert out[0, 2, 0, 1].item() == pytest.approx((0.2 - 0.406) / 0.225, abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)


def test_identity_view_equals_the_plain_backbone() -> None:
    backbone = _eval_backbone("test_resnet")
    cfg = resolve_data_config(backbone, 64)
    model = TTAClassifier(backbone, cfg, views_by_name(["identity"]))
    x = _images(3, 64)
    with torch.no_grad():
        prob, cam = model(x)
        expected = torch.sigmoid(backbone(GrayToModelInput(cfg.mean, cfg.std)(x)).squeeze(1))
    assert prob.shape == (3,) and cam.shape == (3, 2, 2)
    torch.testing.assert_close(prob, expected, atol=1e-6, rtol=0)


def test_hflip_view_equals_the_backbone_on_a_flipped_image() -> None:
    backbone = _eval_backbone("test_resnet")
    cfg = resolve_data_config(backbone, 64)
    pre = GrayToModelInput(cfg.mean, cfg.std)
    x = _images(2, 64)
    with torch.no_grad():
        both, _ = TTAClassifier(backbone, cfg, views_by_name(["identity", "hflip"]))(x)
        plain = torch.sigmoid(backbone(pre(x)).squeeze(1))
        flipped = torch.sigmoid(backbone(pre(torch.flip(x, dims=[3]))).squeeze(1))
    torch.testing.assert_close(2 * both - plain, flipped, atol=1e-5, rtol=0)


def test_five_views_match_torch_affine_grid_per_view() -> None:
    """The constant grids equal torch's affine_grid of each view's theta, warped before normalising."""
    backbone = _eval_backbone("test_efficientnet")
    cfg = resolve_data_config(backbone, 64)
    pre = GrayToModelInput(cfg.mean, cfg.std)
    x = _images(2, 64)
    with torch.no_grad():
        prob, _ = TTAClassifier(backbone, cfg, DEFAULT_VIEWS)(x)
        unit = x.float() / 255
        per_view = []
        for view in DEFAULT_VIEWS:
            theta = torch.tensor(view.theta, dtype=torch.float32).expand(2, 2, 3)
            grid = F.affine_grid(theta, [2, 1, 64, 64], align_corners=False)
            warped = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            per_view.append(torch.sigmoid(backbone(pre.normalise(warped)).squeeze(1)))
    torch.testing.assert_close(prob, torch.stack(per_view).mean(0), atol=1e-5, rtol=0)
    # The views really differ: a model averaging five identical views would not notice a bad grid.
    assert torch.stack(per_view).std(0).max() > 1e-4


def _autograd_grad_cam(backbone: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = backbone.forward_features(x).detach().requires_grad_(True)
    logit = backbone.forward_head(features).squeeze(1)
    (grads,) = torch.autograd.grad(logit.sum(), features)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * features).sum(1)), features.detach(), logit.detach()


@pytest.mark.parametrize(("arch", "size"), [("test_resnet", 128), ("test_efficientnet", 128), ("densenet121", 64)])
def test_cam_equals_autograd_grad_cam(arch: str, size: int) -> None:
    backbone = _eval_backbone(arch)
    cfg = resolve_data_config(backbone, size)
    x = _images(2, size)
    gradcam, features, logit = _autograd_grad_cam(backbone, GrayToModelInput(cfg.mean, cfg.std)(x))
    with torch.no_grad():
        _, cam = TTAClassifier(backbone, cfg, views_by_name(["identity"]))(x)
        head = backbone.get_classifier()
        raw = F.conv2d(features, head.weight.view(1, -1, 1, 1)).squeeze(1)
    z = features.shape[2] * features.shape[3]
    # Σ_k w_k A_k is Z times Grad-CAM's Σ_k α_k A_k, and its spatial mean plus the bias is the logit.
    torch.testing.assert_close(F.relu(raw), z * gradcam, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(raw.mean(dim=(1, 2)) + head.bias, logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam, normalise_cam(gradcam), atol=1e-5, rtol=0)
    assert cam.amax(dim=(1, 2)).min() > 0.99 and cam.min() >= 0
    assert cam.shape == (2, features.shape[2], features.shape[3])


def test_ensemble_is_the_weighted_sum_and_resizes_cams() -> None:
    first = _eval_backbone("test_resnet")
    torch.manual_seed(1)
    second = timm.create_model("test_resnet", pretrained=False, num_classes=1, output_stride=16).eval()
    cfg = resolve_data_config(first, 64)
    members = [TTAClassifier(first, cfg), TTAClassifier(second, cfg)]
    x = _images(3, 64)
    with torch.no_grad():
        (p1, c1), (p2, c2) = members[0](x), members[1](x)
        prob, cam = DERNetEnsemble(members, (0.7, 0.3))(x)
    assert c1.shape == (3, 2, 2) and c2.shape == (3, 4, 4) and cam.shape == (3, 4, 4)
    torch.testing.assert_close(prob, 0.7 * p1 + 0.3 * p2, atol=1e-6, rtol=0)
    up = F.interpolate(c1.unsqueeze(1), size=(4, 4), mode="bilinear", align_corners=False).squeeze(1)
    torch.testing.assert_close(cam, normalise_cam(0.7 * up + 0.3 * c2), atol=1e-6, rtol=0)


def test_ensemble_refuses_mixed_input_sizes() -> None:
    backbone = _eval_backbone("test_resnet")
    members = [TTAClassifier(backbone, resolve_data_config(backbone, s)) for s in (64, 96)]
    with pytest.raises(ValueError, match="input size"):
        DERNetEnsemble(members, (0.5, 0.5))


def test_pretrained_weights_load_without_the_head(tmp_path: Path) -> None:
    torch.manual_seed(3)
    imagenet = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    weights = tmp_path / "test_resnet.pth"
    torch.save(imagenet.state_dict(), weights)
    model = build_backbone("test_resnet", pretrained=weights)
    for name, tensor in imagenet.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[name], tensor, atol=0, rtol=0)
    assert model.fc.weight.shape == (1, model.num_features)

    with pytest.raises(CheckpointError, match="do not fit"):
        build_backbone("resnet10t", pretrained=weights)
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("test_resnet", pretrained=tmp_path / "missing.pth")


def test_all_zero_features_give_an_all_zero_cam() -> None:
    cam = normalise_cam(torch.zeros(2, 3, 3))
    assert torch.equal(cam, torch.zeros(2, 3, 3)) and not math.isnan(cam.sum().item())


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_a_zeroed_head_starts_training_at_probability_one_half(arch: str) -> None:
    backbone = build_backbone(arch).eval()
    assert backbone.get_classifier().weight.abs().max() > 0
    with torch.no_grad():
        prob, _ = TTAClassifier(zero_head(backbone), resolve_data_config(backbone, 64))(_images(2, 64))
    assert torch.equal(prob, torch.full((2,), 0.5))


def test_output_stride_16_doubles_the_cam_grid_with_the_same_weights() -> None:
    plain, dilated = build_backbone("test_resnet").eval(), build_backbone("test_resnet", output_stride=16).eval()
    assert plain.state_dict().keys() == dilated.state_dict().keys()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert plain.forward_features(x).shape[-2:] == (2, 2)
        assert dilated.forward_features(x).shape[-2:] == (4, 4)


def test_an_output_stride_the_arch_lacks_is_a_clear_error() -> None:
    with pytest.raises(ArchitectureError, match=r"output_stride=16.*set output_stride 32"):
        build_backbone("densenet121", output_stride=16)
    with pytest.raises(ArchitectureError, match="use 32, 16 or 8"):
        build_backbone("test_resnet", output_stride=12)


def test_a_checkpoint_rebuilds_with_the_stride_it_was_trained_with(tmp_path: Path) -> None:
    from spine_edge.training.checkpoints import ClassifierMeta, load_classifier_checkpoint, save_classifier_checkpoint
    from spine_edge.training.models import backbone_from_checkpoint
    from spine_edge.training.profiles import ClassifierRecipe

    recipe = ClassifierRecipe("test_resnet", input_size=64, batch_size=2, epochs=1, output_stride=16)
    model = build_backbone("test_resnet", output_stride=16)
    meta = ClassifierMeta(
        arch="test_resnet",
        input_size=64,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        interpolation="bilinear",
        in_chans=3,
        recipe=recipe.to_dict(),
        data_fingerprint="x",
        val_metrics={},
        tta_views=("identity",),
        epoch=1,
    )
    path = save_classifier_checkpoint(tmp_path / "classifier_test_resnet.pt", model.state_dict(), meta)
    rebuilt = backbone_from_checkpoint(load_classifier_checkpoint(path))
    with torch.no_grad():
        assert rebuilt.forward_features(torch.zeros(1, 3, 64, 64)).shape[-2:] == (4, 4)
