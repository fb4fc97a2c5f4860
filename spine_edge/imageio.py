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
* **Multi-frame DICOM is refused.** A spine radiograph is one projection; several frames mean a
  cine loop or a tomosynthesis stack, and classifying its first frame would report a result for an
  image nobody chose.
* **Colour** (DICOM RGB / YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT, raster RGB/RGBA) becomes
  gray with OpenCV's BT.601 weights; alpha is dropped. PALETTE COLOR and sub-sampled YBR_PARTIAL
  are refused: no radiograph is stored that way.
* **What counts as DICOM.** :func:`is_dicom` is the cheap, exact test: "DICM" at byte 128.
  :func:`read_dicom` also accepts a data set without the 128-byte preamble (old ACR-NEMA style
  exports) when it starts with a group 0002 or 0008 element and carries pixel data; anything else
  is reported as "not a DICOM file" without being parsed further.
* **Size limits.** An image with 0 rows or columns, a side over :data:`MAX_SIDE` or more than
  :data:`MAX_PIXELS` is refused from its header, before any pixel is decoded.
* Raster files are decoded from bytes (``cv2.imdecode``), so non-ASCII paths work; EXIF
  orientation is ignored so that boxes refer to the pixels as stored.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spine_edge.errors import ImageReadError

MAX_SIDE = 20_000
"""Largest accepted image side in pixels (a spine radiograph is about 3 000)."""
MAX_PIXELS = 200_000_000
"""Largest accepted pixel count of one image."""
STRETCH_PERCENTILES = (0.5, 99.5)
"""Percentiles mapped to 0 and 255 when an image carries no window (nearest-rank definition)."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
# Files find_images never opens: their names say they are not images.
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


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One decoded radiograph.

    Attributes:
        image: uint8 [H, W], windowed, bone bright (MONOCHROME1 already inverted).
        path: The path as given to the reader.
        kind: "dicom" or "raster".
        bits_stored: DICOM Bits Stored; for raster files the bit depth of a sample (8 or 16).
        photometric: The source's photometric interpretation (for raster files MONOCHROME2 for
            gray, RGB or RGBA for colour).
        pixel_spacing: (row, column) spacing in mm from Pixel Spacing or, failing that, Imager
            Pixel Spacing; None when unknown (always for raster files).
        original_dtype: dtype of the decoded source samples, e.g. "uint16".
        source_shape: (H, W) of the source pixel grid (the reader never resizes).
        windowing: How intensities became 8-bit: "voi_lut", "window", "percentile" or "none".
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


def find_images(folder: str | Path) -> list[Path]:
    """List the image files under a folder, recursively, in a deterministic sorted order.

    Included: files ending in .dcm .dicom .png .jpg .jpeg .tif .tiff (any case), even if they turn
    out to be broken, so that the runtime reports them instead of silently skipping them; and any
    other file carrying the DICOM marker (DICOM files are often named by UID, without extension).
    Skipped: hidden files and folders (name starting with "."), DICOMDIR, files whose extension
    names a non-image (.txt, .csv, .json, ...), and files that cannot be opened to look for the
    marker. Symbolic links to files are followed; links to folders are not (no cycles).

    Args:
        folder: The folder to scan. A single file is returned as a one-element list, so callers can
            accept either.

    Returns:
        Paths sorted by their components.

    Raises:
        ImageReadError: ``folder`` does not exist.

    Example:
        >>> for path in find_images("test_images"):
        ...     radiograph = read_image(path)
    """
    root = Path(folder)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ImageReadError(root, "input folder does not exist", "check the path")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name in _NON_IMAGE_NAMES:
                continue
            path = Path(dirpath, name)
            suffix = path.suffix.lower()
            if suffix in DICOM_SUFFIXES or suffix in RASTER_SUFFIXES:
                found.append(path)
            elif suffix not in _NON_IMAGE_SUFFIXES and is_dicom(path):
                found.append(path)
    return sorted(found)


def read_image(path: str | Path) -> Radiograph:
    """Read a DICOM, PNG, JPEG or TIFF file as a windowed 8-bit radiograph.

    The format is chosen by content (DICOM marker, PNG/JPEG/TIFF signatures), then by extension,
    so a DICOM named ``.png`` is still read as DICOM.

    Args:
        path: The file.

    Returns:
        The radiograph; see :class:`Radiograph`.

    Raises:
        ImageReadError: The file is missing, empty, unreadable, truncated, not an image, or an
            image this reader refuses (multi-frame, palette colour, absurd size, no decoder).

    Example:
        >>> radiograph = read_image("train_images/0a1b2c.dicom")
        >>> radiograph.image.shape, radiograph.image.dtype
        ((1172, 1485), dtype('uint8'))
    """
    data = _read_file(path)
    raster_format = _raster_format(data)
    if _has_dicm_marker(data) or (raster_format is None and _looks_like_raw_dataset(data)):
        return _decode_dicom(path, data)
    if raster_format is not None or Path(path).suffix.lower() in RASTER_SUFFIXES:
        return _decode_raster(path, data)
    raise ImageReadError(
        path,
        "not an image: the content is neither DICOM (no 'DICM' marker at byte 128) nor PNG, JPEG "
        "or TIFF",
        "remove it from the input folder, or export the study again as DICOM or PNG",
    )


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


def read_dicom(path: str | Path) -> Radiograph:
    """Read a single-frame DICOM image; see the module docstring for the intensity chain.

    Only the Image Pixel module is required (Rows, Columns, Bits Allocated/Stored, Pixel
    Representation, Photometric Interpretation, Pixel Data); everything else is optional.

    Args:
        path: The DICOM file (any extension).

    Returns:
        The radiograph with ``kind == "dicom"``.

    Raises:
        ImageReadError: See :func:`read_image`; the hint names the decoder plugin to install when
            the transfer syntax cannot be decoded here.
    """
    return _decode_dicom(path, _read_file(path))


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
    return _decode_raster(path, _read_file(path))


def _read_file(path: str | Path) -> bytes:
    """Return a file's bytes, turning every file-system failure into an ImageReadError."""
    p = Path(path)
    try:
        info = p.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageReadError(
                path, "is a folder, not a file", "pass a folder as an input folder, not as a file"
            )
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(path, "is not a regular file", "pass an image file")
        if info.st_size == 0:
            raise ImageReadError(path, "file is empty (0 bytes)", _REEXPORT_HINT)
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist", "check the path") from None
    except PermissionError:
        raise ImageReadError(
            path, "permission denied", "give the user running spine-edge read access to it"
        ) from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None


def _has_dicm_marker(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A preamble-less data set starts with a little-endian group 0002 or 0008 element."""
    return len(data) >= 8 and data[1] == 0 and data[0] in (0x02, 0x08) and data[3] == 0


def _raster_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _check_dimensions(path: str | Path, rows: int, columns: int) -> None:
    if rows <= 0 or columns <= 0:
        raise ImageReadError(
            path, f"image has no pixels ({rows} rows x {columns} columns)", _REEXPORT_HINT
        )
    if max(rows, columns) > MAX_SIDE or rows * columns > MAX_PIXELS:
        raise ImageReadError(
            path,
            f"image is implausibly large ({rows} rows x {columns} columns; the limit is "
            f"{MAX_SIDE} px a side and {MAX_PIXELS // 1_000_000} MP), refused before decoding",
            "check the file: a spine radiograph is about 3000 px a side",
        )


# ---------------------------------------------------------------------------------------- DICOM


def _decode_dicom(path: str | Path, data: bytes) -> Radiograph:
    has_marker = _has_dicm_marker(data)
    if not has_marker and not _looks_like_raw_dataset(data):
        raise ImageReadError(
            path,
            "not a DICOM file: no 'DICM' marker at byte 128 and no DICOM data set at the start",
            "remove it from the input folder, or export the study again as DICOM",
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_marker)
    except Exception as exc:  # pydicom raises many types on a damaged header
        raise ImageReadError(
            path, f"DICOM header cannot be parsed ({type(exc).__name__}: {exc})", _REEXPORT_HINT
        ) from exc
    try:
        _check_pixel_module(path, ds)
        _check_decodable(path, ds)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom converts values on access: e.g. Number of Frames "x"
        raise ImageReadError(
            path, f"DICOM header has an invalid value ({type(exc).__name__}: {exc})", _REEXPORT_HINT
        ) from exc
    try:
        arr = pixel_array(ds)
    except Exception as exc:  # decoder plugins raise their own types on damaged codestreams
        raise ImageReadError(
            path,
            f"pixel data cannot be decoded ({_transfer_syntax(ds).name}: {exc}); the file is "
            "damaged or truncated",
            _REEXPORT_HINT,
        ) from exc
    rows, columns = int(ds.Rows), int(ds.Columns)
    if arr.shape[:2] != (rows, columns):
        raise ImageReadError(
            path,
            f"decoded pixel data has shape {arr.shape}, but the header says {rows} x {columns}",
            _REEXPORT_HINT,
        )
    photometric = str(ds.PhotometricInterpretation).strip()
    if arr.ndim == 3:
        rgb = arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(np.float32)
        image, windowing = _gray_to_u8(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    else:
        try:
            image, windowing = _monochrome_to_u8(arr, ds, photometric == "MONOCHROME1")
        except Exception as exc:  # a malformed Modality/VOI LUT
            raise ImageReadError(
                path, f"Modality or VOI LUT is malformed ({type(exc).__name__}: {exc})"
            ) from exc
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
    )


def _check_pixel_module(path: str | Path, ds: Dataset) -> None:
    """Refuse, from the header alone, every DICOM object this reader will not decode."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageReadError(
                path, "DICOM float pixel data (a parametric map) is not a radiograph"
            )
        sop_class = UID(str(ds.SOPClassUID)) if ds.get("SOPClassUID") else None
        # pydicom keeps what it parsed before the end of a cut file, which may be nothing at all.
        if len(ds) == 0 or "Rows" in ds or (sop_class and "Image Storage" in sop_class.name):
            raise ImageReadError(
                path, "DICOM file is truncated: it ends before its pixel data", _REEXPORT_HINT
            )
        kind = f"a {sop_class.name}" if sop_class else "an object of unknown SOP class"
        raise ImageReadError(
            path,
            f"DICOM object has no pixel data: it is {kind}, not an image",
            "remove reports, plans and other non-image objects from the input folder",
        )
    missing = [tag for tag in _REQUIRED_TAGS if ds.get(tag) in (None, "")]
    if missing:
        raise ImageReadError(
            path, f"DICOM image lacks required tag(s) {', '.join(missing)}", _REEXPORT_HINT
        )
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
    if not (photometric in _GRAY and samples == 1 or photometric in _COLOUR and samples == 3):
        raise ImageReadError(
            path,
            f"unsupported photometric interpretation {photometric!r} with {samples} sample(s) "
            "per pixel",
            "a radiograph must be MONOCHROME1/2 (or RGB); export the original grayscale image",
        )
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise ImageReadError(
            path,
            f"unsupported bit depth ({stored} bits stored in {allocated} allocated; 8 or 16 "
            "allocated are supported)",
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
    """Refuse a transfer syntax with no installed decoder, and native pixel data cut short."""
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
        options = " | ".join(
            dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies
        )
        raise ImageReadError(
            path,
            f"no decoder is installed for transfer syntax {uid.name} ({uid})",
            f"pip install a pydicom decoder plugin, one of: {options}",
        )
    if not uid.is_compressed:
        expected = get_expected_length(ds, "bytes")
        present = len(ds.PixelData)
        if present < expected:
            raise ImageReadError(
                path,
                f"DICOM file is truncated: {present} of {expected} pixel data bytes present",
                _REEXPORT_HINT,
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
            counts = np.bincount(index.ravel(), minlength=domain.size)
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


def _window_unit(
    values: np.ndarray, centre: float, width: float, function: str
) -> np.ndarray | None:
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
            row, column = (float(v) for v in ds.get(keyword))  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if row > 0 and column > 0 and math.isfinite(row) and math.isfinite(column):
            return (row, column)
    return None


# -------------------------------------------------------------------------------------- raster


def _decode_raster(path: str | Path, data: bytes) -> Radiograph:
    fmt = _raster_format(data)
    size = _raster_size(data, fmt)
    if size is not None:
        _check_dimensions(path, *size)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageReadError(path, _raster_failure(data, fmt), _REEXPORT_HINT)
    _check_dimensions(path, decoded.shape[0], decoded.shape[1])
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
    )


def _raster_failure(data: bytes, fmt: str | None) -> str:
    """Say why OpenCV could not decode a file, as precisely as its bytes allow."""
    if fmt is None:
        return "not an image: the content is not PNG, JPEG or TIFF"
    tail = data[-64:]
    if fmt == "PNG" and b"IEND" not in tail:
        return "PNG file is truncated: it ends before its IEND chunk"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "JPEG file is truncated: it ends before its end-of-image marker"
    return f"{fmt} data cannot be decoded: the file is damaged or truncated"


def _raster_size(data: bytes, fmt: str | None) -> tuple[int, int] | None:
    """(rows, columns) from a PNG, JPEG or classic TIFF header without decoding; None if unknown."""
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            columns, rows = struct.unpack(">II", data[16:24])
            return rows, columns
        if fmt == "JPEG":
            return _jpeg_size(data)
        if fmt == "TIFF":
            return _tiff_size(data)
    except struct.error:
        return None  # a header cut short: let the decoder report it
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        # SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            rows, columns = struct.unpack(">HH", data[i + 5 : i + 9])
            return rows, columns
        if marker == 0xDA:  # start of scan before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            i += 2
            continue
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] != 42:
        return None  # BigTIFF: left to the decoder
    offset = struct.unpack(order + "I", data[4:8])[0]
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    size: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k : offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt, end = ("H", 10) if kind == 3 else ("I", 12)
            size[tag] = struct.unpack(order + fmt, entry[8:end])[0]
    if 256 in size and 257 in size:
        return size[257], size[256]
    return None


# ------------------------------------------------------------------------------ intensity maps


def _gray_to_u8(gray: np.ndarray) -> tuple[np.ndarray, str]:
    """8-bit samples as they are; 16-bit and float samples by percentile stretch."""
    if gray.dtype == np.uint8:
        return np.ascontiguousarray(gray), "none"
    if gray.dtype == np.uint16:
        counts = np.bincount(gray.ravel(), minlength=65536)
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
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _unit_to_u8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(unit, np.float64) * 255.0).astype(np.uint8)
