"""Synthetic radiographs that the input guard (:mod:`spine_edge.guard`) accepts, as arrays and DICOM files.

The guard refuses a flat image as blank, white noise as noise and a field of view under 60 mm, so
:func:`radiograph_pixels` draws a dark background with a gentle gradient, a column of dim "vertebrae"
with soft edges and quantum noise, bone bright. The tiny bundle (:mod:`tests.spine_edge.bundle_factory`)
calls it normal; ``abnormal=True`` adds one bright block, where that bundle finds one box.
:func:`write_radiograph_dicom` stores the pixels as a DX whose 0.5 mm pixels cover enough of a spine.

Example:
    >>> write_radiograph_dicom(tmp_path / "a.dcm", radiograph_pixels((240, 200), abnormal=True))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from spine_edge.dicom_writer import DicomUIDs, build_radiograph_dataset, write_dicom

#: Gray levels (8-bit) of the background (top, bottom), the vertebrae and the abnormal block.
BACKGROUND, VERTEBRA, BLOCK = (25, 60), 110, 250
#: 12-bit values are the 8-bit ones times this, shown with :data:`WINDOW`.
SCALE_12_BIT = 16
WINDOW = (2048, 4096)


def radiograph_pixels(
    shape: tuple[int, int],
    *,
    abnormal: bool = False,
    rng: np.random.Generator | int = 0,
    dtype: type[np.uint8 | np.uint16] = np.uint16,
) -> np.ndarray:
    """A radiograph-like image that passes every image rule of the guard.

    Args:
        shape: ``(height, width)``.
        abnormal: Add one bright block over rows ``[0, h/2)`` and columns ``[w/2, 3w/4)``.
        rng: Noise generator or seed.
        dtype: ``np.uint16`` (12-bit values, see :data:`WINDOW`) or ``np.uint8``.
    """
    h, w = shape
    image = np.repeat(np.linspace(*BACKGROUND, h, dtype=np.float32)[:, None], w, axis=1)
    for top in range(40, max(h - 80, 41), 90):
        cv2.rectangle(image, (w // 3, top), (2 * w // 3, top + 70), VERTEBRA, -1)
    noise = np.random.default_rng(rng).normal(0, 8, shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 6) + cv2.GaussianBlur(noise, (0, 0), 3)
    if abnormal:
        image[: h // 2, w // 2 : 3 * w // 4] = BLOCK
    scale = SCALE_12_BIT if dtype is np.uint16 else 1
    return (image * scale).clip(0, 255 * scale).astype(dtype)


def write_radiograph_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    uids: DicomUIDs | None = None,
    transfer_syntax: str = "jpeg2000-lossless",
    tags: Mapping[str, str] | None = None,
) -> Path:
    """Write 12-bit ``pixels`` as a DX with 0.5 mm pixels (``Modality`` DX unless ``tags`` says otherwise)."""
    dataset = build_radiograph_dataset(
        pixels,
        window=WINDOW,
        transfer_syntax=transfer_syntax,
        pixel_spacing=(0.5, 0.5),
        uids=uids,
        tags={"Modality": "DX", **(tags or {})},
    )
    return write_dicom(path, dataset)
