from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import JPEGLosslessSV1

from spine_edge.errors import ImageReadError
from spine_edge.imageio import (
    MAX_SIDE,
    find_images,
    gray_to_uint8,
    is_dicom,
    read_dicom,
    read_image,
    read_raster,
)
from tests.spine_edge.dicom_factory import (
    BASIC_TEXT_SR,
    RT_PLAN,
    TRANSFER_SYNTAXES,
    build_test_dataset,
    write_test_dicom,
)

H, W = 48, 64
REPO = Path(__file__).resolve().parents[2]


def ramp12() -> np.ndarray:
    """Every value 0..3071 once, shuffled: a 12-bit image with known percentiles."""
    return np.random.default_rng(0).permutation(H * W).reshape(H, W).astype(np.uint16)


def to_u8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written independently of the reader."""
    return to_u8((values.astype(np.float64) - (centre - 0.5)) / (width - 1) + 0.5)


def expect_error(call, path: Path, *words: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        call(path)
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    for word in words:
        assert word.lower() in err.reason.lower(), err.reason
    return err


# ------------------------------------------------------------------------------ DICOM round trips


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_window_maps_below_to_0_above_to_255_and_linear_between(tmp_path: Path, syntax: str) -> None:
    pixels = ramp12()
    path = write_test_dicom(tmp_path / "w.dicom", pixels, window=(1500, 1001), transfer_syntax=syntax)
    rad = read_image(path)
    assert rad.image.dtype == np.uint8 and rad.image.shape == (H, W)
    np.testing.assert_array_equal(rad.image, linear_window(pixels, 1500, 1001))
    assert (rad.image[pixels <= 999] == 0).all() and (rad.image[pixels > 2000] == 255).all()
    assert rad.kind == "dicom" and rad.windowing == "window"
    assert rad.bits_stored == 12 and rad.original_dtype == "uint16"
    assert rad.photometric == "MONOCHROME2" and rad.source_shape == (H, W)
    assert rad.pixel_spacing == (0.14, 0.14) and rad.path == str(path)


def test_jpeg2000_lossless_decodes_exactly_like_uncompressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, (H, W), dtype=np.uint16)
    plain = read_image(write_test_dicom(tmp_path / "p.dcm", pixels))
    j2k_path = write_test_dicom(tmp_path / "j.dcm", pixels, transfer_syntax="jpeg2000-lossless")
    assert pydicom.dcmread(j2k_path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    j2k = read_image(j2k_path)
    np.testing.assert_array_equal(j2k.image, plain.image)
    assert plain.windowing == "percentile" and plain.image.min() == 0 and plain.image.max() == 255


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path: Path) -> None:
    pixels = ramp12()
    mono2 = read_image(write_test_dicom(tmp_path / "m2.dcm", pixels, window=(1500, 1001)))
    mono1_path = tmp_path / "m1.dcm"
    write_test_dicom(mono1_path, pixels, photometric="MONOCHROME1", window=(1500, 1001))
    mono1 = read_image(mono1_path)
    np.testing.assert_array_equal(mono1.image, 255 - linear_window(pixels, 1500, 1001))
    np.testing.assert_array_equal(mono1.image.astype(int), 255 - mono2.image.astype(int))
    assert mono1.image[pixels == 0][0] == 255  # MONOCHROME1: lowest value is displayed white
    assert mono1.photometric == "MONOCHROME1"


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path: Path) -> None:
    pixels = ramp12()
    path = write_test_dicom(tmp_path / "r.dcm", pixels, rescale=(2.0, -1000.0), window=(1000, 2001))
    expected = linear_window(pixels.astype(np.float64) * 2.0 - 1000.0, 1000, 2001)
    np.testing.assert_array_equal(read_image(path).image, expected)


@pytest.mark.parametrize(
    ("function", "formula"),
    [
        ("LINEAR_EXACT", lambda v: (v - 1500) / 1000 + 0.5),
        ("SIGMOID", lambda v: 1 / (1 + np.exp(-4 * (v - 1500) / 1000))),
    ],
)
def test_voi_lut_functions(tmp_path: Path, function: str, formula) -> None:
    pixels = ramp12()
    path = write_test_dicom(tmp_path / "f.dcm", pixels, window=(1500, 1000), voi_function=function)
    np.testing.assert_array_equal(read_image(path).image, to_u8(formula(pixels.astype(np.float64))))


def test_voi_lut_sequence_is_preferred_and_normalised_by_its_range(tmp_path: Path) -> None:
    pixels = ramp12()
    table = (np.sqrt(np.arange(2048)) * 64).astype(np.uint16)  # 12 bits used of 16 declared
    path = write_test_dicom(tmp_path / "v.dcm", pixels, voi_lut=(512, table), window=(10, 10))
    rad = read_image(path)
    looked_up = table[np.clip(pixels.astype(int) - 512, 0, 2047)].astype(np.float64)
    expected = to_u8((looked_up - table.min()) / (table.max() - table.min()))
    np.testing.assert_array_equal(rad.image, expected)
    assert rad.windowing == "voi_lut"


def test_no_window_stretches_between_the_percentiles(tmp_path: Path) -> None:
    pixels = ramp12()  # values 0..3071 once each: 0.5th pct = 15, 99.5th = 3056 (nearest rank)
    rad = read_image(write_test_dicom(tmp_path / "n.dcm", pixels))
    np.testing.assert_array_equal(rad.image, to_u8((pixels - 15.0) / (3056 - 15)))
    assert rad.windowing == "percentile"


def test_signed_pixels_with_window(tmp_path: Path) -> None:
    pixels = ramp12().astype(np.int16) - 1536
    path = write_test_dicom(tmp_path / "s.dcm", pixels, window=(0, 1001), transfer_syntax="jpeg2000-lossless")
    rad = read_image(path)
    np.testing.assert_array_equal(rad.image, linear_window(pixels, 0, 1001))
    assert rad.original_dtype == "int16"


def test_8bit_dicom_without_window_is_kept_as_is(tmp_path: Path) -> None:
    pixels = (ramp12() % 256).astype(np.uint8)
    rad = read_image(write_test_dicom(tmp_path / "e.dcm", pixels))
    np.testing.assert_array_equal(rad.image, pixels)
    assert rad.bits_stored == 8 and rad.windowing == "none"


def test_optional_tags_are_not_required_and_imager_spacing_is_a_fallback(tmp_path: Path) -> None:
    ds = build_test_dataset(ramp12(), pixel_spacing=None, window=(1500, 1001))
    assert "Modality" not in ds and "PatientID" not in ds
    assert read_image(_save(ds, tmp_path / "bare.dcm")).pixel_spacing is None
    ds.ImagerPixelSpacing = [0.15, 0.125]
    assert read_image(_save(ds, tmp_path / "imager.dcm")).pixel_spacing == (0.15, 0.125)


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    pixels = ramp12()
    ds = build_test_dataset(pixels, window=(1500, 1001), transfer_syntax="implicit-little")
    path = tmp_path / "raw"
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert not is_dicom(path)
    np.testing.assert_array_equal(read_image(path).image, linear_window(pixels, 1500, 1001))


def test_colour_dicom_becomes_gray(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    expected = rgb @ np.array([0.299, 0.587, 0.114])
    rad = read_image(write_test_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert np.abs(rad.image - expected).max() <= 1.0 and rad.photometric == "RGB"
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    rad = read_image(write_test_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    assert np.abs(rad.image - expected).max() <= 2.0 and rad.photometric == "YBR_FULL"


def test_dicom_content_wins_over_a_raster_extension(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "actually_dicom.png", ramp12(), window=(1500, 1001))
    assert is_dicom(path) and read_image(path).kind == "dicom"


# ----------------------------------------------------------------------------- raster round trips


def test_8bit_png_round_trip_with_unicode_path(tmp_path: Path) -> None:
    pixels = (ramp12() % 256).astype(np.uint8)
    path = _encode(tmp_path / "rayos_X_é_脊椎.png", pixels)
    rad = read_image(path)
    np.testing.assert_array_equal(rad.image, pixels)
    assert (rad.kind, rad.bits_stored, rad.photometric, rad.windowing) == (
        "raster",
        8,
        "MONOCHROME2",
        "none",
    )
    assert rad.pixel_spacing is None and rad.path == str(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_raster_is_stretched(tmp_path: Path, suffix: str) -> None:
    pixels = ramp12() * 16  # percentiles scale with the values: 240 and 48896
    rad = read_raster(_encode(tmp_path / f"s16{suffix}", pixels))
    np.testing.assert_array_equal(rad.image, to_u8((pixels - 240.0) / (48896 - 240)))
    assert (rad.bits_stored, rad.original_dtype, rad.windowing) == (16, "uint16", "percentile")


def test_8bit_tiff_round_trip(tmp_path: Path) -> None:
    pixels = (ramp12() % 256).astype(np.uint8)
    np.testing.assert_array_equal(read_image(_encode(tmp_path / "t.TIFF", pixels)).image, pixels)


@pytest.mark.parametrize(("channels", "photometric"), [(3, "RGB"), (4, "RGBA")])
def test_colour_png_becomes_gray(tmp_path: Path, channels: int, photometric: str) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[:, : W // 2] = rng.integers(0, 256, (H, W // 2, 1), dtype=np.uint8)  # gray half: R=G=B
    bgr = rgb[:, :, ::-1]
    if channels == 4:
        bgr = np.dstack([bgr, rng.integers(0, 256, (H, W), dtype=np.uint8)])  # alpha is ignored
    rad = read_image(_encode(tmp_path / "c.png", np.ascontiguousarray(bgr)))
    np.testing.assert_array_equal(rad.image[:, : W // 2], rgb[:, : W // 2, 0])
    expected = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(rad.image - expected).max() <= 1.0
    assert rad.photometric == photometric


def test_gray_to_uint8_matches_the_raster_reader(tmp_path: Path) -> None:
    pixels = ramp12() * 16
    from_file = read_raster(_encode(tmp_path / "a.png", pixels)).image
    np.testing.assert_array_equal(gray_to_uint8(pixels), from_file)
    eight = (ramp12() % 256).astype(np.uint8)
    np.testing.assert_array_equal(gray_to_uint8(eight), eight)
    assert not gray_to_uint8(np.full((H, W), 7.5, np.float32)).any()


def test_jpeg_is_read_close_to_its_source(tmp_path: Path) -> None:
    pixels = np.tile(np.linspace(0, 255, W), (H, 1)).astype(np.uint8)
    rad = read_image(_encode(tmp_path / "j.JPG", pixels))
    assert np.abs(rad.image.astype(int) - pixels).mean() < 2.0


# --------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["empty.dcm", "empty.png", "empty"])
def test_zero_byte_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    expect_error(read_image, path, "empty", "0 bytes")


def test_missing_file(tmp_path: Path) -> None:
    expect_error(read_image, tmp_path / "nope.dcm", "does not exist")


def test_truncated_dicom_native(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "t.dcm", ramp12(), window=(1500, 1001))
    path.write_bytes(path.read_bytes()[:-1000])
    err = expect_error(read_image, path, "truncated", "5144 of 6144")
    assert err.hint


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_dicom_jpeg2000(tmp_path: Path, keep: float) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 4096, (H, W), dtype=np.uint16)
    path = write_test_dicom(tmp_path / "t.dcm", pixels, transfer_syntax="jpeg2000-lossless")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(read_image, path, "truncated")


def test_truncated_png(tmp_path: Path) -> None:
    path = _encode(tmp_path / "t.png", ramp12().astype(np.uint8))
    path.write_bytes(path.read_bytes()[:-40])
    expect_error(read_image, path, "truncated", "PNG")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = _encode(tmp_path / "t.jpg", ramp12().astype(np.uint8))
    path.write_bytes(path.read_bytes()[:-40])
    expect_error(read_image, path, "truncated", "JPEG")


@pytest.mark.parametrize("name", ["notes.png", "notes.dcm", "notes"])
def test_text_file_is_not_an_image(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("patient list\nnot an image\n" * 20)
    expect_error(read_image, path, "not an image")


def test_read_dicom_on_text_says_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dicom"
    path.write_text("hello" * 100)
    expect_error(read_dicom, path, "not a DICOM file")


@pytest.mark.parametrize(("sop_class", "name"), [(BASIC_TEXT_SR, "Basic Text SR"), (RT_PLAN, "RT Plan")])
def test_dicom_without_pixel_data(tmp_path: Path, sop_class: str, name: str) -> None:
    path = write_test_dicom(tmp_path / "o.dcm", with_pixels=False, sop_class=sop_class)
    expect_error(read_image, path, "no pixel data", name)


def test_multi_frame_dicom_is_refused(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "mf.dcm", ramp12(), frames=3)
    expect_error(read_image, path, "multi-frame", "3 frames")


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_dicom_with_an_unparsable_header_value(tmp_path: Path) -> None:
    ds = build_test_dataset(ramp12())
    ds.NumberOfFrames = 1
    path = _save(ds, tmp_path / "bad_is.dcm")
    element = b"\x28\x00\x08\x00IS\x02\x00"  # (0028,0008) Number of Frames, 2 bytes
    path.write_bytes(path.read_bytes().replace(element + b"1 ", element + b"x1"))
    expect_error(read_image, path, "invalid value", "x1")


def test_dicom_with_zero_rows(tmp_path: Path) -> None:
    ds = build_test_dataset(ramp12())
    ds.Rows = 0
    expect_error(read_image, _save(ds, tmp_path / "z.dcm"), "no pixels", "0 rows")


def test_dicom_with_absurd_size_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = build_test_dataset(ramp12(), transfer_syntax="jpeg2000-lossless")
    ds.Rows, ds.Columns = 30_000, 30_000  # decoding this would need 1.8 GB
    expect_error(read_image, _save(ds, tmp_path / "big.dcm"), "implausibly large", "30000 rows")


def test_png_with_absurd_size_is_refused_before_decoding(tmp_path: Path) -> None:
    data = bytearray(_encode(tmp_path / "small.png", ramp12().astype(np.uint8)).read_bytes())
    data[16:24] = struct.pack(">II", MAX_SIDE + 1, 12_000)
    path = tmp_path / "big.png"
    path.write_bytes(bytes(data))
    expect_error(read_image, path, "implausibly large", f"{MAX_SIDE + 1} columns")


def test_palette_colour_is_refused(tmp_path: Path) -> None:
    pixels = (ramp12() % 256).astype(np.uint8)
    path = write_test_dicom(tmp_path / "pal.dcm", pixels, photometric="PALETTE COLOR")
    expect_error(read_image, path, "unsupported photometric", "PALETTE COLOR")


def test_transfer_syntax_without_decoder_names_the_plugin(tmp_path: Path) -> None:
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    ds = build_test_dataset((ramp12() % 256).astype(np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    err = expect_error(read_image, _save(ds, tmp_path / "jl.dcm"), "no decoder", "JPEG Lossless")
    assert "pylibjpeg-libjpeg" in err.hint and "gdcm" in err.hint


def test_directory_passed_as_file(tmp_path: Path) -> None:
    folder = tmp_path / "study.dcm"
    folder.mkdir()
    expect_error(read_image, folder, "is a folder")


def test_unreadable_file(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "locked.dcm", ramp12())
    path.chmod(0)
    if os.geteuid() != 0:
        expect_error(read_image, path, "permission denied")
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    # Root reads anything: read it again without the capabilities that bypass permissions.
    script = (
        "from spine_edge.imageio import read_image\n"
        "from spine_edge.errors import ImageReadError\n"
        f"try:\n    read_image({str(path)!r})\n"
        "except ImageReadError as e:\n    print(e.path, '|', e.reason)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.stdout.strip() == f"{path} | permission denied", out.stderr


# --------------------------------------------------------------------------------- find_images


def test_find_images_is_recursive_sorted_and_skips_non_images(tmp_path: Path) -> None:
    dicom = write_test_dicom(tmp_path / "src.dcm", ramp12()).read_bytes()
    png = _encode(tmp_path / "z_src.png", (ramp12() % 256).astype(np.uint8)).read_bytes()
    files = {
        "a.dcm": dicom, "b.DICOM": dicom, "c.PNG": png, "sub/d.jpg": png, "sub/e.TIFF": png,
        "sub/1.2.840.113619.2.55": dicom, "sub/deeper/noext": dicom, "broken.png": b"not png",
        "notes.txt": dicom, "labels.csv": b"a,b", "meta.json": b"{}", "plain_no_ext": b"text",
        ".hidden.png": png, ".cache/f.png": png, "DICOMDIR": dicom,
    }  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "pipe")  # opening it to look for the marker would block forever
    os.mkfifo(tmp_path / "pipe.dcm")  # named as an image: listed, so the runtime reports it
    found = find_images(tmp_path)
    expected = ["a.dcm", "b.DICOM", "broken.png", "c.PNG", "pipe.dcm", "src.dcm",
                "sub/1.2.840.113619.2.55", "sub/d.jpg", "sub/deeper/noext", "sub/e.TIFF",
                "z_src.png"]  # fmt: skip
    assert [p.relative_to(tmp_path).as_posix() for p in found] == expected
    assert find_images(tmp_path) == found
    assert find_images(tmp_path / "a.dcm") == [tmp_path / "a.dcm"]
    expect_error(find_images, tmp_path / "missing", "does not exist")
    expect_error(read_image, tmp_path / "pipe.dcm", "not a regular file")


def test_imageio_does_not_import_torch() -> None:
    code = (
        "import sys, spine_edge.imageio\n"
        "bad = [m for m in ('torch', 'timm', 'ultralytics', 'training', 'export', 'benchmarks')"
        " if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _encode(path: Path, image: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(buf.tobytes())
    return path
