"""The cascade decodes JPEG 2000 at the resolution its models use and reports boxes in original pixels.

A 1400 x 1100 JPEG 2000 DICOM (lossless, 5 levels) through the tiny bundle with a 320 px detector:
the cascade asks the reader for a 320 px long side, which keeps twice that (``DECODE_COVER``), so the
image decodes at level 1 (700 x 550).
The same file decoded at full size must give the same decision and the same boxes within a few
original pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spine_edge import j2k
from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.imageio import Radiograph
from spine_edge.results import CascadeResult, decode_scale
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

pytestmark = pytest.mark.skipif(not j2k.decoder_available(), reason="no libopenjp2 found for spine_edge.j2k")

H, W = 1400, 1100
DETECTOR_SIZE = 320
#: The bright plate, in original pixels: it covers detector cell (row 1, column 1) of the 4 x 4 grid
#: (canvas 80-160 at scale 320/1400, 34 px of padding left and right: x 201-551, y 350-700).
PLATE = (180, 330, 580, 720)
MODEL = {"precision": "fp32", "backend": "onnxruntime", "provider": "cpu", "guard": False, "threads": 1}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"), classifier_size=64, detector_size=DETECTOR_SIZE)


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smooth, dim 12-bit background (texture for the wavelets) with one bright plate."""
    yy, xx = np.mgrid[0:H, 0:W]
    pixels = 900 + 0.4 * xx + 0.3 * yy + 150 * np.sin(xx / 37.0) * np.cos(yy / 29.0)
    x0, y0, x1, y1 = PLATE
    pixels[y0:y1, x0:x1] = 4095
    path = tmp_path_factory.mktemp("in") / "big.dcm"
    return write_test_dicom(
        path, np.clip(pixels, 0, 4095).astype(np.uint16), window=(2048, 4096), transfer_syntax="jpeg2000-lossless"
    )


def _predict(bundle: Path, path: Path, **settings: object) -> tuple[CascadeResult, int | None]:
    with Cascade.from_config(CascadeConfig(bundle=bundle, **MODEL, **settings)) as cascade:  # type: ignore[arg-type]
        return cascade.predict(path), cascade.decode_long_side


def test_reduced_decode_matches_the_full_decode(bundle: Path, radiograph: Path) -> None:
    reduced, long_side = _predict(bundle, radiograph)
    full, full_side = _predict(bundle, radiograph, full_resolution=True)
    assert (long_side, full_side) == (DETECTOR_SIZE, None)  # the larger model input, classifier 64
    assert reduced.ok and full.ok
    assert reduced.image_size == full.image_size == (H, W)  # records speak of the original image
    assert reduced.decoded_size == (700, 550) and full.decoded_size == (H, W)
    assert reduced.image is not None and reduced.image.shape == (700, 550)
    assert reduced.decision is full.decision is True
    assert reduced.probability == pytest.approx(full.probability, abs=1e-3)
    assert [d.class_id for d in reduced.detections] == [d.class_id for d in full.detections] == [0]
    assert reduced.detections[0].score == pytest.approx(full.detections[0].score, abs=1e-2)
    np.testing.assert_allclose(reduced.detections[0].box, full.detections[0].box, atol=3.0)
    # The box lies around the plate's detector cell, in original pixels (not in the 700 x 550 image's).
    x0, y0, x1, y1 = full.detections[0].box
    assert x0 < 300 < 450 < x1 and y0 < 450 < 600 < y1 and x1 > 550
    assert reduced.to_dict()["image_size"] == [H, W] and reduced.to_dict()["decoded_size"] == [700, 550]


def test_boxes_drawn_on_the_reduced_image_are_scaled_to_it(bundle: Path, radiograph: Path) -> None:
    reduced, _ = _predict(bundle, radiograph)
    assert decode_scale(reduced.image_size or (0, 0), reduced.decoded_size or (0, 0)) == 0.5
    drawn = reduced.detections_on_image()[0].box
    original = reduced.detections[0].box
    # Decoded pixel i is centred on original pixel 2 i: x_d = (x_o - 0.5) / 2 + 0.5.
    assert drawn == pytest.approx(tuple(min(max((v - 0.5) / 2 + 0.5, 0.0), 700) for v in original))
    rad = Radiograph(
        image=np.zeros((700, 550), np.uint8),
        path="",
        kind="dicom",
        bits_stored=12,
        photometric="MONOCHROME2",
        pixel_spacing=None,
        original_dtype="uint16",
        source_shape=(H, W),
        windowing="window",
        level=1,
        scale=0.5,
    )
    np.testing.assert_allclose(rad.boxes_to_original(np.array([drawn])), [original], atol=1e-3)  # round trip


def test_the_budget_and_the_reader_are_asked_for_the_same_long_side(
    bundle: Path, radiograph: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spine_edge.imageio

    asked: list[int | None] = []
    real_plan = spine_edge.imageio._plan_read

    def plan(path: Path, target: int | None) -> object:
        asked.append(target)  # one plan per read: its cost and its decode come from the same long side
        return real_plan(path, target)

    monkeypatch.setattr(spine_edge.imageio, "_plan_read", plan)
    with Cascade.from_config(CascadeConfig(bundle=bundle, **MODEL)) as cascade:  # type: ignore[arg-type]
        assert [r.ok for r in cascade.predict_many([radiograph, radiograph])] == [True, True]
    assert asked == [DETECTOR_SIZE] * 2
