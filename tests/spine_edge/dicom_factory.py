"""Small DICOM files for tests, built with the project's one writer, :mod:`spine_edge.dicom_writer`.

By default a file looks like a VinDr-SpineXR image: a DX SOP class, the Image Pixel module, Pixel
Spacing and nothing else (no Modality, no PatientID), so readers are tested without optional tags.

Example:
    >>> pixels = np.full((48, 64), 1000, np.uint16)
    >>> write_test_dicom(tmp_path / "a.dicom", pixels, window=(1024, 2048),
    ...                  transfer_syntax="jpeg2000-lossless")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom.uid

from spine_edge.dicom_writer import DX_FOR_PRESENTATION, TRANSFER_SYNTAXES, build_radiograph_dataset, write_dicom

__all__ = [
    "BASIC_TEXT_SR",
    "DX_FOR_PRESENTATION",
    "RT_PLAN",
    "TRANSFER_SYNTAXES",
    "build_test_dataset",
    "write_test_dicom",
]

BASIC_TEXT_SR = pydicom.uid.BasicTextSRStorage
RT_PLAN = pydicom.uid.RTPlanStorage

build_test_dataset = build_radiograph_dataset
"""The tests' name for :func:`spine_edge.dicom_writer.build_radiograph_dataset`."""


def write_test_dicom(path: str | Path, pixels: np.ndarray | None = None, **options: object) -> Path:
    """Build a data set with :func:`build_test_dataset` and write it as a DICOM Part 10 file.

    Args:
        path: Where to write; parent folders are created.
        pixels: See :func:`build_test_dataset`.
        **options: Keyword arguments of :func:`build_test_dataset`.

    Returns:
        ``path`` as a Path.
    """
    return write_dicom(path, build_test_dataset(pixels, **options))  # type: ignore[arg-type]
