"""Reduced-resolution JPEG 2000 decoding: level choice, box mapping, fallback and parity."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

from spine_edge import j2k
from spine_edge.errors import ImageReadError
from spine_edge.imageio import Radiograph, read_image, select_level
from spine_edge.preprocess import letterbox
from tests.spine_edge.dicom_factory import build_test_dataset, write_test_dicom

H, W = 200, 296  # levels: 100x148, 50x74, 25x37, ...
# The reader keeps DECODE_COVER (2) times the target: W // 4 decodes at level 1, 32 at level 2.
HALF, QUARTER = W // 4, 32
BOX = (60, 40, 180, 120)  # x0, y0, x1, y1 of a bright plate, in original pixels

pytestmark = pytest.mark.skipif(not j2k.decoder_available(), reason="no libopenjp2 found for spine_edge.j2k")


def phantom() -> np.ndarray:
    """A smooth 12-bit radiograph-like image with one bright rectangular plate."""
    yy, xx = np.mgrid[0:H, 0:W]
    image = 800 + 6 * xx + 3 * yy + 200 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
    x0, y0, x1, y1 = BOX
    image[y0:y1, x0:x1] = 4095
    return np.clip(image, 0, 4095).astype(np.uint16)


@pytest.fixture
def j2k_file(tmp_path: Path) -> Path:
    return write_test_dicom(tmp_path / "p.dcm", phantom(), window=(2000, 4000), transfer_syntax="jpeg2000-lossless")


@pytest.mark.parametrize(
    ("rows", "columns", "levels", "target", "level"),
    [
        (2825, 2295, 5, 640, 2),  # 707 >= 640, 354 < 640
        (1529, 1185, 5, 640, 1),  # 765 >= 640
        (1529, 1185, 5, 384, 1),  # 383 < 384: never go below the target
        (1536, 1185, 5, 384, 2),  # exactly 384
        (600, 400, 5, 640, 0),  # already smaller: full resolution
        (2825, 2295, 1, 256, 1),  # capped by the codestream's levels
        (2825, 2295, 5, None, 0),
        (100_000, 10, 5, 1, 5),
    ],
)
def test_select_level(rows: int, columns: int, levels: int, target: int | None, level: int) -> None:
    assert select_level(rows, columns, levels, target) == level


def test_parse_codestream_reads_siz_and_cod() -> None:
    ds = build_test_dataset(phantom(), transfer_syntax="jpeg2000-lossless")
    info = j2k.parse_codestream(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert (info.rows, info.columns, info.components, info.precision, info.signed) == (H, W, 1, (12,), (False,))
    assert info.levels == 5 and not info.subsampled
    assert info.reduced_shape(1) == (100, 148) and info.reduced_shape(3) == (25, 37)


@pytest.mark.parametrize("data", [b"", b"\xff\x4f", b"\xff\x4f\xff\x51\x00\x29", b"not a codestream"])
def test_parse_codestream_refuses_what_it_cannot_read(data: bytes) -> None:
    with pytest.raises(j2k.CodestreamError):
        j2k.parse_codestream(data)


def test_full_decode_equals_pydicom(j2k_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = build_test_dataset(phantom(), transfer_syntax="jpeg2000-lossless")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    np.testing.assert_array_equal(j2k.decode(frame, 0, np.uint16), pixel_array(ds))
    direct = read_image(j2k_file).image
    monkeypatch.setattr(j2k, "decoder_available", lambda: False)
    np.testing.assert_array_equal(direct, read_image(j2k_file).image)


def test_reduced_read_has_level_scale_and_original_shape(j2k_file: Path) -> None:
    full = read_image(j2k_file)
    half = read_image(j2k_file, target_long_side=HALF)
    quarter = read_image(j2k_file, target_long_side=QUARTER)
    assert (full.level, full.scale, full.image.shape) == (0, 1.0, (H, W))
    assert (half.level, half.scale, half.image.shape) == (1, 0.5, (100, 148))
    assert (quarter.level, quarter.scale, quarter.image.shape) == (2, 0.25, (50, 74))
    assert half.source_shape == quarter.source_shape == (H, W)
    assert half.windowing == full.windowing == "window"


def test_reduced_decode_matches_full_decode_downscaled(j2k_file: Path) -> None:
    # Level r is the wavelet low-pass: a smoothed image sampled at every 2**r-th original pixel.
    full = read_image(j2k_file).image.astype(np.float32)
    for target, level in ((HALF, 1), (QUARTER, 2)):
        reduced = read_image(j2k_file, target_long_side=target)
        assert reduced.level == level
        step = 1 << level
        expected = cv2.GaussianBlur(full, (0, 0), step / 2)[::step, ::step]
        diff = reduced.image.astype(np.float32) - expected
        assert np.median(np.abs(diff)) <= 1.0 and abs(diff.mean()) < 1.0, (np.median(np.abs(diff)), diff.mean())


def test_boxes_from_a_reduced_decode_map_back_to_original_pixels(j2k_file: Path) -> None:
    reduced = read_image(j2k_file, target_long_side=QUARTER)
    canvas, placement = letterbox(reduced.image, 96)
    ys, xs = np.nonzero(canvas >= 240)  # the plate, as a detector would box it on the canvas
    canvas_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    original = reduced.boxes_to_original(placement.boxes_to_source(canvas_box))
    tolerance = 2 / (reduced.scale * placement.scale)  # two canvas pixels, in original pixels
    np.testing.assert_allclose(original[0], BOX, atol=tolerance)


def test_boxes_to_original_scales_and_clips() -> None:
    rad = Radiograph(
        image=np.zeros((50, 74), np.uint8), path="x", kind="dicom", bits_stored=12, photometric="MONOCHROME2",
        pixel_spacing=None, original_dtype="uint16", source_shape=(H, W), windowing="window", level=2, scale=0.25,
    )  # fmt: skip
    boxes = rad.boxes_to_original(np.array([[1, 2, 10, 20], [70, 40, 74, 50], [0, 0, 0.5, 0.5]]))
    np.testing.assert_array_equal(boxes, [[2.5, 6.5, 38.5, 78.5], [278.5, 158.5, W, H], [0, 0, 0.5, 0.5]])
    assert rad.boxes_to_original(np.zeros((0, 4))).shape == (0, 4)


def test_a_failing_level_falls_back_to_the_next_larger(j2k_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = j2k.decode
    attempts: list[int] = []

    def flaky(data: bytes, reduce: int = 0, dtype: object = np.int32) -> np.ndarray:
        attempts.append(reduce)
        if reduce == 2:
            raise j2k.DecodeError("decoding failed (OpenJPEG: broken data stream)")
        return real(data, reduce, dtype)  # type: ignore[arg-type]

    monkeypatch.setattr(j2k, "decode", flaky)
    rad = read_image(j2k_file, target_long_side=QUARTER)
    assert attempts == [2, 1] and (rad.level, rad.scale, rad.image.shape) == (1, 0.5, (100, 148))


def test_when_every_level_fails_the_reason_lists_them(j2k_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, reduce: int = 0, dtype: object = np.int32) -> np.ndarray:
        raise j2k.DecodeError(f"decoding failed at {reduce}")

    monkeypatch.setattr(j2k, "decode", broken)
    with pytest.raises(ImageReadError) as info:
        read_image(j2k_file, target_long_side=HALF)
    assert "level 1: decoding failed at 1; level 0: decoding failed at 0" in info.value.reason
    assert "damaged or truncated" in info.value.reason


def test_without_libopenjp2_the_full_resolution_path_is_used(j2k_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j2k, "decoder_available", lambda: False)
    rad = read_image(j2k_file, target_long_side=QUARTER)
    assert (rad.level, rad.scale, rad.image.shape) == (0, 1.0, (H, W))


def test_other_formats_ignore_the_target(tmp_path: Path) -> None:
    native = read_image(write_test_dicom(tmp_path / "n.dcm", phantom(), window=(2000, 4000)), target_long_side=QUARTER)
    assert (native.level, native.scale, native.image.shape) == (0, 1.0, (H, W))


@pytest.mark.parametrize("target", [0, -5, True])
def test_target_must_be_positive(j2k_file: Path, target: int) -> None:
    with pytest.raises(ValueError, match="target_long_side"):
        read_image(j2k_file, target_long_side=target)


def test_decoder_reports_its_version() -> None:
    version = j2k.decoder_version()
    assert version is not None and tuple(int(p) for p in version.split(".")[:2]) >= (2, 3)


def test_openjpeg_threads_decode_the_same_samples() -> None:
    ds = build_test_dataset(phantom(), transfer_syntax="jpeg2000-lossless")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    for level in (0, 1, 2):
        one = j2k.decode(frame, level, np.uint16, threads=1)
        np.testing.assert_array_equal(j2k.decode(frame, level, np.uint16, threads=2), one)
        np.testing.assert_array_equal(j2k.decode(frame, level, np.uint16), one)  # automatic


def test_decode_threads_share_the_cpus_between_running_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j2k, "_cpus", lambda: 8)
    monkeypatch.delenv("SPINE_EDGE_J2K_THREADS", raising=False)
    assert [j2k.decode_threads(n) for n in (1, 2, 3, 8, 20)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("SPINE_EDGE_J2K_THREADS", "2")
    assert j2k.decode_threads(1) == 2 and j2k.decode_threads(8) == 1
    monkeypatch.setenv("SPINE_EDGE_J2K_THREADS", "many")  # not a number: ignored
    assert j2k.decode_threads(1) == 8
