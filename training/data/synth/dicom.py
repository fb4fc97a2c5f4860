"""DICOM encoding of one rendered image.

The files go through the project's one writer, :mod:`spine_edge.dicom_writer`, so the synthetic
set is written exactly like the files the reader's own tests use; only the choices of a modality
(window, inversion for MONOCHROME1, header attributes) are made here.
"""

from __future__ import annotations

import numpy as np

from spine_edge.dicom_writer import TRANSFER_SYNTAXES, DicomUIDs, build_radiograph_dataset, dicom_bytes
from spine_edge.training.data.synth.specs import DicomHeader

_TRANSFER_SYNTAX_NAMES: dict[str, str] = {uid: name for name, uid in TRANSFER_SYNTAXES.items()}


def encode_dicom(pixels: np.ndarray, header: DicomHeader, bits_stored: int) -> bytes:
    """Encode bone-bright uint16 pixels as a DICOM Part 10 file.

    MONOCHROME1 files store inverted values (and a window mirrored to match), so readers must
    invert them back. JPEG 2000 lossless needs pylibjpeg-openjpeg.

    Args:
        pixels: uint16 [rows, cols], bone bright, values below ``2**bits_stored``.
        header: The attributes planned for the file.
        bits_stored: Bits Stored of the file.

    Returns:
        The file's bytes; the same arguments give the same bytes.
    """
    maxval = 2**bits_stored - 1
    stored = (maxval - pixels).astype(np.uint16) if header.photometric == "MONOCHROME1" else pixels
    # The window a modality would set: the anatomy in the middle of the field, leaving collimation,
    # side markers and metal to saturate.
    rows, cols = pixels.shape
    middle = pixels[
        rows // 5 : rows - rows // 5 : max(1, rows // 256), cols // 5 : cols - cols // 5 : max(1, cols // 256)
    ]
    lo, hi = np.percentile(middle, (0.5, 99.5))
    centre, width = round(0.5 * (lo + hi)), max(2, round(1.1 * (hi - lo)))
    if header.photometric == "MONOCHROME1":
        centre = maxval - centre

    dataset = build_radiograph_dataset(
        stored,
        photometric=header.photometric,
        bits_stored=bits_stored,
        window=(int(centre), int(width)),
        transfer_syntax=_TRANSFER_SYNTAX_NAMES[header.transfer_syntax_uid],
        sop_class=header.sop_class_uid,
        pixel_spacing=(header.pixel_spacing_mm, header.pixel_spacing_mm),
        uids=DicomUIDs(header.sop_instance_uid, header.study_instance_uid, header.series_instance_uid),
        tags={
            "PatientID": header.patient_id,
            "Modality": header.modality,
            "BodyPartExamined": header.body_part,
            "ViewPosition": header.view_position,
            "SeriesNumber": header.series_number,
            "InstanceNumber": header.instance_number,
        },
    )
    return dicom_bytes(dataset)
