"""Synthetic radiographs for a benchmark without data: real VinDr-SpineXR sizes and file format.

Without ``--data`` the benchmark still has to decode what a real box decodes, so these are 12-bit
JPEG 2000 lossless DICOM files at the sizes of the two public VinDr-SpineXR samples (DESIGN.md),
written by the project's one DICOM writer (:mod:`spine_edge.dicom_writer`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from spine_edge.dicom_writer import build_radiograph_dataset, write_dicom

#: (rows, columns) of the two public VinDr-SpineXR samples (DESIGN.md).
REAL_SIZES: tuple[tuple[int, int], ...] = ((1485, 1172), (2949, 1470))
#: Bits stored, as in VinDr-SpineXR files.
BITS_STORED = 12


def synthetic_pixels(rows: int, cols: int, index: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth spine-like column with soft tissue and mild noise, as 12-bit stored values.

    Enough for the decoder to do realistic work (noise-free images compress to nothing and decode
    too fast), with no claim to look like a lesion or not.
    """
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    centre = cols * (0.5 + 0.05 * np.sin(y / rows * np.pi * (1 + index)))
    column = np.exp(-(((x - centre) / (cols * 0.12)) ** 2))
    bodies = 0.5 + 0.5 * np.cos(y / (rows / (7 + index)) * 2 * np.pi) ** 2
    tissue = np.exp(-(((x - cols / 2) / (cols * 0.45)) ** 2))
    pixels = 600 + 900 * tissue + 1800 * column * bodies + rng.normal(0, 12, (rows, cols))
    return pixels.clip(0, 2**BITS_STORED - 1).astype(np.uint16)


def write_synthetic_radiographs(
    folder: Path, count: int, seed: int = 0, progress: Callable[[int], None] | None = None
) -> list[Path]:
    """Write ``count`` 12-bit JPEG 2000 lossless DICOM radiographs at real VinDr-SpineXR sizes.

    Args:
        folder: Where to write ``synthetic_NN.dicom`` (created if missing).
        count: Number of files; the sizes alternate through :data:`REAL_SIZES`.
        seed: Seed of the noise.
        progress: Called with 1 after each file.

    Returns:
        The files, in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        rows, cols = REAL_SIZES[i % len(REAL_SIZES)]
        dataset = build_radiograph_dataset(
            synthetic_pixels(rows, cols, i, rng),
            photometric="MONOCHROME2",
            bits_stored=BITS_STORED,
            window=(2048, 4096),
            transfer_syntax="jpeg2000-lossless",
            pixel_spacing=(0.14, 0.14),
        )  # the window spans the 12-bit range
        paths.append(write_dicom(folder / f"synthetic_{i:02d}.dicom", dataset))
        if progress:
            progress(1)
    return paths
