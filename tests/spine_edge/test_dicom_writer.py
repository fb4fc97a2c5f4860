"""The project's DICOM writer: files it writes read back exactly, with the UIDs and tags asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_edge.dicom_writer import DicomUIDs, build_radiograph_dataset, dicom_bytes, write_dicom
from spine_edge.imageio import read_image

UIDS = DicomUIDs("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3")


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4096, (40, 56), dtype=np.uint16)


@pytest.mark.parametrize("syntax", ["explicit-little", "jpeg2000-lossless"])
def test_round_trip_through_read_image(tmp_path: Path, syntax: str) -> None:
    pixels = _pixels()
    dataset = build_radiograph_dataset(pixels, bits_stored=12, window=(2048, 4096), transfer_syntax=syntax)
    path = write_dicom(tmp_path / "sub" / "a.dicom", dataset)
    assert path == tmp_path / "sub" / "a.dicom"
    stored = pydicom.dcmread(path)
    assert (
        stored.file_meta.TransferSyntaxUID
        == {"explicit-little": "1.2.840.10008.1.2.1", "jpeg2000-lossless": "1.2.840.10008.1.2.4.90"}[syntax]
    )
    np.testing.assert_array_equal(stored.pixel_array, pixels)  # lossless either way
    radiograph = read_image(path)
    assert radiograph.windowing == "window" and radiograph.bits_stored == 12
    assert radiograph.pixel_spacing == (0.14, 0.14) and radiograph.source_shape == pixels.shape
    np.testing.assert_array_equal(radiograph.image, np.round(pixels / 4095 * 255).astype(np.uint8))


def test_uids_and_extra_tags_are_kept_and_none_is_left_out(tmp_path: Path) -> None:
    tags = {"Modality": "DX", "PatientID": "p1", "BodyPartExamined": "LSPINE", "ViewPosition": None}
    dataset = build_radiograph_dataset(_pixels(), uids=UIDS, tags=tags, transfer_syntax="jpeg2000-lossless")
    stored = pydicom.dcmread(write_dicom(tmp_path / "a.dicom", dataset))
    assert stored.SOPInstanceUID == stored.file_meta.MediaStorageSOPInstanceUID == UIDS.sop_instance
    assert (stored.StudyInstanceUID, stored.SeriesInstanceUID) == (UIDS.study_instance, UIDS.series_instance)
    assert (stored.Modality, stored.PatientID, stored.BodyPartExamined) == ("DX", "p1", "LSPINE")
    assert "ViewPosition" not in stored


def test_defaults_look_like_vindr_and_bytes_are_reproducible() -> None:
    plain = build_radiograph_dataset(_pixels())
    assert "StudyInstanceUID" not in plain and "PatientID" not in plain and "Modality" not in plain
    assert dicom_bytes(build_radiograph_dataset(_pixels(), uids=UIDS)) == dicom_bytes(
        build_radiograph_dataset(_pixels(), uids=UIDS)
    )


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a.dicom", build_radiograph_dataset(_pixels()))
    write_dicom(tmp_path / "a.dicom", build_radiograph_dataset(_pixels(), rescale=(1.0, 0.0)))
    assert [p.name for p in tmp_path.iterdir()] == ["a.dicom"]
    assert pydicom.dcmread(tmp_path / "a.dicom").RescaleSlope == 1


def test_unknown_keywords_and_syntaxes_are_refused() -> None:
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        build_radiograph_dataset(_pixels(), tags={"PatientName_": "x"})
    with pytest.raises(ValueError, match="unknown transfer syntax"):
        build_radiograph_dataset(_pixels(), transfer_syntax="jpeg-ls")
