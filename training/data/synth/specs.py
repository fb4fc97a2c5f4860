"""What the generator plans and draws: lesion classes, settings and the specs of one image.

These plain, frozen records pass between the steps (plan, render, encode, write), so each step
can be tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_edge.errors import DatasetError

OSTEOPHYTES = "Osteophytes"
SURGICAL_IMPLANT = "Surgical implant"
SPONDYLOLYSTHESIS = "Spondylolysthesis"
FORAMINAL_STENOSIS = "Foraminal stenosis"
DISC_SPACE_NARROWING = "Disc space narrowing"
VERTEBRAL_COLLAPSE = "Vertebral collapse"
OTHER_LESIONS = "Other lesions"

SPLITS: tuple[str, ...] = ("train", "test")
REGIONS: tuple[str, ...] = ("cervical", "thoracic", "lumbar")
PROJECTIONS: tuple[str, ...] = ("lateral", "AP")

#: Calibrated so that the ``cpu`` training profile (small CNNs from scratch at 128 px, 250 train
#: images) can learn the lesions within minutes. Measured on the 2-core dev box, 300 train images at
#: scale 0.35, resnet10t at 128 px, batch 8, AdamW 3e-3: validation AUROC 0.79 at difficulty 0.5
#: after 20 epochs and 0.86 at difficulty 0.0 (20 epochs) and 0.2 (15 epochs); yolo11n at 256 px
#: reached mAP@0.5 0.27 after 12 epochs at 0.2. Lesions stay small (osteophyte spurs are a few
#: pixels at 128 px) and normal variants still mimic them; use 0.5 or more for a harder set.
DEFAULT_DIFFICULTY = 0.2


@dataclass(frozen=True)
class SynthConfig:
    """Settings of :func:`generate_dataset`.

    Attributes:
        n_train: Images in ``train_images`` (0 allowed).
        n_test: Images in ``test_images`` (0 allowed).
        seed: The same seed (and settings) writes byte-identical files.
        difficulty: 0 (obvious lesions, clean anatomy) .. 1 (subtle lesions among look-alike
            normal variants, more noise).
        normal_fraction: Share of images marked "No finding" (assigned per study).
        scale: Multiplies the realistic image sizes (about 1300-3000 rows); e.g. 0.35 for a
            fast demo, 0.05 for tests. Pixel Spacing grows accordingly.
        jpeg2000_fraction: Share of files stored as JPEG 2000 lossless; the rest are explicit
            VR little endian.
        workers: Processes that render and encode; 0 means one per CPU.
        min_images_per_class: Each split gets at least this many images of every class when it
            has abnormal images at all (see :mod:`spine_edge.training.data.synth`).
    """

    n_train: int = 300
    n_test: int = 100
    seed: int = 0
    difficulty: float = DEFAULT_DIFFICULTY
    normal_fraction: float = 0.5
    scale: float = 1.0
    jpeg2000_fraction: float = 0.9
    workers: int = 0
    min_images_per_class: int = 2

    def __post_init__(self) -> None:
        checks = (
            (self.n_train >= 0 and self.n_test >= 0, "n_train and n_test must be >= 0"),
            (self.n_train + self.n_test >= 1, "n_train + n_test must be at least 1"),
            (0.0 <= self.difficulty <= 1.0, "difficulty must be in [0, 1]"),
            (0.0 <= self.normal_fraction <= 1.0, "normal_fraction must be in [0, 1]"),
            (0.01 <= self.scale <= 2.0, "scale must be in [0.01, 2]"),
            (0.0 <= self.jpeg2000_fraction <= 1.0, "jpeg2000_fraction must be in [0, 1]"),
            (self.workers >= 0, "workers must be >= 0 (0 = one per CPU)"),
            (self.min_images_per_class >= 0, "min_images_per_class must be >= 0"),
        )
        for ok, rule in checks:
            if not ok:
                raise DatasetError(f"invalid synthetic dataset settings {self}: {rule}")


@dataclass(frozen=True)
class LesionSpec:
    """One lesion to draw.

    Attributes:
        lesion_type: A name from ``CLASS_NAMES``.
        level: Vertebra index from the top (for disc-level lesions: the vertebra above the disc).
        side: -1 or +1 across the column. In lateral views +1 is anterior.
        end: -1 upper, +1 lower endplate (osteophytes); 0 otherwise.
        span: Vertebrae covered (surgical implants); 1 otherwise.
        severity: 0 (mild) .. 1 (marked), before the difficulty scaling.
        variant: Class-specific form: implant 0 screws and rods, 1 anterior plate, 2 screws,
            rods and cages; other lesions 0 lytic, 1 sclerotic.
        seed: Seeds the lesion's own small random details.
    """

    lesion_type: str
    level: int
    side: int = 1
    end: int = 0
    span: int = 1
    severity: float = 0.5
    variant: int = 0
    seed: int = 0


@dataclass(frozen=True)
class ImageSpec:
    """Everything :func:`render_radiograph` needs; rendering is a pure function of it.

    Attributes:
        rows: Image height in pixels.
        cols: Image width in pixels.
        region: "cervical", "thoracic" or "lumbar".
        projection: "lateral" or "AP".
        facing: +1 when the patient faces image right (lateral views).
        n_vertebrae: Whole vertebrae in view; lesions refer to them by index from the top.
        bits_stored: 12..16; pixel values stay below ``2**bits_stored``.
        difficulty: See :class:`SynthConfig`.
        anatomy_seed: Seeds shape, texture and exposure (independent of the lesions).
        noise_seed: Seeds the quantum noise.
        lesions: Lesions to draw, in the order their boxes are returned.
    """

    rows: int
    cols: int
    region: str
    projection: str
    facing: int
    n_vertebrae: int
    bits_stored: int
    difficulty: float
    anatomy_seed: int
    noise_seed: int
    lesions: tuple[LesionSpec, ...] = ()


@dataclass(frozen=True)
class LesionBox:
    """A lesion's box in pixel edge coordinates: 0 <= xmin < xmax <= cols, same for y."""

    lesion_type: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True, eq=False)
class Rendering:
    """Output of :func:`render_radiograph`.

    Attributes:
        pixels: uint16 [rows, cols], bone bright (MONOCHROME2 sense).
        boxes: One box per ``spec.lesions`` entry, same order.
    """

    pixels: np.ndarray
    boxes: tuple[LesionBox, ...]


@dataclass(frozen=True)
class DicomHeader:
    """The DICOM attributes chosen for one file (no dates: files depend on the seed only)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    photometric: str
    transfer_syntax_uid: str
    pixel_spacing_mm: float
    series_number: int
    instance_number: int
    modality: str | None
    body_part: str | None
    view_position: str | None


@dataclass(frozen=True)
class ImageJob:
    """One planned image: where it goes, its CSV identity, its header and what to draw."""

    split: str
    image_id: str
    study_id: str
    series_id: str
    rad_id: str
    header: DicomHeader
    spec: ImageSpec

    @property
    def abnormal(self) -> bool:
        """True when the image has at least one lesion."""
        return bool(self.spec.lesions)
