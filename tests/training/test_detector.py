"""Detector training: the recipe reaches ultralytics, the three additions work, outputs load anywhere.

One tiny training run happens in a subprocess with the network cut off (it also proves that
nothing is downloaded); the other tests set a trainer up in-process without training it.
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import random
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import DatasetError, SpineEdgeError
from spine_edge.training.detector import read_prepared_cache, train_detector
from spine_edge.training.profiles import get_profile

REPO = Path(__file__).resolve().parents[2]
RARE = CLASS_NAMES.index("Vertebral collapse")
# Per training image: (class, x, y, w, h) boxes in pixels of a 96 x 128 image; the last is normal.
TRAIN_BOXES = [
    [(0, 10, 10, 20, 14)],
    [(0, 12, 40, 18, 16), (4, 60, 20, 24, 12)],
    [(0, 8, 60, 20, 16), (RARE, 80, 30, 22, 26)],
    [(4, 30, 30, 26, 12)],
    [(0, 70, 10, 16, 16)],
    [(0, 20, 20, 20, 20), (4, 60, 60, 30, 14)],
    [(RARE, 40, 50, 18, 28)],
    [],
]
VAL_BOXES = [[(0, 10, 10, 20, 14), (4, 50, 40, 26, 12)], [(RARE, 60, 30, 20, 24)], [(0, 30, 50, 18, 18)]]


def _write_split(root: Path, split: str, boxes_per_image: list, rng: np.random.Generator) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    h, w = 96, 128
    for i, boxes in enumerate(boxes_per_image):
        image = rng.integers(10, 50, size=(h, w), dtype=np.uint8)
        lines = []
        for cls, x, y, bw, bh in boxes:
            # A textured patch, so that a pasted crop can be told apart from the background.
            image[y : y + bh, x : x + bw] = 140 + rng.integers(0, 100, size=(bh, bw), dtype=np.uint8)
            lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        cv2.imwrite(str(root / "images" / split / f"{split}{i}.png"), image)
        (root / "labels" / split / f"{split}{i}.txt").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared cache in the documented layout: 8 train and 3 val 128x96 gray PNGs."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    _write_split(root, "train", TRAIN_BOXES, rng)
    _write_split(root, "val", VAL_BOXES, rng)
    spec = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(CLASS_NAMES))}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    meta = {"version": 1, "long_side": 128, "seed": 0, "class_names": list(CLASS_NAMES), "fingerprint": "f1ng3r"}
    (root / "prepare.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spine_edge_config")


@pytest.fixture(scope="module")
def ext(config_dir: Path):
    """spine_edge.training.yolo_ext, with ultralytics configured to use a test config dir (when first imported here)."""
    from spine_edge.training.detector import import_yolo_extensions

    return import_yolo_extensions(config_dir)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _clean_env(config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["SPINE_EDGE_CONFIG_DIR"] = str(config_dir)
    return env


@pytest.fixture(scope="module")
def tiny_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train the tiny profile in a fresh process whose sockets all raise, then draw a plot label."""
    work = tmp_path_factory.mktemp("tiny_run")
    out, cwd, config = work / "out", work / "cwd", work / "config"
    cwd.mkdir()
    before = _tree(prepared)
    script = textwrap.dedent(
        f"""
        import json, socket, sys
        from dataclasses import asdict, replace
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args[1:] if len(args) > 1 else args))
            raise OSError("network disabled by the test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.getaddrinfo = refuse
        socket.create_connection = refuse
        from spine_edge.training.detector import train_detector
        from spine_edge.training.profiles import get_profile
        recipe = get_profile("tiny").detector
        result = train_detector(Path({str(prepared)!r}), Path({str(out)!r}), recipe, profile_name="tiny", seed=3)
        # Ultralytics' plots label boxes through this Annotator, which finds (or downloads) Arial.ttf.
        import numpy as np
        from ultralytics.utils.plotting import Annotator
        annotator = Annotator(np.zeros((64, 64, 3), np.uint8), pil=True)
        annotator.box_label([4, 4, 40, 40], "Osteophytes")
        print("RESULT=" + json.dumps({{**asdict(result), "checkpoint": str(result.checkpoint),
                                      "metadata": str(result.metadata), "attempts": attempts,
                                      "plot_font": str(getattr(annotator.font, "path", ""))}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=_clean_env(config), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT="))
    return {
        "result": json.loads(line[len("RESULT=") :]),
        "out": out,
        "cwd": cwd,
        "config": config,
        "prepared_before": before,
        "prepared_after": _tree(prepared),
    }


# ------------------------------------------------------------------------------------------
# The tiny run: outputs, offline, writes only inside OUT and the config dir
# ------------------------------------------------------------------------------------------


def test_tiny_run_writes_checkpoint_and_metadata(tiny_run: dict) -> None:
    out, result = tiny_run["out"], tiny_run["result"]
    assert Path(result["checkpoint"]) == out / "detector.pt" and (out / "detector.pt").stat().st_size > 1_000_000
    meta = json.loads((out / "detector.json").read_text())
    assert meta["arch"] == "yolo11n"
    assert meta["imgsz"] == 64
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["data_fingerprint"] == "f1ng3r"
    assert meta["recipe"] == json.loads(json.dumps(get_profile("tiny").detector.to_dict()))
    assert meta["profile"] == "tiny" and meta["seed"] == 3 and meta["epochs"] == 1
    metrics = meta["val_metrics"]
    assert set(metrics) >= {"map50", "map50_95", "per_class_ap50"}
    # Classes with validation boxes, by name, and nothing else.
    assert set(metrics["per_class_ap50"]) == {"Osteophytes", "Disc space narrowing", "Vertebral collapse"}
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    assert result["map50"] == metrics["map50"] and result["epochs"] == 1 and result["seconds"] > 0
    assert (out / "detector_run" / "weights" / "best.pt").is_file()
    assert (out / "detector_run" / "results.csv").is_file()


def test_tiny_run_is_offline_and_writes_only_out_and_config(tiny_run: dict) -> None:
    assert tiny_run["result"]["attempts"] == []
    # Plot labels use the local font rather than a download (or PIL's fallback bitmap font).
    font = tiny_run["config"] / "ultralytics" / "Ultralytics" / "Arial.ttf"
    assert font.is_file() and tiny_run["result"]["plot_font"] == str(font)
    settings = json.loads((tiny_run["config"] / "ultralytics" / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False and settings["mlflow"] is False
    assert tiny_run["prepared_after"] == tiny_run["prepared_before"]
    assert list(tiny_run["cwd"].iterdir()) == []
    # Ultralytics' label caches went to the linked view inside OUT.
    assert (tiny_run["out"] / "detector_run" / "data" / "labels" / "train.cache").is_file()


def test_checkpoint_loads_without_spine_edge(tiny_run: dict, tmp_path: Path) -> None:
    checkpoint = tiny_run["out"] / "detector.pt"
    with zipfile.ZipFile(checkpoint) as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        ops = list(pickletools.genops(archive.read(pickle_name)))
    strings = [arg for _, arg, _ in ops if isinstance(arg, str)]
    assert "ultralytics.nn.tasks" in strings or "ultralytics.nn.tasks DetectionModel" in strings
    assert not [s for s in strings if s.startswith(("training.", "training ", "spine_edge"))]
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"training", "spine_edge", "export", "benchmarks"}}:
                    raise ModuleNotFoundError(name)
                return None
        sys.meta_path.insert(0, Hide())
        sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        import numpy as np
        from ultralytics import YOLO
        model = YOLO({str(checkpoint)!r})
        result = model.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)[0]
        assert "training" not in sys.modules and "spine_edge" not in sys.modules
        print("NAMES=" + "|".join(model.names[i] for i in sorted(model.names)), "BOXES=", len(result.boxes))
        """
    )
    env = _clean_env(tiny_run["config"])
    env["YOLO_OFFLINE"] = "1"
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "NAMES=" + "|".join(CLASS_NAMES) in proc.stdout


# ------------------------------------------------------------------------------------------
# The recipe reaches ultralytics (a trainer set up in-process, not trained)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(ext, prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    from spine_edge.training.detector import build_detector_trainer

    recipe = replace(
        get_profile("tiny").detector,
        epochs=3,
        batch=2,
        nbs=8,
        close_mosaic=2,
        mosaic=0.5,
        lr0=0.02,
        momentum=0.85,
        weight_decay=4e-4,
        copy_paste_p=0.2,
    )
    trainer = build_detector_trainer(prepared, tmp_path_factory.mktemp("setup_out"), recipe, seed=1)
    trainer._setup_train()  # everything train() does before the first batch
    trainer.recipe = recipe
    return trainer


def test_train_args_reach_ultralytics(trainer) -> None:
    recipe, args = trainer.recipe, trainer.args
    assert (args.optimizer, args.lr0, args.momentum, args.weight_decay) == ("SGD", 0.02, 0.85, 4e-4)
    assert (args.batch, args.nbs, args.epochs, args.imgsz) == (2, 8, 3, 64)
    assert (args.mosaic, args.close_mosaic, args.copy_paste, args.cos_lr) == (0.5, 2, 0.0, True)
    assert (args.hsv_h, args.hsv_s, args.hsv_v, args.fliplr) == (0.015, 0.7, 0.4, 0.5)
    assert args.pretrained is False and args.amp is False
    assert type(trainer.optimizer) is torch.optim.SGD
    assert trainer.accumulate == 4  # nbs 8 / batch 2
    groups = {g["param_group"]: g for g in trainer.optimizer.param_groups}
    assert groups["weight"]["initial_lr"] == pytest.approx(recipe.lr0)
    assert groups["weight"]["momentum"] == pytest.approx(recipe.momentum)
    # ultralytics scales decay by batch * accumulate / nbs, which is 1 here.
    assert groups["weight"]["weight_decay"] == pytest.approx(recipe.weight_decay)
    assert groups["bias"]["weight_decay"] == 0.0


def test_focal_criterion_is_attached_for_training_and_validation(ext, trainer) -> None:
    from ultralytics.utils.torch_utils import unwrap_model

    for model in (unwrap_model(trainer.model), trainer.ema.ema):
        assert isinstance(model.criterion, ext.FocalDetectionLoss)
        assert (model.criterion.bce.gamma, model.criterion.bce.alpha) == (2.0, 0.25)
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    loss, items = trainer.model(batch)
    assert torch.isfinite(loss).all() and set(items) == {"box_loss", "cls_loss", "dfl_loss"}


# ------------------------------------------------------------------------------------------
# Focal loss
# ------------------------------------------------------------------------------------------


def test_focal_loss_matches_formula(ext) -> None:
    logits = [0.0, 2.0, -1.5, 0.7, -3.0]
    targets = [1.0, 0.0, 0.4, 0.9, 0.0]
    gamma, alpha = 2.0, 0.25
    expected = []
    for x, t in zip(logits, targets):
        p = 1.0 / (1.0 + math.exp(-x))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        expected.append(bce * alpha_t * (1 - p_t) ** gamma)
    got = ext.FocalBCE(gamma, alpha)(torch.tensor(logits), torch.tensor(targets))
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Hand value for the first element: p = 0.5, t = 1 -> ln 2 * 0.25 * 0.25.
    assert got[0].item() == pytest.approx(math.log(2) * 0.0625, rel=1e-6)


def test_focal_loss_without_focusing_is_half_bce(ext) -> None:
    logits = torch.linspace(-4, 4, 17).reshape(1, 17, 1).repeat(2, 1, 3)
    targets = torch.rand(2, 17, 3, generator=torch.Generator().manual_seed(0))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(ext.FocalBCE(0.0, 0.5)(logits, targets) * 2, bce)


# ------------------------------------------------------------------------------------------
# Class-balanced sampling
# ------------------------------------------------------------------------------------------


def test_sampling_weights_follow_inverse_sqrt_frequency(ext) -> None:
    images = [np.array([0, 0]), np.array([0, 1]), np.array([0]), np.array([]), np.array([2])]
    # Lesion images: 4. f_0 = 3/4, f_1 = 1/4, f_2 = 1/4.
    weights = ext.image_sampling_weights(images, num_classes=3)
    w0, w_rare = 1 / math.sqrt(0.75), 1 / math.sqrt(0.25)
    np.testing.assert_allclose(weights, [w0, w_rare, w0, w0, w_rare])
    np.testing.assert_allclose(ext.image_sampling_weights([np.array([]), np.array([])], 3), [1.0, 1.0])


def test_balanced_sampler_draws_rare_images_more_often(ext, trainer) -> None:
    sampler = trainer.train_loader.sampler
    dataset = trainer.train_loader.dataset
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler)
    assert sampler.replacement and sampler.num_samples == len(dataset)
    classes = [lb["cls"].ravel().astype(int) for lb in dataset.labels]
    np.testing.assert_allclose(sampler.weights.numpy(), ext.image_sampling_weights(classes, len(CLASS_NAMES)))
    epochs = 2000
    counts = Counter(i for _ in range(epochs) for i in sampler)
    rare = [i for i, c in enumerate(classes) if RARE in c]
    common = [i for i, c in enumerate(classes) if set(c) == {0}]
    assert len(rare) == 2 and len(common) == 2
    per_draw = {i: counts[i] / (epochs * len(dataset)) for i in rare + common}
    total = float(sampler.weights.sum())
    for i in rare + common:  # close to weight / sum of weights (binomial sd here is about 0.003)
        assert per_draw[i] == pytest.approx(float(sampler.weights[i]) / total, abs=0.012)
    # Expected ratio: sqrt(5/2) = 1.58 (Vertebral collapse on 2 of 7 lesion images, Osteophytes on 5).
    assert min(per_draw[i] for i in rare) > 1.35 * max(per_draw[i] for i in common)


# ------------------------------------------------------------------------------------------
# Copy-paste of rare lesions
# ------------------------------------------------------------------------------------------


def test_lesion_bank_holds_rare_crops_at_training_scale(trainer, prepared: Path) -> None:
    bank = trainer.train_loader.dataset.lesion_bank
    assert bank.classes == (RARE, RARE)
    source = cv2.imread(str(prepared / "images" / "train" / "train2.png"), cv2.IMREAD_COLOR)
    _, x, y, w, h = TRAIN_BOXES[2][1]
    scale = 64 / 128  # imgsz / long side
    expected = cv2.resize(source[y : y + h, x : x + w], (round(w * scale), round(h * scale)))
    shapes = {crop.shape for crop in bank.crops}
    assert expected.shape in shapes
    crop = next(c for c in bank.crops if c.shape == expected.shape)
    np.testing.assert_array_equal(crop, expected)


def test_paste_lesions_adds_boxes_over_the_crop_pixels(ext) -> None:
    rng = np.random.default_rng(1)
    crops = (rng.integers(0, 255, (12, 9, 3), dtype=np.uint8), rng.integers(0, 255, (7, 15, 3), dtype=np.uint8))
    bank = ext.LesionBank(crops, (5, 6))
    image = np.full((60, 80, 3), 30, np.uint8)
    existing = np.array([[0.5, 0.5, 0.5, 0.5]], np.float32)  # the centre 40 x 30 block
    seen = set()
    for seed in range(30):
        out, classes, boxes = ext.paste_lesions(image, existing, bank, random.Random(seed))
        assert 1 <= len(classes) <= 2 and (image == 30).all()  # input untouched
        for cls, (cx, cy, w, h) in zip(classes, boxes):
            crop = crops[(5, 6).index(int(cls))]
            x1, y1 = round((cx - w / 2) * 80), round((cy - h / 2) * 60)
            np.testing.assert_array_equal(out[y1 : y1 + crop.shape[0], x1 : x1 + crop.shape[1]], crop)
            assert (round(w * 80), round(h * 60)) == (crop.shape[1], crop.shape[0])
            # Not over the existing box by more than the allowed share of the smaller box.
            ix = max(0, min(x1 + crop.shape[1], 60) - max(x1, 20))
            iy = max(0, min(y1 + crop.shape[0], 45) - max(y1, 15))
            assert ix * iy <= ext.PASTE_MAX_OVERLAP * crop.shape[0] * crop.shape[1] + 1e-6
            seen.add(int(cls))
    assert seen == {5, 6}


def test_dataset_pastes_rare_lesions_before_augmentation(trainer) -> None:
    dataset = trainer.train_loader.dataset
    assert dataset.paste_p == 0.2
    random.seed(4)
    label = dataset.get_image_and_label(0)  # an Osteophytes-only image
    n_before = len(label["cls"])
    pasted = dataset.paste_into(label)
    cls = pasted["cls"].ravel().astype(int)
    assert len(cls) > n_before and set(cls[n_before:]) == {RARE}
    boxes = pasted["instances"].bboxes
    assert len(boxes) == len(cls)
    h, w = pasted["img"].shape[:2]
    crops = {c.shape: c for c in dataset.lesion_bank.crops}
    for cx, cy, bw, bh in boxes[n_before:]:
        corners = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        x1, y1, x2, y2 = (round(v) for v in corners)
        region = pasted["img"][y1:y2, x1:x2]
        np.testing.assert_array_equal(region, crops[region.shape])
    # The sample goes through ultralytics' transforms with the new boxes.
    sample = dataset.transforms(pasted)
    assert sample["img"].shape[0] == 3 and len(sample["cls"]) >= n_before


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_cache_raises_dataset_error(ext, prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"prepare\.json: missing"):
        read_prepared_cache(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prepare.json").write_text((prepared / "prepare.json").read_text())
    (broken / "dataset.yaml").write_text(yaml.safe_dump({"names": ["a", "b"]}))
    with pytest.raises(DatasetError, match="class names"):
        read_prepared_cache(broken)
    with pytest.raises(DatasetError, match="rare_classes"):
        train_detector(prepared, tmp_path / "out", replace(get_profile("tiny").detector, rare_classes=("Nope",)))


def test_refuses_weights_and_finished_resume(ext, tiny_run: dict, prepared: Path) -> None:
    from spine_edge.training.detector import build_detector_trainer

    recipe = get_profile("tiny").detector
    with pytest.raises(SpineEdgeError, match="model YAML"):
        build_detector_trainer(prepared, tiny_run["out"], replace(recipe, model="yolo11n.pt"))
    with pytest.raises(SpineEdgeError, match="already finished"):
        build_detector_trainer(prepared, tiny_run["out"], recipe, resume=True)
    assert (tiny_run["out"] / "detector_run" / "weights" / "last.pt").is_file()  # nothing was deleted
