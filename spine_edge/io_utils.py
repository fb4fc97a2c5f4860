"""Atomic file writes: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
    """Text version of :func:`write_bytes_atomic` (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_image_atomic(path: str | Path, image: np.ndarray) -> Path:
    """Encode an image with OpenCV by the path's extension and write it atomically."""
    target = Path(path)
    ok, buf = cv2.imencode(target.suffix or ".png", image)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as {target.suffix}")
    return write_bytes_atomic(target, buf.tobytes())
