"""JPEG 2000 decoding on an NVIDIA GPU (nvImageCodec / nvJPEG2000), behind :mod:`spine_edge.j2k`'s contract.

:func:`decode` takes what :func:`spine_edge.j2k.decode` takes and returns what it returns: the
samples of a single-component 8-16 bit (signed or unsigned) codestream, unchanged (no colour
conversion, no scaling to 8 bits), as a host numpy array of the requested dtype, at resolution level
``reduce`` (each side divided by ``2 ** reduce``, rounded up); it raises
:class:`spine_edge.j2k.DecodeError`. :func:`choose_decoder` picks this module or OpenJPEG for the
reader and says why.

nvImageCodec (``pip install 'spine-edge[gpu-decode-cu12]'``, or ``-cu13``) is imported on the first
call, never when this module is imported. Its Python API has no reduced-resolution decode (the
nvJPEG2000 C library has one, ``nvjpeg2kDecodeTile``'s ``num_res_levels``, but nvImageCodec 0.9 always
asks it for every level), so ``reduce > 0`` costs a full-resolution GPU decode, a full-size copy to
the host and :func:`reduce_like_openjpeg` on the CPU (0.1-0.2 s and 14 bytes a sample at its peak for a
9 MP film, measured on one core of a 2-core box): the GPU path saves the entropy decode, not the
reduction. That CPU step repeats JPEG 2000's own
reversible 5/3 analysis low-pass, vertical then horizontal, once per level, so the result has
OpenJPEG's shape (sides rounded up) and its co-sited grid (pixel ``i`` centred on original pixel
``i * 2**reduce``, which :meth:`spine_edge.imageio.Radiograph.boxes_to_original` assumes), and for a
lossless single-tile codestream exactly OpenJPEG's samples. A block average would not do: it centres
pixel ``i`` half a block further on, and its values differ from the wavelet low-pass the reduced
CPU decode returns. For lossy (9/7) or multi-tile codestreams the result is close to, not equal to,
OpenJPEG's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from spine_edge import j2k

#: The extras that install nvImageCodec with nvJPEG2000 (pyproject.toml), by CUDA major.
GPU_DECODE_EXTRAS = ("gpu-decode-cu12", "gpu-decode-cu13")
#: The oldest nvImageCodec used: the release NVIDIA's own pydicom plugin requires (0.8.0).
MIN_VERSION = (0, 8)
#: Default for ``max_bytes``: the same 512 MiB as :data:`spine_edge.imageio.MAX_DECODE_BYTES`.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: nvJPEG2000 decodes up to 16 bits per component.
MAX_PRECISION = 16
#: CPU threads of each decoder's executor: the reader's own threads are the parallelism, so one each
#: keeps N reader threads from starting N x (CPU count) executor threads.
CPU_THREADS = 1
# Host bytes per full-resolution sample that reduce_like_openjpeg holds at its peak (int32 samples,
# their symmetrically extended copy and the half-size high-pass and low-pass arrays).
_REDUCE_WORK_BYTES_PER_SAMPLE = 16
_INSTALL_HINT = "pip install 'spine-edge[gpu-decode-cu12]' (or gpu-decode-cu13 with driver R580+)"
_LOG = logging.getLogger(__name__)
_LOCAL = threading.local()

DecoderPreference = Literal["auto", "cpu", "gpu"]


# ------------------------------------------------------------------------------- availability


@functools.cache
def _cuda_devices() -> tuple[int, str | None]:
    """(CUDA device count, why none) from the driver API, without any CUDA Python package."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver is installed (libcuda.so.1 not found)"
    status = lib.cuInit(0)
    if status == 100:  # CUDA_ERROR_NO_DEVICE
        return 0, "the NVIDIA driver sees no CUDA device"
    if status:
        return 0, f"the NVIDIA driver does not start (cuInit error {status}); check it with nvidia-smi"
    count = ctypes.c_int(0)
    status = lib.cuDeviceGetCount(ctypes.byref(count))
    if status or count.value == 0:
        return 0, "the NVIDIA driver sees no CUDA device"
    return count.value, None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


@functools.cache
def _library() -> tuple[Any, str | None]:
    """(``nvidia.nvimgcodec``, None) or (None, why it cannot be used); imported once per process."""
    if not _module_present("nvidia.nvimgcodec"):
        return None, f"nvImageCodec is not installed: {_INSTALL_HINT}"
    try:
        module = importlib.import_module("nvidia.nvimgcodec")
    except (ImportError, OSError) as exc:  # a broken install: a missing or mismatched shared library
        return None, f"nvImageCodec does not load ({type(exc).__name__}: {exc})"
    version = str(getattr(module, "__version__", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        floor = ".".join(map(str, MIN_VERSION))
        return None, f"nvImageCodec {version} is older than {floor}: {_INSTALL_HINT}"
    if not _module_present("nvidia.nvjpeg2k") and not ctypes.util.find_library("nvjpeg2k"):
        return None, f"nvImageCodec is installed without nvJPEG2000 (its [nvjpeg2k] extra): {_INSTALL_HINT}"
    return module, None


def unavailable_reason(device: int = 0) -> str | None:
    """Why :func:`decode` cannot run on ``device``, or None when it can.

    Checks, in order: nvImageCodec installed and loading, its version, nvJPEG2000 present, an NVIDIA
    driver with CUDA device ``device``. Nothing is decoded and no decoder is created.
    """
    _, reason = _library()
    if reason is not None:
        return reason
    count, why = _cuda_devices()
    if why is not None:
        return why
    if not 0 <= device < count:
        return f"CUDA device {device} does not exist (this box has {count}: 0..{count - 1})"
    return None


def decoder_available(device: int = 0) -> bool:
    """Tell whether nvImageCodec with nvJPEG2000 and CUDA device ``device`` are there for :func:`decode`."""
    return unavailable_reason(device) is None


def decoder_version() -> str | None:
    """The version of nvImageCodec that :func:`decode` uses, or None when it cannot be used."""
    module, _ = _library()
    return None if module is None else str(module.__version__)


# ------------------------------------------------------------------------------------ decoding


def decode_bytes(info: j2k.CodestreamInfo, reduce: int, dtype: np.dtype | type) -> int:
    """Bytes a :func:`decode` of ``info`` at ``reduce`` into ``dtype`` holds at its peak.

    The full-resolution image on the GPU and its host copy (1 byte a sample up to 8 bits, else 2),
    the work of :func:`reduce_like_openjpeg` when ``reduce > 0``, and the result. nvJPEG2000's own
    device buffers (code-block data, a few times the codestream) are not counted.
    """
    pixels = info.rows * info.columns
    container = 1 if max(info.precision) <= 8 else 2
    rows, columns = info.reduced_shape(reduce)
    work = pixels * _REDUCE_WORK_BYTES_PER_SAMPLE if reduce else 0
    return 2 * pixels * container + work + rows * columns * np.dtype(dtype).itemsize


def decode(
    data: bytes,
    reduce: int = 0,
    dtype: np.dtype | type = np.int32,
    *,
    device: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Decode a single-component JPEG 2000 codestream (or JP2 file) on the GPU.

    Each calling thread gets its own nvImageCodec decoder per device, made on its first call and
    kept for the thread's life (a decoder holds CUDA streams and buffers; sharing one between threads
    would serialise them).

    Args:
        data: The codestream or JP2 file.
        reduce: Resolution level, as :func:`spine_edge.j2k.decode`: each side divided by
            ``2 ** reduce``, rounded up; at most :attr:`spine_edge.j2k.CodestreamInfo.levels`.
            nvImageCodec decodes full resolution and :func:`reduce_like_openjpeg` reduces it.
        dtype: dtype of the result; an integer type that holds the codestream's precision.
        device: CUDA device index.
        max_bytes: Refuse, before decoding, a codestream whose :func:`decode_bytes` exceed this.

    Returns:
        [H, W] samples of ``dtype``, the values the codestream holds.

    Raises:
        DecodeError: The codestream's header is unreadable or it is not one 1-16 bit component, the
            level is not in it, the decode would exceed ``max_bytes``, nvImageCodec or the GPU is not
            available, or nvImageCodec could not decode it.

    Example:
        >>> samples = nvj2k.decode(frame, reduce=1, dtype=np.uint16)
    """
    info = _check(data, reduce, dtype, max_bytes)
    decoder, module = _decoder(device)
    params = module.DecodeParams(
        apply_exif_orientation=False, color_spec=module.ColorSpec.UNCHANGED, allow_any_depth=True
    )
    try:
        image = decoder.decode(module.CodeStream(bytes(data)), params=params)
        host = None if image is None else image.cpu()
    except Exception as exc:  # nvImageCodec raises RuntimeError/ValueError from its C++ layer
        raise j2k.DecodeError(f"nvImageCodec could not decode the codestream ({type(exc).__name__}: {exc})") from exc
    if host is None:
        raise j2k.DecodeError("nvImageCodec could not decode the codestream (it returned no image)")
    samples = np.asarray(host)
    if samples.ndim == 3 and samples.shape[2] == 1:
        samples = samples[:, :, 0]
    if samples.shape != (info.rows, info.columns):
        raise j2k.DecodeError(
            f"nvImageCodec returned {samples.shape} samples for a {info.rows} x {info.columns} codestream"
        )
    _check_range(samples, info)
    if reduce:
        return reduce_like_openjpeg(samples, reduce, info.precision[0], info.signed[0]).astype(dtype)
    return samples.astype(dtype)


def _check(data: bytes, reduce: int, dtype: np.dtype | type, max_bytes: int) -> j2k.CodestreamInfo:
    """Refuse, from the main header alone, what :func:`decode` will not decode."""
    try:
        info = j2k.parse_codestream(data)
    except j2k.CodestreamError as exc:
        raise j2k.DecodeError(f"the codestream header cannot be read ({exc})") from exc
    if info.components != 1 or info.subsampled:
        raise j2k.DecodeError(f"the codestream has {info.components} components; only 1 is decoded here")
    precision, signed = info.precision[0], info.signed[0]
    if precision > MAX_PRECISION:
        raise j2k.DecodeError(f"the codestream has {precision}-bit samples; nvJPEG2000 decodes up to 16 bits")
    target = np.dtype(dtype)
    value_bits = target.itemsize * 8 - (target.kind == "i")  # bits for magnitudes, sign bit excluded
    if target.kind not in "iu" or (signed and target.kind == "u") or value_bits < precision - signed:
        raise j2k.DecodeError(f"{target} cannot hold {'signed' if signed else 'unsigned'} {precision}-bit samples")
    if not 0 <= reduce <= info.levels:
        raise j2k.DecodeError(f"resolution level {reduce} is not available (the codestream has {info.levels})")
    needed = decode_bytes(info, reduce, target)
    if needed > max_bytes:
        raise j2k.DecodeError(
            f"decoding this {info.rows} x {info.columns} codestream on the GPU needs about {needed / 2**20:.1f} MiB, "
            f"more than the {max_bytes / 2**20:.1f} MiB allowed; refused before decoding"
        )
    return info


def _decoder(device: int) -> tuple[Any, Any]:
    """This thread's nvImageCodec decoder for ``device``, made on first use."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise j2k.DecodeError(f"no GPU JPEG 2000 decoder: {reason}")
    module, _ = _library()
    decoders: dict[int, Any] = getattr(_LOCAL, "decoders", None) or {}
    _LOCAL.decoders = decoders
    if device not in decoders:
        # Only GPU backends: nvImageCodec's CPU fallbacks (OpenCV) would make this a slower copy of j2k.
        backends = [module.Backend(module.BackendKind.GPU_ONLY), module.Backend(module.BackendKind.HYBRID_CPU_GPU)]
        try:
            decoders[device] = module.Decoder(device_id=device, max_num_cpu_threads=CPU_THREADS, backends=backends)
        except Exception as exc:  # the C++ layer raises RuntimeError (no device, out of memory)
            raise j2k.DecodeError(f"nvImageCodec could not create a decoder on CUDA device {device} ({exc})") from exc
    return decoders[device], module


def _check_range(samples: np.ndarray, info: j2k.CodestreamInfo) -> None:
    """Refuse samples outside the codestream's precision: a decoder that scaled them to its container."""
    precision, signed = info.precision[0], info.signed[0]
    low, high = (-(1 << (precision - 1)), (1 << (precision - 1)) - 1) if signed else (0, (1 << precision) - 1)
    if samples.dtype.kind not in "iu" or int(samples.min()) < low or int(samples.max()) > high:
        raise j2k.DecodeError(
            f"nvImageCodec returned {samples.dtype} samples outside the codestream's {precision}-bit range "
            f"[{low}, {high}]: it did not keep the values"
        )


# ----------------------------------------------------------------------------- reduced levels


def reduce_like_openjpeg(samples: np.ndarray, reduce: int, precision: int, signed: bool) -> np.ndarray:
    """What OpenJPEG's decode at resolution level ``reduce`` returns, computed from the full image.

    Applies JPEG 2000's reversible 5/3 analysis low-pass (integer lifting, whole-sample symmetric
    extension), to the columns and then the rows, ``reduce`` times, and clips to the samples'
    range as OpenJPEG does. For a lossless (5/3) single-tile codestream with its origin at 0 this is
    exactly OpenJPEG's reduced decode; otherwise it is the same low-pass on the same grid.

    Args:
        samples: [H, W] integer samples at full resolution.
        reduce: Levels to drop (0 returns the samples as int32).
        precision: Bits per sample of the codestream.
        signed: Whether the samples are signed.

    Returns:
        int32 [ceil(H / 2**reduce), ceil(W / 2**reduce)].
    """
    low = samples.astype(np.int32)
    for _ in range(reduce):
        low = _lowpass(_lowpass(low, 0), 1)
    bottom, top = (-(1 << (precision - 1)), (1 << (precision - 1)) - 1) if signed else (0, (1 << precision) - 1)
    return np.clip(low, bottom, top, out=low)


def _lowpass(x: np.ndarray, axis: int) -> np.ndarray:
    """The low-pass half of one 5/3 lifting step along ``axis`` (ceil(n / 2) samples)."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n == 1:  # a one-sample signal passes unchanged (ITU-T T.800 F.3.7)
        return np.moveaxis(x, 0, axis)
    half = (n + 1) // 2
    ext = np.pad(x, [(2, 2)] + [(0, 0)] * (x.ndim - 1), mode="reflect")  # x[-k] = x[k], x[n-1+k] = x[n-1-k]
    # High-pass at the odd positions -1, 1, ..., 2*half - 1 (index + 2 in ext), then low-pass at the evens.
    high = ext[1 : 2 * half + 2 : 2] - ((ext[0 : 2 * half + 1 : 2] + ext[2 : 2 * half + 3 : 2]) >> 1)
    low = ext[2 : 2 * half + 2 : 2] + ((high[:-1] + high[1:] + 2) >> 2)
    return np.moveaxis(low, 0, axis)


# ---------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class DecoderChoice:
    """The JPEG 2000 decoder the reader uses, with :mod:`spine_edge.j2k`'s three functions.

    Attributes:
        kind: "gpu" (this module, nvImageCodec) or "cpu" (:mod:`spine_edge.j2k`, OpenJPEG).
        reason: Why it was chosen, for logs and ``bench`` reports.
        device: CUDA device index the GPU decoder runs on.
        max_bytes: The GPU decoder's ``max_bytes``.
    """

    kind: Literal["cpu", "gpu"]
    reason: str
    device: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES

    def decoder_available(self) -> bool:
        """Whether the chosen decoder can decode (OpenJPEG found; nvImageCodec and the GPU there)."""
        return decoder_available(self.device) if self.kind == "gpu" else j2k.decoder_available()

    def decoder_version(self) -> str | None:
        """The chosen library's version."""
        return decoder_version() if self.kind == "gpu" else j2k.decoder_version()

    def decode(self, data: bytes, reduce: int = 0, dtype: np.dtype | type = np.int32) -> np.ndarray:
        """:func:`decode` or :func:`spine_edge.j2k.decode`, looked up at each call."""
        if self.kind == "gpu":
            return decode(data, reduce, dtype, device=self.device, max_bytes=self.max_bytes)
        return j2k.decode(data, reduce, dtype)


def choose_decoder(
    prefer: DecoderPreference = "auto", device: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
) -> DecoderChoice:
    """Pick the GPU decoder where it can run and is wanted, else OpenJPEG; log the reason.

    Args:
        prefer: "gpu" or "auto": this module when nvImageCodec, nvJPEG2000 and CUDA device
            ``device`` are there, else OpenJPEG (a warning for "gpu", info for "auto"); "cpu":
            OpenJPEG.
        device: CUDA device index for the GPU decoder.
        max_bytes: The GPU decoder's memory bound (see :func:`decode`).

    Returns:
        The choice; call its ``decode`` as :func:`spine_edge.j2k.decode`.

    Example:
        >>> choice = choose_decoder("auto")
        >>> samples = choice.decode(frame, 1, np.uint16)
    """
    if prefer not in ("auto", "cpu", "gpu"):
        raise ValueError(f"prefer must be 'auto', 'cpu' or 'gpu', not {prefer!r}")
    if prefer == "cpu":
        choice = DecoderChoice("cpu", "the CPU decoder (OpenJPEG) was asked for", device, max_bytes)
        _LOG.info("JPEG 2000 decoder: %s", choice.reason)
        return choice
    reason = unavailable_reason(device)
    if reason is None:
        choice = DecoderChoice("gpu", f"nvImageCodec {decoder_version()} on CUDA device {device}", device, max_bytes)
        _LOG.info("JPEG 2000 decoder: %s", choice.reason)
        return choice
    choice = DecoderChoice("cpu", f"OpenJPEG, because the GPU decoder cannot run: {reason}", device, max_bytes)
    _LOG.log(logging.WARNING if prefer == "gpu" else logging.INFO, "JPEG 2000 decoder: %s", choice.reason)
    return choice
