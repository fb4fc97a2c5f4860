"""Write DICOM radiographs: the one DICOM writer of the project.

The synthetic dataset generator, the benchmark's synthetic radiographs and the tests all build
their files here, so what :func:`spine_edge.imageio.read_image` is tested against is what the
project writes everywhere.

By default a data set looks like a VinDr-SpineXR image: a DX SOP class, the Image Pixel module,
Pixel Spacing and nothing else (no Modality, PatientID, Study or Series UID). Those are added with
``uids`` and ``tags``, so readers can be tested without optional attributes.

Files are written with the 128-byte preamble and file meta information (DICOM Part 10). Compressed
transfer syntaxes are encoded for real: JPEG 2000 lossless with pylibjpeg (pylibjpeg-openjpeg),
RLE lossless with pydicom's own encoder.

Example:
    >>> pixels = np.full((48, 64), 1000, np.uint16)
    >>> dataset = build_radiograph_dataset(pixels, window=(1024, 2048), transfer_syntax="jpeg2000-lossless")
    >>> write_dicom(tmp_path / "a.dicom", dataset)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID

from spine_edge.io_utils import write_bytes_atomic

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit-little": pydicom.uid.ExplicitVRLittleEndian,
    "implicit-little": pydicom.uid.ImplicitVRLittleEndian,
    "jpeg2000-lossless": pydicom.uid.JPEG2000Lossless,
    "rle": pydicom.uid.RLELossless,
}
"""Short names accepted by ``transfer_syntax``; the compressed ones are encoded for real."""

DX_FOR_PRESENTATION = pydicom.uid.DigitalXRayImageStorageForPresentation
"""The SOP class of VinDr-SpineXR images, and the default."""

_ENCODING_PLUGINS: dict[UID, str] = {pydicom.uid.JPEG2000Lossless: "pylibjpeg"}
"""Encoders to use where pydicom's default is not installed; "" lets pydicom choose."""


@dataclass(frozen=True)
class DicomUIDs:
    """Explicit UIDs for a data set, e.g. derived from a seed so that files are reproducible.

    Attributes:
        sop_instance: SOP Instance UID (also the Media Storage SOP Instance UID).
        study_instance: Study Instance UID, or None to omit it.
        series_instance: Series Instance UID, or None to omit it.
    """

    sop_instance: str
    study_instance: str | None = None
    series_instance: str | None = None


def build_radiograph_dataset(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    voi_lut: tuple[int, np.ndarray] | None = None,
    rescale: tuple[float, float] | None = None,
    transfer_syntax: str = "explicit-little",
    frames: int = 1,
    with_pixels: bool = True,
    sop_class: str = DX_FOR_PRESENTATION,
    pixel_spacing: tuple[float, float] | None = (0.14, 0.14),
    uids: DicomUIDs | None = None,
    tags: Mapping[str, object] | None = None,
) -> FileDataset:
    """Build a DICOM data set in memory; edit it further, or write it with :func:`write_dicom`.

    Args:
        pixels: [H, W] gray or [H, W, 3] RGB stored values; uint8, uint16, int8 or int16. Stored
            as given: for MONOCHROME1 pass the already inverted values. Required unless
            ``with_pixels`` is False.
        photometric: Photometric Interpretation to record.
        bits_stored: Bits Stored; default 12 for 16-bit arrays, 8 for 8-bit ones.
        window: (Window Center, Window Width), or None for no window.
        voi_function: VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), or None to omit it.
        voi_lut: (first mapped value, uint16 table) for a VOI LUT Sequence, or None.
        rescale: (Rescale Slope, Rescale Intercept), or None.
        transfer_syntax: A key of :data:`TRANSFER_SYNTAXES`.
        frames: Number of frames; the image is repeated in each.
        with_pixels: False builds an object with no Image Pixel module (e.g. a report).
        sop_class: SOP Class UID.
        pixel_spacing: Pixel Spacing in mm (row, column), or None to omit it.
        uids: SOP Instance, Study and Series UIDs; None generates a random SOP Instance UID and
            omits the other two.
        tags: Further attributes by DICOM keyword, e.g. ``{"Modality": "DX", "PatientID": "p1"}``;
            a None value leaves the attribute out. Not for Image Pixel module attributes, which
            the pixels and the options above determine.

    Returns:
        The data set, with file meta information and a 128-byte preamble.

    Raises:
        ValueError: Unknown ``transfer_syntax`` or tag keyword, or no ``pixels`` while
            ``with_pixels`` is True.

    Example:
        >>> pixels = np.full((48, 64), 1000, np.uint16)
        >>> dataset = build_radiograph_dataset(
        ...     pixels, bits_stored=12, window=(2048, 4096), transfer_syntax="jpeg2000-lossless",
        ...     tags={"Modality": "DX", "BodyPartExamined": "LSPINE"})
        >>> dataset.file_meta.TransferSyntaxUID.name
        'JPEG 2000 Image Compression (Lossless Only)'
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; use one of {sorted(TRANSFER_SYNTAXES)}")
    instance_uid = uids.sop_instance if uids is not None else pydicom.uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if uids is not None and uids.study_instance is not None:
        ds.StudyInstanceUID = uids.study_instance
    if uids is not None and uids.series_instance is not None:
        ds.SeriesInstanceUID = uids.series_instance
    _set_tags(ds, tags or {})
    if not with_pixels:
        return ds
    if pixels is None:
        raise ValueError("pixels is required when with_pixels is True")
    if bits_stored is None:
        bits_stored = 8 * pixels.dtype.itemsize - (4 if pixels.dtype.itemsize == 2 else 0)
    array = np.stack([pixels] * frames) if frames > 1 else pixels
    ds.set_pixel_data(array, photometric, bits_stored, generate_instance_uid=False)
    if pixel_spacing is not None:
        # Decimal String holds at most 16 characters: 0.14 / 0.05 would print as 2.8000000000000003.
        ds.PixelSpacing = [f"{value:.6g}" for value in pixel_spacing]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first_mapped, table = voi_lut
        item = Dataset()
        item.add_new(0x00283002, "US", [len(table), first_mapped, 16])  # LUT Descriptor
        item.add_new(0x00283006, "OW", np.asarray(table, "<u2").tobytes())  # LUT Data
        ds.VOILUTSequence = [item]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if uid.is_compressed:
        # generate_instance_uid=False: pydicom would otherwise replace the caller's UID.
        ds.compress(uid, encoding_plugin=_ENCODING_PLUGINS.get(uid, ""), generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    return ds


def dicom_bytes(dataset: Dataset) -> bytes:
    """Encode a data set as a DICOM Part 10 file in memory.

    Example:
        >>> data = dicom_bytes(build_radiograph_dataset(np.zeros((8, 8), np.uint16)))
        >>> data[128:132]
        b'DICM'
    """
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(path: str | Path, dataset: Dataset) -> Path:
    """Write a data set as a DICOM Part 10 file, atomically; parent folders are created.

    Returns:
        ``path`` as a Path.

    Example:
        >>> pixels = np.full((48, 64), 1000, np.uint16)
        >>> write_dicom(tmp_path / "a.dicom", build_radiograph_dataset(pixels))  # doctest: +SKIP
        PosixPath('.../a.dicom')
    """
    return write_bytes_atomic(path, dicom_bytes(dataset))


def _set_tags(ds: Dataset, tags: Mapping[str, object]) -> None:
    for keyword, value in tags.items():
        # pydicom would store an unknown keyword as a plain Python attribute and never write it.
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. 'PatientID', 'BodyPartExamined')")
        if value is not None:
            setattr(ds, keyword, value)
