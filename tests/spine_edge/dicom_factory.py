"""Build small DICOM files for tests, with exactly the tags a test asks for.

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
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit-little": pydicom.uid.ExplicitVRLittleEndian,
    "implicit-little": pydicom.uid.ImplicitVRLittleEndian,
    "jpeg2000-lossless": pydicom.uid.JPEG2000Lossless,
    "rle": pydicom.uid.RLELossless,
}
"""Short names accepted by ``transfer_syntax``; the compressed ones are encoded for real."""

DX_FOR_PRESENTATION = pydicom.uid.DigitalXRayImageStorageForPresentation
BASIC_TEXT_SR = pydicom.uid.BasicTextSRStorage
RT_PLAN = pydicom.uid.RTPlanStorage


def build_test_dataset(
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
) -> FileDataset:
    """Build a DICOM data set in memory (edit it further, then save it with ``save_as``).

    Args:
        pixels: [H, W] gray or [H, W, 3] RGB samples; uint8, uint16, int8 or int16. Required
            unless ``with_pixels`` is False.
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
        pixel_spacing: Pixel Spacing in mm, or None to omit it.

    Returns:
        The data set, with file meta information and a 128-byte preamble.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if not with_pixels:
        return ds
    if pixels is None:
        raise ValueError("pixels is required when with_pixels is True")
    if bits_stored is None:
        bits_stored = 8 * pixels.dtype.itemsize - (4 if pixels.dtype.itemsize == 2 else 0)
    array = np.stack([pixels] * frames) if frames > 1 else pixels
    ds.set_pixel_data(array, photometric, bits_stored, generate_instance_uid=False)
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
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
        plugin = "pylibjpeg" if uid == pydicom.uid.JPEG2000Lossless else ""
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    return ds


def write_test_dicom(path: str | Path, pixels: np.ndarray | None = None, **options: object) -> Path:
    """Build a data set with :func:`build_test_dataset` and write it as a DICOM Part 10 file.

    Args:
        path: Where to write; parent folders are created.
        pixels: See :func:`build_test_dataset`.
        **options: Keyword arguments of :func:`build_test_dataset`.

    Returns:
        ``path`` as a Path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset = build_test_dataset(pixels, **options)  # type: ignore[arg-type]
    dataset.save_as(target, enforce_file_format=True)
    return target
