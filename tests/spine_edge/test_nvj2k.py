"""GPU JPEG 2000 decoding (nvImageCodec): availability, the choice of decoder, refusals and reduced levels.

Everything but the last test runs without a GPU. The reduced-level step is checked against OpenJPEG's
own reduced decode (:mod:`spine_edge.j2k`) of real codestreams, so it is the reader's level ``r``
whichever decoder made the full-resolution samples.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
from pydicom.encaps import generate_frames

from spine_edge import j2k, nvj2k
from tests.spine_edge.dicom_factory import build_test_dataset

pytestmark = pytest.mark.skipif(not j2k.decoder_available(), reason="no libopenjp2 found for spine_edge.j2k")

_NVIMGCODEC_INSTALLED = importlib.util.find_spec("nvidia") is not None and (
    importlib.util.find_spec("nvidia.nvimgcodec") is not None
)
_GPU_DECODER_REASON = nvj2k.unavailable_reason()
needs_no_gpu_decoder = pytest.mark.skipif(
    _GPU_DECODER_REASON is None, reason="the GPU decoder runs here; its fallbacks are tested where it cannot"
)


def codestream(pixels: np.ndarray, bits_stored: int) -> bytes:
    """A lossless JPEG 2000 codestream of ``pixels``, encoded the way the test DICOM files are."""
    ds = build_test_dataset(pixels, bits_stored=bits_stored, transfer_syntax="jpeg2000-lossless")
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def noise(shape: tuple[int, int], low: int, high: int, dtype: type, seed: int = 0) -> np.ndarray:
    """Uniform noise over the whole range: every clip and rounding of the low-pass is exercised."""
    return np.random.default_rng(seed).integers(low, high, shape, endpoint=True).astype(dtype)


def phantom(h: int, w: int) -> np.ndarray:
    """A smooth 12-bit gradient with a bright plate, as in test_reduced_decode."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = 800 + 6 * xx + 3 * yy + 200 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
    image[h // 4 : h // 2, w // 5 : w // 2] = 4095
    return np.clip(image, 0, 4095).astype(np.uint16)


CASES = [
    pytest.param(phantom(200, 296), 12, id="u12-200x296"),
    pytest.param(phantom(37, 51), 12, id="u12-odd-37x51"),
    pytest.param(noise((64, 65), 0, 4095, np.uint16), 12, id="u12-noise-64x65"),
    pytest.param(noise((40, 52), -2048, 2047, np.int16, 1), 12, id="s12-noise"),
    pytest.param(noise((33, 48), 0, 255, np.uint8, 2), 8, id="u8-noise"),
    pytest.param(noise((48, 37), 0, 65535, np.uint16, 3), 16, id="u16-noise"),
]


@pytest.mark.parametrize(("pixels", "bits"), CASES)
def test_reduced_levels_equal_openjpeg_reduced_decode(pixels: np.ndarray, bits: int) -> None:
    data = codestream(pixels, bits)
    info = j2k.parse_codestream(data)
    full = j2k.decode(data, 0, np.int32)
    np.testing.assert_array_equal(full, pixels)
    for level in range(1, 4):
        reduced = nvj2k.reduce_like_openjpeg(full, level, info.precision[0], info.signed[0])
        expected = j2k.decode(data, level, np.int32)
        # OpenJPEG's shape: each side divided by 2**level, rounded up.
        assert reduced.shape == expected.shape == info.reduced_shape(level)
        np.testing.assert_array_equal(reduced, expected)


def test_reduce_zero_and_single_sample_sides_pass_unchanged() -> None:
    pixels = noise((1, 9), 0, 4095, np.uint16)
    np.testing.assert_array_equal(nvj2k.reduce_like_openjpeg(pixels, 0, 12, False), pixels)
    assert nvj2k.reduce_like_openjpeg(pixels, 2, 12, False).shape == (1, 3)


@pytest.mark.skipif(_NVIMGCODEC_INSTALLED, reason="nvImageCodec is installed here")
def test_without_nvimgcodec_the_gpu_decoder_is_unavailable_and_says_why() -> None:
    reason = nvj2k.unavailable_reason()
    assert reason is not None and "nvImageCodec is not installed" in reason and "gpu-decode-cu12" in reason
    assert not nvj2k.decoder_available() and nvj2k.decoder_version() is None
    with pytest.raises(j2k.DecodeError, match="no GPU JPEG 2000 decoder: nvImageCodec is not installed"):
        nvj2k.decode(codestream(phantom(40, 40), 12), 0, np.uint16)


@needs_no_gpu_decoder
@pytest.mark.parametrize(("prefer", "level"), [("auto", logging.INFO), ("gpu", logging.WARNING)])
def test_choose_decoder_falls_back_to_openjpeg_with_the_reason(
    prefer: nvj2k.DecoderPreference, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="spine_edge.nvj2k"):
        choice = nvj2k.choose_decoder(prefer)
    assert choice.kind == "cpu" and _GPU_DECODER_REASON is not None
    assert choice.reason == f"OpenJPEG, because the GPU decoder cannot run: {_GPU_DECODER_REASON}"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(level, f"JPEG 2000 decoder: {choice.reason}")]
    data = codestream(phantom(64, 80), 12)
    np.testing.assert_array_equal(choice.decode(data, 1, np.uint16), j2k.decode(data, 1, np.uint16))
    assert choice.decoder_available() and choice.decoder_version() == j2k.decoder_version()


def test_choose_decoder_cpu_is_openjpeg_and_other_preferences_are_refused() -> None:
    choice = nvj2k.choose_decoder("cpu")
    assert (choice.kind, choice.reason) == ("cpu", "the CPU decoder (OpenJPEG) was asked for")
    with pytest.raises(ValueError, match="prefer"):
        nvj2k.choose_decoder("cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reduce", "dtype", "max_bytes", "message"),
    [
        (0, np.uint16, 1 << 10, r"needs about 0.3 MiB, more than the 0.0 MiB allowed; refused before decoding"),
        (6, np.uint16, nvj2k.DEFAULT_MAX_BYTES, r"resolution level 6 is not available \(the codestream has 5\)"),
        (0, np.uint8, nvj2k.DEFAULT_MAX_BYTES, r"uint8 cannot hold unsigned 12-bit samples"),
        (0, np.float32, nvj2k.DEFAULT_MAX_BYTES, r"float32 cannot hold"),
    ],
)
def test_decode_refuses_from_the_header_before_any_gpu_work(
    reduce: int, dtype: type, max_bytes: int, message: str
) -> None:
    with pytest.raises(j2k.DecodeError, match=message):
        nvj2k.decode(codestream(phantom(200, 296), 12), reduce, dtype, max_bytes=max_bytes)


def test_decode_refuses_signed_samples_into_an_unsigned_dtype_and_unreadable_headers() -> None:
    with pytest.raises(j2k.DecodeError, match="uint16 cannot hold signed 12-bit samples"):
        nvj2k.decode(codestream(noise((40, 52), -2048, 2047, np.int16), 12), 0, np.uint16)
    with pytest.raises(j2k.DecodeError, match="header cannot be read"):
        nvj2k.decode(b"not a codestream", 0, np.uint16)


def test_decode_bytes_counts_the_full_image_the_reduction_and_the_result() -> None:
    info = j2k.parse_codestream(codestream(phantom(200, 296), 12))
    pixels = 200 * 296
    assert nvj2k.decode_bytes(info, 0, np.uint16) == 2 * pixels * 2 + pixels * 2
    assert nvj2k.decode_bytes(info, 1, np.int32) == 2 * pixels * 2 + pixels * 16 + 100 * 148 * 4


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_DECODER_REASON is not None, reason=f"GPU JPEG 2000 decoder: {_GPU_DECODER_REASON}")
@pytest.mark.parametrize(("pixels", "bits"), CASES)
def test_gpu_decode_equals_openjpeg(pixels: np.ndarray, bits: int) -> None:
    data = codestream(pixels, bits)
    dtype = pixels.dtype
    for reduce in (0, 1):
        gpu = nvj2k.decode(data, reduce, dtype)
        assert gpu.dtype == dtype
        np.testing.assert_array_equal(gpu, j2k.decode(data, reduce, dtype))
    choice = nvj2k.choose_decoder("auto")
    assert choice.kind == "gpu" and choice.reason.startswith("nvImageCodec ")
    np.testing.assert_array_equal(choice.decode(data, 0, dtype), pixels)
