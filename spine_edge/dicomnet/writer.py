"""Write one result record as DICOM files next to the JSON results: the SR and the SC images.

Layout under the DICOM output folder, one folder per analysed image::

    <dicom_out>/<source SOP Instance UID>/SR.dcm            Comprehensive SR, TID 1500
    <dicom_out>/<source SOP Instance UID>/SC-overlay.dcm    boxes + triage caption, RGB
    <dicom_out>/<source SOP Instance UID>/SC-heatmap.dcm    class-activation heatmap, RGB (when asked
                                                            and the record has a heatmap picture)

Only ``ok`` records of DICOM inputs produce files: a refused or failed input, or a PNG (which has
no patient or study to file results under), produces none; its reason is in results.jsonl.

Because every UID is derived from the source and the bundle (:func:`~spine_edge.dicomnet.common.derived_uid`),
writing a record again (replay after a crash, ``infer --resume``) rewrites the same objects.

Example:
    >>> files = write_dicom_results(record, DicomOutputConfig(Path("out/dicom"), results_root=Path("out")))
    >>> files.sr  # doctest: +SKIP
    PosixPath('out/dicom/1.2.3/SR.dcm')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from spine_edge.dicom_writer import write_dicom
from spine_edge.dicomnet.common import DicomNetError, sop_instance_uid
from spine_edge.dicomnet.sc import build_secondary_capture, heatmap_to_source_grid, overlay_picture
from spine_edge.dicomnet.sr import build_sr
from spine_edge.errors import ImageReadError
from spine_edge.imageio import is_dicom, read_image

log = logging.getLogger(__name__)

SR_NAME = "SR.dcm"
OVERLAY_NAME = "SC-overlay.dcm"
HEATMAP_NAME = "SC-heatmap.dcm"


@dataclass(frozen=True)
class DicomOutputConfig:
    """Where and what to write.

    Attributes:
        folder: The DICOM output folder (``--dicom-out``).
        results_root: The folder the record's relative picture paths (``heatmap``) are under, i.e.
            the JSON output folder; None writes no heatmap SC.
        overlay: Write the overlay SC.
        heatmap: Write the heatmap SC when the record has a heatmap picture.
        institution_name: Recorded in the SR, if given.
    """

    folder: Path
    results_root: Path | None = None
    overlay: bool = True
    heatmap: bool = True
    institution_name: str | None = None


@dataclass(frozen=True)
class DicomResultFiles:
    """The files written for one record.

    Attributes:
        source_uid: SOP Instance UID of the analysed image.
        sr: The SR file.
        overlay: The overlay SC file, or None.
        heatmap: The heatmap SC file, or None.
    """

    source_uid: str
    sr: Path
    overlay: Path | None = None
    heatmap: Path | None = None

    def paths(self) -> list[Path]:
        """Every file written, SR first."""
        return [p for p in (self.sr, self.overlay, self.heatmap) if p is not None]


def result_folder(folder: Path, source_uid: str) -> Path:
    """The folder holding the DICOM results of the image with SOP Instance UID ``source_uid``."""
    return folder / source_uid


def write_dicom_results(
    record: Mapping[str, Any], config: DicomOutputConfig, *, image: np.ndarray | None = None
) -> DicomResultFiles | None:
    """Write the SR and the SCs for one result record; None where the record warrants no DICOM result.

    This is what ``infer --dicom-out`` calls after each record; the service calls
    :func:`write_sr` and :func:`write_secondary_captures` apart, so that the SR can leave before
    the pictures are drawn.

    Args:
        record: A result record (``CascadeResult.to_dict()`` form) whose ``source`` is the analysed file.
        config: Output folder and options.
        image: See :func:`write_secondary_captures`.

    Returns:
        The files written, or None for a record that is not ``ok`` or whose source is not DICOM.

    Raises:
        DicomNetError: The source file is gone or unreadable now, or does not match the record.
        MissingDependencyError: highdicom is not installed (``spine-edge[dicom]``).
    """
    sr = write_sr(record, config)
    if sr is None:
        return None
    overlay, heatmap = write_secondary_captures(record, config, image=image)
    return DicomResultFiles(source_uid=sr.parent.name, sr=sr, overlay=overlay, heatmap=heatmap)


def write_sr(record: Mapping[str, Any], config: DicomOutputConfig) -> Path | None:
    """Write the SR of one result record; None for a record that is not ``ok`` or not of a DICOM file.

    Raises:
        DicomNetError: See :func:`write_dicom_results`.
    """
    found = _source(record)
    if found is None:
        return None
    _, source = found
    target = result_folder(config.folder, sop_instance_uid(source))
    path = write_dicom(target / SR_NAME, build_sr(record, source, institution_name=config.institution_name))
    log.info("%s: SR written to %s", target.name, target)
    return path


def write_secondary_captures(
    record: Mapping[str, Any], config: DicomOutputConfig, *, image: np.ndarray | None = None
) -> tuple[Path | None, Path | None]:
    """Write the overlay SC and, when the record has a heatmap picture, the heatmap SC.

    Args:
        record: An ``ok`` record of a DICOM file (others write nothing).
        config: Output folder and options (``overlay``, ``heatmap``, ``results_root``).
        image: The windowed uint8 image the cascade saw (``CascadeResult.image``, or the service's
            ``images/`` PNG), for the overlay; None decodes the source again (a JPEG 2000 radiograph
            costs up to a second or two here). An image decoded at a reduced resolution is upsampled to
            the source's pixel grid and the boxes drawn at full size on it: the SC keeps the source's grid
            and Pixel Spacing, and the fast decode is not paid for twice.

    Returns:
        (overlay SC, heatmap SC), each None where not written.

    Raises:
        DicomNetError: See :func:`write_dicom_results`; also a heatmap picture named by the record
            that is missing.
    """
    found = _source(record)
    if found is None:
        return None, None
    source_path, source = found
    target = result_folder(config.folder, sop_instance_uid(source))
    overlay_path = None
    if config.overlay:
        if image is None:
            try:
                image = read_image(source_path).image
            except ImageReadError as exc:
                raise DicomNetError(f"{source_path}: cannot decode the image again for the overlay SC ({exc})") from exc
        overlay_path = write_dicom(
            target / OVERLAY_NAME, build_secondary_capture(record, source, overlay_picture(record, image))
        )
    heatmap_path = None
    relative = record.get("heatmap")
    if config.heatmap and relative and config.results_root is not None:
        picture = cv2.imread(str(config.results_root / relative), cv2.IMREAD_COLOR)
        if picture is None:
            raise DicomNetError(f"{config.results_root / relative}: the heatmap picture is missing or unreadable")
        decoded, size = record.get("decoded_size"), record.get("image_size")
        if decoded and size and list(decoded) != list(size):  # drawn on a reduced-resolution decode
            picture = heatmap_to_source_grid(picture, size, decoded)
        heatmap_path = write_dicom(
            target / HEATMAP_NAME, build_secondary_capture(record, source, picture, kind="heatmap")
        )
    return overlay_path, heatmap_path


def _source(record: Mapping[str, Any]) -> tuple[Path, Dataset] | None:
    """The analysed file and its header, or None where the record warrants no DICOM result."""
    if record.get("status") != "ok":
        return None
    source_path = Path(str(record.get("source")))
    if not source_path.is_file():
        raise DicomNetError(f"{source_path}: the analysed file is gone; its DICOM results cannot be written")
    if not is_dicom(source_path):
        log.debug("%s: not DICOM, so no SR (results for raster files stay in results.jsonl)", source_path)
        return None
    try:
        return source_path, pydicom.dcmread(source_path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DicomNetError(f"{source_path}: cannot read the DICOM header again ({exc})") from exc
