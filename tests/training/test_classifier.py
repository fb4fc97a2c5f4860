"""Training of one DERNet member on the tiny cache: recipe, checkpoints, log, resume."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from spine_edge.errors import DatasetError
from spine_edge.training.checkpoints import CheckpointError, load_train_state
from spine_edge.training.classifier import build_training_components, size_for_epoch, train_classifier
from spine_edge.training.datasets import GrayAugment
from spine_edge.training.models import build_backbone, tta_classifier_from_checkpoint
from spine_edge.training.profiles import ClassifierRecipe, get_profile
from spine_edge.tta import DEFAULT_VIEWS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE = replace(get_profile("tiny").classifier("test_resnet"), lr=2e-3, weight_decay=3e-4, t_max=5)


@pytest.fixture(scope="module")
def one_epoch(
    single_thread: None, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ckpt")
    return out, train_classifier(tiny_prepared, out, RECIPE, seed=0, profile_name="tiny", progress=False)


def test_recipe_builds_adamw_cosine_and_bce() -> None:
    parts = build_training_components(build_backbone("test_resnet"), RECIPE)
    assert type(parts.optimizer) is torch.optim.AdamW
    group = parts.optimizer.param_groups[0]
    assert group["lr"] == 2e-3 and group["weight_decay"] == 3e-4
    assert type(parts.scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR and parts.scheduler.T_max == 5
    assert type(parts.loss) is torch.nn.BCEWithLogitsLoss


def test_the_run_used_the_recipe(one_epoch: tuple[Path, object]) -> None:
    _, result = one_epoch
    state = load_train_state(result.state)
    group = state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 2e-3 and group["weight_decay"] == 3e-4 and group["amsgrad"] is False
    assert state["scheduler"]["T_max"] == 5 and state["scheduler"]["last_epoch"] == 1
    # One cosine step of T_max 5 from 2e-3: 1e-3 * (1 + cos(pi / 5)).
    assert group["lr"] == pytest.approx(1e-3 * (1 + 0.8090169943749475))
    assert result.history[0].lr == 2e-3


def test_progressive_sizes_split_the_epochs_equally() -> None:
    effnet = get_profile("paper").classifier("tf_efficientnetv2_s")
    sizes = [size_for_epoch(effnet, e) for e in range(effnet.epochs)]
    assert sizes == [128] * 20 + [256] * 20 + [384] * 20
    assert size_for_epoch(get_profile("paper").classifier("resnet50"), 0) == 384


def test_checkpoint_log_and_metadata(one_epoch: tuple[Path, object], tiny_prepared: Path) -> None:
    out, result = one_epoch
    assert result.checkpoint == out / "classifier_test_resnet.pt" and result.epochs_run == 1 and result.best_epoch == 1
    with (out / "logs" / "test_resnet.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1] and float(rows[0]["val_auroc"]) == pytest.approx(
        result.best_val_auroc, abs=1e-5
    )

    payload = torch.load(result.checkpoint, weights_only=True)
    meta = payload["meta"]
    assert payload["format"] == "spine-edge-classifier/1" and payload["arch"] == "test_resnet"
    assert meta["input_size"] == 64 and meta["in_chans"] == 3 and meta["epoch"] == 1
    timm_cfg = timm.data.resolve_model_data_config(timm.create_model("test_resnet", pretrained=False))
    assert meta["mean"] == list(timm_cfg["mean"]) and meta["std"] == list(timm_cfg["std"])
    assert meta["data_fingerprint"] == json.loads((tiny_prepared / "prepare.json").read_text())["fingerprint"]
    assert meta["tta_views"] == [v.name for v in DEFAULT_VIEWS]
    assert meta["recipe"]["lr"] == 2e-3 and meta["recipe"]["arch"] == "test_resnet"
    assert meta["val_metrics"]["auroc"] == pytest.approx(result.best_val_auroc) and meta["val_metrics"]["n"] == 12

    model = tta_classifier_from_checkpoint(result.checkpoint)
    prob, cam = model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    assert prob.shape == (2,) and cam.shape == (2, 2, 2) and model.view_names == tuple(meta["tta_views"])


def test_checkpoint_loads_weights_only_without_spine_edge(one_epoch: tuple[Path, object]) -> None:
    _, result = one_epoch
    code = (
        "import json, sys, torch\n"
        f"ck = torch.load({str(result.checkpoint)!r}, map_location='cpu', weights_only=True)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('training', 'spine_edge', 'timm')]\n"
        "print(json.dumps({'arch': ck['arch'], 'n': len(ck['state_dict']), 'epoch': ck['meta']['epoch']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (
        info["arch"] == "test_resnet"
        and info["epoch"] == 1
        and info["n"] == len(build_backbone("test_resnet").state_dict())
    )


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(
    one_epoch: tuple[Path, object], tiny_prepared: Path, tmp_path: Path
) -> None:
    out, first = one_epoch
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    two = replace(RECIPE, epochs=2, patience=5)
    resumed = train_classifier(tiny_prepared, resumed_dir, two, resume=True, seed=0, progress=False)
    straight = train_classifier(tiny_prepared, tmp_path / "straight", two, seed=0, progress=False)

    assert [r.epoch for r in resumed.history] == [1, 2] and resumed.epochs_run == 2
    assert resumed.history[0] == first.history[0]
    assert load_train_state(resumed.state)["scheduler"]["last_epoch"] == 2
    for a, b in zip(resumed.history, straight.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4) and a.val_auroc == pytest.approx(
            b.val_auroc, abs=1e-6
        )
    weights_a = load_train_state(resumed.state)["model"]
    weights_b = load_train_state(straight.state)["model"]
    for name, tensor in weights_a.items():
        torch.testing.assert_close(tensor, weights_b[name], atol=1e-4, rtol=1e-4)

    # A finished run resumed with the same recipe does nothing more.
    again = train_classifier(tiny_prepared, resumed_dir, two, resume=True, seed=0, progress=False)
    assert again.epochs_run == 2 and len(again.history) == 2


def test_resume_refuses_another_recipe(one_epoch: tuple[Path, object], tiny_prepared: Path, tmp_path: Path) -> None:
    out, _ = one_epoch
    shutil.copytree(out, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"\['lr'\]"):
        train_classifier(tiny_prepared, tmp_path / "c", replace(RECIPE, lr=1e-2, epochs=2), resume=True, progress=False)


def test_progressive_resizing_trains_at_each_size(tiny_prepared: Path, tmp_path: Path) -> None:
    recipe = ClassifierRecipe("test_resnet", input_size=64, batch_size=8, epochs=2, t_max=2, progressive_sizes=(48, 64))
    result = train_classifier(tiny_prepared, tmp_path, recipe, progress=False)
    assert [r.size for r in result.history] == [48, 64]
    assert torch.load(result.checkpoint, weights_only=True)["meta"]["input_size"] == 64


def test_single_class_validation_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    bad = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, bad)
    lines = (bad / "classification.csv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if ",val,1," not in line]
    (bad / "classification.csv").write_text("\n".join(kept) + "\n")
    with pytest.raises(DatasetError, match="every 'val' image is normal"):
        train_classifier(bad, tmp_path / "ckpt", RECIPE, progress=False)


def test_missing_cache_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"prepare\.json: not found.*spine-edge data prepare"):
        train_classifier(tmp_path, tmp_path / "ckpt", RECIPE, progress=False)


def test_augmentation_flips_rotates_with_black_fill_and_blurs() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (64, 64), dtype=np.uint8)
    base = ClassifierRecipe("x", 64, 4, 1, hflip_p=0.0, rotation_deg=0.0, color_jitter=0.0, blur_p=0.0)

    torch.manual_seed(0)
    assert np.array_equal(GrayAugment(base, 64)(image), image)
    assert np.array_equal(GrayAugment(replace(base, hflip_p=1.0), 64)(image), image[:, ::-1])

    rotate = GrayAugment(replace(base, rotation_deg=15.0), 64)
    corners = [rotate(np.full((64, 64), 200, np.uint8))[[0, 0, -1, -1], [0, -1, 0, -1]] for _ in range(10)]
    # Angles of at least 1.5° (nine draws in ten) push every corner outside the source: black fill.
    assert sum(bool((c == 0).all()) for c in corners) >= 8

    # σ is drawn from [0.1, size / 128]: at 256 px up to 2 px, which smooths pixel noise strongly.
    noise = rng.integers(60, 200, (256, 256), dtype=np.uint8)
    blur = GrayAugment(replace(base, blur_p=1.0), 256)
    ratios = [blur(noise).std() / noise.std() for _ in range(10)]
    assert max(ratios) <= 1.0 and np.mean(ratios) < 0.7

    jittered = [GrayAugment(replace(base, color_jitter=0.2), 64)(image) for _ in range(10)]
    ratios = [float(j.mean()) / float(image.mean()) for j in jittered]
    assert all(0.79 <= r <= 1.21 for r in ratios) and max(ratios) - min(ratios) > 0.02
