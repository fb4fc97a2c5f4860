"""JPEG 2000 codestreams: size them from their own header, and decode them at a reduced resolution.

Two jobs, both for :mod:`spine_edge.imageio`:

* :func:`parse_codestream` reads the main header of a codestream (SIZ: image size, components,
  precision; COD/COC: the number of wavelet decomposition levels) without decoding anything, so the
  reader can check a DICOM's Rows/Columns against what the codestream will really decode to, and
  budget memory, before a single pixel is decoded.
* :func:`decode` decodes a codestream with OpenJPEG (``libopenjp2``) through :mod:`ctypes`, at
  resolution level ``reduce`` (0 = full size, r = each side divided by 2**r, rounded up). Why not
  a decoder from PyPI: pylibjpeg-openjpeg and imagecodecs have no reduced-resolution decode;
  pylibjpeg-openjpeg and Pillow's JPEG 2000 plugin hold the GIL for the whole decode (measured:
  two threads decode no faster than one), and Pillow's ``reduce`` failed with "broken data
  stream" at levels 2-3 of real-size files that OpenJPEG itself, called directly, decodes at every
  level. A :mod:`ctypes` call releases the GIL, so decodes run in parallel with each other and
  with inference. The stream is handed to OpenJPEG in one read callback (that callback and the
  error handler are the only moments the GIL is taken back).

The library is looked up, in order, at ``$SPINE_EDGE_OPENJP2`` (a path), as the system's
``libopenjp2`` (Debian/Ubuntu ``libopenjp2-7``, present wherever Pillow or GDAL come from the
distribution) and as the copy Pillow's wheels ship (``pillow.libs``/``PIL/.dylibs``).
:func:`decoder_available` says whether one was found; without one the reader falls back to
pydicom's full-resolution decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SOC = b"\xff\x4f"
_SIZ = 0xFF51
_COD = 0xFF52
_COC = 0xFF53
_SOT = 0xFF90
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_OPJ_CODEC_J2K = 0
_OPJ_CODEC_JP2 = 2
# opj_dparameters_t is about 18 KB on 64-bit builds (two 4096-byte path buffers plus options); it
# is only ever filled by opj_set_default_decoder_parameters, so an oversized buffer is safe.
_DPARAMETERS_BYTES = 64 * 1024
_MIN_VERSION = (2, 3)


class CodestreamError(ValueError):
    """A JPEG 2000 codestream whose main header cannot be read."""


class DecodeError(RuntimeError):
    """OpenJPEG could not decode a codestream (the messages OpenJPEG gave are in the text)."""


@dataclass(frozen=True)
class CodestreamInfo:
    """What a JPEG 2000 main header says the codestream decodes to.

    Attributes:
        rows: Image height at full resolution (Ysiz - YOsiz).
        columns: Image width at full resolution (Xsiz - XOsiz).
        components: Csiz, the number of components.
        precision: Bit depth of each component (1-38).
        signed: Whether each component's samples are signed.
        subsampled: Whether any component is sub-sampled (XRsiz or YRsiz above 1).
        levels: Wavelet decomposition levels available in every component (the smallest over
            COD and COC in the main header): the largest usable ``reduce`` value.
        jp2: True when the codestream came wrapped in a JP2 file (boxes), not bare.
    """

    rows: int
    columns: int
    components: int
    precision: tuple[int, ...]
    signed: tuple[bool, ...]
    subsampled: bool
    levels: int
    jp2: bool

    def reduced_shape(self, reduce: int) -> tuple[int, int]:
        """(rows, columns) that a decode at resolution level ``reduce`` returns."""
        step = 1 << reduce
        return -(-self.rows // step), -(-self.columns // step)


def parse_codestream(data: bytes | memoryview) -> CodestreamInfo:
    """Read SIZ, COD and COC from the main header of a J2K codestream or a JP2 file.

    Args:
        data: The codestream (starting with the SOC marker FF4F) or a JP2 file; only its main
            header (up to the first tile, usually well under 1 KB) is read.

    Returns:
        What the codestream decodes to.

    Raises:
        CodestreamError: The data is neither, or its main header is cut short or inconsistent.
    """
    view = bytes(data[: 1 << 16]) if len(data) > 1 << 16 else bytes(data)
    jp2 = view.startswith(_JP2_SIGNATURE)
    if jp2:
        view = _jp2_codestream(bytes(data))
    if not view.startswith(_SOC):
        raise CodestreamError("does not start with a JPEG 2000 SOC marker (FF4F)")
    try:
        return _parse_main_header(view, jp2)
    except struct.error:
        raise CodestreamError("main header is cut short") from None


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of the first contiguous-codestream ('jp2c') box of a JP2 file."""
    offset = 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if length == 1:
            if offset + 16 > len(data):
                break
            (length,) = struct.unpack(">Q", data[offset + 8 : offset + 16])
            header = 16
        elif length == 0:
            length = len(data) - offset
        if kind == b"jp2c":
            return data[offset + header : offset + header + min(length - header, 1 << 16)]
        if length < header:
            break
        offset += length
    raise CodestreamError("JP2 file has no codestream box")


def _parse_main_header(view: bytes, jp2: bool) -> CodestreamInfo:
    offset = 2
    size: tuple[int, int, int, tuple[int, ...], tuple[bool, ...], bool] | None = None
    cod_levels: int | None = None
    coc_levels: list[int] = []
    while offset + 4 <= len(view):
        marker, length = struct.unpack(">HH", view[offset : offset + 4])
        if marker == _SOT:
            break
        if marker >> 8 != 0xFF or length < 2:
            raise CodestreamError(f"main header has an invalid marker 0x{marker:04X} at byte {offset}")
        segment = view[offset + 4 : offset + 2 + length]
        if len(segment) != length - 2:
            raise CodestreamError("main header is cut short")
        if marker == _SIZ:
            size = _parse_siz(segment)
        elif marker == _COD:
            cod_levels = segment[5]  # Scod, SGcod (4 bytes), then SPcod's first byte
        elif marker == _COC and size is not None:
            component_bytes = 1 if size[2] < 257 else 2
            coc_levels.append(segment[component_bytes + 1])
        offset += 2 + length
    if size is None:
        raise CodestreamError("main header has no SIZ marker")
    if cod_levels is None:
        raise CodestreamError("main header has no COD marker")
    rows, columns, components, precision, signed, subsampled = size
    return CodestreamInfo(
        rows=rows,
        columns=columns,
        components=components,
        precision=precision,
        signed=signed,
        subsampled=subsampled,
        levels=min([cod_levels, *coc_levels]),
        jp2=jp2,
    )


def _parse_siz(segment: bytes) -> tuple[int, int, int, tuple[int, ...], tuple[bool, ...], bool]:
    xsiz, ysiz, x_offset, y_offset = struct.unpack(">IIII", segment[2:18])
    (components,) = struct.unpack(">H", segment[34:36])
    if not 1 <= components <= 16384 or len(segment) < 36 + 3 * components:
        raise CodestreamError(f"SIZ marker declares {components} components but is {len(segment)} bytes")
    if xsiz <= x_offset or ysiz <= y_offset:
        raise CodestreamError(f"SIZ marker declares an empty image ({xsiz}x{ysiz}, offset {x_offset},{y_offset})")
    precision, signed, subsampled = [], [], False
    for k in range(components):
        ssiz, xr, yr = segment[36 + 3 * k : 39 + 3 * k]
        precision.append((ssiz & 0x7F) + 1)
        signed.append(bool(ssiz & 0x80))
        subsampled = subsampled or xr != 1 or yr != 1
    return ysiz - y_offset, xsiz - x_offset, components, tuple(precision), tuple(signed), subsampled


# ------------------------------------------------------------------------------------ decoding


class _ImageComp(ctypes.Structure):
    _fields_ = [
        ("dx", ctypes.c_uint32),
        ("dy", ctypes.c_uint32),
        ("w", ctypes.c_uint32),
        ("h", ctypes.c_uint32),
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("prec", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("sgnd", ctypes.c_uint32),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    _fields_ = [
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("x1", ctypes.c_uint32),
        ("y1", ctypes.c_uint32),
        ("numcomps", ctypes.c_uint32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_ImageComp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_MSG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_READ_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_NO_DATA = ctypes.c_size_t(-1).value  # OpenJPEG's (OPJ_SIZE_T)-1: end of stream


def _candidate_paths() -> list[str]:
    configured = os.environ.get("SPINE_EDGE_OPENJP2")
    if configured:
        return [configured]
    found = [ctypes.util.find_library("openjp2") or ""]
    spec = importlib.util.find_spec("PIL")
    if spec is not None and spec.origin:
        package = Path(spec.origin).parent
        for pattern in ("../pillow.libs/libopenjp2*.so*", ".dylibs/libopenjp2*.dylib"):
            found.extend(sorted(glob.glob(str(package / pattern))))
    return [path for path in found if path]


def _load(path: str) -> tuple[ctypes.CDLL, str] | None:
    try:
        lib = ctypes.CDLL(path)
        lib.opj_version.restype = ctypes.c_char_p
        version = lib.opj_version().decode("ascii", "replace")
        if tuple(int(p) for p in version.split(".")[:2]) < _MIN_VERSION:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    c_void_p, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    signatures: dict[str, tuple[list[object], object]] = {
        "opj_create_decompress": ([c_int], c_void_p),
        "opj_destroy_codec": ([c_void_p], None),
        "opj_set_default_decoder_parameters": ([c_void_p], None),
        "opj_setup_decoder": ([c_void_p, c_void_p], c_int),
        "opj_set_error_handler": ([c_void_p, _MSG_CALLBACK, c_void_p], c_int),
        "opj_set_warning_handler": ([c_void_p, _MSG_CALLBACK, c_void_p], c_int),
        "opj_set_info_handler": ([c_void_p, _MSG_CALLBACK, c_void_p], c_int),
        "opj_stream_create": ([ctypes.c_size_t, c_int], c_void_p),
        "opj_stream_destroy": ([c_void_p], None),
        "opj_stream_set_read_function": ([c_void_p, _READ_CALLBACK], None),
        "opj_stream_set_skip_function": ([c_void_p, _SKIP_CALLBACK], None),
        "opj_stream_set_seek_function": ([c_void_p, _SEEK_CALLBACK], None),
        "opj_stream_set_user_data": ([c_void_p, c_void_p, c_void_p], None),
        "opj_stream_set_user_data_length": ([c_void_p, ctypes.c_uint64], None),
        "opj_read_header": ([c_void_p, c_void_p, ctypes.POINTER(ctypes.POINTER(_Image))], c_int),
        "opj_set_decoded_resolution_factor": ([c_void_p, c_uint32], c_int),
        "opj_decode": ([c_void_p, c_void_p, ctypes.POINTER(_Image)], c_int),
        "opj_end_decompress": ([c_void_p, c_void_p], c_int),
        "opj_image_destroy": ([ctypes.POINTER(_Image)], None),
    }
    try:
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = restype
    except AttributeError:
        return None
    # OpenJPEG 2.2+: code-blocks of one image decoded by several threads (a build without thread
    # support has the function and returns false, in which case one thread decodes).
    threads = getattr(lib, "opj_codec_set_threads", None)
    if threads is not None:
        threads.argtypes = [c_void_p, c_int]
        threads.restype = c_int
    return lib, version


@functools.cache
def _openjp2() -> tuple[ctypes.CDLL, str] | None:
    """The first usable library of :func:`_candidate_paths`, searched once per process."""
    for path in _candidate_paths():
        found = _load(path)
        if found is not None:
            return found
    return None


def decoder_available() -> bool:
    """Tell whether an OpenJPEG library (2.3 or newer) was found for :func:`decode`."""
    return _openjp2() is not None


def decoder_version() -> str | None:
    """The version of the OpenJPEG library :func:`decode` uses, or None when none was found."""
    found = _openjp2()
    return None if found is None else found[1]


class _InFlight:
    """How many :func:`decode` calls run at this moment in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    @contextlib.contextmanager
    def entered(self) -> Iterator[int]:
        with self._lock:
            self.count += 1
            now = self.count
        try:
            yield now
        finally:
            with self._lock:
                self.count -= 1


_IN_FLIGHT = _InFlight()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def decode_threads(in_flight: int) -> int:
    """OpenJPEG threads for one decode while ``in_flight`` decodes (itself included) run.

    The CPUs this process may use, shared between the decodes running: a radiograph decoded alone
    (a kiosk's one image, the latency that matters there) gets every core, while a read-ahead's
    parallel decodes get one each, as before. ``$SPINE_EDGE_J2K_THREADS`` caps it (1 turns it off).
    """
    share = max(1, _cpus() // max(1, in_flight))
    configured = os.environ.get("SPINE_EDGE_J2K_THREADS", "").strip()
    if configured.isdigit() and int(configured) >= 1:
        share = min(share, int(configured))
    return share


def decode(data: bytes, reduce: int = 0, dtype: np.dtype | type = np.int32, threads: int | None = None) -> np.ndarray:
    """Decode a single-component JPEG 2000 codestream (or JP2 file) at a resolution level.

    The GIL is released while OpenJPEG works, so several threads decode in parallel; one image's
    code-blocks are also split over OpenJPEG's own worker threads (:func:`decode_threads`: all
    cores for a decode that runs alone; measured on a real-size 1,953 px file, 2 cores: full decode
    970 → 600 ms, level 1 264 → 153 ms, the same samples).

    Args:
        data: The codestream or JP2 file.
        reduce: Resolution level: each side is divided by ``2 ** reduce`` (rounded up). Must not
            exceed :attr:`CodestreamInfo.levels`.
        dtype: dtype of the result; OpenJPEG's int32 samples are converted while they are still the
            library's (one copy, not two). It must hold the codestream's precision.
        threads: OpenJPEG worker threads for this image (1: the calling thread only; None:
            :func:`decode_threads`; ignored by a library built without thread support).

    Returns:
        [H, W] samples of ``dtype`` (signed values already sign-extended by OpenJPEG).

    Raises:
        DecodeError: No library was found, the codestream has more than one component, or
            OpenJPEG failed (its error messages are in the exception).
    """
    with _IN_FLIGHT.entered() as running:
        return _decode(data, reduce, dtype, decode_threads(running) if threads is None else threads)


def _decode(data: bytes, reduce: int, dtype: np.dtype | type, threads: int) -> np.ndarray:
    found = _openjp2()
    if found is None:
        raise DecodeError("no OpenJPEG library (libopenjp2 2.3 or newer) was found")
    lib = found[0]
    messages: list[str] = []
    position = [0]
    size = len(data)
    source = ctypes.c_char_p(data)
    base = ctypes.cast(source, ctypes.c_void_p).value or 0

    def on_error(message: bytes | None, _user: int | None) -> None:
        messages.append((message or b"").decode("utf-8", "replace").strip())

    def on_read(buffer: int | None, count: int, _user: int | None) -> int:
        start = position[0]
        if buffer is None or start >= size:
            return _NO_DATA
        count = min(count, size - start)
        ctypes.memmove(buffer, base + start, count)
        position[0] = start + count
        return count

    def on_skip(count: int, _user: int | None) -> int:
        start = position[0]
        position[0] = max(0, min(size, start + count))
        return position[0] - start

    def on_seek(target: int, _user: int | None) -> int:
        if not 0 <= target <= size:
            return 0
        position[0] = target
        return 1

    callbacks = (_MSG_CALLBACK(on_error), _MSG_CALLBACK(lambda _m, _u: None), _READ_CALLBACK(on_read),
                 _SKIP_CALLBACK(on_skip), _SEEK_CALLBACK(on_seek))  # fmt: skip
    codec_format = _OPJ_CODEC_JP2 if data[:12] == _JP2_SIGNATURE else _OPJ_CODEC_J2K
    codec = lib.opj_create_decompress(codec_format)
    stream = lib.opj_stream_create(max(size, 1), 1)
    image = ctypes.POINTER(_Image)()
    try:
        lib.opj_set_error_handler(codec, callbacks[0], None)
        lib.opj_set_warning_handler(codec, callbacks[1], None)
        lib.opj_set_info_handler(codec, callbacks[1], None)
        parameters = ctypes.create_string_buffer(_DPARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(parameters)
        if not lib.opj_setup_decoder(codec, parameters):
            raise DecodeError(_failure("setting up the decoder failed", messages))
        if threads > 1 and hasattr(lib, "opj_codec_set_threads"):
            lib.opj_codec_set_threads(codec, threads)
        lib.opj_stream_set_read_function(stream, callbacks[2])
        lib.opj_stream_set_skip_function(stream, callbacks[3])
        lib.opj_stream_set_seek_function(stream, callbacks[4])
        lib.opj_stream_set_user_data(stream, None, None)
        lib.opj_stream_set_user_data_length(stream, size)
        if not lib.opj_read_header(stream, codec, ctypes.byref(image)):
            raise DecodeError(_failure("the codestream header cannot be read", messages))
        if image.contents.numcomps != 1:
            raise DecodeError(f"the codestream has {image.contents.numcomps} components; only 1 is decoded here")
        if reduce and not lib.opj_set_decoded_resolution_factor(codec, reduce):
            raise DecodeError(_failure(f"resolution level {reduce} is not available", messages))
        if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(codec, stream):
            raise DecodeError(_failure("decoding failed", messages))
        component = image.contents.comps[0]
        rows, columns = int(component.h), int(component.w)
        if not component.data or rows * columns == 0:
            raise DecodeError(_failure("the decoder returned no samples", messages))
        return np.ctypeslib.as_array(component.data, shape=(rows, columns)).astype(dtype)
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_stream_destroy(stream)
        lib.opj_destroy_codec(codec)
        del source


def _failure(what: str, messages: list[str]) -> str:
    said = "; ".join(m for m in messages if m)
    return f"{what} (OpenJPEG: {said})" if said else what
