"""The reader's limits and refusals, one test per fault class of the reliability issue.

Every input is generated here, small: the limits are exercised by headers that claim large sizes,
or by lowering :data:`spine_edge.imageio.MAX_DECODE_BYTES` for one test.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from spine_edge import imageio, j2k
from spine_edge.errors import ImageReadError
from spine_edge.imageio import estimate_decode_bytes, find_images, read_image, scan_folder
from tests.spine_edge.dicom_factory import build_test_dataset, write_test_dicom

H, W = 48, 64
needs_openjpeg = pytest.mark.skipif(not j2k.decoder_available(), reason="no libopenjp2 for reduced decoding")


def pixels12(shape: tuple[int, int] = (H, W), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16)


def refused(path: Path, *words: str, call=read_image) -> ImageReadError:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageReadError) as info:
        call(path)
    err = info.value
    assert err.path == str(path)
    for word in words:
        assert word.lower() in err.reason.lower(), err.reason
    return err


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def j2k_dataset(header_shape: tuple[int, int], codestream_shape: tuple[int, int]) -> pydicom.Dataset:
    """A JPEG 2000 DICOM whose Rows/Columns say ``header_shape`` around a codestream of another."""
    ds = build_test_dataset(pixels12(header_shape), transfer_syntax="jpeg2000-lossless")
    other = build_test_dataset(pixels12(codestream_shape, seed=1), transfer_syntax="jpeg2000-lossless")
    ds.PixelData = other.PixelData
    return ds


def encode(path: Path, image: np.ndarray, params: list[int] | None = None) -> Path:
    ok, buf = cv2.imencode(path.suffix, image, params or [])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def bigtiff(width: int, height: int, pixels: bytes = b"", pages: int = 1) -> bytes:
    """A little-endian BigTIFF: 8-bit gray, one uncompressed strip per page."""
    out = bytearray(b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 16))
    for page in range(pages):
        ifd_at = len(out)
        entries = [(256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
                   (273, 16, 0), (277, 3, 1), (278, 16, height), (279, 16, len(pixels))]  # fmt: skip
        data_at = ifd_at + 8 + 20 * len(entries) + 8
        out += struct.pack("<Q", len(entries))
        for tag, kind, value in entries:
            value = data_at if tag == 273 else value
            out += struct.pack("<HHQ", tag, kind, 1) + struct.pack("<Q", value)
        out += struct.pack("<Q", data_at + len(pixels) if page + 1 < pages else 0)
        out += pixels
    return bytes(out)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# ------------------------------------------------------------------- sizes before decoding


def test_codestream_larger_than_its_header_is_refused_with_both_sizes(tmp_path: Path) -> None:
    path = save(j2k_dataset((H, W), (2 * H, 3 * W)), tmp_path / "big_stream.dcm")
    refused(path, f"{H} x {W}", f"{2 * H} x {3 * W}", "before decoding")
    refused(path, f"{2 * H} x {3 * W}", call=estimate_decode_bytes)


def test_codestream_smaller_than_its_header_is_refused(tmp_path: Path) -> None:
    path = save(j2k_dataset((2 * H, W), (H, W)), tmp_path / "small_stream.dcm")
    refused(path, f"{2 * H} x {W}", f"{H} x {W}", "rather than reshaping")


def test_codestream_that_cannot_be_sized_is_refused(tmp_path: Path) -> None:
    ds = build_test_dataset(pixels12(), transfer_syntax="jpeg2000-lossless")
    ds.PixelData = encapsulate([b"\x00" * 64])
    refused(save(ds, tmp_path / "garbage.dcm"), "codestream header cannot be read", "before decoding")


def test_codestream_with_more_bits_than_allocated_is_refused(tmp_path: Path) -> None:
    ds = build_test_dataset((pixels12() % 256).astype(np.uint8), transfer_syntax="jpeg2000-lossless")
    ds.PixelData = build_test_dataset(pixels12(), transfer_syntax="jpeg2000-lossless").PixelData
    refused(save(ds, tmp_path / "bits.dcm"), "12-bit samples", "8 bits allocated")


def test_byte_budget_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_test_dicom(tmp_path / "j.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    cost = estimate_decode_bytes(path)
    monkeypatch.setattr(imageio, "MAX_DECODE_BYTES", cost - 1)

    def must_not_decode(*args: object) -> np.ndarray:
        raise AssertionError("decoded despite the budget")

    monkeypatch.setattr(j2k, "decode", must_not_decode)
    monkeypatch.setattr(imageio, "pixel_array", must_not_decode)
    refused(path, "refused before decoding", "MiB")


@needs_openjpeg
def test_estimate_counts_samples_and_bytes(tmp_path: Path) -> None:
    gray8 = encode(tmp_path / "g8.png", (pixels12() % 256).astype(np.uint8))
    rgba16 = encode(tmp_path / "c16.png", np.dstack([pixels12(seed=k) * 16 for k in range(4)]))
    pixels = H * W
    fixed = imageio._FIXED_BYTES
    assert estimate_decode_bytes(gray8) == fixed + gray8.stat().st_size + pixels * (1 + 1) * 11 // 10
    # Four 16-bit channels twice (OpenCV's own buffer and its result), the 16-bit gray conversion,
    # the 8-bit result and the guard's 8-bit colour copy, with the 10% margin.
    rgba_cost = fixed + rgba16.stat().st_size + pixels * (2 * 4 * 2 + 2 + 1 + 3) * 11 // 10
    assert estimate_decode_bytes(rgba16) == rgba_cost
    j2k_path = write_test_dicom(tmp_path / "j.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    assert estimate_decode_bytes(j2k_path, target_long_side=W // 4) < estimate_decode_bytes(j2k_path)


def test_radiograph_sized_images_fit_the_budget() -> None:
    # A 9 MP 16-bit spine film and the 40 MP limit itself, with OpenJPEG's int32 buffers.
    for pixels in (3000 * 3000, imageio.MAX_PIXELS):
        cost = pixels * (imageio._J2K_WORK_BYTES_PER_SAMPLE + 2 + 1)
        assert cost < imageio.MAX_DECODE_BYTES


def test_file_larger_than_the_budget_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_test_dicom(tmp_path / "a.dcm", pixels12())
    monkeypatch.setattr(imageio, "MAX_DECODE_BYTES", 2 * path.stat().st_size - 2)
    refused(path, "refused before reading")


def test_bigtiff_is_sized_and_read(tmp_path: Path) -> None:
    pixels = (pixels12() % 256).astype(np.uint8)
    path = tmp_path / "small.tif"
    path.write_bytes(bigtiff(W, H, pixels.tobytes()))
    np.testing.assert_array_equal(read_image(path).image, pixels)
    huge = tmp_path / "huge.tif"
    huge.write_bytes(bigtiff(100_000, 40_000, b"\x00" * 64))
    refused(huge, "implausibly large", "40000 rows", "before decoding")


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    pixels = (pixels12() % 256).astype(np.uint8)
    path = tmp_path / "pages.tif"
    path.write_bytes(bigtiff(W, H, pixels.tobytes(), pages=3))
    refused(path, "multi-page TIFF", "3 pages")
    classic = tmp_path / "classic.tiff"
    assert cv2.imwritemulti(str(classic), [pixels, pixels])
    refused(classic, "multi-page TIFF", "2 pages")


def test_tiff_that_cannot_be_sized_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 1 << 20))  # first directory beyond the end
    refused(path, "size is unknown", "before decoding")


def test_jpeg_with_stray_bytes_between_segments_is_still_sized(tmp_path: Path) -> None:
    data = encode(tmp_path / "a.jpg", (pixels12() % 256).astype(np.uint8)).read_bytes()
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    stray = data[:app0_end] + b"\x00\x13\x37" + data[app0_end:]
    sof = stray.find(b"\xff\xc0")
    huge = bytearray(stray)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 30_000, 30_000)
    (tmp_path / "huge.jpg").write_bytes(bytes(huge))
    refused(tmp_path / "huge.jpg", "implausibly large", "30000 rows")
    (tmp_path / "ok.jpg").write_bytes(stray)
    assert read_image(tmp_path / "ok.jpg").image.shape == (H, W)


def test_jpeg_without_frame_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nosof.jpg"
    path.write_bytes(b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9")
    refused(path, "JPEG header", "size is unknown", "before decoding")


def test_png_16_bit_rgba_over_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ramp = np.tile(np.arange(W, dtype=np.uint16) * 1000, (H, 1))  # compresses: the file stays small
    path = encode(tmp_path / "c16.png", np.dstack([ramp] * 4))
    monkeypatch.setattr(imageio, "MAX_DECODE_BYTES", H * W * 8)
    refused(path, "refused before decoding", f"{H} x {W} PNG")


def test_animated_png_is_refused(tmp_path: Path) -> None:
    data = encode(tmp_path / "a.png", (pixels12() % 256).astype(np.uint8)).read_bytes()
    ihdr_end = 8 + 25
    animated = data[:ihdr_end] + png_chunk(b"acTL", struct.pack(">II", 4, 0)) + data[ihdr_end:]
    (tmp_path / "anim.png").write_bytes(animated)
    refused(tmp_path / "anim.png", "animated PNG", "4 pages")


# --------------------------------------------------------------- header / pixel mismatches


def test_native_pixel_data_longer_than_the_header_is_refused(tmp_path: Path) -> None:
    ds = build_test_dataset(pixels12())
    ds.PixelData = ds.PixelData + b"\x00\x00" * W * 4
    err = refused(save(ds, tmp_path / "long.dcm"), f"{2 * H * W + 8 * W} bytes", f"describes {2 * H * W}", "cropping")
    assert "truncated" not in err.reason


def test_native_pixel_data_for_fewer_samples_than_declared(tmp_path: Path) -> None:
    gray = pixels12()
    ds = build_test_dataset(np.dstack([gray, gray, gray]), photometric="RGB")
    ds.PixelData = gray.tobytes()
    err = refused(save(ds, tmp_path / "rgb.dcm"), f"{H * W * 2} of {H * W * 6}", "3 sample(s)")
    assert "broadcast" not in err.reason and "reshape" not in err.reason


def test_one_pad_byte_is_accepted(tmp_path: Path) -> None:
    pixels = (np.arange(7 * 9) % 256).astype(np.uint8).reshape(7, 9)  # 63 bytes: padded to 64
    assert read_image(write_test_dicom(tmp_path / "odd.dcm", pixels)).image.shape == (7, 9)


# ---------------------------------------------------------------------- true messages


def test_removed_pixel_data_says_no_pixel_data_not_truncated(tmp_path: Path) -> None:
    ds = build_test_dataset(pixels12())
    del ds.PixelData
    err = refused(save(ds, tmp_path / "stripped.dcm"), "no pixel data", "pixel data element is missing")
    assert "truncated" not in err.reason


def test_file_cut_inside_the_pixel_data_header_says_truncated(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "cut.dcm", pixels12())
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00") + 6])
    refused(path, "truncated")


def test_truncated_encapsulated_pixel_data(tmp_path: Path) -> None:
    path = write_test_dicom(tmp_path / "t.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    data = path.read_bytes()
    with pytest.warns(UserWarning, match="End of file"):
        refused(_write(tmp_path / "cut.dcm", data[:-200]), "truncated")


def test_damaged_jpeg2000_logs_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = build_test_dataset(pixels12((256, 320)), transfer_syntax="jpeg2000-lossless")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) * 6 // 10]])  # a whole fragment, a cut codestream
    path = save(ds, tmp_path / "damaged.dcm")
    for direct in (True, False):  # OpenJPEG by ctypes, and pydicom's plugin
        monkeypatch.setattr(j2k, "decoder_available", lambda direct=direct: direct)
        with caplog.at_level(logging.DEBUG):
            refused(path, "cannot be decoded", "damaged or truncated")
        assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= logging.ERROR]


def test_pydicom_logging_of_other_threads_is_untouched(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def log_from_other_thread() -> None:
        logging.getLogger("pydicom").error("from another thread")
        seen.append("done")

    with caplog.at_level(logging.ERROR), imageio._PYDICOM_LOG.capture() as captured:
        worker = threading.Thread(target=log_from_other_thread)
        worker.start()
        worker.join()
        logging.getLogger("pydicom").error("from the reading thread")
    assert seen == ["done"] and captured == ["from the reading thread"]
    assert [r.getMessage() for r in caplog.records if r.name == "pydicom"] == ["from another thread"]


# ------------------------------------------------------------------ formats and folders


@pytest.mark.parametrize(("ext", "name"), [(".bmp", "BMP"), (".webp", "WebP")])
def test_bmp_and_webp_are_not_supported(tmp_path: Path, ext: str, name: str) -> None:
    image = (pixels12() % 256).astype(np.uint8)
    path = encode(tmp_path / f"a{ext}", image)
    renamed = _write(tmp_path / "disguised.png", path.read_bytes())
    refused(path, f"{name} images are not supported")
    refused(renamed, f"{name} images are not supported")


def test_gif_is_not_supported(tmp_path: Path) -> None:
    refused(_write(tmp_path / "a.gif", b"GIF89a" + b"\x00" * 64), "GIF images are not supported")


def test_scan_folder_lists_unsupported_files_and_unreadable_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dicom = write_test_dicom(tmp_path / "a.dcm", pixels12())
    for name in ("b.gif", "c.BMP", "sub/d.webp", "locked/e.dcm", "notes.txt"):
        _write(tmp_path / name, b"x" * 16)
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(tmp_path)
    assert scan.images == (dicom,)
    assert [p.relative_to(tmp_path).as_posix() for p in scan.unsupported] == ["b.gif", "c.BMP", "sub/d.webp"]
    assert scan.unreadable_dirs == ((tmp_path / "locked", "Permission denied"),)
    assert find_images(tmp_path) == [dicom]


def test_scan_folder_refuses_a_root_it_cannot_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scandir(path: object = ".") -> object:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", scandir)
    refused(tmp_path, "cannot be listed", call=scan_folder)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------ read-ahead budget


def test_decode_budget_holds_concurrent_reservations_within_its_total() -> None:
    total = imageio.MAX_DECODE_BYTES
    budget = imageio.DecodeBudget(total)
    inside, most = [0], [0]
    lock = threading.Lock()

    def hold(nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                inside[0] += nbytes
                most[0] = max(most[0], inside[0])
            threading.Event().wait(0.02)
            with lock:
                inside[0] -= nbytes

    def run(sizes: list[int]) -> None:
        threads = [threading.Thread(target=hold, args=(n,)) for n in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    run([total // 3] * 7)
    assert most[0] <= budget.peak_reserved <= total
    most[0] = 0
    run([2 * total, total // 3, total // 3])  # larger than the budget: it runs alone
    assert most[0] == 2 * total and budget.peak_reserved == 2 * total


@needs_openjpeg
def test_decode_budget_reads_and_releases(tmp_path: Path) -> None:
    budget = imageio.DecodeBudget(imageio.MAX_DECODE_BYTES)
    path = write_test_dicom(tmp_path / "a.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    assert budget.read(path, target_long_side=W // 4).scale == 0.5
    assert budget.peak_reserved == estimate_decode_bytes(path, W // 4)
    with budget.reserve(imageio.MAX_DECODE_BYTES):  # nothing is left reserved by the read
        pass
    with pytest.raises(ValueError, match="positive"):
        imageio.DecodeBudget(0)


def test_deflated_data_set_that_inflates_past_the_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = build_test_dataset(np.zeros((256, 256), np.uint16))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = save(ds, tmp_path / "deflated.dcm")
    assert read_image(path).image.shape == (256, 256)
    monkeypatch.setattr(imageio, "MAX_DECODE_BYTES", 2 * path.stat().st_size + 2 * 65536)
    refused(path, "deflated", "refused before inflating")


def _count_header_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    real = imageio._open_dicom

    def counting(path: str | Path, data: bytes) -> pydicom.Dataset:
        parsed.append(str(path))
        return real(path, data)

    monkeypatch.setattr(imageio, "_open_dicom", counting)
    return parsed


@needs_openjpeg
def test_a_budgeted_read_parses_the_header_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_test_dicom(tmp_path / "a.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    expected = read_image(path, W // 4).image
    parsed = _count_header_parses(monkeypatch)
    budget = imageio.DecodeBudget(imageio.MAX_DECODE_BYTES)
    np.testing.assert_array_equal(budget.read(path, W // 4).image, expected)
    assert parsed == [str(path)]  # read, checked, estimated and decoded from one parse
    assert budget.peak_reserved == estimate_decode_bytes(path, W // 4)
    with pytest.raises(ImageReadError):  # a refusal still costs no reservation
        budget.read(tmp_path / "missing.dcm")


@needs_openjpeg
def test_a_read_that_must_wait_holds_nothing_and_checks_the_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_test_dicom(tmp_path / "a.dcm", pixels12(), transfer_syntax="jpeg2000-lossless")
    parsed = _count_header_parses(monkeypatch)
    budget = imageio.DecodeBudget(estimate_decode_bytes(path))
    parsed.clear()
    out: list[imageio.Radiograph] = []
    with budget.reserve(1):  # another read in flight leaves too little room
        reader = threading.Thread(target=lambda: out.append(budget.read(path)))
        reader.start()
        for _ in range(1000):  # until it has parsed once and found no room
            if parsed:
                break
            threading.Event().wait(0.01)
        reader.join(0.2)
        assert reader.is_alive() and not out and parsed == [str(path)]  # waiting, its first parse dropped
    reader.join(10)
    assert out and out[0].image.shape == (H, W) and parsed == [str(path)] * 2
    assert budget.peak_reserved == estimate_decode_bytes(path)


@pytest.mark.parametrize("depth", [np.uint8, np.uint16])
def test_the_colour_copy_is_the_guards_thumbnail(tmp_path: Path, depth: type) -> None:
    from spine_edge.guard import MEASURE_SIDE, measure_image

    rng = np.random.default_rng(3)
    scale = 255 if depth is np.uint8 else 65535
    colour = (rng.random((600, 900, 3)) * scale).astype(depth)
    colour[100:300, 200:700] = (0, 0, scale)  # a saturated red block among noisy colour
    path = encode(tmp_path / f"c{np.dtype(depth).itemsize}.png", colour)
    radiograph = read_image(path)
    assert radiograph.colour is not None and radiograph.colour.dtype == np.uint8
    assert radiograph.colour.shape == (round(600 * MEASURE_SIDE / 900), MEASURE_SIDE, 3)
    # The guard measures the kept thumbnail exactly as it measured the full colour samples.
    full = measure_image(radiograph.image, colour)
    kept = measure_image(radiograph.image, radiograph.colour)
    assert (kept.colour_fraction, kept.median_chroma) == (full.colour_fraction, full.median_chroma)
