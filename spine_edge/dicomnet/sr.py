"""The cascade's result as a Comprehensive SR following TID 1500 (Measurement Report), with highdicom.

One SR per analysed image, in the image's study, in a results series of its own::

    Imaging Measurement Report (TID 1500)
    ├─ observer: device "spine-edge" (TID 1004), procedure: plain radiography
    ├─ image library: the source image
    └─ imaging measurements
       ├─ triage group (TID 1501): qualitative evaluation "Spine radiograph triage" = Abnormal | Normal,
       │    measurements "Probability of abnormality" and "Decision threshold" (unit 1),
       │    finding site spine, algorithm identification (TID 4019)
       └─ one group per lesion box (TID 1410): finding type = the lesion class, the box as a closed
            SCOORD POLYLINE in the source image's pixels referencing its SOP Instance UID,
            measurement "Detection score", algorithm identification

Lesion classes and the triage concepts have no standard codes, so they are coded in the
project-local scheme :data:`CODING_SCHEME` ("99" prefix: a private scheme, PS3.16 section 8),
which every SR declares in its Coding Scheme Identification Sequence.

The algorithm identification carries the name, spine-edge version, bundle id, precision and
backend, so a reader can tell which model produced a finding.

:func:`read_sr_findings` parses an SR back with highdicom into the same plain data, which the tests
compare with the record that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from spine_edge import __version__
from spine_edge.dicomnet.common import DicomNetError, derived_uid, sop_instance_uid
from spine_edge.support import import_optional

#: Designator of the project-local coding scheme ("99..." marks a private scheme).
CODING_SCHEME = "99SPINEEDGE"
CODING_SCHEME_NAME = "spine-edge local codes"

#: Name recorded as the algorithm and the observer device.
ALGORITHM_NAME = "spine-edge DERNet triage + YOLO11 lesion detection"
MANUFACTURER = "spine-edge"

#: Series numbers of the results series, far from a modality's usual 1-99 so they sort last.
SR_SERIES_NUMBER = 9901

_CODE_VALUE = re.compile(r"[^A-Z0-9]+")


def _hd() -> Any:
    return import_optional("highdicom", "dicom", "Writing results as DICOM SR")


@dataclass(frozen=True)
class SrFinding:
    """One lesion box as an SR carries it.

    Attributes:
        class_name: The lesion class (the code meaning).
        code_value: Its code in :data:`CODING_SCHEME`.
        score: Detection score.
        box: ``(x1, y1, x2, y2)`` in the source image's pixels.
        referenced_sop_instance_uid: The image the box is drawn on.
    """

    class_name: str
    code_value: str
    score: float
    box: tuple[float, float, float, float]
    referenced_sop_instance_uid: str


@dataclass(frozen=True)
class SrContent:
    """What an SR says, read back as plain data (see :func:`read_sr_findings`).

    Attributes:
        decision: True for abnormal, False for normal.
        probability: Probability of abnormality.
        threshold: Decision threshold τ.
        findings: The lesion boxes, in the SR's order (by descending score).
        algorithm_parameters: The algorithm identification's parameters (``key=value``).
    """

    decision: bool
    probability: float
    threshold: float
    findings: tuple[SrFinding, ...]
    algorithm_parameters: tuple[str, ...]


def _code(value: str, meaning: str) -> Any:
    return _hd().sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def class_code_value(class_name: str) -> str:
    """The local code of a lesion class: upper case, runs of other characters as ``-``, 16 at most.

    Example:
        >>> class_code_value("Disc space narrowing")
        'DISC-SPACE-NARRO'
    """
    value = _CODE_VALUE.sub("-", class_name.upper()).strip("-")[:16].rstrip("-")
    if not value:
        raise DicomNetError(f"lesion class {class_name!r} has no letters or digits to code it by")
    return value


def _triage_code() -> Any:
    return _code("TRIAGE", "Spine radiograph triage")


def _probability_code() -> Any:
    return _code("PROB", "Probability of abnormality")


def _threshold_code() -> Any:
    return _code("TAU", "Decision threshold")


def _score_code() -> Any:
    return _code("SCORE", "Detection score")


def coding_scheme_item() -> Any:
    """The Coding Scheme Identification item that declares :data:`CODING_SCHEME`."""
    schemes = import_optional("highdicom.coding_schemes", "dicom", "Writing results as DICOM SR")
    return schemes.CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name=CODING_SCHEME_NAME,
        version=__version__,
        responsible_organization="spine-edge project",
    )


def algorithm_parameters(record: Mapping[str, Any]) -> list[str]:
    """``key=value`` parameters identifying the model run: bundle, precision, backend."""
    return [f"{key}={record.get(key) or ''}" for key in ("bundle_id", "precision", "backend")]


_MODALITY_OF_SOP_CLASS: dict[str, str] = {
    pydicom.uid.DigitalXRayImageStorageForPresentation: "DX",
    pydicom.uid.DigitalXRayImageStorageForProcessing: "DX",
    pydicom.uid.ComputedRadiographyImageStorage: "CR",
}


def evidence_view(source: Dataset) -> Dataset:
    """The source's header (no pixel data) with every attribute the results must copy present.

    Patient and study attributes that the source leaves out are added empty (type 2 in the SR and
    SC IODs), and a missing Modality follows from the SOP class. A source without Study or Series Instance UID (VinDr-SpineXR's anonymised files have
    neither) gets UIDs derived from its SOP Instance UID, so its SR and SCs still share one study.

    Args:
        source: The analysed image's data set.

    Returns:
        A new data set; ``source`` is not changed.
    """
    view = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            view.add(element)
    instance = sop_instance_uid(source)
    view.SOPInstanceUID = instance
    view.SOPClassUID = source.get("SOPClassUID") or source.file_meta.MediaStorageSOPClassUID
    if not view.get("Modality"):
        # The SOP class fixes the modality of these IODs; highdicom needs it to reference the image.
        view.Modality = _MODALITY_OF_SOP_CLASS.get(str(view.SOPClassUID), "OT")
    if not view.get("StudyInstanceUID"):
        view.StudyInstanceUID = derived_uid(instance, "study")
    if not view.get("SeriesInstanceUID"):
        view.SeriesInstanceUID = derived_uid(instance, "series")
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        if keyword not in view:
            setattr(view, keyword, "")
    return view


def _check_record(record: Mapping[str, Any], source: Dataset) -> None:
    if record.get("status") != "ok":
        raise DicomNetError(
            f"{record.get('source')}: no SR for a record with status {record.get('status')!r} "
            "(its reason is in results.jsonl)"
        )
    if record.get("probability") is None or record.get("threshold") is None or record.get("decision") is None:
        raise DicomNetError(f"{record.get('source')}: the record has no probability, threshold or decision")
    size = record.get("image_size")
    shape = [int(source.get("Rows", 0)), int(source.get("Columns", 0))]
    if size is not None and list(size) != shape:
        # Boxes are in the analysed image's pixels; drawn on another grid they would mislead.
        raise DicomNetError(
            f"{record.get('source')}: the record is for a {size[0]}x{size[1]} image but the DICOM "
            f"object is {shape[0]}x{shape[1]}; analyse the file again"
        )


def _box_polyline(box: Sequence[float]) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    # SCOORD has no rectangle: a closed POLYLINE (first point repeated last) is the standard form.
    # DICOM pixel coordinates put 0.0 at the top-left corner of the top-left pixel, as our boxes do.
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _describable(evidence: Dataset) -> bool:
    """Whether highdicom can write the image library entry (TID 1601) for this image.

    Its projection-radiography descriptors need Patient Orientation and Imager Pixel Spacing
    (type 1 in a real DX object, absent from anonymised or synthetic ones); the library is optional
    in TID 1500, so an image without them is referenced from the findings only.
    """
    modality = evidence.get("Modality")
    if not modality:
        return False
    if modality not in _PROJECTION_MODALITIES:
        return True
    orientation = evidence.get("PatientOrientation")
    spacing = evidence.get("ImagerPixelSpacing")
    return orientation is not None and len(orientation) == 2 and spacing is not None and len(spacing) == 2


def build_sr(
    record: Mapping[str, Any],
    source: Dataset,
    *,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
) -> Dataset:
    """A Comprehensive SR (TID 1500) stating the record's triage and lesion boxes about ``source``.

    UIDs are derived from the source SOP Instance UID and the bundle id (:func:`derived_uid`):
    the same result written twice is the same SR.

    Args:
        record: A result record with status ``ok`` (``CascadeResult.to_dict()`` form).
        source: The analysed image's data set (pixel data not needed).
        series_number: Series Number of the results series.
        institution_name: Recorded as the SR's Institution Name, if given.

    Returns:
        The SR as a highdicom ``ComprehensiveSR`` (a pydicom Dataset).

    Raises:
        DicomNetError: The record is not ``ok``, lacks the triage values, or is for an image of
            another size.
        MissingDependencyError: highdicom is not installed (``spine-edge[dicom]``).

    Example:
        >>> sr = build_sr(record, pydicom.dcmread("inbox/1.2.3.dcm"))  # doctest: +SKIP
        >>> sr.save_as("1.2.3.sr.dcm", enforce_file_format=True)  # doctest: +SKIP
    """
    hd = _hd()
    _check_record(record, source)
    evidence = evidence_view(source)
    instance = str(evidence.SOPInstanceUID)
    bundle_id = str(record.get("bundle_id") or "")
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=__version__, parameters=algorithm_parameters(record)
    )
    spine = hd.sr.FindingSite(anatomic_location=codes.SCT.Spine)
    unitless = codes.UCUM.NoUnits
    decision = bool(record["decision"])
    triage = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(instance, bundle_id, "triage"), identifier="triage"
        ),
        finding_type=_triage_code(),
        algorithm_id=algorithm,
        finding_sites=[spine],
        measurements=[
            hd.sr.Measurement(name=_probability_code(), value=float(record["probability"]), unit=unitless),
            hd.sr.Measurement(name=_threshold_code(), value=float(record["threshold"]), unit=unitless),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_triage_code(), value=codes.SCT.Abnormal if decision else codes.SCT.Normal)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)],
    )
    groups: list[Any] = [triage]
    for number, det in enumerate(record.get("detections") or [], 1):
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_box_polyline(det["box"]),
            source_image=hd.sr.SourceImageForRegion.from_source_image(evidence),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(instance, bundle_id, "finding", str(number)), identifier=f"finding {number}"
                ),
                referenced_region=region,
                finding_type=_code(class_code_value(det["class_name"]), det["class_name"]),
                algorithm_id=algorithm,
                finding_sites=[spine],
                measurements=[hd.sr.Measurement(name=_score_code(), value=float(det["score"]), unit=unitless)],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", MANUFACTURER),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=bundle_id or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.PlainRadiography,
        imaging_measurements=groups,
        referenced_images=[evidence] if _describable(evidence) else None,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=derived_uid(str(evidence.StudyInstanceUID), bundle_id, "sr-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(instance, bundle_id, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        # An algorithm's output awaits a radiologist: preliminary and unverified.
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description="spine-edge AI triage and lesion boxes",
        software_versions=__version__,
        coding_schemes=[coding_scheme_item()],
    )
    return sr  # type: ignore[no-any-return]


def read_sr_findings(sr: Dataset) -> SrContent:
    """Parse an SR written by :func:`build_sr` back into plain data, with highdicom.

    Args:
        sr: The SR data set (e.g. ``pydicom.dcmread`` of the file, or what a PACS returned).

    Returns:
        The triage values and the findings.

    Raises:
        DicomNetError: The SR has no triage group in spine-edge's coding scheme.
    """
    hd = _hd()
    # Parsing (a copy) gives the typed TID 1500 view even for an SR built in this process.
    document = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    report = document.content
    image_groups = report.get_image_measurement_groups(finding_type=_triage_code())
    if not image_groups:
        raise DicomNetError(f"SR {sr.get('SOPInstanceUID')} has no spine-edge triage group ({CODING_SCHEME} TRIAGE)")
    triage = image_groups[0]
    evaluations = triage.get_qualitative_evaluations(name=_triage_code())
    probability = triage.get_measurements(name=_probability_code())
    threshold = triage.get_measurements(name=_threshold_code())
    if not (evaluations and probability and threshold):
        raise DicomNetError(f"SR {sr.get('SOPInstanceUID')}: the triage group lacks its evaluation or measurements")
    parameters = tuple(
        str(item.TextValue)
        for item in triage[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    )
    findings = []
    for group in report.get_planar_roi_measurement_groups():
        roi = group.roi
        points = np.asarray(roi.value, dtype=np.float64)
        reference = roi.ContentSequence[0].ReferencedSOPSequence[0]
        score = group.get_measurements(name=_score_code())
        findings.append(
            SrFinding(
                class_name=str(group.finding_type.meaning),
                code_value=str(group.finding_type.value),
                score=float(score[0].value) if score else float("nan"),
                box=(
                    float(points[:, 0].min()),
                    float(points[:, 1].min()),
                    float(points[:, 0].max()),
                    float(points[:, 1].max()),
                ),
                referenced_sop_instance_uid=str(reference.ReferencedSOPInstanceUID),
            )
        )
    return SrContent(
        decision=evaluations[0].value == codes.SCT.Abnormal,
        probability=float(probability[0].value),
        threshold=float(threshold[0].value),
        findings=tuple(findings),
        algorithm_parameters=parameters,
    )
