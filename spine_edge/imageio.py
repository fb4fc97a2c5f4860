"""Read radiographs (DICOM, PNG, JPEG, TIFF) as windowed 8-bit grayscale, bone bright.

This is the one image reader of the project: the training cache, calibration and the runtime all
call :func:`read_image`, so a study looks the same to the model everywhere.

Decisions, and why:

* **Intensity chain (DICOM).** Stored values go through the Modality LUT (Rescale Slope/Intercept
  or a Modality LUT Sequence, via pydicom), then the VOI stage, then MONOCHROME1 inversion, then
  ``round(255 * unit)``. The VOI stage is the VOI LUT Sequence when present (preferred over a
  window, as pydicom does), else the first Window Center/Width with its VOI LUT Function (LINEAR,
  LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2), else a robust stretch between the 0.5th and 99.5th
  percentiles of the modality values. 8-bit unsigned images without any VOI are taken as they are.
  A window whose width is invalid for its function falls back to the stretch.
  The whole chain is evaluated once on every possible stored value (at most 65 536 of them) and
  applied to the image with one table look-up, so no per-pixel float arithmetic happens at all.
* **Presentation LUT Shape** is ignored: for DX images it only restates MONOCHROME1/2.
* **One image per file.** Multi-frame DICOM and multi-page TIFF are refused, animated PNG too: a
  spine radiograph is one projection; several frames mean a cine loop, a tomosynthesis stack or a
  scanned document, and classifying the first one would report a result for an image nobody chose.
* **Colour** (DICOM RGB / YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT, raster RGB/RGBA) becomes
  gray with OpenCV's BT.601 weights; alpha is dropped. PALETTE COLOR and sub-sampled YBR_PARTIAL
  are refused: no radiograph is stored that way. GIF, BMP, WebP and other formats are reported as
  not supported (:func:`scan_folder` lists them apart), never decoded.
* **What counts as DICOM.** :func:`is_dicom` is the cheap, exact test: "DICM" at byte 128.
  :func:`read_dicom` also accepts a data set without the 128-byte preamble (old ACR-NEMA style
  exports) when it starts with a group 0002 or 0008 element and carries pixel data; anything else
  is reported as "not a DICOM file" without being parsed further.
* **Memory is bounded by design.** Before any pixel is decoded, the size an image will decode to
  is taken from the data that the decoder itself will follow: the JPEG 2000 codestream's SIZ
  marker (checked against Rows/Columns and Samples per Pixel; a disagreement is refused with both
  numbers), the native pixel data length (which must equal Rows x Columns x samples x bytes, never
  cropped or reshaped), the PNG IHDR, the JPEG SOFn frame header (found by walking the segments,
  stray bytes between them included) and every TIFF/BigTIFF directory. A file that cannot be sized
  this way is refused, not decoded. The size becomes a cost in **bytes** (:func:`estimate_decode_bytes`:
  the file, the decoder's working copy and every array the reader makes), which must stay within
  :data:`MAX_DECODE_BYTES`; sides are limited by :data:`MAX_SIDE` and pixels by :data:`MAX_PIXELS`.
* **Reduced-resolution JPEG 2000.** With ``target_long_side`` (the largest model input of the
  bundle), a single-component JPEG 2000 image is decoded at the smallest wavelet resolution level
  whose long side still covers :data:`DECODE_COVER` times the target (:func:`select_level`); measured on 1 500-2 800 px files,
  level 1 reads about 4x faster than a full decode and level 2 15-20x. :attr:`Radiograph.scale`
  and :meth:`Radiograph.boxes_to_original` map results back to the original pixels. A level that fails to decode falls back to the next larger
  one, down to full resolution. JPEG 2000 goes through :mod:`spine_edge.j2k` (OpenJPEG by ctypes,
  GIL released) where a libopenjp2 is found, else through pydicom at full resolution.
* **Messages are true.** pydicom's own log records during a decode are captured into the error
  reason (not printed to stderr); "truncated" is said only of data that ends early, and a DICOM
  image header without a Pixel Data element is "no pixel data".
* Raster files are decoded from bytes (``cv2.imdecode``), so non-ASCII paths work; EXIF
  orientation is ignored so that boxes refer to the pixels as stored.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal, cast, get_args

import cv2
import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import get_expected_length, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spine_edge import j2k, nvj2k
from spine_edge.errors import ImageReadError
from spine_edge.guard import MEASURE_SIDE

MAX_SIDE = 20_000
"""Largest accepted image side in pixels (a spine radiograph is about 3 000)."""
MAX_PIXELS = 40_000_000
"""Largest accepted pixel count of one image: 40 MP, over four times a 9 MP spine film and more
than a stitched full-spine or long-leg study (about 7 000 x 2 500 px)."""
MAX_DECODE_BYTES = 512 * 1024 * 1024
"""Most memory one read may use, in bytes (512 MiB): a 40 MP 16-bit gray JPEG 2000 image costs
about 440 MB by :func:`estimate_decode_bytes` (int32 decoder buffers, the 16-bit array, the 8-bit
result), a 9 MP spine film about 100 MB. A read-ahead of N images needs at most N times this."""
DECODE_COVER = 2
"""A reduced-resolution JPEG 2000 decode keeps a long side of at least this many times the target
(the largest model input): the letterbox then area-averages two or more decoded pixels into each
model pixel, so the wavelet low-pass and its grid (co-sited samples, sides rounded up) barely reach
the model. Decoding just above the target (factor 1) left the last resize to average between one
and two pixels, which moved the demo bundle's boxes (agreement AP 0.74 against the full decode) and
gate decisions as much as shifting the full image by one pixel does (benchmarks/decode_parity.py)."""
STRETCH_PERCENTILES = (0.5, 99.5)
"""Percentiles mapped to 0 and 255 when an image carries no window (nearest-rank definition)."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
UNSUPPORTED_SUFFIXES = frozenset(
    {".gif", ".bmp", ".dib", ".webp", ".jp2", ".j2k", ".j2c", ".jpx", ".jxl", ".heic", ".heif",
     ".avif", ".pgm", ".ppm", ".pbm", ".pnm", ".exr", ".hdr", ".tga", ".ico", ".svg"}
)  # fmt: skip
"""Image formats :func:`scan_folder` lists as not supported instead of ignoring them."""
# Files scan_folder never opens: their names say they are not images.
_NON_IMAGE_SUFFIXES = frozenset(
    {".txt", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".xml", ".md", ".html", ".pdf",
     ".log", ".ini", ".cfg", ".py", ".sh", ".zip", ".gz", ".tar", ".7z", ".npy", ".npz", ".pt",
     ".onnx", ".engine", ".plan", ".db", ".sqlite"}
)  # fmt: skip
# DICOMDIR is a media index: it has the DICM marker but never pixel data.
_NON_IMAGE_NAMES = frozenset({"DICOMDIR"})

_GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom returns these as RGB after decoding (YBR_FULL* converted, JPEG 2000 MCT undone).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_REQUIRED_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation",
                  "PixelRepresentation")  # fmt: skip
_REEXPORT_HINT = "copy or export the file again from the source system"
_TOO_BIG_HINT = "check the file: a spine radiograph is about 3000 px a side and 9 MP"
_J2K_SYNTAXES = frozenset(
    {pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000, pydicom.uid.JPEG2000MCLossless,
     pydicom.uid.JPEG2000MC, pydicom.uid.HTJ2KLossless, pydicom.uid.HTJ2KLosslessRPCL, pydicom.uid.HTJ2K}
)  # fmt: skip
_JPEG_SYNTAXES = frozenset(
    {pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEGLossless,
     pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLSNearLossless}
)  # fmt: skip
# OpenJPEG keeps int32 samples; two such buffers (tile data, code-block work) bound what it holds.
_J2K_WORK_BYTES_PER_SAMPLE = 8
# Other decoders (libjpeg, RLE) write the output array plus at most one working copy of it.
_OTHER_WORK_FACTOR = 2
# Histograms are counted in chunks of this many values (np.bincount copies its input as int64).
_HISTOGRAM_CHUNK = 1 << 20
# What every read holds whatever the image size: the histogram chunk, the 65 536-entry LUTs of
# the intensity chain (float64, a few of them) and pydicom's or OpenCV's own state.
_FIXED_BYTES = 16 * 2**20
_DEFLATED_UID = pydicom.uid.DeflatedExplicitVRLittleEndian.encode("ascii")
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One decoded radiograph.

    Attributes:
        image: uint8 [H, W], windowed, bone bright (MONOCHROME1 already inverted). Smaller than
            ``source_shape`` when the file was decoded at a reduced resolution (``scale < 1``).
        path: The path as given to the reader.
        kind: "dicom" or "raster".
        bits_stored: DICOM Bits Stored; for raster files the bit depth of a sample (8 or 16).
        photometric: The source's photometric interpretation (for raster files MONOCHROME2 for
            gray, RGB or RGBA for colour).
        pixel_spacing: (row, column) spacing in mm of the original pixels, from Pixel Spacing or,
            failing that, Imager Pixel Spacing; None when unknown (always for raster files).
        original_dtype: dtype of the decoded source samples, e.g. "uint16".
        source_shape: (H, W) of the original, full-resolution pixel grid.
        windowing: How intensities became 8-bit: "voi_lut", "window", "percentile" or "none".
        level: JPEG 2000 resolution level decoded (0 = full resolution; every other reader 0).
        scale: ``image`` pixels per original pixel, ``2 ** -level``. JPEG 2000's low-pass samples
            are co-sited with the even samples of the level above, so pixel ``i`` of ``image`` is
            centred on original pixel ``i / scale`` (not on the middle of a ``1 / scale`` block);
            :meth:`boxes_to_original` accounts for that.
        colour: A thumbnail of the colour samples before they became gray, for the input guard's
            colour-photograph rule: uint8 ``[h, w, 3]`` (RGB for DICOM, BGR for raster files, alpha
            dropped), long side at most :data:`spine_edge.guard.MEASURE_SIDE`, made the way the guard
            makes its own (so its measures are the same as on the full samples) and small whatever the
            image's size, so a record waiting for the model holds no full-size colour copy that no
            read-ahead budget counts. None for gray sources.
    """

    image: np.ndarray
    path: str
    kind: Literal["dicom", "raster"]
    bits_stored: int
    photometric: str
    pixel_spacing: tuple[float, float] | None
    original_dtype: str
    source_shape: tuple[int, int]
    windowing: str
    level: int = 0
    scale: float = 1.0
    colour: np.ndarray | None = None

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[K, 4]`` xyxy boxes from ``image`` pixels to original pixels (clipped).

        Args:
            boxes: Boxes in the coordinates of :attr:`image` (e.g. from
                :meth:`spine_edge.preprocess.Letterbox.boxes_to_source`).

        Returns:
            float32 ``[K, 4]`` boxes in the coordinates of the full-resolution source.

        Example:
            >>> canvas, placement = letterbox(radiograph.image, 640)
            >>> radiograph.boxes_to_original(placement.boxes_to_source(canvas_boxes))
        """
        given = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        # Edge coordinates: pixel i spans [i, i + 1) and its centre i + 0.5 sits at i / scale + 0.5;
        # an edge on the decoded image's border stays on the original's border.
        out: np.ndarray = (given - 0.5) / np.float32(self.scale) + 0.5
        h, w = self.source_shape
        reduced_h, reduced_w = self.image.shape[:2]
        out[:, [0, 2]] = np.where(given[:, [0, 2]] >= reduced_w, w, out[:, [0, 2]].clip(0, w))
        out[:, [1, 3]] = np.where(given[:, [1, 3]] >= reduced_h, h, out[:, [1, 3]].clip(0, h))
        return out


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_folder` found.

    Attributes:
        images: Files to read, sorted by their path components (see :func:`scan_folder`).
        unsupported: Image files of a format the reader does not support (GIF, BMP, WebP, ...),
            sorted: to be reported, not read.
        unreadable_dirs: Sub-folders that could not be listed (permission denied, I/O error),
            with the reason, sorted: their files are missing from ``images``.
    """

    images: tuple[Path, ...]
    unsupported: tuple[Path, ...]
    unreadable_dirs: tuple[tuple[Path, str], ...]


def is_dicom(path: str | Path) -> bool:
    """Tell whether a file carries the DICOM Part 10 marker ("DICM" at byte 128).

    Args:
        path: Any path; unreadable files, folders and other non-regular files (a FIFO would block
            the read) give False.

    Returns:
        True when the marker is present.
    """
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return _has_dicm_marker(head)


def scan_folder(folder: str | Path) -> ScanResult:
    """List the image files under a folder, recursively, and what could not be listed.

    Included in ``images``: files ending in .dcm .dicom .png .jpg .jpeg .tif .tiff (any case),
    even if they turn out to be broken, so that the runtime reports them instead of silently
    skipping them; and any other file carrying the DICOM marker (DICOM files are often named by
    UID, without extension). In ``unsupported``: files ending in :data:`UNSUPPORTED_SUFFIXES`.
    Skipped: hidden files and folders (name starting with "."), DICOMDIR, files whose extension
    names a non-image (.txt, .csv, .json, ...), and files that cannot be opened to look for the
    marker. Symbolic links to files are followed; links to folders are not (no cycles).

    Args:
        folder: The folder to scan. A single file is returned as the one image, so callers can
            accept either.

    Returns:
        The images, the unsupported files and the folders that could not be listed.

    Raises:
        ImageReadError: ``folder`` does not exist, or cannot be listed itself.

    Example:
        >>> scan = scan_folder("test_images")
        >>> for path, reason in scan.unreadable_dirs:
        ...     print(f"{path}: not scanned ({reason})")
    """
    root = Path(folder)
    if root.is_file():
        return ScanResult(images=(root,), unsupported=(), unreadable_dirs=())
    if not root.is_dir():
        raise ImageReadError(root, "input folder does not exist", "check the path")
    unreadable: list[tuple[Path, str]] = []

    def on_error(error: OSError) -> None:
        unreadable.append((Path(error.filename or root), error.strerror or str(error)))

    images: list[Path] = []
    unsupported: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name in _NON_IMAGE_NAMES:
                continue
            path = Path(dirpath, name)
            suffix = path.suffix.lower()
            if suffix in DICOM_SUFFIXES or suffix in RASTER_SUFFIXES:
                images.append(path)
            elif suffix in UNSUPPORTED_SUFFIXES:
                unsupported.append(path)
            elif suffix not in _NON_IMAGE_SUFFIXES and is_dicom(path):
                images.append(path)
    if unreadable and unreadable[0][0] == root:
        raise ImageReadError(
            root, f"input folder cannot be listed ({unreadable[0][1]})", "give the user running spine-edge access to it"
        )
    return ScanResult(
        images=tuple(sorted(images)), unsupported=tuple(sorted(unsupported)), unreadable_dirs=tuple(sorted(unreadable))
    )


def find_images(folder: str | Path) -> list[Path]:
    """List the image files under a folder: :attr:`ScanResult.images` of :func:`scan_folder`.

    Callers that report what was not read (unsupported formats, folders that cannot be listed)
    call :func:`scan_folder` instead.

    Args:
        folder: The folder to scan, or a single file (returned as a one-element list).

    Returns:
        Paths sorted by their components.

    Raises:
        ImageReadError: ``folder`` does not exist.

    Example:
        >>> for path in find_images("test_images"):
        ...     radiograph = read_image(path)
    """
    return list(scan_folder(folder).images)


def read_image(path: str | Path, target_long_side: int | None = None) -> Radiograph:
    """Read a DICOM, PNG, JPEG or TIFF file as a windowed 8-bit radiograph.

    The format is chosen by content (DICOM marker, PNG/JPEG/TIFF signatures), then by extension,
    so a DICOM named ``.png`` is still read as DICOM. Every size check runs before decoding.

    Args:
        path: The file.
        target_long_side: The long side the caller needs (the largest model input of the bundle,
            e.g. 640). JPEG 2000 images are then decoded at the smallest resolution level whose
            long side is at least :data:`DECODE_COVER` times this (see :func:`select_level`); other
            formats, and None, give the full resolution.

    Returns:
        The radiograph; see :class:`Radiograph` (``scale`` says how ``image`` maps to the
        original pixels).

    Raises:
        ImageReadError: The file is missing, empty, unreadable, truncated, not an image, or an
            image this reader refuses (multi-frame or multi-page, palette colour, a size that
            cannot be known or is over the limits, a header that disagrees with its pixel data,
            no decoder).

    Example:
        >>> radiograph = read_image("train_images/0a1b2c.dicom", target_long_side=640)
        >>> radiograph.image.shape, radiograph.source_shape, radiograph.scale
        ((1466, 1172), (2932, 2344), 0.5)
    """
    return _plan_read(path, _check_target(target_long_side)).decode()


def estimate_decode_bytes(path: str | Path, target_long_side: int | None = None) -> int:
    """Bytes that :func:`read_image` will hold at its peak for this file, known before decoding.

    The cost counts the file's bytes, the copy pydicom or OpenCV keeps of them, the decoder's
    working buffers (OpenJPEG: two int32 buffers per sample at the decoded level), the decoded
    samples, colour-to-gray and 8-bit arrays. It only parses headers (the JPEG 2000 main header,
    PNG IHDR, JPEG SOFn, TIFF directories), so it is cheap next to a decode; a read-ahead can sum
    it over the files in flight and wait before starting one that would pass its budget. A
    reduced-resolution decode that falls back to a larger level costs more than estimated, never
    more than the full-resolution cost, which :data:`MAX_DECODE_BYTES` bounds.

    Args:
        path: The file.
        target_long_side: As for :func:`read_image`; the estimate is for that decode.

    Returns:
        The estimated peak, in bytes; at most :data:`MAX_DECODE_BYTES`.

    Raises:
        ImageReadError: Whatever :func:`read_image` refuses before decoding (same message).

    Example:
        >>> estimate_decode_bytes("IM0001.dicom", target_long_side=640) < MAX_DECODE_BYTES
        True
    """
    return _plan_read(path, _check_target(target_long_side)).cost


@dataclass(frozen=True)
class _PlannedRead:
    """A file read, its header parsed and every check passed: what decoding it will cost, and the decode.

    Attributes:
        cost: Estimated peak bytes (see :func:`estimate_decode_bytes`), file bytes included.
        decode: Decodes the file from what was already read and parsed (nothing is read or parsed again).
    """

    cost: int
    decode: Callable[[], Radiograph]


def _plan_read(path: str | Path, target: int | None) -> _PlannedRead:
    """Read a file and run every check that comes before decoding; the header is parsed here, once."""
    data = _read_file(path)
    if _is_dicom_content(data):
        ds = _open_dicom(path, data)
        dicom = _plan_dicom(path, data, ds, target)
        return _PlannedRead(dicom.cost, partial(_decode_dicom, path, ds, dicom))
    raster = _plan_raster(path, data)
    return _PlannedRead(raster.cost, partial(_decode_raster, path, data, raster))


class DecodeBudget:
    """A byte budget shared by the threads that read images at the same time (a read-ahead).

    Each read reserves its :func:`estimate_decode_bytes` before decoding and returns it when the
    decode is over (the 8-bit result it keeps is small next to the decode's peak, and so is the
    colour thumbnail of :attr:`Radiograph.colour`), so however many threads read, their decodes
    together stay within ``total_bytes``. A read whose estimate is larger than the whole budget
    waits until nothing else is reserved and then runs alone.

    :meth:`read` parses a file's header once: it reads and checks the file, and decodes it at once
    if the budget has room for its estimate. Only when it must wait does it drop what it read first,
    so a waiting read holds nothing, and read and check the file again once its turn comes.

    Args:
        total_bytes: The most bytes reads may hold at once (at least 1). Below
            :data:`MAX_DECODE_BYTES` some images the reader accepts cost more than the whole
            budget: each of those runs alone.

    Example:
        >>> budget = DecodeBudget(1024 * 2**20)
        >>> with ThreadPoolExecutor(4) as pool:
        ...     images = list(pool.map(lambda p: budget.read(p, target_long_side=640), paths))
    """

    def __init__(self, total_bytes: int) -> None:
        if isinstance(total_bytes, bool) or total_bytes < 1:
            raise ValueError(f"total_bytes must be a positive number of bytes, got {total_bytes!r}")
        self.total_bytes = total_bytes
        self._reserved = 0
        self._peak = 0
        self._condition = threading.Condition()

    @property
    def peak_reserved(self) -> int:
        """The most bytes that were reserved at one time so far."""
        with self._condition:
            return self._peak

    def _fits(self, nbytes: int) -> bool:
        return self._reserved == 0 or self._reserved + nbytes <= self.total_bytes

    def _take(self, nbytes: int) -> None:
        self._reserved += nbytes
        self._peak = max(self._peak, self._reserved)

    def _give(self, nbytes: int) -> None:
        with self._condition:
            self._reserved -= nbytes
            self._condition.notify_all()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the block, waiting until they fit."""
        with self._condition:
            self._condition.wait_for(lambda: self._fits(nbytes))
            self._take(nbytes)
        try:
            yield
        finally:
            self._give(nbytes)

    def read(self, path: str | Path, target_long_side: int | None = None) -> Radiograph:
        """:func:`read_image` within the budget, the header parsed once unless the read has to wait.

        Raises:
            ImageReadError: As :func:`read_image` (a refusal costs no reservation).
        """
        target = _check_target(target_long_side)
        planned = _plan_read(path, target)
        with self._condition:
            fits = self._fits(planned.cost)
            if fits:
                self._take(planned.cost)
        if fits:
            try:
                return planned.decode()
            finally:
                self._give(planned.cost)
        while True:
            cost = planned.cost
            del planned  # a waiting read holds no file bytes or parsed header
            with self.reserve(cost):
                planned = _plan_read(path, target)  # the file may have changed while this read waited
                if planned.cost <= cost:
                    return planned.decode()


J2K_DECODER_ENV = "SPINE_EDGE_J2K_DECODER"
"""Environment variable choosing the JPEG 2000 decoder: ``auto`` (default: the GPU where
:mod:`spine_edge.nvj2k` can run, else OpenJPEG), ``cpu`` or ``gpu``."""


@cache
def j2k_decoder() -> nvj2k.DecoderChoice:
    """The JPEG 2000 decoder of this process, chosen once from :data:`J2K_DECODER_ENV` (the reason is logged)."""
    prefer = os.environ.get(J2K_DECODER_ENV, "auto").strip().lower() or "auto"
    if prefer not in get_args(nvj2k.DecoderPreference):
        raise ValueError(f"${J2K_DECODER_ENV} must be auto, cpu or gpu, not {prefer!r}")
    return nvj2k.choose_decoder(cast(nvj2k.DecoderPreference, prefer))


def select_level(rows: int, columns: int, levels: int, target_long_side: int | None) -> int:
    """Choose the JPEG 2000 resolution level to decode for a target long side.

    Level ``r`` divides each side by ``2 ** r`` (rounded up). The result is the largest level, at
    most ``levels``, whose long side is still at least ``target_long_side``, so the model's input
    is never upsampled from a coarser level than needed; 0 when the image is already smaller.

    Args:
        rows: Full-resolution height.
        columns: Full-resolution width.
        levels: Decomposition levels the codestream has (the largest decodable level).
        target_long_side: The long side needed; None for full resolution.

    Returns:
        The level, between 0 and ``levels``.
    """
    if target_long_side is None:
        return 0
    long_side, level = max(rows, columns), 0
    while level < levels and -(-long_side // (1 << (level + 1))) >= target_long_side:
        level += 1
    return level


def gray_to_uint8(gray: np.ndarray) -> np.ndarray:
    """Map an already decoded gray array to 8 bits exactly as the raster reader does.

    For images that arrive as arrays (a kiosk API) so they look the same as the file they came
    from: uint8 is returned as it is; uint16 and float arrays are stretched between the
    :data:`STRETCH_PERCENTILES` (all zeros for a constant image).

    Args:
        gray: [H, W] uint8, uint16 or float array.

    Returns:
        uint8 [H, W].
    """
    return _gray_to_u8(gray)[0]


def read_dicom(path: str | Path, target_long_side: int | None = None) -> Radiograph:
    """Read a single-frame DICOM image; see the module docstring for the intensity chain.

    Only the Image Pixel module is required (Rows, Columns, Bits Allocated/Stored, Pixel
    Representation, Photometric Interpretation, Pixel Data); everything else is optional.

    Args:
        path: The DICOM file (any extension).
        target_long_side: See :func:`read_image`.

    Returns:
        The radiograph with ``kind == "dicom"``.

    Raises:
        ImageReadError: See :func:`read_image`; the hint names the decoder plugin to install when
            the transfer syntax cannot be decoded here.
    """
    target = _check_target(target_long_side)
    data = _read_file(path)
    ds = _open_dicom(path, data)
    return _decode_dicom(path, ds, _plan_dicom(path, data, ds, target))


def read_raster(path: str | Path) -> Radiograph:
    """Read a PNG, JPEG or TIFF (8 or 16 bit, gray, RGB or RGBA) as 8-bit gray.

    8-bit samples are kept as they are; 16-bit and float samples are stretched between the
    :data:`STRETCH_PERCENTILES`.

    Args:
        path: The image file.

    Returns:
        The radiograph with ``kind == "raster"``.

    Raises:
        ImageReadError: See :func:`read_image`.
    """
    data = _read_file(path)
    return _decode_raster(path, data, _plan_raster(path, data))


def _check_target(target_long_side: int | None) -> int | None:
    if target_long_side is not None and (isinstance(target_long_side, bool) or target_long_side < 1):
        raise ValueError(f"target_long_side must be a positive number of pixels or None, not {target_long_side!r}")
    return target_long_side


def _read_file(path: str | Path) -> bytes:
    """Return a file's bytes, turning every file-system failure into an ImageReadError."""
    p = Path(path)
    try:
        info = p.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageReadError(path, "is a folder, not a file", "pass a folder as an input folder, not as a file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(path, "is not a regular file", "pass an image file")
        if info.st_size == 0:
            raise ImageReadError(path, "file is empty (0 bytes)", _REEXPORT_HINT)
        if info.st_size > MAX_DECODE_BYTES // 2:
            # Reading alone holds the file twice (our bytes and the parser's copy of its values).
            raise ImageReadError(
                path,
                f"file is {_mib(info.st_size)}, more than the {_mib(MAX_DECODE_BYTES // 2)} one image file "
                "may have; refused before reading",
                _TOO_BIG_HINT,
            )
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist", "check the path") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied", "give the user running spine-edge read access to it") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None


def _has_dicm_marker(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A preamble-less data set starts with a little-endian group 0002 or 0008 element."""
    return len(data) >= 8 and data[1] == 0 and data[0] in (0x02, 0x08) and data[3] == 0


def _is_dicom_content(data: bytes) -> bool:
    return _has_dicm_marker(data) or (_raster_format(data) is None and _looks_like_raw_dataset(data))


def _raster_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _unsupported_format(data: bytes) -> str | None:
    """The name of an image format this reader does not support, recognised by its signature."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000 (outside DICOM)"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    return None


def _check_dimensions(path: str | Path, rows: int, columns: int) -> None:
    if rows <= 0 or columns <= 0:
        raise ImageReadError(path, f"image has no pixels ({rows} rows x {columns} columns)", _REEXPORT_HINT)
    if max(rows, columns) > MAX_SIDE or rows * columns > MAX_PIXELS:
        raise ImageReadError(
            path,
            f"image is implausibly large ({rows} rows x {columns} columns; the limit is "
            f"{MAX_SIDE} px a side and {MAX_PIXELS // 1_000_000} MP), refused before decoding",
            _TOO_BIG_HINT,
        )


def _check_cost(path: str | Path, cost: int, what: str) -> int:
    if cost > MAX_DECODE_BYTES:
        raise ImageReadError(
            path,
            f"decoding {what} would need about {_mib(cost)}, more than the {_mib(MAX_DECODE_BYTES)} one image "
            "may use; refused before decoding",
            _TOO_BIG_HINT,
        )
    return cost


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


class _ThreadLogCapture(logging.Filter):
    """Swallow and keep pydicom's log records emitted by a thread while it is capturing.

    pydicom logs a plugin's failure with a full traceback at ERROR level; the reader turns that
    into the record's reason instead. Records from threads that are not capturing pass untouched,
    so logging is never switched off globally.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        previous = getattr(self._local, "messages", None)
        messages: list[str] = []
        self._local.messages = messages
        try:
            yield messages
        finally:
            self._local.messages = previous

    def filter(self, record: logging.LogRecord) -> bool:
        messages = getattr(self._local, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


_PYDICOM_LOG = _ThreadLogCapture()
# A logger's filters see only its own records, and pydicom's pixel modules log under their module
# names: filter each pydicom logger (all exist once pydicom.pixels is imported, above).
for _name in ["pydicom", *(n for n in logging.Logger.manager.loggerDict if n.startswith("pydicom."))]:
    logging.getLogger(_name).addFilter(_PYDICOM_LOG)


# ---------------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class _DicomPlan:
    """How one DICOM image will be decoded, decided from its header and codestream header.

    Attributes:
        codestream: The frame's JPEG 2000 codestream when it goes to :mod:`spine_edge.j2k`.
        level: Resolution level to try first (0 unless ``codestream`` is set).
        cost: Estimated peak bytes (see :func:`estimate_decode_bytes`).
    """

    codestream: bytes | None
    level: int
    cost: int


def _open_dicom(path: str | Path, data: bytes) -> Dataset:
    """Parse a DICOM header and refuse, from it alone, what this reader will not decode."""
    has_marker = _has_dicm_marker(data)
    if not has_marker and not _looks_like_raw_dataset(data):
        raise ImageReadError(
            path,
            "not a DICOM file: no 'DICM' marker at byte 128 and no DICOM data set at the start",
            "remove it from the input folder, or export the study again as DICOM",
        )
    if has_marker:
        _check_deflated_size(path, data)
    try:
        with _PYDICOM_LOG.capture():
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_marker)
    except Exception as exc:  # pydicom raises many types on a damaged header
        raise ImageReadError(
            path, f"DICOM header cannot be parsed ({type(exc).__name__}: {exc})", _REEXPORT_HINT
        ) from exc
    try:
        _check_pixel_module(path, ds, data)
        _check_decodable(path, ds)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom converts values on access: e.g. Number of Frames "x"
        raise ImageReadError(
            path, f"DICOM header has an invalid value ({type(exc).__name__}: {exc})", _REEXPORT_HINT
        ) from exc
    return ds


def _check_deflated_size(path: str | Path, data: bytes) -> None:
    """Inflate a Deflated Explicit VR data set up to the budget, before pydicom inflates all of it.

    pydicom inflates the whole data set while parsing, so a small deflated file could otherwise
    expand without bound before any size check runs.
    """
    if _DEFLATED_UID not in data[132:4096]:
        return
    try:
        (group_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL, explicit VR LE
    except struct.error:
        return  # a cut header: pydicom reports it
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, inflated = data[144 + group_length :], 0
    try:
        while pending and inflated <= MAX_DECODE_BYTES // 2:  # 1 MiB at a time, counted, dropped
            inflated += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # not deflate data after all: pydicom reports what is wrong
    if inflated > MAX_DECODE_BYTES // 2:
        raise ImageReadError(
            path,
            f"deflated DICOM data set inflates to more than {_mib(MAX_DECODE_BYTES // 2)}; refused before "
            "inflating it further",
            _TOO_BIG_HINT,
        )


def _plan_dicom(path: str | Path, data: bytes, ds: Dataset, target: int | None) -> _DicomPlan:
    """Check the pixel data against the header and the memory limit, before decoding any of it."""
    uid = _transfer_syntax(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    sample_bytes = int(ds.BitsAllocated) // 8
    pixels = rows * columns
    # The file's bytes, plus pydicom's copy of the Pixel Data value.
    held = _FIXED_BYTES + len(data) + len(ds.PixelData)
    # Colour to gray, then to 8 bits, and the 8-bit copy the guard's colour thumbnail is made from.
    gray_cost = pixels * (sample_bytes + 1 + 3) if samples == 3 else 0
    if not uid.is_compressed:
        _check_native_length(path, ds)
        cost = held + pixels * samples * sample_bytes + gray_cost + pixels
        return _DicomPlan(codestream=None, level=0, cost=_check_cost(path, cost, f"this {rows} x {columns} image"))
    frame = _first_frame(path, ds, uid)
    if uid in _J2K_SYNTAXES:
        info = _codestream_info(path, frame)
        _check_codestream(path, ds, info)
        decoder = j2k_decoder()
        direct = samples == 1 and decoder.decoder_available() and info.signed[0] == bool(int(ds.PixelRepresentation))
        cover = None if target is None else DECODE_COVER * target
        level = select_level(rows, columns, info.levels, cover) if direct else 0
        held += 2 * len(frame)  # the joined fragments, and OpenJPEG's stream buffer of the same size
        full = held + pixels * samples * (_J2K_WORK_BYTES_PER_SAMPLE + sample_bytes) + gray_cost + pixels
        _check_cost(path, full, f"this {rows} x {columns} JPEG 2000 image")
        reduced_rows, reduced_columns = info.reduced_shape(level)
        cost = held + reduced_rows * reduced_columns * (_J2K_WORK_BYTES_PER_SAMPLE + sample_bytes + 1)
        if decoder.kind == "gpu":  # it decodes full size, then reduces on the host (spine_edge.nvj2k)
            gpu_bytes = nvj2k.decode_bytes(info, level, np.dtype(f"u{sample_bytes}"))
            cost = max(cost, held + gpu_bytes + reduced_rows * reduced_columns)
        return _DicomPlan(codestream=frame if direct else None, level=level, cost=cost if direct else full)
    if uid in _JPEG_SYNTAXES:
        header = _jpeg_header(frame)
        if header is None or header.rows == 0:
            raise ImageReadError(
                path,
                f"{uid.name} pixel data has no readable frame header (SOFn) giving its size; refused before decoding",
                _REEXPORT_HINT,
            )
        if (header.rows, header.columns, header.channels) != (rows, columns, samples):
            raise ImageReadError(
                path,
                f"DICOM header says {rows} x {columns} with {samples} sample(s) per pixel, but its "
                f"{uid.name} frame header says {header.rows} x {header.columns} with {header.channels}; "
                "refused rather than reshaping",
                _REEXPORT_HINT,
            )
    elif uid != pydicom.uid.RLELossless:
        # RLE decodes into a buffer sized from Rows/Columns; nothing else can be sized here.
        raise ImageReadError(
            path,
            f"{uid.name} pixel data cannot be sized before decoding, so it is not decoded",
            "convert the file to Explicit VR Little Endian or JPEG 2000 (e.g. dcmconv, gdcmconv)",
        )
    cost = held + len(frame) + _OTHER_WORK_FACTOR * pixels * samples * sample_bytes + gray_cost + pixels
    return _DicomPlan(codestream=None, level=0, cost=_check_cost(path, cost, f"this {rows} x {columns} image"))


def _decode_dicom(path: str | Path, ds: Dataset, plan: _DicomPlan) -> Radiograph:
    """Decode a DICOM image that :func:`_open_dicom` parsed and :func:`_plan_dicom` checked."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    level = 0
    if plan.codestream is not None:
        arr, level = _decode_j2k_levels(path, ds, plan.codestream, plan.level)
    else:
        arr = _pydicom_pixels(path, ds, rows, columns)
    photometric = str(ds.PhotometricInterpretation).strip()
    if arr.ndim == 3:
        rgb = arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(np.float32)
        image, windowing = _gray_to_u8(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    else:
        try:
            image, windowing = _monochrome_to_u8(arr, ds, photometric == "MONOCHROME1")
        except Exception as exc:  # a malformed Modality/VOI LUT
            raise ImageReadError(path, f"Modality or VOI LUT is malformed ({type(exc).__name__}: {exc})") from exc
    return Radiograph(
        image=image,
        path=str(path),
        kind="dicom",
        bits_stored=int(ds.BitsStored),
        photometric=photometric,
        pixel_spacing=_pixel_spacing(ds),
        original_dtype=str(arr.dtype),
        source_shape=(rows, columns),
        windowing=windowing,
        level=level,
        scale=1.0 / (1 << level),
        colour=_colour_thumbnail(arr) if arr.ndim == 3 else None,
    )


def _pydicom_pixels(path: str | Path, ds: Dataset, rows: int, columns: int) -> np.ndarray:
    """Decode through pydicom (native data, colour JPEG 2000, no libopenjp2), at full size."""
    uid = _transfer_syntax(ds)
    with _PYDICOM_LOG.capture() as logged:
        try:
            arr = pixel_array(ds)
        except Exception as exc:  # decoder plugins raise their own types on damaged codestreams
            said = f"{type(exc).__name__}: {exc}"
            if logged and str(exc) not in logged[-1]:
                said += f"; pydicom: {logged[-1].splitlines()[0]}"
            raise ImageReadError(
                path,
                f"{uid.name} pixel data cannot be decoded ({said}); the pixel data is damaged or truncated",
                _REEXPORT_HINT,
            ) from exc
    if arr.shape[:2] != (rows, columns):
        raise ImageReadError(
            path,
            f"decoded pixel data is {arr.shape[0]} x {arr.shape[1]}, but the DICOM header says "
            f"{rows} x {columns}; refused rather than reshaping",
            _REEXPORT_HINT,
        )
    return arr


def _decode_j2k_levels(path: str | Path, ds: Dataset, codestream: bytes, level: int) -> tuple[np.ndarray, int]:
    """Decode at ``level``; if that fails, at each larger level down to full resolution.

    The GPU decoder (:func:`j2k_decoder`) is tried first where chosen, then OpenJPEG: nvJPEG2000
    refuses some codestreams OpenJPEG decodes (an image origin other than 0, more than 16 bits).
    """
    dtype = np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{int(ds.BitsAllocated) // 8}")
    chosen = j2k_decoder()
    # The GPU decodes every level from the full image, so one attempt tells; OpenJPEG then tries each level.
    plan = [(chosen, [level]), (nvj2k.DecoderChoice("cpu", "after the GPU decoder"), list(range(level, -1, -1)))]
    failures: list[str] = []
    for decoder, attempts in plan if chosen.kind == "gpu" else [(chosen, list(range(level, -1, -1)))]:
        for attempt in attempts:
            try:
                return decoder.decode(codestream, attempt, dtype), attempt
            except j2k.DecodeError as exc:
                said = f"level {attempt}: {exc}" if level else str(exc)
                failures.append(f"{decoder.kind} {said}" if chosen.kind == "gpu" else said)
    raise ImageReadError(
        path,
        f"JPEG 2000 pixel data cannot be decoded ({'; '.join(failures)}); the pixel data is damaged or truncated",
        _REEXPORT_HINT,
    )


def _first_frame(path: str | Path, ds: Dataset, uid: UID) -> bytes:
    """The one frame of encapsulated pixel data, with its items checked against the data's length."""
    value = bytes(ds.PixelData)
    offset, fragments = 0, []
    while offset + 8 <= len(value):
        group, element, length = struct.unpack("<HHI", value[offset : offset + 8])
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise ImageReadError(
                path,
                f"{uid.name} pixel data is not valid encapsulated data (item tag ({group:04X},{element:04X}) "
                f"at byte {offset} of the Pixel Data value)",
                _REEXPORT_HINT,
            )
        if offset + 8 + length > len(value):
            raise ImageReadError(
                path,
                f"DICOM file is truncated: a pixel data fragment of {length} bytes has only "
                f"{len(value) - offset - 8} present",
                _REEXPORT_HINT,
            )
        fragments.append(value[offset + 8 : offset + 8 + length])
        offset += 8 + length
    frame = b"".join(fragments[1:])  # the first item is the Basic Offset Table
    if not frame:
        raise ImageReadError(path, f"{uid.name} pixel data holds no fragments (no compressed frame)", _REEXPORT_HINT)
    return frame


def _codestream_info(path: str | Path, frame: bytes) -> j2k.CodestreamInfo:
    try:
        return j2k.parse_codestream(frame)
    except j2k.CodestreamError as exc:
        raise ImageReadError(
            path,
            f"JPEG 2000 codestream header cannot be read ({exc}), so its size is unknown; refused before decoding",
            _REEXPORT_HINT,
        ) from None


def _check_codestream(path: str | Path, ds: Dataset, info: j2k.CodestreamInfo) -> None:
    """Refuse a codestream that would not decode to what the DICOM header describes."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    allocated = int(ds.BitsAllocated)
    if (info.rows, info.columns, info.components) != (rows, columns, samples):
        raise ImageReadError(
            path,
            f"DICOM header says {rows} x {columns} with {samples} sample(s) per pixel, but its JPEG 2000 "
            f"codestream is {info.rows} x {info.columns} with {info.components} component(s); refused "
            "before decoding rather than reshaping",
            _REEXPORT_HINT,
        )
    if max(info.precision) > allocated or info.subsampled:
        detail = "sub-sampled components" if info.subsampled else f"{max(info.precision)}-bit samples"
        raise ImageReadError(
            path,
            f"JPEG 2000 codestream has {detail}, which do not fit the header's {allocated} bits allocated "
            "per sample; refused before decoding",
            _REEXPORT_HINT,
        )


def _check_native_length(path: str | Path, ds: Dataset) -> None:
    """Native pixel data must be exactly Rows x Columns x samples x bytes (plus one pad byte)."""
    expected = get_expected_length(ds, "bytes")
    present = len(ds.PixelData)
    shape = (
        f"{int(ds.Rows)} rows x {int(ds.Columns)} columns x {int(ds.get('SamplesPerPixel') or 1)} "
        f"sample(s) x {int(ds.BitsAllocated)} bits"
    )
    if present < expected:
        raise ImageReadError(
            path,
            f"DICOM pixel data is shorter than its header describes: {present} of {expected} bytes present "
            f"({shape}); the file is truncated or its header is wrong",
            _REEXPORT_HINT,
        )
    if present > expected + expected % 2:  # DICOM pads odd lengths to even with one byte
        raise ImageReadError(
            path,
            f"native pixel data has {present} bytes, but the header ({shape}) describes {expected}; "
            "refused rather than cropping",
            _REEXPORT_HINT,
        )


def _check_pixel_module(path: str | Path, ds: Dataset, data: bytes) -> None:
    """Refuse, from the header alone, every DICOM object this reader will not decode."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageReadError(path, "DICOM float pixel data (a parametric map) is not a radiograph")
        sop_class = UID(str(ds.SOPClassUID)) if ds.get("SOPClassUID") else None
        # pydicom keeps what it parsed before the end of a cut file, which may be nothing at all.
        if len(ds) == 0 or _PIXEL_DATA_TAG_LE in data[132:] or _PIXEL_DATA_TAG_BE in data[132:]:
            raise ImageReadError(
                path, "DICOM file is truncated: it ends inside or before its pixel data", _REEXPORT_HINT
            )
        if "Rows" in ds or (sop_class and "Image Storage" in sop_class.name):
            raise ImageReadError(
                path,
                "DICOM image has no pixel data: its header describes an image but the Pixel Data element "
                "is missing (removed by an anonymiser or export tool, or the file was cut just before it)",
                "export the study again with its pixel data",
            )
        kind = f"a {sop_class.name}" if sop_class else "an object of unknown SOP class"
        raise ImageReadError(
            path,
            f"DICOM object has no pixel data: it is {kind}, not an image",
            "remove reports, plans and other non-image objects from the input folder",
        )
    missing = [tag for tag in _REQUIRED_TAGS if ds.get(tag) in (None, "")]
    if missing:
        raise ImageReadError(path, f"DICOM image lacks required tag(s) {', '.join(missing)}", _REEXPORT_HINT)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(
            path,
            f"multi-frame DICOM ({frames} frames) is refused: a spine radiograph is one frame",
            "export the single projection image of the study",
        )
    _check_dimensions(path, int(ds.Rows), int(ds.Columns))
    photometric = str(ds.PhotometricInterpretation).strip()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if not ((photometric in _GRAY and samples == 1) or (photometric in _COLOUR and samples == 3)):
        raise ImageReadError(
            path,
            f"unsupported photometric interpretation {photometric!r} with {samples} sample(s) per pixel",
            "a radiograph must be MONOCHROME1/2 (or RGB); export the original grayscale image",
        )
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise ImageReadError(
            path,
            f"unsupported bit depth ({stored} bits stored in {allocated} allocated; 8 or 16 allocated are supported)",
            "export the image with 8-16 bit samples",
        )


def _transfer_syntax(ds: Dataset) -> UID:
    """The data set's transfer syntax; for a preamble-less data set, the one it was read with."""
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if not little:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _check_decodable(path: str | Path, ds: Dataset) -> None:
    """Refuse a transfer syntax with no installed decoder."""
    uid = _transfer_syntax(ds)
    ds.file_meta.TransferSyntaxUID = uid  # pydicom decodes by this element; raw data sets lack it
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageReadError(
            path,
            f"transfer syntax {uid.name} ({uid}) is not supported for pixel data",
            "convert the file to Explicit VR Little Endian or JPEG 2000 (e.g. dcmconv, gdcmconv)",
        ) from None
    if not decoder.is_available:
        options = " | ".join(dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies)
        raise ImageReadError(
            path,
            f"no decoder is installed for transfer syntax {uid.name} ({uid})",
            f"pip install a pydicom decoder plugin, one of: {options}",
        )


def _monochrome_to_u8(arr: np.ndarray, ds: Dataset, invert: bool) -> tuple[np.ndarray, str]:
    """Apply the intensity chain to every possible stored value, then look the image up."""
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    index = arr.view(unsigned)
    # domain[i] is the stored value whose bit pattern is i, so lut[index] needs no offset.
    domain = np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)
    values = apply_modality_lut(domain, ds)
    unit, windowing = _voi_unit(values, ds)
    if unit is None:
        if arr.dtype == np.uint8 and values is domain:
            unit, windowing = domain / 255.0, "none"
        else:
            counts = _histogram(index, domain.size)
            unit, windowing = _percentile_unit(values.astype(np.float64), counts), "percentile"
    lut = _unit_to_u8(unit)
    if invert:
        np.subtract(255, lut, out=lut)
    return lut[index], windowing


def _voi_unit(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray | None, str]:
    """Map modality values to [0, 1] by the VOI LUT Sequence or window, if the file has one."""
    items = ds.get("VOILUTSequence")
    if items and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None:
        descriptor = items[0].LUTDescriptor
        n_entries, first_mapped = int(descriptor[0]) or 65536, int(descriptor[1])
        last_mapped = first_mapped + n_entries - 1
        inputs = np.clip(np.rint(values), first_mapped, last_mapped).astype(np.int64)
        out = apply_voi(inputs, ds)
        # Normalise by the table's own range: vendors often declare 16 bits but fill 12.
        entries = apply_voi(np.arange(first_mapped, last_mapped + 1, dtype=np.int64), ds)
        lo, hi = float(entries.min()), float(entries.max())
        if hi > lo:
            return (out.astype(np.float64) - lo) / (hi - lo), "voi_lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        centre = _first_value(ds.WindowCenter)
        width = _first_value(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        unit = _window_unit(values.astype(np.float64), centre, width, function)
        if unit is not None:
            return unit, "window"
    return None, ""


def _first_value(value: object) -> float:
    """Window Center/Width may hold several alternatives (VM 1-n); the first is the default."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _window_unit(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2/C.11.2.1.3 windowing onto [0, 1]; None when the window is invalid."""
    if not (math.isfinite(centre) and math.isfinite(width)):
        return None
    if function == "LINEAR" and width >= 1:
        if width == 1:
            return (values > centre - 0.5).astype(np.float64)
        return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - centre) / width, -700, 700)))
    return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, column = (float(v) for v in ds.get(keyword))
        except (TypeError, ValueError):
            continue
        if row > 0 and column > 0 and math.isfinite(row) and math.isfinite(column):
            return (row, column)
    return None


# -------------------------------------------------------------------------------------- raster


@dataclass(frozen=True)
class _RasterHeader:
    """What a PNG, JPEG or TIFF header says the file decodes to.

    Attributes:
        rows: Height in pixels (0 when the header defers it, e.g. a JPEG DNL marker).
        columns: Width in pixels.
        channels: Channels OpenCV returns (palette PNG/TIFF expand to 3 or 4, gray+alpha to 4).
        sample_bytes: Bytes per decoded sample (1, 2, 4 or 8).
        pages: Images in the file that are not reduced-resolution copies (TIFF pages, APNG frames).
        progressive: A progressive JPEG, whose decoder buffers every DCT coefficient.
    """

    rows: int
    columns: int
    channels: int
    sample_bytes: int
    pages: int = 1
    progressive: bool = False


@dataclass(frozen=True)
class _RasterPlan:
    """A raster file checked before decoding: its format, header and estimated peak bytes."""

    fmt: str
    header: _RasterHeader
    cost: int


def _plan_raster(path: str | Path, data: bytes) -> _RasterPlan:
    """Size a PNG, JPEG or TIFF from its own header and check it against the limits."""
    fmt = _raster_format(data)
    if fmt is None:
        other = _unsupported_format(data)
        if other is not None:
            raise ImageReadError(
                path,
                f"{other} images are not supported (only DICOM, PNG, JPEG and TIFF are read)",
                "export the study as DICOM (or PNG) instead",
            )
        raise ImageReadError(
            path,
            "not an image: the content is neither DICOM (no 'DICM' marker at byte 128) nor PNG, JPEG or TIFF",
            "remove it from the input folder, or export the study again as DICOM or PNG",
        )
    try:
        header = _png_header(data) if fmt == "PNG" else _jpeg_header(data) if fmt == "JPEG" else _tiff_header(data)
    except (struct.error, IndexError):
        header = None
    if header is None or header.rows == 0:
        raise ImageReadError(
            path,
            f"{fmt} header is damaged or cut short, so the image size is unknown; refused before decoding",
            _REEXPORT_HINT,
        )
    if header.pages > 1:
        what = "multi-page TIFF" if fmt == "TIFF" else f"animated {fmt}"
        raise ImageReadError(
            path,
            f"{what} ({header.pages} pages) is refused: a spine radiograph is one image",
            "export the single projection image of the study",
        )
    _check_dimensions(path, header.rows, header.columns)
    pixels = header.rows * header.columns
    decoded = pixels * header.channels * header.sample_bytes
    variable = decoded + pixels  # OpenCV's array and the 8-bit result
    if header.channels > 1:
        # Measured: OpenCV decodes colour into a buffer of its own and converts it into the array
        # it returns (twice the decoded size at its peak), then the gray conversion; then the
        # guard's 8-bit, 3-channel copy that its thumbnail is made from.
        variable += decoded + pixels * header.sample_bytes + pixels * 3
    if header.sample_bytes > 2:  # float path: float32 copy, float64 unit, percentile copies
        variable += pixels * header.channels * 4 + pixels * 24
    if header.progressive:
        variable += pixels * header.channels * 2
    # Measured peaks were up to 10% above this sum (libpng/libtiff row buffers, zlib windows).
    cost = _FIXED_BYTES + len(data) + variable * 11 // 10
    _check_cost(path, cost, f"this {header.rows} x {header.columns} {fmt} image")
    return _RasterPlan(fmt=fmt, header=header, cost=cost)


def _decode_raster(path: str | Path, data: bytes, plan: _RasterPlan) -> Radiograph:
    """Decode a raster file that :func:`_plan_raster` checked."""
    fmt, header = plan.fmt, plan.header
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageReadError(path, _raster_failure(data, fmt), _REEXPORT_HINT)
    if decoded.shape[:2] != (header.rows, header.columns):
        raise ImageReadError(
            path,
            f"{fmt} decoded to {decoded.shape[0]} x {decoded.shape[1]}, but its header says "
            f"{header.rows} x {header.columns}",
            _REEXPORT_HINT,
        )
    original_dtype = str(decoded.dtype)
    if decoded.dtype not in (np.uint8, np.uint16, np.float32):
        decoded = decoded.astype(np.float32)
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if channels == 3:
        gray, photometric = cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY), "RGB"
    elif channels == 4:
        gray, photometric = cv2.cvtColor(decoded, cv2.COLOR_BGRA2GRAY), "RGBA"
    else:
        gray = decoded if decoded.ndim == 2 else decoded[:, :, 0]
        photometric = "MONOCHROME2"
    image, windowing = _gray_to_u8(gray)
    return Radiograph(
        image=image,
        path=str(path),
        kind="raster",
        bits_stored=8 * np.dtype(original_dtype).itemsize,
        photometric=photometric,
        pixel_spacing=None,
        original_dtype=original_dtype,
        source_shape=(int(image.shape[0]), int(image.shape[1])),
        windowing=windowing,
        colour=_colour_thumbnail(decoded) if channels in (3, 4) else None,
    )


def _colour_thumbnail(colour: np.ndarray) -> np.ndarray:
    """The guard's view of colour samples: uint8, alpha dropped, long side at most MEASURE_SIDE.

    The same steps as :func:`spine_edge.guard.measure_image` takes on full samples (scale to 8
    bits by the peak, then an area-averaged thumbnail), so measuring this copy gives the same
    numbers: the guard's own thumbnail of it is itself.
    """
    rgb = colour[..., :3]
    if rgb.dtype != np.uint8:
        peak = float(rgb.max(initial=0))
        factor = np.float32(255.0 / peak if peak > 0 else 0.0)
        scaled = np.empty(rgb.shape, np.uint8)
        rows = max(1, _HISTOGRAM_CHUNK // max(1, rgb.shape[1] * 3))  # a float32 copy of a few rows at a time
        for top in range(0, rgb.shape[0], rows):
            scaled[top : top + rows] = rgb[top : top + rows].astype(np.float32) * factor
        rgb = scaled
    h, w = rgb.shape[:2]
    factor = MEASURE_SIDE / max(h, w)
    if factor >= 1:
        return np.ascontiguousarray(rgb)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    thumbnail: np.ndarray = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)
    return thumbnail


def _raster_failure(data: bytes, fmt: str | None) -> str:
    """Say why OpenCV could not decode a file, as precisely as its bytes allow."""
    tail = data[-64:]
    if fmt == "PNG" and b"IEND" not in tail:
        return "PNG file is truncated: it ends before its IEND chunk"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "JPEG file is truncated: it ends before its end-of-image marker"
    return f"{fmt} data cannot be decoded: the file is damaged or truncated"


def _png_header(data: bytes) -> _RasterHeader | None:
    """IHDR, plus an APNG animation control chunk (acTL) if one comes before the image data."""
    if data[12:16] != b"IHDR":
        return None
    columns, rows, depth, colour = struct.unpack(">IIBB", data[16:26])
    # OpenCV returns gray as 1 channel, gray+alpha and palette with transparency as BGRA.
    channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(colour)
    if channels is None:
        return None
    frames, offset = 1, 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            break
        if kind == b"acTL":
            (frames,) = struct.unpack(">I", data[offset + 8 : offset + 12])
        elif kind == b"tRNS" and colour == 3:
            channels = 4
        offset += 12 + length
    return _RasterHeader(rows, columns, channels, 2 if depth == 16 else 1, pages=frames)


def _jpeg_header(data: bytes) -> _RasterHeader | None:
    """The frame header (SOFn) of a JPEG, found by walking its marker segments.

    Bytes between segments that are not a marker (libjpeg skips them with a warning, so they
    must not hide the frame header from this check) are skipped the same way: up to the next FF.
    """
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # stuffed byte, TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC), and JPEG-LS SOF55 (F7).
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            precision, rows, columns, components = struct.unpack(">BHHB", data[i + 4 : i + 10])
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            return _RasterHeader(rows, columns, components, 1 if precision <= 8 else 2, progressive=progressive)
        i += 2 + length
    return None


_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                    16: 8, 17: 8, 18: 8}  # fmt: skip
_TIFF_TYPE_FORMAT = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TIFF_MAX_IFDS = 1024


def _tiff_header(data: bytes) -> _RasterHeader | None:
    """The first image directory of a classic TIFF or BigTIFF, and how many pages follow it.

    Pages are directories not marked as a reduced-resolution copy (NewSubfileType bit 0), so a
    TIFF that carries a thumbnail or a pyramid is one image; a scanned document's pages are not.
    """
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    if version == 42:
        (offset,) = struct.unpack(order + "I", data[4:8])
        count_format, entry_bytes, inline, offset_format = "H", 12, 4, "I"
    elif version == 43 and struct.unpack(order + "HH", data[4:8]) == (8, 0):
        (offset,) = struct.unpack(order + "Q", data[8:16])
        count_format, entry_bytes, inline, offset_format = "Q", 20, 8, "Q"
    else:
        return None
    count_bytes, offset_bytes = struct.calcsize(count_format), struct.calcsize(offset_format)
    first: dict[int, list[int]] | None = None
    pages, seen = 0, set[int]()
    while offset and offset not in seen and len(seen) < _TIFF_MAX_IFDS:
        seen.add(offset)
        (count,) = struct.unpack(order + count_format, data[offset : offset + count_bytes])
        tags: dict[int, list[int]] = {}
        for k in range(count):
            start = offset + count_bytes + k * entry_bytes
            tag, kind = struct.unpack(order + "HH", data[start : start + 4])
            if tag not in (254, 256, 257, 258, 262, 277) or kind not in _TIFF_TYPE_FORMAT:
                continue
            (n,) = struct.unpack(order + offset_format, data[start + 4 : start + 4 + offset_bytes])
            n = min(n, 16)
            size = n * _TIFF_TYPE_BYTES[kind]
            where = start + 4 + offset_bytes
            if size > inline:
                (where,) = struct.unpack(order + offset_format, data[where : where + offset_bytes])
            fmt = order + _TIFF_TYPE_FORMAT[kind] * n
            tags[tag] = list(struct.unpack(fmt, data[where : where + struct.calcsize(fmt)]))
        if first is None:
            first = tags
        if not tags.get(254, [0])[0] & 1:
            pages += 1
        next_at = offset + count_bytes + count * entry_bytes
        (offset,) = struct.unpack(order + offset_format, data[next_at : next_at + offset_bytes])
    if first is None or 256 not in first or 257 not in first:
        return None
    samples = first.get(277, [1])[0]
    bits = max(first.get(258, [1]))
    channels = 3 if first.get(262, [1])[0] == 3 else max(samples, 1)  # palette expands to BGR
    sample_bytes = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    return _RasterHeader(first[257][0], first[256][0], channels, sample_bytes, pages=max(pages, 1))


# ------------------------------------------------------------------------------ intensity maps


def _gray_to_u8(gray: np.ndarray) -> tuple[np.ndarray, str]:
    """8-bit samples as they are; 16-bit and float samples by percentile stretch."""
    if gray.dtype == np.uint8:
        return np.ascontiguousarray(gray), "none"
    if gray.dtype == np.uint16:
        counts = _histogram(gray, 65536)
        lut = _unit_to_u8(_percentile_unit(np.arange(65536, dtype=np.float64), counts))
        return lut[gray], "percentile"
    finite = gray[np.isfinite(gray)]
    if finite.size == 0:
        return np.zeros(gray.shape, np.uint8), "percentile"
    lo, hi = np.percentile(finite, STRETCH_PERCENTILES, method="inverted_cdf")
    if hi <= lo:
        lo, hi = finite.min(), finite.max()
    if hi <= lo:
        return np.zeros(gray.shape, np.uint8), "percentile"
    unit = np.clip((np.nan_to_num(gray, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return _unit_to_u8(unit), "percentile"


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """Counts of each value of an unsigned integer array, in chunks.

    np.bincount converts its whole input to int64 first (eight bytes a pixel: 160 MB for a 20 MP
    image); chunks bound that copy to :data:`_HISTOGRAM_CHUNK` values.
    """
    flat = values.reshape(-1)
    counts = np.zeros(bins, np.int64)
    for start in range(0, flat.size, _HISTOGRAM_CHUNK):
        counts += np.bincount(flat[start : start + _HISTOGRAM_CHUNK], minlength=bins)
    return counts


def _percentile_unit(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Map ``values`` to [0, 1] between the stretch percentiles of a histogram over them.

    Args:
        values: The (modality) value of each histogram bin.
        counts: How many pixels fall in each bin.

    Returns:
        One unit value per bin; all zeros for a constant image.
    """
    present = np.flatnonzero(counts)
    order = np.argsort(values[present], kind="stable")
    sorted_values = values[present][order]
    cumulative = np.cumsum(counts[present][order])
    total = cumulative[-1]
    low, high = (np.searchsorted(cumulative, p / 100 * total) for p in STRETCH_PERCENTILES)
    lo, hi = sorted_values[low], sorted_values[min(high, len(sorted_values) - 1)]
    if hi <= lo:
        lo, hi = sorted_values[0], sorted_values[-1]
    if hi <= lo:
        return np.zeros(values.shape, np.float64)
    unit: np.ndarray = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return unit


def _unit_to_u8(unit: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.rint(np.asarray(unit, np.float64) * 255.0).astype(np.uint8)
    return out
