"""SR (TID 1500) and Secondary Capture results: content, UIDs, dciodvfy, and highdicom reading them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest

from spine_edge.cascade import Cascade
from spine_edge.dicom_writer import DicomUIDs, build_radiograph_dataset, write_dicom
from spine_edge.dicomnet.common import DicomNetError
from spine_edge.dicomnet.sc import build_secondary_capture, overlay_picture
from spine_edge.dicomnet.sr import CODING_SCHEME, build_sr, read_sr_findings
from spine_edge.dicomnet.writer import HEATMAP_NAME, OVERLAY_NAME, SR_NAME, DicomOutputConfig, write_dicom_results
from spine_edge.infer import write_pictures
from tests.dicomnet.programs import dciodvfy
from tests.spine_edge.bundle_factory import make_bundle

STUDY, SERIES, IMAGE = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
PATIENT = {"PatientID": "P-0042", "PatientName": "Doe^Jane", "PatientBirthDate": "19600101", "PatientSex": "F"}


def _source(**tags: object) -> pydicom.Dataset:
    pixels = np.full((128, 256), 900, np.uint16)
    pixels[0:64, 128:192] = 4000
    return build_radiograph_dataset(
        pixels,
        window=(2048, 4096),
        uids=DicomUIDs(IMAGE, STUDY, SERIES),
        tags={
            "Modality": "DX",
            "AccessionNumber": "A77",
            "StudyID": "S1",
            "StudyDate": "20260101",
            "StudyTime": "101010",
            "BodyPartExamined": "LSPINE",
            "InstanceNumber": 3,
            **PATIENT,
            **tags,
        },
    )


def _record(source: str = "x.dcm", **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "source": source,
        "status": "ok",
        "error": None,
        "probability": 0.924142,
        "decision": True,
        "threshold": 0.5,
        "detector_ran": True,
        "detections": [
            {"class_id": 0, "class_name": "Osteophytes", "score": 0.880797, "box": [112.0, 0.0, 208.0, 80.0]},
            {"class_id": 4, "class_name": "Disc space narrowing", "score": 0.41, "box": [10.5, 20.25, 60.0, 90.75]},
        ],
        "image_size": [128, 256],
        "heatmap": None,
        "overlay": None,
        "bundle_id": "tiny-bundle-1",
        "precision": "fp32",
        "backend": "onnxruntime/CPUExecutionProvider",
    }
    record.update(changes)
    return record


def _roundtrip(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    write_dicom(path, ds)
    return pydicom.dcmread(path)


def test_sr_states_triage_findings_and_algorithm_and_reads_back(tmp_path: Path) -> None:
    source = _source()
    sr = _roundtrip(build_sr(_record(), source), tmp_path / "sr.dcm")
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName, sr.AccessionNumber) == (
        STUDY,
        "P-0042",
        "Doe^Jane",
        "A77",
    )
    assert sr.SeriesInstanceUID not in (SERIES, "") and sr.SOPInstanceUID != IMAGE
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [CODING_SCHEME]
    content = read_sr_findings(sr)
    assert content.decision is True
    assert content.probability == pytest.approx(0.924142) and content.threshold == pytest.approx(0.5)
    assert [(f.class_name, f.code_value) for f in content.findings] == [
        ("Osteophytes", "OSTEOPHYTES"),
        ("Disc space narrowing", "DISC-SPACE-NARRO"),
    ]
    assert content.findings[0].box == pytest.approx((112.0, 0.0, 208.0, 80.0))
    assert content.findings[1].box == pytest.approx((10.5, 20.25, 60.0, 90.75))
    assert content.findings[0].score == pytest.approx(0.880797, rel=1e-6)
    assert {f.referenced_sop_instance_uid for f in content.findings} == {IMAGE}
    assert content.algorithm_parameters == (
        "bundle_id=tiny-bundle-1",
        "precision=fp32",
        "backend=onnxruntime/CPUExecutionProvider",
    )


def test_sr_uids_are_derived_from_source_and_bundle() -> None:
    source = _source()
    first, again = build_sr(_record(), source), build_sr(_record(), source)
    other_bundle = build_sr(_record(bundle_id="another"), source)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other_bundle.SOPInstanceUID != first.SOPInstanceUID
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid


def test_normal_image_sr_has_triage_and_no_findings(tmp_path: Path) -> None:
    sr = _roundtrip(build_sr(_record(decision=False, probability=0.1, detections=[]), _source()), tmp_path / "n.dcm")
    content = read_sr_findings(sr)
    assert (content.decision, content.findings) == (False, ())


def test_source_without_study_attributes_still_gets_a_study() -> None:
    """VinDr-SpineXR files carry no Study/Series UID or patient module: results get derived ones."""
    bare = build_radiograph_dataset(np.full((128, 256), 900, np.uint16), uids=DicomUIDs(IMAGE))
    sr = build_sr(_record(), bare)
    sc = build_secondary_capture(_record(), bare, np.zeros((128, 256, 3), np.uint8))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID and pydicom.uid.UID(sr.StudyInstanceUID).is_valid
    assert sr.PatientID == "" and read_sr_findings(sr).findings[0].referenced_sop_instance_uid == IMAGE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": "error", "error": "truncated"}, "status 'error'"),
        ({"status": "refused"}, "status 'refused'"),
        ({"image_size": [64, 64]}, "64x64 image"),
    ],
)
def test_no_sr_for_refused_failed_or_mismatched_records(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(DicomNetError, match=message):
        build_sr(_record(**changes), _source())


def test_sr_and_sc_pass_dciodvfy_without_errors(tmp_path: Path) -> None:
    source = _source(PatientOrientation=["L", "F"], ImagerPixelSpacing=["0.14", "0.14"])
    sr_path = write_dicom(tmp_path / "sr.dcm", build_sr(_record(), source))
    picture = overlay_picture(_record(), np.full((128, 256), 80, np.uint8))
    sc_path = write_dicom(tmp_path / "sc.dcm", build_secondary_capture(_record(), source, picture))
    for path in (sr_path, sc_path):
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        print(f"dciodvfy {path.name}: {len(warnings)} warning(s)", *warnings, sep="\n  ")  # listed in the report


def test_sc_has_the_source_grid_spacing_and_reference(tmp_path: Path) -> None:
    source = _source()
    picture = overlay_picture(_record(), np.full((128, 256), 80, np.uint8))
    sc = _roundtrip(build_secondary_capture(_record(), source, picture), tmp_path / "sc.dcm")
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (128, 256, 3, "RGB")
    assert [float(v) for v in sc.PixelSpacing] == [0.14, 0.14]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == IMAGE
    assert (sc.StudyInstanceUID, sc.PatientID, sc.BurnedInAnnotation) == (STUDY, "P-0042", "YES")
    np.testing.assert_array_equal(sc.pixel_array, picture[:, :, ::-1])  # OpenCV's BGR stored as RGB
    with pytest.raises(DicomNetError, match="not BGR uint8"):
        build_secondary_capture(_record(), source, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DicomNetError, match="not BGR uint8"):  # only a heatmap may be wider
        build_secondary_capture(_record(), source, np.zeros((128, 300, 3), np.uint8))


def test_writer_writes_sr_overlay_and_heatmap_for_ok_dicom_records_only(tmp_path: Path) -> None:
    source_path = write_dicom(tmp_path / "in" / "a.dcm", _source())
    heatmap = np.zeros((128, 256 + 40, 3), np.uint8)  # draw_heatmap appends a colour bar on the right
    heatmap[:, :, 2] = 200
    cv2.imwrite(str(tmp_path / "heat.png"), heatmap)
    config = DicomOutputConfig(folder=tmp_path / "dicom", results_root=tmp_path)
    files = write_dicom_results(_record(str(source_path), heatmap="heat.png"), config)
    assert files is not None
    assert [p.name for p in files.paths()] == [SR_NAME, OVERLAY_NAME, HEATMAP_NAME]
    assert files.sr.parent == tmp_path / "dicom" / IMAGE
    heat_sc = pydicom.dcmread(files.heatmap)
    assert heat_sc.SeriesNumber != pydicom.dcmread(files.overlay).SeriesNumber
    np.testing.assert_array_equal(heat_sc.pixel_array[5, 5], [200, 0, 0])
    assert (heat_sc.Rows, heat_sc.Columns) == (128, 296)
    png = tmp_path / "in" / "b.png"
    cv2.imwrite(str(png), np.zeros((128, 256), np.uint8))
    assert write_dicom_results(_record(str(png)), config) is None
    assert write_dicom_results(_record(str(source_path), status="error"), config) is None


def test_writer_on_a_cascade_result_as_infer_dicom_out_would_call_it(tmp_path: Path) -> None:
    """What ``infer --dicom-out`` does per record: the real cascade, its PNGs, then the DICOM results."""
    source_path = write_dicom(tmp_path / "in" / "a.dcm", _source(ImagerPixelSpacing=["0.14", "0.14"]))
    out = tmp_path / "out"
    bundle = make_bundle(tmp_path / "bundle")
    with Cascade.from_bundle(bundle, precision="fp32", backend="onnxruntime", provider="cpu", guard=False) as cascade:
        result = write_pictures(cascade.predict(source_path), Path("a.dcm"), out)
    record = result.to_dict()
    assert record["decision"] is True and record["heatmap"]
    files = write_dicom_results(record, DicomOutputConfig(folder=out / "dicom", results_root=out), image=result.image)
    assert files is not None and files.heatmap is not None
    content = read_sr_findings(pydicom.dcmread(files.sr))
    assert [list(f.box) for f in content.findings] == [pytest.approx(d["box"]) for d in record["detections"]]
    for path in files.paths():
        assert dciodvfy(path)[0] == [], path
