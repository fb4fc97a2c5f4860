"""Atomic file writes: a reader (or a crash) never sees half a file.

Temporary files are named ``.spine-edge.XXXXXXXX.tmp`` (:data:`TEMP_PREFIX`, eight random
characters, :data:`TEMP_SUFFIX`) in the target's folder, whatever the target is called: a fixed,
short name never pushes a long file name past the file system's 255-byte limit, and one pattern
lets :func:`remove_stale_temp_files` find what a killed process (kill -9, power cut) left behind.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import cv2
import numpy as np

#: Start and end of every temporary file name :func:`write_bytes_atomic` creates.
TEMP_PREFIX = ".spine-edge."
TEMP_SUFFIX = ".tmp"
# mkstemp's random part: eight characters from [a-z0-9_].
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; outputs and manifests must be readable by a kiosk service
        # running as another user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Text version of :func:`write_bytes_atomic` (UTF-8).

    Lone surrogates (from file names that are not valid UTF-8, which Python decodes with
    ``surrogateescape``) are written back as the bytes they stand for, so such a name survives
    unchanged instead of failing the whole file.
    """
    return write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"))


#: OpenCV encoder settings per extension for pictures people look at. JPEG: quality 95 with full
#: chroma (4:4:4), so a thin coloured box or label stays crisp instead of bleeding into the gray image.
_ENCODE_PARAMS: dict[str, list[int]] = {
    ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
}


def write_image_atomic(path: str | Path, image: np.ndarray) -> Path:
    """Encode an image with OpenCV by the path's extension (PNG lossless, JPEG quality 95) and write it atomically."""
    target = Path(path)
    suffix = target.suffix.lower() or ".png"
    ok, buf = cv2.imencode(suffix, image, _ENCODE_PARAMS.get(".jpg" if suffix == ".jpeg" else suffix, []))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as {target.suffix}")
    return write_bytes_atomic(target, buf.tobytes())


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete the temporary files :func:`write_bytes_atomic` left under ``folder`` (recursively).

    Call it only while no other process writes there (``spine-edge infer`` holds the output
    folder's lock): a live writer's temporary file has the same name pattern.

    Args:
        folder: The folder to clean; missing is fine.

    Returns:
        How many files were removed. Files that cannot be removed are left alone (a later run tries again).
    """
    removed = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if _TEMP_NAME.fullmatch(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                except OSError:
                    continue
                removed += 1
    return removed


#: ``errno`` values that mean "no room left": the disk is full, or the user's quota is.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception is the file system saying it has no room left (ENOSPC or EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
