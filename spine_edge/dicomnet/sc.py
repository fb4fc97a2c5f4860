"""The cascade's result as Secondary Capture images, for viewers that do not render SR.

Why Secondary Capture and not a Grayscale Softcopy Presentation State: a GSPS would keep the
boxes as vector graphics over the original pixels, but many kiosk and web viewers ignore
presentation states, and a GSPS cannot carry the heatmap's colours. An SC is a plain RGB picture
that every viewer shows; the SR stays the machine-readable record, and the SC says so in its
Derivation Description.

Each SC is in the source image's study, in a series of its own (overlay and heatmap apart), has
the same pixel grid and Pixel Spacing as the source (so a viewer's ruler still measures; the
heatmap's colour bar only adds columns on the right), and references the source through the
Source Image Sequence.

The cascade decodes JPEG 2000 at the resolution its models use, so the image it hands over may be
smaller than the source. The SC is then made from that image upsampled onto the source's grid
(:func:`to_source_grid`, co-sited as the wavelet levels are), with the boxes, which are in original
pixels, drawn at full size on it, rather than from a second, full decode: that would cost each
analysed image the 4-20x slower full decode the cascade avoided, for a picture whose diagnostic
pixels the viewer shows from the source anyway. The SC therefore shows the image as the models saw
it; the boxes and the SR's coordinates are exact either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import cv2
import numpy as np
from pydicom.dataset import Dataset

from spine_edge import __version__
from spine_edge.dicomnet.common import DicomNetError, derived_uid
from spine_edge.dicomnet.sr import MANUFACTURER, evidence_view
from spine_edge.overlay import draw_detections
from spine_edge.results import Detection, decode_scale
from spine_edge.support import import_optional

PictureKind = Literal["overlay", "heatmap"]

#: Series numbers of the two SC series (the SR's is 9901).
SC_SERIES_NUMBERS: dict[PictureKind, int] = {"overlay": 9902, "heatmap": 9903}

_DESCRIPTIONS: dict[PictureKind, str] = {
    "overlay": "spine-edge AI lesion boxes (burned in)",
    "heatmap": "spine-edge AI class-activation heatmap",
}

#: Patient Orientation values highdicom accepts; anything else in a source is not copied.
_ORIENTATION_LETTERS = frozenset("APLRHF")


def detections_of(record: Mapping[str, Any]) -> list[Detection]:
    """The record's lesion boxes as :class:`spine_edge.results.Detection` objects."""
    return [
        Detection(
            class_id=int(d["class_id"]),
            class_name=str(d["class_name"]),
            score=float(d["score"]),
            box=(float(d["box"][0]), float(d["box"][1]), float(d["box"][2]), float(d["box"][3])),
        )
        for d in record.get("detections") or []
    ]


def triage_caption(record: Mapping[str, Any]) -> str:
    """One line stating the triage, burned into the overlay so that it travels with the picture.

    Example:
        >>> triage_caption({"decision": True, "probability": 0.91, "threshold": 0.5})
        'spine-edge AI: ABNORMAL  p=0.910  tau=0.500  (not a diagnosis)'
    """
    verdict = "ABNORMAL" if record.get("decision") else "NORMAL"
    return (
        f"spine-edge AI: {verdict}  p={float(record['probability']):.3f}  "
        f"tau={float(record['threshold']):.3f}  (not a diagnosis)"
    )


def to_source_grid(image: np.ndarray, image_size: tuple[int, int] | list[int]) -> np.ndarray:
    """The image on the original pixel grid: as it is at full size, else upsampled from its reduced decode.

    Decoded pixel ``i`` of a JPEG 2000 level is co-sited with original pixel ``i / scale`` (as
    :meth:`spine_edge.imageio.Radiograph.boxes_to_original` maps boxes), so the upsampling maps it
    there exactly; a plain resize would shift the picture against the boxes by up to half a block.

    Args:
        image: uint8 ``[h, w]`` or ``[h, w, 3]``, full size or a reduced-resolution decode of the original.
        image_size: ``(height, width)`` of the original (the record's ``image_size``).

    Raises:
        DicomNetError: ``image`` is no reduced decode of an image of that size.
    """
    rows, columns = int(image_size[0]), int(image_size[1])
    if image.shape[:2] == (rows, columns):
        return image
    try:
        scale = decode_scale((rows, columns), (int(image.shape[0]), int(image.shape[1])))
    except ValueError as exc:
        raise DicomNetError(f"the picture does not fit the analysed image: {exc}") from exc
    inverse = np.array([[scale, 0.0, 0.0], [0.0, scale, 0.0]], np.float64)  # original pixel -> decoded pixel
    out: np.ndarray = cv2.warpAffine(
        image, inverse, (columns, rows), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    return out


def heatmap_to_source_grid(
    picture: np.ndarray, image_size: tuple[int, int] | list[int], decoded_size: tuple[int, int] | list[int]
) -> np.ndarray:
    """A heatmap PNG drawn on the decoded image (colour bar on its right), brought to the original grid.

    The image part is upsampled as :func:`to_source_grid`; the colour bar keeps its proportions.

    Raises:
        DicomNetError: The picture is not of the decoded size (plus a colour bar).
    """
    height, width = int(decoded_size[0]), int(decoded_size[1])
    if picture.shape[0] != height or picture.shape[1] < width:
        raise DicomNetError(
            f"the heatmap picture is {picture.shape[:2]}, the record says the image was decoded at {(height, width)}"
        )
    rows = int(image_size[0])
    image = to_source_grid(picture[:, :width], image_size)
    bar = picture[:, width:]
    if bar.shape[1] == 0:
        return image
    bar_columns = max(1, round(bar.shape[1] * rows / height))
    return np.hstack([image, cv2.resize(bar, (bar_columns, rows), interpolation=cv2.INTER_LINEAR)])


def overlay_picture(record: Mapping[str, Any], image: np.ndarray) -> np.ndarray:
    """The boxes and the triage caption over the windowed image, BGR uint8 on the original pixel grid.

    Boxes are drawn at full size on the image brought to the original grid (:func:`to_source_grid`), so
    an image the cascade decoded at a reduced resolution still gives an SC with the source's pixel grid
    (and Pixel Spacing), sharp boxes and a legible caption, without decoding the radiograph again.

    Args:
        record: An ``ok`` result record (its boxes and ``image_size`` in original pixels).
        image: uint8 gray ``[h, w]``: the windowed image the cascade saw (``CascadeResult.image``, at
            full size or reduced), or ``spine_edge.imageio.read_image(path).image``.

    Raises:
        DicomNetError: ``image`` is no decode of the record's image.
    """
    size = record.get("image_size")
    canvas = draw_detections(image if size is None else to_source_grid(image, size), detections_of(record))
    side = min(canvas.shape[:2])
    scale = max(0.35, side / 1500)
    thickness = max(1, round(side / 500))
    caption = triage_caption(record)
    (_, height), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    # Dark outline under white text: legible on bone and on background alike.
    origin = (max(2, side // 100), height + base + max(2, side // 100))
    cv2.putText(canvas, caption, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(canvas, caption, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas


def _orientation(evidence: Dataset) -> tuple[str, str] | None:
    value = evidence.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    row, column = (str(v) for v in value)
    if not (row and column and set(row + column) <= _ORIENTATION_LETTERS):
        return None
    return row, column


def _copy_body_part(evidence: Dataset, sc: Dataset) -> None:
    """Body Part Examined and Laterality from the source (General Series, type 3 and 2C).

    Laterality is required unless the body part is known to be unpaired: a source that names its
    body part (the spine: unpaired) needs none, one that names neither gets the empty value that
    means "unknown".
    """
    body_part = evidence.get("BodyPartExamined")
    if body_part:
        sc.BodyPartExamined = body_part
    laterality = evidence.get("Laterality") or evidence.get("ImageLaterality")
    if laterality in ("L", "R"):
        sc.Laterality = laterality
    elif not body_part:
        sc.Laterality = ""


def build_secondary_capture(
    record: Mapping[str, Any],
    source: Dataset,
    picture: np.ndarray,
    *,
    kind: PictureKind = "overlay",
) -> Dataset:
    """A Secondary Capture image of ``picture`` in the source image's study.

    Args:
        record: The ``ok`` result record the picture shows (its bundle id enters the UIDs).
        source: The analysed image's data set (pixel data not needed).
        picture: BGR uint8 ``[H, W, 3]`` (as OpenCV draws), the source's size; a heatmap picture may
            be wider by a legend on its right (``spine_edge.overlay.draw_heatmap``'s colour bar).
        kind: ``overlay`` or ``heatmap``: its own series and description.

    Returns:
        The SC as a highdicom ``SCImage`` (a pydicom Dataset), RGB, Explicit VR Little Endian.

    Raises:
        DicomNetError: The picture is not BGR uint8 of the source's size.
        MissingDependencyError: highdicom is not installed (``spine-edge[dicom]``).
    """
    hd = import_optional("highdicom", "dicom", "Writing results as DICOM Secondary Capture")
    rows, columns = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    bgr = picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    # The heatmap picture may carry a colour bar on its right: same rows, more columns, and the
    # image part keeps the source's pixel grid (and so its Pixel Spacing).
    fits = picture.shape[:2] == (rows, columns) or (
        kind == "heatmap" and picture.shape[0] == rows and picture.shape[1] >= columns
    )
    if not (bgr and fits):
        raise DicomNetError(
            f"the {kind} picture is {picture.dtype} {picture.shape}, not BGR uint8 of the source's {(rows, columns)}"
            + (" (a heatmap may be wider, by a colour bar)" if kind == "heatmap" else "")
        )
    evidence = evidence_view(source)
    instance = str(evidence.SOPInstanceUID)
    bundle_id = str(record.get("bundle_id") or "")
    orientation = _orientation(evidence)
    spacing = evidence.get("PixelSpacing") or evidence.get("ImagerPixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence,
        pixel_array=np.ascontiguousarray(picture[:, :, ::-1]),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derived_uid(str(evidence.StudyInstanceUID), bundle_id, f"sc-{kind}-series"),
        series_number=SC_SERIES_NUMBERS[kind],
        sop_instance_uid=derived_uid(instance, bundle_id, f"sc-{kind}"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        # highdicom insists on an orientation for a patient image; the real one is restored below.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=_DESCRIPTIONS[kind],
        software_versions=__version__,
    )
    # Patient Orientation is type 2: empty says "unknown", which is honest where the source did
    # not state it, while a guessed value would tell a viewer where left is.
    sc.PatientOrientation = list(orientation) if orientation else ""
    _copy_body_part(evidence, sc)
    sc.ConversionType = "WSD"  # made on a workstation from another image, not captured from video
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"spine-edge {__version__} {kind} of the analysed image; the DICOM SR in this study is the "
        "machine-readable result"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = evidence.SOPClassUID
    reference.ReferencedSOPInstanceUID = instance
    sc.SourceImageSequence = [reference]
    return sc  # type: ignore[no-any-return]
