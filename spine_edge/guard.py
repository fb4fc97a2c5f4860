"""The input guard: refuse what the bundle must not judge, before it is judged, and say why.

A kiosk receives whatever a user drops on it: phone photographs, brain MRI slices saved as JPEG,
scanned referral letters, blank frames. The classifier would score any of them, and a cat would come
back "abnormal" with lesion boxes. The guard runs in three places, cheapest first:

1. **DICOM header** (:func:`check_header`, before any pixel is decoded): a Modality (or, when that
   tag is missing, a SOP Class) that is not a projection radiograph is refused: CT, MR, US, NM, PT,
   MG, XA and every other non-radiographic modality. ``OT`` (other) and ``SC`` (secondary capture)
   say nothing about the pixels, so those files go on to the image rules, which refuse them where the
   image is clearly not an X-ray. A Body Part Examined that is present and not spine-related is a
   *flag*, not a refusal: a chest film shows the thoracic spine. Missing tags are normal (real
   VinDr-SpineXR files carry almost none) and never a reason to refuse.
2. **Image rules** (:func:`check_image`, after decoding): a colour picture (measured on the colour
   image before it became gray), an implausible size or aspect ratio, a blank image, noise without
   structure, and a document or screenshot (a flat light background, or most of the image in areas of
   one exact gray level, as rendered panels are) are refused, with the numbers.
3. **In-distribution score** (:func:`check_ood`): an output of the classifier graph itself (fitted at
   export on the training images' features, threshold from validation images, in the manifest), for
   everything that passes the rules. Policy ``refuse`` or ``flag``.

The rules are deliberately coarse, set from what radiographs physically are rather than fitted to
files: each refuses only what no spine radiograph can look like, and the learned score handles the
rest (gray natural images, MRI-like slices). Every decision carries a machine-readable ``code`` and a
``reason`` a radiographer understands. The module needs numpy, OpenCV and pydicom only.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

RefusalCode = Literal["modality", "colour", "size", "aspect_ratio", "blank", "noise", "document", "out_of_distribution"]
"""Why an input was refused (machine-readable)."""
REFUSAL_CODES: tuple[RefusalCode, ...] = get_args(RefusalCode)
FlagCode = Literal["body_part", "out_of_distribution"]
"""Why an input that was judged deserves a second look (machine-readable)."""
FLAG_CODES: tuple[FlagCode, ...] = get_args(FlagCode)
OodPolicy = Literal["refuse", "flag"]
"""What an out-of-distribution score above the threshold does: refuse the image, or judge it with a flag."""
OOD_POLICIES: tuple[OodPolicy, ...] = get_args(OodPolicy)

#: Modalities that are projection radiographs: computed and digital radiography, film digitised as a
#: radiograph, and radio-fluoroscopy (a spine fluoroscopy frame is a projection X-ray). "DR" is no
#: DICOM code, but some digital radiography systems write it.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "RF", "DR"})
#: Modalities that say nothing about the pixels: the image rules decide.
UNSPECIFIC_MODALITIES = frozenset({"OT", "SC"})
#: What the common non-radiograph modalities are, for the refusal's wording; any other code that is
#: neither a radiograph nor unspecific is refused too, named by its code.
MODALITY_NAMES: dict[str, str] = {
    "CT": "a CT image",
    "MR": "an MR image",
    "US": "an ultrasound image",
    "NM": "a nuclear medicine image",
    "PT": "a PET image",
    "MG": "a mammogram",
    "XA": "an angiography image",
    "IVUS": "an intravascular ultrasound image",
    "OCT": "an optical coherence tomography image",
    "OP": "an ophthalmic photograph",
    "XC": "a photograph (external camera)",
    "ES": "an endoscopy image",
    "SM": "a microscopy slide",
    "GM": "a microscopy image",
    "DG": "a diaphanography image",
    "IO": "an intra-oral (dental) radiograph",
    "PX": "a panoramic dental radiograph",
    "BMD": "a bone densitometry (DXA) image",
    "RTIMAGE": "a radiotherapy portal image",
    "SR": "a structured report",
    "DOC": "a document",
    "SEG": "a segmentation",
    "PR": "a presentation state",
    "KO": "a key-object selection",
}
#: SOP classes that fix the modality, for files whose Modality tag is missing.
_SOP_CLASS_MODALITY: dict[str, str] = {
    str(uid): modality
    for uid, modality in (
        (pydicom.uid.CTImageStorage, "CT"),
        (pydicom.uid.EnhancedCTImageStorage, "CT"),
        (pydicom.uid.MRImageStorage, "MR"),
        (pydicom.uid.EnhancedMRImageStorage, "MR"),
        (pydicom.uid.UltrasoundImageStorage, "US"),
        (pydicom.uid.UltrasoundMultiFrameImageStorage, "US"),
        (pydicom.uid.NuclearMedicineImageStorage, "NM"),
        (pydicom.uid.PositronEmissionTomographyImageStorage, "PT"),
        (pydicom.uid.XRayAngiographicImageStorage, "XA"),
        (pydicom.uid.VLPhotographicImageStorage, "XC"),
        (pydicom.uid.VLEndoscopicImageStorage, "ES"),
        (pydicom.uid.EncapsulatedPDFStorage, "DOC"),
        (pydicom.uid.DigitalMammographyXRayImageStorageForPresentation, "MG"),
    )
}
#: Body Part Examined values (PS3.16 CID 4031 spellings, upper case) that show the spine.
SPINE_BODY_PARTS = frozenset({"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE",
                              "WHOLESPINE", "COCCYX", "SACRUM", "NECK"})  # fmt: skip
_HEADER_TAGS = ("Modality", "BodyPartExamined", "SOPClassUID")

#: Side of the thumbnail the image measures are taken on: enough for noise, contrast and flat areas,
#: and it costs well under a millisecond.
MEASURE_SIDE = 256
#: Chroma (max - min of R, G, B, in 8-bit levels) above which a thumbnail pixel counts as coloured.
#: A gray image stored as RGB has chroma 0; JPEG's chroma sub-sampling leaves a few levels on gray
#: content, and the area-averaged thumbnail removes most of that.
COLOUR_CHROMA = 24


@dataclass(frozen=True)
class GuardConfig:
    """Limits of the image rules. Each is a property of radiographs, not a value fitted to files.

    Attributes:
        min_side: Shortest accepted side in original pixels. Below this the vertebrae of a spine film
            are a few pixels tall: nothing for the model, or a radiologist, to judge.
        min_side_mm: None, or the least long side in millimetres when the pixel spacing is known;
            a spine radiograph covers several vertebrae, at least about 60 mm.
        max_aspect: Largest accepted long side / short side. A stitched whole-spine study is about
            2.8; a strip, a banner or a panorama is more.
        max_colour_fraction: Largest fraction of coloured pixels (see :data:`COLOUR_CHROMA`) accepted.
            Annotations burnt into a film (arrows, text, rulers) cover a few percent at most.
        min_contrast: Fewest gray levels between the 1st and 99th percentiles: a blank image has 0.
        min_neighbour_correlation: Least correlation between neighbouring thumbnail pixels. Anatomy is
            smooth at this scale (radiographs: above 0.9); independent noise is near 0.
        max_flat_light_fraction: Largest fraction of the image that may sit within
            :attr:`flat_tolerance` of one light gray level (at least :attr:`light_level`). Documents and
            screenshots are mostly flat white; a radiograph's background is dark (bone bright).
        light_level: The gray level from which a flat area counts as light.
        flat_tolerance: Gray levels either side of the most common light level that count as flat.
        max_flat_fraction: Largest fraction of the image that may lie in exactly flat patches (a pixel
            whose 7 x 7 neighbourhood, on a copy of at most 512 px, holds one gray level), not counting
            the darkest and brightest levels. Rendered screens and graphics, dark themes included, are
            mostly filled areas of one exact level (about 60%); an exposure always has quantum noise, so
            radiographs have none (0 on all 500 VinDr-SpineXR demo images, DICOM and PNG; under 1% on
            the tests' noise-free synthetic films). Exact-black collimation borders and white burnt-in
            labels sit at the extreme levels and do not count.
    """

    min_side: int = 128
    min_side_mm: float | None = 60.0
    max_aspect: float = 4.0
    max_colour_fraction: float = 0.05
    min_contrast: float = 12.0
    min_neighbour_correlation: float = 0.5
    max_flat_light_fraction: float = 0.4
    light_level: int = 160
    flat_tolerance: int = 2
    max_flat_fraction: float = 0.3

    def __post_init__(self) -> None:
        checks = (
            (self.min_side >= 1, f"min_side must be at least 1 px, got {self.min_side}"),
            (self.min_side_mm is None or self.min_side_mm > 0, f"min_side_mm must be positive, got {self.min_side_mm}"),
            (self.max_aspect >= 1, f"max_aspect must be at least 1, got {self.max_aspect}"),
            (
                0 <= self.max_colour_fraction <= 1,
                f"max_colour_fraction must be in [0, 1], got {self.max_colour_fraction}",
            ),
            (0 <= self.max_flat_light_fraction <= 1, "max_flat_light_fraction must be in [0, 1]"),
            (0 <= self.max_flat_fraction <= 1, "max_flat_fraction must be in [0, 1]"),
            (-1 <= self.min_neighbour_correlation <= 1, "min_neighbour_correlation must be in [-1, 1]"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Refusal:
    """Why the bundle must not judge an input.

    Attributes:
        code: Machine-readable reason (:data:`REFUSAL_CODES`).
        reason: One sentence for a radiographer, with the measured numbers.
    """

    code: RefusalCode
    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "reason": ...}`` for result records."""
        return {"code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class GuardFlag:
    """A warning on an input that was judged anyway.

    Attributes:
        code: Machine-readable reason (:data:`FLAG_CODES`).
        reason: One sentence for a radiographer.
    """

    code: FlagCode
    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "reason": ...}`` for result records."""
        return {"code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class GuardDecision:
    """What one guard stage concluded: a refusal (the first rule that refused) and any flags.

    Attributes:
        refusal: None when the input may be judged.
        flags: Warnings to carry into the record.
    """

    refusal: Refusal | None = None
    flags: tuple[GuardFlag, ...] = ()

    @property
    def refused(self) -> bool:
        """True when the input must not be judged."""
        return self.refusal is not None

    def then(self, other: GuardDecision) -> GuardDecision:
        """This stage followed by ``other``: the earlier refusal wins, flags add up."""
        return GuardDecision(self.refusal or other.refusal, self.flags + other.flags)


@dataclass(frozen=True)
class HeaderFacts:
    """The DICOM tags the guard reads, normalised (upper case, stripped); None where absent.

    Attributes:
        modality: Modality (0008,0060).
        body_part: Body Part Examined (0018,0015).
        sop_class: SOP Class UID, from the data set or the file meta.
    """

    modality: str | None = None
    body_part: str | None = None
    sop_class: str | None = None

    @staticmethod
    def from_dataset(ds: Dataset) -> HeaderFacts:
        """Take the facts from a parsed data set (pixel data not needed)."""
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
        return HeaderFacts(modality=_tag_text(ds.get("Modality")), body_part=_tag_text(ds.get("BodyPartExamined")),
                           sop_class=str(sop).strip() if sop else None)  # fmt: skip


@dataclass(frozen=True)
class ImageMeasures:
    """What the image rules measured, in the units their reasons use.

    Attributes:
        height: Original height in pixels.
        width: Original width in pixels.
        aspect: Long side / short side.
        long_side_mm: Long side in millimetres, None when the pixel spacing is unknown.
        colour_fraction: Fraction of coloured thumbnail pixels, None for gray sources.
        median_chroma: Median chroma of the colour thumbnail, None for gray sources.
        contrast: Gray levels between the 1st and 99th percentiles.
        neighbour_correlation: Mean of the horizontal and vertical lag-1 correlations of the thumbnail.
        flat_light_fraction: Fraction of the image within the flat tolerance of its most common light level.
        flat_light_level: That light level (0 when the image has no light pixels).
        flat_fraction: Fraction of the image in exactly flat 7 x 7 patches, the darkest and brightest
            levels left out (see :attr:`GuardConfig.max_flat_fraction`).
    """

    height: int
    width: int
    aspect: float
    long_side_mm: float | None
    colour_fraction: float | None
    median_chroma: float | None
    contrast: float
    neighbour_correlation: float
    flat_light_fraction: float
    flat_light_level: int
    flat_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """Plain, rounded values for reports."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = round(value, 4) if isinstance(value, float) else value
        return out


def _tag_text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def read_header(path: str | os.PathLike[str]) -> HeaderFacts | None:
    """Read the guard's tags from a DICOM file without touching its pixel data.

    Parsing stops before Pixel Data, so this costs a fraction of a millisecond even for a 20 MB
    JPEG 2000 file. Files that are not DICOM, or whose header cannot be parsed, give None: the reader
    reports those, with its own reasons.

    Args:
        path: Any input file.

    Returns:
        The facts, or None for a non-DICOM or unparsable file.
    """
    # A FIFO or device named like an image would block open() forever; the reader reports those.
    if not Path(path).is_file():
        return None
    try:
        # Only regular files: opening a FIFO or a device would block or read forever (the reader
        # refuses those with its own message).
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                return None
            f.seek(0)
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a damaged header; the reader reports it
        log.debug("%s: header not read for the guard (%s)", path, exc)
        return None
    return HeaderFacts.from_dataset(ds)


def check_header(facts: HeaderFacts | None) -> GuardDecision:
    """Header rules: refuse non-radiograph modalities, flag a body part that is not the spine.

    Args:
        facts: From :func:`read_header` (None: not DICOM, nothing to check).

    Returns:
        The decision; missing tags never refuse.

    Example:
        >>> check_header(HeaderFacts(modality="MR")).refusal.code
        'modality'
    """
    if facts is None:
        return GuardDecision()
    refusal = None
    modality = facts.modality or _SOP_CLASS_MODALITY.get(facts.sop_class or "")
    if modality is not None and modality not in RADIOGRAPH_MODALITIES | UNSPECIFIC_MODALITIES:
        what = MODALITY_NAMES.get(modality, f"not a projection radiograph (DICOM Modality {modality})")
        said = "DICOM Modality" if facts.modality else "its DICOM SOP Class"
        refusal = Refusal(
            "modality",
            f"this is {what} ({said} {modality if facts.modality else facts.sop_class}); the model judges only "
            "projection X-rays of the spine (CR, DX): send the spine radiograph of the study",
        )
    flags: tuple[GuardFlag, ...] = ()
    part = facts.body_part
    if part is not None and part.replace(" ", "") not in SPINE_BODY_PARTS and "SPINE" not in part:
        flags = (
            GuardFlag(
                "body_part",
                f"Body Part Examined is {part!r}, not the spine: check that the right series was sent "
                "(judged anyway: other views, such as a chest film, show part of the spine)",
            ),
        )
    return GuardDecision(refusal, flags)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """Area-averaged copy with the long side at most :data:`MEASURE_SIDE` (no copy when already small)."""
    h, w = image.shape[:2]
    factor = MEASURE_SIDE / max(h, w)
    if factor >= 1:
        return image
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _colour_measures(colour: np.ndarray) -> tuple[float, float]:
    """Fraction of coloured pixels and median chroma of an RGB(A) image (channel order irrelevant)."""
    rgb = colour[..., :3]
    if rgb.dtype != np.uint8:
        peak = float(rgb.max(initial=0))
        rgb = (rgb.astype(np.float32) * (255.0 / peak if peak > 0 else 0.0)).astype(np.uint8)
    small = _thumbnail(np.ascontiguousarray(rgb)).astype(np.int16)
    chroma = small.max(axis=2) - small.min(axis=2)
    return float((chroma > COLOUR_CHROMA).mean()), float(np.median(chroma))


def _neighbour_correlation(gray: np.ndarray) -> float:
    x = gray.astype(np.float64)
    pairs = [(x[:, :-1], x[:, 1:]), (x[:-1, :], x[1:, :])]
    values = []
    for a, b in pairs:
        if a.size < 2:
            continue
        sa, sb = a.std(), b.std()
        values.append(float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)) if sa > 0 and sb > 0 else 0.0)
    return float(np.mean(values)) if values else 0.0


def _flat_light(gray: np.ndarray, light_level: int, tolerance: int) -> tuple[float, int]:
    """Fraction of pixels within ``tolerance`` of the most common level at or above ``light_level``."""
    # A strided sample keeps exact gray levels (area averaging would blur text into mid grays).
    step = max(1, max(gray.shape) // (2 * MEASURE_SIDE))
    sample = gray[::step, ::step]
    counts = np.bincount(sample.ravel(), minlength=256)
    if counts[light_level:].sum() == 0:
        return 0.0, 0
    mode = light_level + int(np.argmax(counts[light_level:]))
    window = counts[max(0, mode - tolerance) : mode + tolerance + 1].sum()
    return float(window / sample.size), mode


def _flat_fraction(gray: np.ndarray) -> float:
    """Fraction of pixels whose 7 x 7 neighbourhood is one exact level, other than the image's extremes."""
    # Nearest-neighbour reduction keeps exact levels (area averaging would smooth noise into flats,
    # and blend a panel's edge into levels of its own); neighbours are then a few source pixels apart.
    h, w = gray.shape
    factor = 2 * MEASURE_SIDE / max(h, w)
    if factor < 1:
        gray = cv2.resize(gray, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_NEAREST)
    # 7 x 7: smooth anatomy quantised to 8 bits has small plateaus of one level, filled panels large ones.
    kernel = np.ones((7, 7), np.uint8)
    flat = cv2.dilate(gray, kernel) == cv2.erode(gray, kernel)
    # Collimation borders (exact black) and burnt-in labels (exact white) are flat on real films.
    inside = (gray > gray.min()) & (gray < gray.max())
    return float((flat & inside).mean())


def measure_image(
    gray: np.ndarray,
    colour: np.ndarray | None = None,
    source_shape: tuple[int, int] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    config: GuardConfig | None = None,
) -> ImageMeasures:
    """Take the measures the image rules decide on.

    Args:
        gray: uint8 ``[H, W]`` image as the model will see it (windowed, bone bright).
        colour: The decoded colour image ``[H', W', 3|4]`` before it became gray, or None for a gray source.
        source_shape: ``(H, W)`` of the original pixel grid (a reduced-resolution decode is smaller);
            None: ``gray``'s shape.
        pixel_spacing: ``(row, column)`` mm per original pixel, or None.
        config: Where the light level and flat tolerance come from; None for the defaults.

    Returns:
        The measures.
    """
    config = config or GuardConfig()
    height, width = source_shape or (int(gray.shape[0]), int(gray.shape[1]))
    long_mm = None
    if pixel_spacing is not None and all(s > 0 for s in pixel_spacing):
        long_mm = max(height * pixel_spacing[0], width * pixel_spacing[1])
    colour_fraction = median_chroma = None
    if colour is not None and colour.ndim == 3 and colour.shape[2] >= 3:
        colour_fraction, median_chroma = _colour_measures(colour)
    small = _thumbnail(gray)
    low, high = np.percentile(small, (1, 99))
    flat, level = _flat_light(gray, config.light_level, config.flat_tolerance)
    return ImageMeasures(
        height=int(height),
        width=int(width),
        aspect=max(height, width) / max(1, min(height, width)),
        long_side_mm=None if long_mm is None else float(long_mm),
        colour_fraction=colour_fraction,
        median_chroma=median_chroma,
        contrast=float(high - low),
        neighbour_correlation=_neighbour_correlation(small),
        flat_light_fraction=flat,
        flat_light_level=level,
        flat_fraction=_flat_fraction(gray),
    )


def judge_measures(m: ImageMeasures, config: GuardConfig | None = None) -> GuardDecision:
    """Apply the image rules to measures, in the order of how plainly they rule an image out.

    Args:
        m: From :func:`measure_image`.
        config: Limits; None for the defaults.

    Returns:
        The first refusal, or an empty decision.
    """
    c = config or GuardConfig()
    refusal: Refusal | None = None
    if m.colour_fraction is not None and m.colour_fraction > c.max_colour_fraction:
        refusal = Refusal(
            "colour",
            f"a colour picture, not an X-ray: {m.colour_fraction:.0%} of the image is coloured (median chroma "
            f"{m.median_chroma:.0f} of 255; at most {c.max_colour_fraction:.0%} allowed for burnt-in annotations); "
            "radiographs are gray",
        )
    elif min(m.height, m.width) < c.min_side:
        refusal = Refusal(
            "size",
            f"too small for a spine radiograph: {m.width} x {m.height} px (at least {c.min_side} px a side needed); "
            "send the original image, not a thumbnail",
        )
    elif c.min_side_mm is not None and m.long_side_mm is not None and m.long_side_mm < c.min_side_mm:
        refusal = Refusal(
            "size",
            f"covers only {m.long_side_mm:.0f} mm (pixel spacing from the DICOM header); a spine radiograph "
            f"covers at least {c.min_side_mm:.0f} mm",
        )
    elif m.aspect > c.max_aspect:
        refusal = Refusal(
            "aspect_ratio",
            f"implausible shape for a spine radiograph: {m.width} x {m.height} px, aspect ratio {m.aspect:.1f} "
            f"(at most {c.max_aspect:.1f}; a stitched whole-spine study is about 2.8)",
        )
    elif m.contrast < c.min_contrast:
        refusal = Refusal(
            "blank",
            f"the image is blank: 98% of its pixels lie within {m.contrast:.0f} gray levels "
            f"(at least {c.min_contrast:.0f} expected); check the exposure or the export",
        )
    elif m.neighbour_correlation < c.min_neighbour_correlation:
        refusal = Refusal(
            "noise",
            f"the image looks like noise: neighbouring pixels are nearly uncorrelated (r = "
            f"{m.neighbour_correlation:.2f}, anatomy gives above {c.min_neighbour_correlation:.2f}); there is no "
            "anatomy to judge",
        )
    elif m.flat_light_fraction > c.max_flat_light_fraction:
        refusal = Refusal(
            "document",
            f"looks like a document or screenshot: {m.flat_light_fraction:.0%} of the image is one flat light tone "
            f"(gray level {m.flat_light_level}; at most {c.max_flat_light_fraction:.0%}); a radiograph has a "
            "dark background and no flat areas",
        )
    elif m.flat_fraction > c.max_flat_fraction:
        refusal = Refusal(
            "document",
            f"looks like a screenshot or a rendered graphic: {m.flat_fraction:.0%} of the image is in areas of one "
            f"exact gray level (at most {c.max_flat_fraction:.0%}); an exposure is never exactly flat, a radiograph "
            "has noise everywhere but in its black borders and white labels",
        )
    return GuardDecision(refusal)


def check_image(
    gray: np.ndarray,
    colour: np.ndarray | None = None,
    source_shape: tuple[int, int] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    config: GuardConfig | None = None,
) -> GuardDecision:
    """Image rules on a decoded image: :func:`measure_image` then :func:`judge_measures`.

    Args:
        gray: uint8 ``[H, W]`` as the model will see it.
        colour: The colour image before conversion to gray, None for gray sources.
        source_shape: Original ``(H, W)``; None for ``gray``'s shape.
        pixel_spacing: mm per original pixel, or None.
        config: Limits; None for the defaults.

    Returns:
        The decision.

    Example:
        >>> check_image(np.zeros((512, 512), np.uint8)).refusal.code
        'blank'
    """
    return judge_measures(measure_image(gray, colour, source_shape, pixel_spacing, config), config)


def check_ood(score: float, threshold: float | None, policy: OodPolicy = "refuse") -> GuardDecision:
    """The learned rule: refuse (or flag) an image whose in-distribution score is above the threshold.

    Args:
        score: The classifier graph's ``ood_score`` for the image (larger: less like the training images).
        threshold: The manifest's threshold, chosen on validation images; None for bundles exported before
            the score existed (nothing to decide).
        policy: ``refuse`` or ``flag``.

    Returns:
        The decision. A non-finite score counts as out of distribution: a model that cannot score an
        image has not seen its like.
    """
    if threshold is None or (np.isfinite(score) and score <= threshold):
        return GuardDecision()
    reason = (
        f"unlike the spine radiographs the model was trained on (in-distribution score {score:.3g}, "
        f"limit {threshold:.3g} from validation images): check that this is a spine radiograph"
    )
    if policy == "refuse":
        return GuardDecision(Refusal("out_of_distribution", reason))
    return GuardDecision(flags=(GuardFlag("out_of_distribution", reason + "; judged anyway (--ood flag)"),))


@dataclass(frozen=True)
class GuardReport:
    """Counts of refusals over a set of inputs, for ``bench`` and notes.

    Attributes:
        total: Inputs judged by the guard.
        refused: Inputs refused.
        by_code: Refusals per code.
    """

    total: int
    refused: int
    by_code: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Fraction refused (0 for no inputs)."""
        return self.refused / self.total if self.total else 0.0

    @staticmethod
    def of(decisions: list[GuardDecision]) -> GuardReport:
        """Count a list of decisions."""
        by_code: dict[str, int] = {}
        for d in decisions:
            if d.refusal is not None:
                by_code[d.refusal.code] = by_code.get(d.refusal.code, 0) + 1
        return GuardReport(len(decisions), sum(by_code.values()), dict(sorted(by_code.items())))
