"""LIME and CAM explanations through the bundle's classifier graph, the pointing game, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spine_edge.cli import main
from spine_edge.explain import (
    ClassifierRunner,
    ExplainConfig,
    LimeConfig,
    evaluate_pointing,
    explain_cam,
    explain_lime,
    perturb,
    pointing_game,
    superpixels,
    upsample_cam,
)
from spine_edge.preprocess import letterbox
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

# The tiny bundle's classifier: prob = sigmoid(10 (max cell brightness - 0.5)) over an 8 x 8 grid of a
# 64-px canvas, so the evidence for "abnormal" is exactly the brightest region.
SIZE, GRID = 64, 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("explain_bundle"), classifier_size=SIZE, cam_grid=GRID)


@pytest.fixture(scope="module")
def config(bundle: Path) -> ExplainConfig:
    return ExplainConfig(bundle=bundle, precision="fp32", backend="onnxruntime", provider="cpu",
                         lime=LimeConfig(samples=120, segments=30, batch_size=16), progress=False)  # fmt: skip


def _lesion_image(rng: np.random.Generator, centre: tuple[int, int], shape: tuple[int, int] = (256, 192)) -> np.ndarray:
    """A dim textured image with one bright disc (the "lesion") at ``centre`` (x, y)."""
    image = np.clip(rng.normal(60, 8, shape), 0, 255).astype(np.uint8)
    cv2.circle(image, centre, 22, 250, -1)
    return image


def _runner(config: ExplainConfig):  # type: ignore[no-untyped-def]
    from spine_edge.explain import open_classifier

    return open_classifier(config)


def test_perturb_hides_superpixels_with_their_mean_and_keeps_padding() -> None:
    canvas, placement = letterbox(_lesion_image(np.random.default_rng(0), (96, 128)), SIZE)
    labels = superpixels(canvas, placement, LimeConfig(segments=20))
    assert labels.min() == -1 and labels.max() >= 5  # padding marked, several superpixels
    assert (labels[:, SIZE // 2] >= 0).all()  # a content column is fully labelled (padding is left/right)
    present = np.zeros((2, labels.max() + 1), bool)
    present[0] = True
    out = perturb(canvas, labels, present)
    np.testing.assert_array_equal(out[0], canvas)
    np.testing.assert_array_equal(out[1][labels < 0], canvas[labels < 0])
    region = labels == 0
    assert np.ptp(out[1][region]) == 0 and abs(int(out[1][region][0]) - canvas[region].mean()) <= 0.5


def test_lime_and_cam_point_at_the_bright_lesion(config: ExplainConfig) -> None:
    rng = np.random.default_rng(1)
    image = _lesion_image(rng, (140, 60))
    with _runner(config) as runner:
        assert isinstance(runner, ClassifierRunner)
        lime = explain_lime(runner, image, config.lime)
        cam = explain_cam(runner, image)
    box = [(118.0, 38.0, 162.0, 82.0)]
    assert pointing_game("lime", [lime], [box]).hits == 1
    assert pointing_game("cam", [cam], [box]).hits == 1
    assert lime.hottest.weight > 0 and lime.details["samples"] == 120 and lime.details["r2"] > 0.3
    assert lime.heatmap.shape == image.shape and lime.labels.shape == image.shape
    # 256 x 192 fills 6 of the 8 cell columns: cells wholly in the padding are no regions of the image.
    assert cam.details["cam_shape"] == [GRID, GRID] and len(cam.regions) == GRID * 6
    assert lime.probability == pytest.approx(cam.probability, abs=1e-6)
    # The same seed gives the same weights.
    with _runner(config) as runner:
        again = explain_lime(runner, image, config.lime)
    assert [r.weight for r in again.regions] == [r.weight for r in lime.regions]


def test_upsampled_cam_is_smooth_and_in_range() -> None:
    cam = np.zeros((8, 8), np.float32)
    cam[2, 5] = 1.0
    _, placement = letterbox(np.zeros((256, 192), np.uint8), SIZE)
    up = upsample_cam(cam, placement)
    assert up.shape == (256, 192) and up.min() >= 0 and up.max() <= 1
    # Bicubic: no flat 32-px blocks, many distinct values.
    assert len(np.unique(np.round(up, 4))) > 100


def test_pointing_game_random_baseline_is_exact() -> None:
    from spine_edge.explain import Explanation, Region

    regions = tuple(Region(i, float(10 - i), (10.0 + 20 * i, 10.0), (0, 0, 1, 1), 1.0) for i in range(4))
    explanation = Explanation("x", "cam", 0.9, regions, np.zeros((1, 1)), np.zeros((1, 1), np.int32), 0.0)
    score = pointing_game("cam", [explanation, explanation], [[(0, 0, 35, 20)], []])
    assert (score.images, score.hits, score.random_baseline) == (1, 1, 0.5)


def _vindr(root: Path, rng: np.random.Generator) -> Path:
    rows = ["image_id,study_id,series_id,rad_id,lesion_type,xmin,ymin,xmax,ymax"]
    for i in range(3):
        centre = (40 + 50 * i, 60 + 40 * i)
        write_test_dicom(root / "test_images" / f"img{i}.dicom", (_lesion_image(rng, centre).astype(np.uint16) * 16))
        x, y = centre
        rows.append(f"img{i},s{i},r{i},R1,Osteophytes,{x - 20},{y - 20},{x + 20},{y + 20}")
    write_test_dicom(root / "train_images" / "t0.dicom", _lesion_image(rng, (50, 50)).astype(np.uint16) * 16)
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "test.csv").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "train.csv").write_text(rows[0] + "\nt0,s9,r9,R1,No finding,,,,\n")
    return root


def test_evaluate_pointing_on_a_vindr_folder(tmp_path: Path, config: ExplainConfig) -> None:
    root = _vindr(tmp_path / "vindr", np.random.default_rng(2))
    report = evaluate_pointing(root, config, max_images=None)
    by_method = {s.method: s for s in report.scores}
    assert by_method["cam"].images == 3 and by_method["lime"].images == 3
    assert by_method["cam"].hits == 3 and by_method["lime"].hits >= 2
    assert by_method["cam"].random_baseline < 0.2  # one 40-px box among 64 cells


def test_cli_explains_dicom_and_png_and_evaluates(tmp_path: Path, bundle: Path) -> None:
    rng = np.random.default_rng(3)
    png = tmp_path / "in" / "lesion.png"
    png.parent.mkdir()
    cv2.imwrite(str(png), _lesion_image(rng, (60, 180)))
    dicom = write_test_dicom(tmp_path / "in" / "lesion.dicom", _lesion_image(rng, (60, 180)).astype(np.uint16) * 16)
    common = ["--bundle", str(bundle), "--precision", "fp32", "--backend", "onnxruntime", "--provider", "cpu"]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(png), str(dicom), "--samples", "60", "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    assert "about" in result.output  # the time estimate comes first
    for stem in ("lesion",):
        record = json.loads((out / f"{stem}.lime.json").read_text())
        assert record["method"] == "lime" and record["samples"] == 60 and record["regions"]
        picture = cv2.imread(str(out / f"{stem}.lime.png"))
        assert picture.shape[0] == 256 and picture.shape[1] > 192  # image + colour bar
    result = CliRunner().invoke(main, ["explain", str(png), "--method", "cam", "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lesion.cam.json").read_text())["cam_shape"] == [GRID, GRID]
    root = _vindr(tmp_path / "vindr", rng)
    result = CliRunner().invoke(main, ["explain", str(root), "--eval", "--samples", "40", "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    assert "random baseline" in result.output
    scores = json.loads((out / "pointing_game.json").read_text())["scores"]
    assert {s["method"] for s in scores} == {"cam", "lime"}
