"""Synthetic VinDr-SpineXR: spine radiographs with learnable lesions, written in the real layout.

The generator writes what ``read_vindr`` and ``spine-edge data prepare`` expect from the real data::

    OUT/train_images/<image_id>.dicom   OUT/annotations/train.csv
    OUT/test_images/<image_id>.dicom    OUT/annotations/test.csv

It works in three pure steps, so tests can check each one without touching the disk:

1. :func:`plan_dataset` draws studies, normal/abnormal status, lesion classes and DICOM header
   choices for every image (cheap: no pixels).
2. :func:`render_radiograph` turns one :class:`ImageSpec` into uint16 pixels (bone bright) and
   the tight box of every lesion. Rendering is a pure function of the spec: the anatomy, texture
   and noise come from seeds stored in it, so dropping one lesion from a spec changes the pixels
   inside that lesion's box and nowhere else.
3. :func:`generate_dataset` renders and encodes the images in a process pool and writes the CSVs.

Anatomy: a column of vertebral bodies (trabecular texture, cortical rim, rounded corners,
slightly concave endplates) separated by disc spaces, posterior elements with foramina, a
soft-tissue silhouette and per-region extras (skull base and airway, ribs and lungs, pelvis and
bowel gas), exposure gradient, quantum noise, sometimes collimation and a side marker.

Lesions, each with its own signature inside its box: Osteophytes (a beak at a vertebral corner),
Disc space narrowing (endplates closer together and sclerotic), Surgical implant (bright metal),
Spondylolysthesis (a body shifted against its neighbours), Foraminal stenosis (a foramen squeezed
by bone), Vertebral collapse (a wedged, denser body), Other lesions (a lytic or sclerotic blob).

Difficulty (0 easy .. 1 hard) shrinks lesions and their contrast, and grows the normal variants
that mimic them (small corner lipping, disc height and alignment variation, bone islands, small
foramina), and the noise. Lesion sizes are relative to the vertebrae, so they survive
downscaling to a few hundred pixels.

Class frequencies follow the paper: each class is present on an abnormal image with
``PAPER_CLASS_FREQUENCY`` (exactly, conditioned on the image having at least one lesion), and
common classes come with several boxes per image (:data:`INSTANCE_COUNT_PROBABILITIES`). In small
sets the rare classes would be missing, so every split gets at least
``SynthConfig.min_images_per_class`` images of each class (added to abnormal images that lack
it), which over-represents the rarest classes in small sets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)
from tqdm import tqdm

from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES, NO_FINDING, PAPER_CLASS_FREQUENCY
from spine_edge.errors import DatasetError
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic

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

#: P(n boxes = 1, 2, ...) for a class present on an image. The paper counts 6,886 osteophyte boxes
#: over 8,389 images, so the common classes come several per image.
INSTANCE_COUNT_PROBABILITIES: dict[str, tuple[float, ...]] = {
    OSTEOPHYTES: (0.45, 0.30, 0.17, 0.08),
    DISC_SPACE_NARROWING: (0.60, 0.30, 0.10),
    SURGICAL_IMPLANT: (1.0,),
    SPONDYLOLYSTHESIS: (0.90, 0.10),
    FORAMINAL_STENOSIS: (0.75, 0.25),
    OTHER_LESIONS: (1.0,),
    VERTEBRAL_COLLAPSE: (0.90, 0.10),
}

_REGION_PROBABILITIES = (0.35, 0.15, 0.50)
_VIEWS_PER_STUDY = ((1, 0.25), (2, 0.60), (3, 0.15))
_BITS_STORED = ((12, 0.75), (14, 0.10), (15, 0.05), (16, 0.10))
_MONOCHROME1_PROBABILITY = 0.15
_BODY_PART = {"cervical": "CSPINE", "thoracic": "TSPINE", "lumbar": "LSPINE"}
_NOMINAL_PIXEL_SPACING_MM = 0.14
_MIN_ROWS = 48
#: Anatomy is drawn at most this many rows high and then resized to the file's size: the
#: drawing is smooth, and full-resolution noise is added after the resize.
_WORK_MAX_ROWS = 1024
#: System blur (working pixels) and the box margin that covers it, antialiasing and the resize.
_BLUR_SIGMA = 0.7
_BOX_MARGIN_WORK_PX = 2.5

_CANVASES = ("trab", "post", "cortex", "blob", "metal", "extra")
_METAL = 2.5
_SEED_SALT = 0x5EED_5917


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
            has abnormal images at all (see the module docstring).
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
        return bool(self.spec.lesions)


@dataclass(frozen=True)
class SynthReport:
    """What :func:`generate_dataset` wrote.

    Attributes:
        path: The dataset root.
        images: Images per split.
        normal_images: "No finding" images per split.
        studies: Studies per split.
        boxes: Split -> class -> number of boxes.
        images_with_class: Split -> class -> images with at least one box of the class.
        transfer_syntaxes: Transfer syntax name -> files.
        elapsed_s: Wall time of the whole run.
    """

    path: Path
    images: Mapping[str, int]
    normal_images: Mapping[str, int]
    studies: Mapping[str, int]
    boxes: Mapping[str, Mapping[str, int]]
    images_with_class: Mapping[str, Mapping[str, int]]
    transfer_syntaxes: Mapping[str, int]
    elapsed_s: float

    def __str__(self) -> str:
        total = sum(self.images.values())
        lines = [f"wrote {total} synthetic radiographs to {self.path} in {self.elapsed_s:.1f} s"]
        for split in self.images:
            lines.append(
                f"  {split}: {self.images[split]} images in {self.studies[split]} studies, "
                f"{self.normal_images[split]} normal"
            )
        width = max(len(name) for name in CLASS_NAMES)
        lines.append(f"  {'boxes (images)':<{width}}  " + "  ".join(f"{s:>12}" for s in self.images))
        for name in CLASS_NAMES:
            cells = "  ".join(f"{self.boxes[s][name]:>6} ({self.images_with_class[s][name]:>3})" for s in self.images)
            lines.append(f"  {name:<{width}}  {cells}")
        lines.append("  files: " + ", ".join(f"{n} {name}" for name, n in self.transfer_syntaxes.items()))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sampling: classes, lesion placement, image specs, the dataset plan
# --------------------------------------------------------------------------------------------


def presence_probabilities() -> dict[str, float]:
    """Per-class draw probabilities q such that P(class | at least one class) = paper frequency.

    Abnormal images are drawn by rejection (redraw when no class came up), which inflates every
    class by 1 / P(any); q solves q_c = p_c * P_any(q) so that the result matches the paper.
    """
    target = {name: PAPER_CLASS_FREQUENCY[name] for name in CLASS_NAMES}
    q = dict(target)
    for _ in range(200):
        p_any = 1.0 - math.prod(1.0 - v for v in q.values())
        q = {name: target[name] * p_any for name in CLASS_NAMES}
    return q


_PRESENCE = presence_probabilities()


def sample_lesion_counts(rng: np.random.Generator) -> dict[str, int]:
    """Draw the classes of one abnormal image and how many boxes each gets (at least one class)."""
    while True:
        draws = rng.random(len(CLASS_NAMES))
        present = [name for name, r in zip(CLASS_NAMES, draws, strict=True) if r < _PRESENCE[name]]
        if present:
            break
    counts = {}
    for name in present:
        probs = INSTANCE_COUNT_PROBABILITIES[name]
        counts[name] = 1 + int(rng.choice(len(probs), p=probs))
    return counts


def sample_image_spec(
    rng: np.random.Generator,
    *,
    lesion_counts: Mapping[str, int],
    difficulty: float = DEFAULT_DIFFICULTY,
    scale: float = 1.0,
    region: str | None = None,
    projection: str | None = None,
    bits_stored: int = 12,
) -> ImageSpec:
    """Draw an image's size, view and anatomy seeds, and place the requested lesions.

    Args:
        rng: Source of randomness (consumed).
        lesion_counts: Class name -> boxes wanted; empty for a normal image. Counts larger than
            the free places for a class (e.g. discs in view) are reduced.
        difficulty: See :class:`SynthConfig`.
        scale: Image size factor.
        region: Spine region, or None to draw one.
        projection: "lateral" or "AP", or None to draw one.
        bits_stored: Stored bits of the pixel values.

    Returns:
        The spec, ready for :func:`render_radiograph`.
    """
    unknown = set(lesion_counts) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown lesion classes {sorted(unknown)}; expected names from CLASS_NAMES")
    region = region or str(rng.choice(REGIONS, p=_REGION_PROBABILITIES))
    projection = projection or str(rng.choice(PROJECTIONS, p=(0.6, 0.4)))
    rows_range = {"cervical": (1300, 2000), "thoracic": (1800, 3000), "lumbar": (1800, 3000)}[region]
    aspect_range = (0.5, 0.82) if projection == "lateral" else (0.68, 0.85)
    rows_real = rng.uniform(*rows_range)
    rows = max(_MIN_ROWS, round(rows_real * scale))
    cols = max(_MIN_ROWS // 2, round(rows_real * rng.uniform(*aspect_range) * scale))
    n_vertebrae = {
        "cervical": int(rng.choice((5, 6), p=(0.3, 0.7))),
        "thoracic": int(rng.integers(8, 12)),
        "lumbar": int(rng.choice((5, 6), p=(0.8, 0.2))),
    }[region]
    facing = int(rng.choice((-1, 1))) if projection == "lateral" else 1
    anatomy_seed, noise_seed = (int(s) for s in rng.integers(0, 2**63 - 1, size=2))
    lesions = _place_lesions(rng, lesion_counts, n_vertebrae, region, projection)
    return ImageSpec(
        rows=rows,
        cols=cols,
        region=region,
        projection=projection,
        facing=facing,
        n_vertebrae=n_vertebrae,
        bits_stored=bits_stored,
        difficulty=float(difficulty),
        anatomy_seed=anatomy_seed,
        noise_seed=noise_seed,
        lesions=lesions,
    )


def _place_lesions(
    rng: np.random.Generator, counts: Mapping[str, int], n: int, region: str, projection: str
) -> tuple[LesionSpec, ...]:
    lateral = projection == "lateral"
    lesions: list[LesionSpec] = []

    def new(name: str, level: int, **kw: int) -> LesionSpec:
        return LesionSpec(
            lesion_type=name,
            level=level,
            severity=float(rng.uniform(0.0, 1.0)),
            seed=int(rng.integers(0, 2**31 - 1)),
            **kw,
        )

    def pick(slots: list[tuple[int, ...]], k: int, weights: Sequence[float] | None = None) -> list[tuple[int, ...]]:
        k = min(k, len(slots))
        p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
        chosen = rng.choice(len(slots), size=k, replace=False, p=p)
        return [slots[int(i)] for i in sorted(chosen)]

    caudal = np.linspace(1.0, 3.0, n - 1) if region == "lumbar" else np.ones(n - 1)
    slipped: set[int] = set()
    for name in CLASS_NAMES:
        k = counts.get(name, 0)
        if k <= 0:
            continue
        if name == OSTEOPHYTES:
            corners = [(lv, s, e) for lv in range(n) for s in (-1, 1) for e in (-1, 1)]
            weights = [6.0 if (not lateral or s == 1) else 1.0 for (_, s, _) in corners]
            for lv, s, e in pick(corners, k, weights):
                lesions.append(new(name, lv, side=s, end=e))
        elif name == DISC_SPACE_NARROWING:
            for (lv,) in pick([(d,) for d in range(n - 1)], k, caudal):
                lesions.append(new(name, lv))
        elif name == SURGICAL_IMPLANT:
            span = int(rng.integers(2, 4))
            start = int(rng.integers(0, n - span + 1))
            if lateral and region == "cervical":
                variant = int(rng.choice((0, 1), p=(0.3, 0.7)))
            else:
                variant = int(rng.choice((0, 2), p=(0.7, 0.3)))
            lesions.append(new(name, start, span=span, variant=variant))
        elif name == SPONDYLOLYSTHESIS:
            for (lv,) in pick([(v,) for v in range(n - 1)], k, caudal):
                side = int(rng.choice((1, -1), p=(0.8, 0.2))) if lateral else int(rng.choice((-1, 1)))
                lesions.append(new(name, lv, side=side))
                slipped.add(lv)
        elif name == FORAMINAL_STENOSIS:
            slots = [(d, -1) for d in range(n - 1)] if lateral else [(d, s) for d in range(n - 1) for s in (-1, 1)]
            for lv, s in pick(slots, k):
                lesions.append(new(name, lv, side=s))
        elif name == VERTEBRAL_COLLAPSE:
            free = [(v,) for v in range(n) if v not in slipped] or [(v,) for v in range(n)]
            for (lv,) in pick(free, k):
                lesions.append(new(name, lv))
        elif name == OTHER_LESIONS:
            for (lv,) in pick([(v,) for v in range(n)], k):
                lesions.append(new(name, lv, variant=int(rng.choice((0, 1), p=(0.6, 0.4)))))
    return tuple(lesions)


def plan_dataset(config: SynthConfig) -> tuple[ImageJob, ...]:
    """Draw every image of the dataset (no pixels): ids, studies, labels, headers, specs.

    Train images come first, then test images; within a split, images of a study are adjacent.
    """
    jobs: list[ImageJob] = []
    for split_index, split in enumerate(SPLITS):
        n = config.n_train if split == "train" else config.n_test
        if n > 0:
            jobs.extend(_plan_split(config, split, split_index, n))
    return tuple(jobs)


def _plan_split(config: SynthConfig, split: str, split_index: int, n: int) -> list[ImageJob]:
    rng = np.random.default_rng([_SEED_SALT, config.seed, split_index])
    sizes: list[int] = []
    view_counts = [v for v, _ in _VIEWS_PER_STUDY]
    view_probs = [p for _, p in _VIEWS_PER_STUDY]
    while sum(sizes) < n:
        sizes.append(min(int(rng.choice(view_counts, p=view_probs)), n - sum(sizes)))
    # Normal status is a study property; fill the normal quota with whole studies in random order.
    target_normal = round(config.normal_fraction * n)
    normal_study = [False] * len(sizes)
    n_normal = 0
    for s in rng.permutation(len(sizes)):
        if n_normal + sizes[s] <= target_normal:
            normal_study[s] = True
            n_normal += sizes[s]
    study_of_image = [s for s, size in enumerate(sizes) for _ in range(size)]
    counts: list[dict[str, int]] = [{} if normal_study[s] else sample_lesion_counts(rng) for s in study_of_image]
    _guarantee_min_images(rng, counts, [not normal_study[s] for s in study_of_image], config.min_images_per_class)

    jobs: list[ImageJob] = []
    image_index = 0
    for s, size in enumerate(sizes):
        study = _sample_study(rng, config, split, s)
        projections = _study_projections(rng, size)
        for view in range(size):
            i = image_index
            image_rng = np.random.default_rng([_SEED_SALT, config.seed, split_index, 1, i])
            j2k = bool(image_rng.random() < config.jpeg2000_fraction)
            spec = sample_image_spec(
                image_rng,
                lesion_counts=counts[i],
                difficulty=config.difficulty,
                scale=config.scale,
                region=study.region,
                projection=projections[view],
                bits_stored=study.bits_stored,
            )
            extra = study.extra_tags
            header = DicomHeader(
                sop_class_uid=study.sop_class_uid,
                sop_instance_uid=_uid(config.seed, split, "sop", i),
                study_instance_uid=study.study_uid,
                series_instance_uid=_uid(config.seed, split, "series", i),
                patient_id=study.patient_id,
                photometric=study.photometric,
                transfer_syntax_uid=JPEG2000Lossless if j2k else ExplicitVRLittleEndian,
                pixel_spacing_mm=round(study.spacing_mm / config.scale, 6),
                series_number=view + 1,
                instance_number=1,
                modality=study.modality if extra else None,
                body_part=_BODY_PART[study.region] if extra else None,
                view_position=("LL" if spec.projection == "lateral" else "AP") if extra else None,
            )
            jobs.append(
                ImageJob(
                    split=split,
                    image_id=_hex_id(config.seed, split, "image", i),
                    study_id=study.study_id,
                    series_id=_hex_id(config.seed, split, "series", i),
                    rad_id=study.rad_id,
                    header=header,
                    spec=spec,
                )
            )
            image_index += 1
    return jobs


def _guarantee_min_images(
    rng: np.random.Generator, counts: list[dict[str, int]], abnormal: list[bool], minimum: int
) -> None:
    """Add one box of a class to abnormal images lacking it until ``minimum`` images have it."""
    candidates_all = [i for i, a in enumerate(abnormal) if a]
    if not candidates_all or minimum <= 0:
        return
    for name in CLASS_NAMES:
        have = sum(1 for i in candidates_all if name in counts[i])
        lacking = [i for i in candidates_all if name not in counts[i]]
        for i in rng.permutation(lacking)[: max(0, minimum - have)]:
            counts[int(i)][name] = 1


@dataclass(frozen=True)
class _Study:
    """What the views of one study share: patient, exam, device settings, reader."""

    study_id: str
    study_uid: str
    patient_id: str
    rad_id: str
    region: str
    bits_stored: int
    photometric: str
    sop_class_uid: str
    modality: str
    extra_tags: bool
    spacing_mm: float


def _sample_study(rng: np.random.Generator, config: SynthConfig, split: str, s: int) -> _Study:
    computed_radiography = bool(rng.random() < 0.3)
    return _Study(
        study_id=_hex_id(config.seed, split, "study", s),
        study_uid=_uid(config.seed, split, "study", s),
        patient_id=_hex_id(config.seed, split, "patient", s)[:16],
        rad_id=f"rad{1 + int(rng.integers(0, 5))}",
        region=str(rng.choice(REGIONS, p=_REGION_PROBABILITIES)),
        bits_stored=int(rng.choice([b for b, _ in _BITS_STORED], p=[p for _, p in _BITS_STORED])),
        photometric="MONOCHROME1" if rng.random() < _MONOCHROME1_PROBABILITY else "MONOCHROME2",
        sop_class_uid=(
            ComputedRadiographyImageStorage if computed_radiography else DigitalXRayImageStorageForPresentation
        ),
        modality="CR" if computed_radiography else "DX",
        # Real VinDr files carry almost no optional tags; some of ours do, so readers see both.
        extra_tags=bool(rng.random() < 0.4),
        spacing_mm=_NOMINAL_PIXEL_SPACING_MM * float(rng.uniform(0.95, 1.05)),
    )


def _study_projections(rng: np.random.Generator, size: int) -> list[str]:
    if size == 1:
        return [str(rng.choice(PROJECTIONS, p=(0.6, 0.4)))]
    views = ["lateral", "AP"] + ["lateral"] * (size - 2)
    return [views[i] for i in rng.permutation(size)]


def _hex_id(seed: int, split: str, kind: str, index: int) -> str:
    return hashlib.sha256(f"spine-edge-synth/{seed}/{split}/{kind}/{index}".encode()).hexdigest()[:32]


def _uid(seed: int, split: str, kind: str, index: int) -> str:
    """A UUID-derived UID (PS3.5 B.2, root 2.25) made from the seed, so reruns repeat it.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random.
    """
    return f"2.25.{int(_hex_id(seed, split, f'uid-{kind}', index), 16)}"


# --------------------------------------------------------------------------------------------
# Difficulty
# --------------------------------------------------------------------------------------------


def _lesion_gain(difficulty: float) -> float:
    """Multiplies lesion size and contrast: 2 at difficulty 0, about 1 at 0.5, 0.5 at 1.

    Steeper at the easy end, so that low settings give lesions a small network sees at 128 px.
    """
    return 0.5 + 1.5 * (1.0 - difficulty) ** 1.6


def _mimic(difficulty: float) -> float:
    """Amplitude of the normal variants that look like lesions: 0.1 at difficulty 0, 1 at 1."""
    return 0.1 + 0.9 * difficulty


def _noise_sigma(difficulty: float) -> float:
    """Quantum noise, as a fraction of the pixel range, at mid grey."""
    return 0.008 * (0.6 + 1.4 * difficulty)


# --------------------------------------------------------------------------------------------
# Geometry. Coordinates are in units of the image height: y in [0, 1], x in [0, cols / rows].
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vertebra:
    """A vertebral body in its own frame: u across (+u anterior / image right), v down the column.

    ``size`` is the nominal body height, which lesion details scale with; lesions that change the
    body (narrowing, collapse) leave it alone so that nothing else on the vertebra moves.
    Endplate distances are measured from the centre at the back (-u) and front (+u) walls. The
    core rectangle spans v in [-core_top, core_bot]; the caps above and below it hold the
    endplates, so that narrowing a disc only redraws the caps next to it.
    """

    cx: float
    cy: float
    angle: float
    facing: int
    half_w: float
    size: float
    top_back: float
    top_front: float
    bot_back: float
    bot_front: float
    core_top: float
    core_bot: float
    density: float
    top_sclerosis: float = 0.0
    bot_sclerosis: float = 0.0

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """Map local (u, v) points [N, 2] to image units."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        eu = np.array([self.facing * c, -self.facing * s])
        ev = np.array([s, c])
        return np.array([self.cx, self.cy]) + uv[:, :1] * eu + uv[:, 1:2] * ev

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([self.facing * c, -self.facing * s]), np.array([s, c])


@dataclass(frozen=True)
class _Prim:
    """One shape drawn with overwrite semantics on a canvas; filled when thickness == 0."""

    canvas: str
    points: tuple[float, ...]
    value: float
    thickness: float = 0.0
    closed: bool = False


@dataclass(frozen=True)
class _Anatomy:
    """The lesion-independent part of an image, drawn from ``ImageSpec.anatomy_seed``."""

    cols_u: float
    field: tuple[float, float, float, float]
    collimated: bool
    vertebrae: tuple[_Vertebra, ...]
    lipping: tuple[tuple[int, int, int, float], ...]  # (vertebra, side, end, length in heights)
    islands: tuple[tuple[int, float, float, float, float], ...]  # (vertebra, u, v, radius, density)
    foramen_scale: Mapping[tuple[int, int], float]
    post_density: float
    cortex: float
    base_prims: tuple[_Prim, ...]
    extra_prims: tuple[_Prim, ...]
    soft: tuple[float, float, float, float]  # body silhouette: centre x, half width, density, slope
    soft_prims: tuple[_Prim, ...]
    marker: tuple[str, float, float, float] | None  # side letter, x, y, height
    offset: float
    gain: float
    heel: float
    knee: float
    collimation_level: float
    texture_seed: int


def _poly(canvas: str, pts: np.ndarray, value: float, thickness: float = 0.0, closed: bool = False) -> _Prim:
    return _Prim(
        canvas, tuple(np.asarray(pts, dtype=np.float64).ravel().tolist()), float(value), float(thickness), closed
    )


def _ellipse(
    cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, n: int = 28, wobble: np.ndarray | None = None
) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    r = 1.0 if wobble is None else 1.0 + wobble
    x, y = ax * r * np.cos(t), ay * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _build_anatomy(spec: ImageSpec) -> _Anatomy:
    rng = np.random.default_rng(spec.anatomy_seed)
    mimic = _mimic(spec.difficulty)
    lateral = spec.projection == "lateral"
    cols_u = spec.cols / spec.rows

    collimated = bool(rng.random() < 0.35)
    if collimated:
        left, right = rng.uniform(0.0, 0.1, 2) * cols_u
        top, bottom = rng.uniform(0.0, 0.05, 2)
        field_rect = (float(left), float(top), float(cols_u - right), float(1.0 - bottom))
    else:
        field_rect = (0.0, 0.0, cols_u, 1.0)
    fx0, fy0, fx1, fy1 = field_rect

    head = {"cervical": (0.16, 0.24), "thoracic": (0.05, 0.1), "lumbar": (0.05, 0.1)}[spec.region]
    tail = {"cervical": (0.1, 0.18), "thoracic": (0.05, 0.1), "lumbar": (0.16, 0.24)}[spec.region]
    y_top = fy0 + rng.uniform(*head) * (fy1 - fy0)
    y_bot = fy1 - rng.uniform(*tail) * (fy1 - fy0)
    disc_ratio = {"cervical": 0.32, "thoracic": 0.22, "lumbar": 0.33}[spec.region] * rng.uniform(0.9, 1.1)
    aspect = {
        ("cervical", "lateral"): 1.2,
        ("thoracic", "lateral"): 1.05,
        ("lumbar", "lateral"): 1.3,
        ("cervical", "AP"): 1.55,
        ("thoracic", "AP"): 1.35,
        ("lumbar", "AP"): 1.6,
    }[(spec.region, spec.projection)] * rng.uniform(0.9, 1.1)

    n = spec.n_vertebrae
    growth = 1.0 + rng.uniform(0.1, 0.3) * np.linspace(0.0, 1.0, n)
    height_var = 1.0 + rng.uniform(-0.06, 0.06, n) * mimic
    heights = growth * height_var
    disc_factor = rng.uniform(1.0 - 0.3 * mimic, 1.0 + 0.12 * mimic, n - 1)
    gaps = disc_ratio * 0.5 * (heights[:-1] + heights[1:]) * disc_factor
    unit = (y_bot - y_top) / (heights.sum() + gaps.sum())
    heights, gaps = heights * unit, gaps * unit
    widths = heights * aspect

    # Keep the column and its posterior elements inside the field (posterior reaches ~3 widths).
    a_max = 0.5 * float(widths.max())
    span_back, span_front = (3.1 * a_max, 1.5 * a_max) if lateral else (2.4 * a_max, 2.4 * a_max)
    left_room, right_room = (span_back, span_front) if spec.facing == 1 else (span_front, span_back)
    lo, hi = fx0 + left_room, fx1 - right_room
    centre = 0.5 * (fx0 + fx1) + (rng.uniform(-0.12, 0.12) if lateral else rng.uniform(-0.04, 0.04)) * (fx1 - fx0)
    x_mid = float(np.clip(centre, lo, hi)) if lo < hi else 0.5 * (lo + hi)
    if lateral:
        bow = spec.facing * (rng.uniform(0.02, 0.05) if spec.region != "thoracic" else -rng.uniform(0.015, 0.04))
    else:
        bow = rng.uniform(-0.02, 0.02)
    tilt = rng.uniform(-0.04, 0.04)
    span_y = y_bot - y_top

    def centre_x(y: float) -> float:
        t = (y - y_top) / span_y
        return x_mid + bow * (math.sin(math.pi * t) - 0.64) + tilt * (t - 0.5) * span_y

    def slope(y: float) -> float:
        t = (y - y_top) / span_y
        return bow * math.pi * math.cos(math.pi * t) / span_y + tilt

    density_base = rng.uniform(0.28, 0.38)
    vertebrae = []
    y = y_top
    for k in range(n):
        h = float(heights[k])
        cy = y + 0.5 * h
        angle = math.atan(slope(cy))
        jitter = rng.normal(0.0, 0.02 * mimic) * widths[k]
        eu_x = spec.facing * math.cos(angle)
        cx = centre_x(cy) + jitter * eu_x
        cy += jitter * -spec.facing * math.sin(angle)
        half = 0.5 * h
        wedge = 1.0 - rng.uniform(0.0, 0.1 * mimic) if spec.region == "thoracic" else 1.0
        vertebrae.append(
            _Vertebra(
                cx=cx,
                cy=cy,
                angle=angle,
                facing=spec.facing,
                half_w=0.5 * float(widths[k]),
                size=h,
                top_back=half,
                top_front=half * wedge,
                bot_back=half,
                bot_front=half * (0.5 + 0.5 * wedge),
                core_top=0.55 * half * wedge,
                core_bot=0.55 * half,
                density=density_base * rng.uniform(0.92, 1.08),
                top_sclerosis=float(rng.uniform(0.0, 0.4 * mimic)) if rng.random() < 0.3 else 0.0,
                bot_sclerosis=float(rng.uniform(0.0, 0.4 * mimic)) if rng.random() < 0.3 else 0.0,
            )
        )
        y += h + (float(gaps[k]) if k < n - 1 else 0.0)

    # Normal variants that mimic lesions: small corner lipping, bone islands, smaller foramina.
    # Every draw happens whatever the difficulty, so one seed keeps its anatomy across difficulties.
    lipping = []
    for k in range(n):
        for s in (-1, 1):
            for e in (-1, 1):
                chance, length = rng.random(), rng.uniform(0.03, 0.06 + 0.06 * mimic)
                if chance < 0.15 + 0.25 * mimic:
                    lipping.append((k, s, e, float(length)))
    islands = []
    for k in range(n):
        chance, u, w, r, value = rng.random(), *rng.uniform((-0.5, -0.4, 0.03, 0.04), (0.5, 0.4, 0.07, 0.1))
        if chance < 0.1 + 0.2 * mimic:
            islands.append((k, float(u), float(w), float(r), float(value * (0.5 + mimic))))
    sides = (-1,) if lateral else (-1, 1)
    foramen_scale = {(d, s): float(rng.uniform(1.0 - 0.25 * mimic, 1.08)) for d in range(n - 1) for s in sides}
    post_density = float(rng.uniform(0.18, 0.26))
    cortex = float(rng.uniform(0.16, 0.22))

    base = tuple(vertebrae)
    base_prims = tuple(_posterior_blocks(base, lateral, post_density))
    extra_prims, soft_prims = _region_extras(rng, spec, base, x_mid, y_top, y_bot, cols_u)
    soft = (
        float(x_mid + spec.facing * rng.uniform(0.05, 0.2)) if lateral else float(x_mid),
        float(rng.uniform(0.18, 0.3) if spec.region == "cervical" else rng.uniform(0.35, 0.6)),
        float(rng.uniform(0.16, 0.26)),
        float(rng.uniform(-0.06, 0.06)),
    )
    marker = None
    if rng.random() < 0.6:
        corner_x = fx0 + 0.04 * cols_u if rng.random() < 0.5 else fx1 - 0.1 * cols_u
        marker = (
            str(rng.choice(("L", "R"))),
            float(corner_x),
            float(fy0 + rng.uniform(0.06, 0.1)),
            float(rng.uniform(0.03, 0.05)),
        )
    return _Anatomy(
        cols_u=cols_u,
        field=field_rect,
        collimated=collimated,
        vertebrae=base,
        lipping=tuple(lipping),
        islands=tuple(islands),
        foramen_scale=foramen_scale,
        post_density=post_density,
        cortex=cortex,
        base_prims=base_prims,
        extra_prims=tuple(extra_prims),
        soft=soft,
        soft_prims=tuple(soft_prims),
        marker=marker,
        offset=float(rng.uniform(0.04, 0.12)),
        gain=float(rng.uniform(0.5, 0.68)),
        heel=float(rng.uniform(-0.15, 0.15)),
        knee=float(rng.uniform(0.72, 0.8)),
        collimation_level=float(rng.uniform(0.82, 0.92)),
        texture_seed=int(rng.integers(0, 2**63 - 1)),
    )


def _gap_below(vertebrae: Sequence[_Vertebra], k: int) -> float:
    if k + 1 < len(vertebrae):
        a, b = vertebrae[k], vertebrae[k + 1]
        distance = math.hypot(b.cx - a.cx, b.cy - a.cy)
        return max(0.0, distance - 0.5 * (a.bot_back + a.bot_front) - 0.5 * (b.top_back + b.top_front))
    return 0.3 * vertebrae[k].size


def _gap_above(vertebrae: Sequence[_Vertebra], k: int) -> float:
    return _gap_below(vertebrae, k - 1) if k > 0 else 0.3 * vertebrae[k].size


def _posterior_blocks(vertebrae: Sequence[_Vertebra], lateral: bool, density: float) -> list[_Prim]:
    """Pedicles/laminae (the band the foramina are cut into), spinous and transverse processes."""
    prims = []
    for k, v in enumerate(vertebrae):
        a, h = v.half_w, v.size
        up = v.top_back + 0.55 * _gap_above(vertebrae, k)
        down = v.bot_back + 0.55 * _gap_below(vertebrae, k)
        sides = (-1,) if lateral else (-1, 1)
        for s in sides:
            inner, outer = (0.95 * a, 2.0 * a) if lateral else (0.95 * a, 1.8 * a)
            block = np.array([[s * inner, -up], [s * outer, -0.8 * up], [s * outer, 0.8 * down], [s * inner, down]])
            prims.append(_poly("post", v.to_image(block), density))
        if lateral:
            spinous = np.array([[-1.9 * a, -0.35 * h], [-2.9 * a, 0.15 * h], [-3.0 * a, 0.35 * h], [-1.9 * a, 0.3 * h]])
            prims.append(_poly("post", v.to_image(spinous), 0.9 * density))
        else:
            spinous = _ellipse(0.0, 0.35 * v.bot_back, 0.12 * a, 0.3 * h, n=16)
            prims.append(_poly("post", v.to_image(spinous), 0.7 * density))
            for s in (-1, 1):
                bar = np.array(
                    [
                        [s * 1.7 * a, -0.22 * h],
                        [s * 2.3 * a, -0.12 * h],
                        [s * 2.3 * a, 0.02 * h],
                        [s * 1.7 * a, 0.05 * h],
                    ]
                )
                prims.append(_poly("post", v.to_image(bar), 0.8 * density))
    return prims


def _foramen(vertebrae: Sequence[_Vertebra], d: int, s: int, lateral: bool) -> tuple[np.ndarray, float, float, float]:
    """Centre, semi-axes and angle of the foramen at disc ``d`` on side ``s`` (base geometry)."""
    upper, lower = vertebrae[d], vertebrae[d + 1]
    off = 1.42 if lateral else 1.38
    p = upper.to_image(np.array([[s * off * upper.half_w, upper.bot_back]]))[0]
    q = lower.to_image(np.array([[s * off * lower.half_w, -lower.top_back]]))[0]
    a = 0.5 * (upper.half_w + lower.half_w)
    h = 0.5 * (upper.size + lower.size)
    su = (0.26 if lateral else 0.2) * a
    sv = 0.5 * float(np.hypot(*(q - p))) + 0.22 * h
    return 0.5 * (p + q), su, sv, 0.5 * (upper.angle + lower.angle)


def _region_extras(
    rng: np.random.Generator,
    spec: ImageSpec,
    vertebrae: Sequence[_Vertebra],
    x_mid: float,
    y_top: float,
    y_bot: float,
    cols_u: float,
) -> tuple[list[_Prim], list[_Prim]]:
    """Sharp bony extras (skull, ribs, pelvis, sacrum...) and smooth soft-tissue shapes."""
    lateral = spec.projection == "lateral"
    f = spec.facing
    first, last = vertebrae[0], vertebrae[-1]
    a = max(v.half_w for v in vertebrae)
    extra: list[_Prim] = []
    soft: list[_Prim] = []
    if spec.region == "cervical":
        if lateral:
            skull = _ellipse(x_mid - f * 0.08, y_top - 0.14, 0.34, 0.16, angle=f * 0.15)
            extra.append(_poly("extra", skull, 0.22))
            extra.append(_poly("extra", skull, 0.2, thickness=0.012, closed=True))
            jaw = np.array(
                [
                    [x_mid + f * 2.0 * a, y_top - 0.06],
                    [x_mid + f * 3.2 * a, y_top + 0.02],
                    [x_mid + f * 4.8 * a, y_top + 0.05],
                ]
            )
            extra.append(_poly("extra", jaw, 0.25, thickness=0.022))
            soft.append(
                _poly(
                    "soft", _ellipse(x_mid + f * 2.3 * a, 0.5 * (y_top + y_bot), 0.35 * a, 0.55 * (y_bot - y_top)), -0.1
                )
            )
        else:
            jaw = np.array([[x_mid - 5 * a, y_top - 0.02], [x_mid, y_top + 0.06], [x_mid + 5 * a, y_top - 0.02]])
            extra.append(_poly("extra", jaw, 0.22, thickness=0.03))
            soft.append(_poly("soft", _ellipse(x_mid, 0.5 * (y_top + y_bot), 0.4 * a, 0.6 * (y_bot - y_top)), -0.07))
            for s in (-1, 1):
                clav = np.array(
                    [
                        [x_mid + s * 0.6 * a, y_bot + 0.02],
                        [x_mid + s * 3.5 * a, y_bot - 0.03],
                        [x_mid + s * 7 * a, y_bot - 0.05],
                    ]
                )
                extra.append(_poly("extra", clav, 0.22, thickness=0.03))
        soft.append(_poly("soft", np.array([[0, y_bot + 0.02], [cols_u, y_bot + 0.02], [cols_u, 1.2], [0, 1.2]]), 0.12))
    elif spec.region == "thoracic":
        for v in vertebrae:
            for s in ((-1, 1) if not lateral else (-1,)):
                start = v.to_image(np.array([[s * 1.6 * v.half_w, -0.1 * v.size]]))[0]
                t = np.linspace(0.0, 1.0, 8)
                reach = 0.35 if not lateral else 0.22
                direction = s * (1 if not lateral else f)
                pts = np.stack([start[0] + direction * reach * np.sin(t * 1.4), start[1] + 0.12 * t**1.6], axis=1)
                extra.append(_poly("extra", pts, 0.1, thickness=0.018))
        if lateral:
            soft.append(_poly("soft", _ellipse(x_mid + f * 0.22, 0.45, 0.16, 0.33), -0.1))
        else:
            for s in (-1, 1):
                soft.append(_poly("soft", _ellipse(x_mid + s * 0.22, 0.45, 0.14, 0.35), -0.1))
            soft.append(_poly("soft", _ellipse(x_mid + 0.08, 0.62, 0.16, 0.12), 0.06))
    else:
        sacrum_top = last.to_image(
            np.array([[-last.half_w, last.bot_back + 0.3 * last.size], [last.half_w, last.bot_front + 0.3 * last.size]])
        )
        down = np.array([math.sin(last.angle), math.cos(last.angle)])
        lean = (np.array([f * 0.5, 0.0]) if lateral else np.zeros(2)) * last.size
        sacrum = np.array(
            [
                sacrum_top[0],
                sacrum_top[1],
                sacrum_top[1] + down * 1.6 * last.size + lean * 2,
                sacrum_top[0] + down * 1.8 * last.size + lean,
            ]
        )
        extra.append(_poly("trab", sacrum, last.density * 0.9))
        extra.append(_poly("extra", sacrum, 0.14, thickness=0.008, closed=True))
        centres = (
            [(x_mid + f * 0.05, y_bot + 0.12)]
            if lateral
            else [(x_mid - 0.26, y_bot + 0.05), (x_mid + 0.26, y_bot + 0.05)]
        )
        for cx, cy in centres:
            wing = _ellipse(cx, cy, 0.2, 0.15, angle=float(rng.uniform(-0.3, 0.3)))
            extra.append(_poly("extra", wing, 0.1))
            extra.append(_poly("extra", wing, 0.14, thickness=0.01, closed=True))
        for _ in range(int(rng.integers(4, 11))):
            gx = x_mid + (f * rng.uniform(0.0, 0.4) if lateral else rng.uniform(-0.35, 0.35))
            gy = rng.uniform(y_top + 0.2, y_bot + 0.1)
            blob = _ellipse(
                gx, gy, rng.uniform(0.015, 0.05), rng.uniform(0.012, 0.035), wobble=rng.uniform(-0.25, 0.25, 28) * 0.5
            )
            soft.append(_poly("soft", blob, -float(rng.uniform(0.04, 0.1))))
    # Spine of the top vertebra continues out of view in thoracic/lumbar images.
    if spec.region != "cervical":
        above = first.to_image(
            np.array(
                [
                    [-first.half_w, -first.top_back - 1.3 * first.size],
                    [first.half_w, -first.top_front - 1.3 * first.size],
                    [first.half_w, -first.top_front - 0.35 * first.size],
                    [-first.half_w, -first.top_back - 0.35 * first.size],
                ]
            )
        )
        extra.append(_poly("trab", above, first.density))
        extra.append(_poly("extra", above, 0.18, thickness=0.12 * first.half_w, closed=True))
    return extra, soft


# --------------------------------------------------------------------------------------------
# Scene: anatomy + lesions -> primitives
# --------------------------------------------------------------------------------------------


def _endplate_outline(a: float, back: float, front: float, core: float, conc: float) -> np.ndarray:
    """Top-endplate outline from the core line at the back wall to the core line at the front.

    Distances grow toward the endplate; callers negate them for the upper endplate.
    """
    r = max(1e-6, min(0.22 * a, 0.45 * (min(back, front) - core)))

    def plate(u: np.ndarray) -> np.ndarray:
        return back + (front - back) * (u + a) / (2 * a) - conc * (1.0 - (u / a) ** 2)

    t = np.linspace(0.0, 1.0, 5)[:, None]

    def corner(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2

    u_mid = np.linspace(-a + r, a - r, 7)[1:-1]
    back_corner = corner(
        np.array([-a, back - r]), np.array([-a, back]), np.array([-a + r, plate(np.array([-a + r]))[0]])
    )
    front_corner = corner(
        np.array([a - r, plate(np.array([a - r]))[0]]), np.array([a, front]), np.array([a, front - r])
    )
    return np.concatenate(
        [
            [[-a, core]],
            back_corner,
            np.stack([u_mid, plate(u_mid)], axis=1),
            front_corner,
            [[a, core]],
        ]
    )


def _body_prims(v: _Vertebra, cortex: float) -> list[_Prim]:
    a = v.half_w
    conc = 0.05 * v.size
    top = _endplate_outline(a, v.top_back, v.top_front, v.core_top, conc) * [1.0, -1.0]
    bot = _endplate_outline(a, v.bot_back, v.bot_front, v.core_bot, conc)
    core = np.array([[-a, -v.core_top], [a, -v.core_top], [a, v.core_bot], [-a, v.core_bot]])
    rim = 0.12 * a
    walls = [np.array([[s * a, -v.core_top], [s * a, v.core_bot]]) for s in (-1, 1)]
    return [
        _poly("trab", v.to_image(core), v.density),
        _poly("trab", v.to_image(top), v.density),
        _poly("trab", v.to_image(bot), v.density),
        *[_poly("cortex", v.to_image(w), cortex, thickness=rim) for w in walls],
        _poly("cortex", v.to_image(top), cortex * (1 + 0.6 * v.top_sclerosis), thickness=rim * (1 + v.top_sclerosis)),
        _poly("cortex", v.to_image(bot), cortex * (1 + 0.6 * v.bot_sclerosis), thickness=rim * (1 + v.bot_sclerosis)),
    ]


def _spur(v: _Vertebra, side: int, end: int, length: float, cortex: float) -> list[_Prim]:
    """A bony beak at a corner, growing outward and toward the disc; ``length`` in body heights."""
    a = v.half_w
    plate = {(-1, -1): v.top_back, (1, -1): v.top_front, (-1, 1): v.bot_back, (1, 1): v.bot_front}[(side, end)]
    L = length * v.size
    beak = np.array(
        [
            [a - 0.35 * L, plate - 0.35 * L],
            [a, plate - 0.9 * L],
            [a + 0.45 * L, plate - 0.25 * L],
            [a + 0.8 * L, plate + 0.35 * L],
            [a + 0.55 * L, plate + 0.32 * L],
            [a + 0.15 * L, plate + 0.06 * L],
            [a - 0.35 * L, plate + 0.02 * L],
        ]
    )
    outline = v.to_image(beak * [side, end])
    return [_poly("trab", outline, v.density), _poly("cortex", outline, cortex, thickness=0.06 * v.size, closed=True)]


def _scene(anat: _Anatomy, spec: ImageSpec, lesions: Sequence[LesionSpec]) -> list[_Prim]:
    """All primitives of an image with ``lesions`` drawn; order = drawing order per canvas."""
    gain = _lesion_gain(spec.difficulty)
    lateral = spec.projection == "lateral"
    verts = list(anat.vertebrae)
    for les in lesions:
        k, sev = les.level, les.severity
        if les.lesion_type == SPONDYLOLYSTHESIS:
            v = verts[k]
            eu, _ = v.axes()
            shift = les.side * 2 * v.half_w * float(np.clip((0.15 + 0.2 * sev) * gain, 0.06, 0.45))
            verts[k] = replace(v, cx=v.cx + shift * eu[0], cy=v.cy + shift * eu[1])
        elif les.lesion_type == VERTEBRAL_COLLAPSE:
            verts[k] = _collapse(verts[k], float(np.clip((0.3 + 0.25 * sev) * gain, 0.12, 0.65)), gain, sev)
        elif les.lesion_type == DISC_SPACE_NARROWING:
            narrow = float(np.clip((0.45 + 0.35 * sev) * gain, 0.15, 0.9))
            delta = 0.5 * narrow * _gap_below(anat.vertebrae, k)
            sclerosis = 0.6 + 0.8 * sev * gain
            up, low = verts[k], verts[k + 1]
            verts[k] = replace(
                up,
                bot_back=up.bot_back + delta,
                bot_front=up.bot_front + delta,
                bot_sclerosis=max(up.bot_sclerosis, sclerosis),
            )
            verts[k + 1] = replace(
                low,
                top_back=low.top_back + delta,
                top_front=low.top_front + delta,
                top_sclerosis=max(low.top_sclerosis, sclerosis),
            )

    prims: list[_Prim] = list(anat.base_prims)
    stenosis = {(les.level, les.side): les for les in lesions if les.lesion_type == FORAMINAL_STENOSIS}
    overgrowth = []
    for (d, s), scale in anat.foramen_scale.items():
        centre, su, sv, angle = _foramen(anat.vertebrae, d, s, lateral)
        les = stenosis.get((d, s))
        if les is not None:
            squeeze = float(np.clip((0.45 + 0.3 * les.severity) * gain, 0.2, 0.85))
            scale *= 1.0 - squeeze
            ca, sa = math.cos(angle), math.sin(angle)
            toward_body = -s * spec.facing
            bump = centre + toward_body * 0.7 * su * np.array([ca, -sa])
            grow = 0.5 + 0.5 * les.severity
            overgrowth.append(
                _poly(
                    "cortex", _ellipse(bump[0], bump[1], 0.55 * su * grow, 0.5 * sv * grow, angle=-angle), anat.cortex
                )
            )
        prims.append(_poly("post", _ellipse(centre[0], centre[1], su * scale, sv * scale, angle=-angle), 0.0))

    for v in verts:
        prims.extend(_body_prims(v, anat.cortex))
    for k, s, e, length in anat.lipping:
        prims.extend(_spur(verts[k], s, e, length, anat.cortex))
    for les in lesions:
        if les.lesion_type == OSTEOPHYTES:
            length = min(0.8, (0.25 + 0.3 * les.severity) * gain)
            prims.extend(_spur(verts[les.level], les.side, les.end, length, anat.cortex))
    prims.extend(overgrowth)
    for k, u, w, r, value in anat.islands:
        v = verts[k]
        blob = _ellipse(u * v.half_w, w * v.size, r * v.size, 0.8 * r * v.size, n=16)
        prims.append(_poly("blob", v.to_image(blob), value))
    for les in lesions:
        if les.lesion_type == OTHER_LESIONS:
            prims.extend(_other_lesion(verts[les.level], les, gain, anat.cortex))
        elif les.lesion_type == SURGICAL_IMPLANT:
            prims.extend(_implant(anat.vertebrae, les, lateral))
    return prims


def _collapse(v: _Vertebra, loss: float, gain: float, severity: float) -> _Vertebra:
    """Wedge: the front loses ``loss`` of its height, the back a quarter of that; bone gets denser."""
    front = (v.top_front + v.bot_front) * (1.0 - loss)
    back = (v.top_back + v.bot_back) * (1.0 - 0.25 * loss)
    bottom_before = 0.5 * (v.bot_back + v.bot_front)
    bottom_after = 0.25 * (front + back)
    _, ev = v.axes()
    move = bottom_before - bottom_after
    return replace(
        v,
        cx=v.cx + move * ev[0],
        cy=v.cy + move * ev[1],
        top_back=0.5 * back,
        bot_back=0.5 * back,
        top_front=0.5 * front,
        bot_front=0.5 * front,
        core_top=0.55 * 0.5 * min(front, back),
        core_bot=0.55 * 0.5 * min(front, back),
        density=v.density * (1.0 + (0.15 + 0.2 * severity) * gain),
        top_sclerosis=max(v.top_sclerosis, 0.5 + 0.5 * severity),
    )


def _other_lesion(v: _Vertebra, les: LesionSpec, gain: float, cortex: float) -> list[_Prim]:
    rng = np.random.default_rng(les.seed)
    r = min(0.3, (0.18 + 0.14 * les.severity) * (0.7 + 0.3 * gain)) * v.size
    u = float(rng.uniform(-0.35, 0.35)) * v.half_w
    w = float(rng.uniform(-0.2, 0.2)) * v.size
    shape = _ellipse(
        u,
        w,
        r,
        r * float(rng.uniform(0.75, 1.0)),
        angle=float(rng.uniform(0, math.pi)),
        wobble=rng.uniform(-0.12, 0.12, 28),
    )
    contrast = (0.15 + 0.15 * les.severity) * gain
    pts = v.to_image(shape)
    if les.variant == 0:
        return [_poly("blob", pts, -contrast), _poly("cortex", pts, 0.6 * cortex, thickness=0.14 * r, closed=True)]
    return [_poly("blob", pts, contrast)]


def _implant(vertebrae: Sequence[_Vertebra], les: LesionSpec, lateral: bool) -> list[_Prim]:
    rng = np.random.default_rng(les.seed)
    levels = range(les.level, min(len(vertebrae), les.level + les.span))
    prims: list[_Prim] = []
    if lateral and les.variant == 1:
        plate = []
        for k in levels:
            v = vertebrae[k]
            a, h = v.half_w, v.size
            plate.extend(v.to_image(np.array([[1.1 * a, -0.45 * h], [1.1 * a, 0.45 * h]])))
            screw = np.array([[1.1 * a, -0.05 * h], [0.1 * a, float(rng.uniform(-0.1, 0.1)) * h]])
            prims.append(_poly("metal", v.to_image(screw), _METAL, thickness=0.07 * h))
        prims.append(_poly("metal", np.array(plate), _METAL, thickness=0.09 * vertebrae[les.level].half_w))
        return prims
    heads: dict[int, list[np.ndarray]] = {-1: [], 1: []}
    for k in levels:
        v = vertebrae[k]
        a, h = v.half_w, v.size
        tilt = float(rng.uniform(-0.08, 0.08)) * h
        if lateral:
            screw = np.array([[-2.0 * a, -0.12 * h + tilt], [0.5 * a, 0.02 * h]])
            heads[-1].append(v.to_image(screw[:1])[0])
            prims.append(_poly("metal", v.to_image(screw), _METAL, thickness=0.085 * h))
            prims.append(
                _poly("metal", v.to_image(_ellipse(-2.0 * a, -0.12 * h + tilt, 0.1 * h, 0.1 * h, n=12)), _METAL)
            )
        else:
            for s in (-1, 1):
                screw = np.array([[s * 1.05 * a, -0.2 * h + tilt], [s * 0.15 * a, 0.02 * h]])
                heads[s].append(v.to_image(screw[:1])[0])
                prims.append(_poly("metal", v.to_image(screw), _METAL, thickness=0.08 * h))
                prims.append(
                    _poly(
                        "metal", v.to_image(_ellipse(s * 1.05 * a, -0.2 * h + tilt, 0.11 * h, 0.09 * h, n=12)), _METAL
                    )
                )
    rod_width = 0.06 * vertebrae[les.level].size
    for pts in heads.values():
        if len(pts) >= 2:
            prims.append(_poly("metal", np.array(pts), _METAL, thickness=rod_width))
    if les.variant == 2:
        for k in list(levels)[:-1]:
            v = vertebrae[k]
            a = v.half_w
            gap = _gap_below(vertebrae, k)
            mid = v.bot_back + 0.5 * gap
            cage = np.array(
                [
                    [-0.6 * a, mid - 0.4 * gap],
                    [0.6 * a, mid - 0.4 * gap],
                    [0.6 * a, mid + 0.4 * gap],
                    [-0.6 * a, mid + 0.4 * gap],
                ]
            )
            prims.append(_poly("metal", v.to_image(cage), 0.6 * _METAL, thickness=0.04 * v.size, closed=True))
    return prims


# --------------------------------------------------------------------------------------------
# Rasterisation and exposure
# --------------------------------------------------------------------------------------------


def render_radiograph(spec: ImageSpec) -> Rendering:
    """Draw one radiograph and the box of each lesion.

    Args:
        spec: What to draw (see :func:`sample_image_spec`).

    Returns:
        uint16 pixels (bone bright, values < ``2**spec.bits_stored``) and one box per lesion.

    Example:
        >>> spec = sample_image_spec(np.random.default_rng(0), lesion_counts={"Osteophytes": 1}, scale=0.1)
        >>> out = render_radiograph(spec)
        >>> out.pixels.shape == (spec.rows, spec.cols), out.boxes[0].lesion_type
        (True, 'Osteophytes')
    """
    anat = _build_anatomy(spec)
    prims = _scene(anat, spec, spec.lesions)
    work_rows = min(spec.rows, _WORK_MAX_ROWS)
    work_cols = max(1, round(spec.cols * work_rows / spec.rows))
    density = _rasterize(anat, prims, work_rows, work_cols)
    pixels = _expose(density, anat, spec)
    boxes = tuple(_lesion_box(anat, spec, prims, i, work_rows) for i in range(len(spec.lesions)))
    return Rendering(pixels=pixels, boxes=boxes)


def _draw(canvas: np.ndarray, prim: _Prim, sx: float, sy: float) -> None:
    pts = np.asarray(prim.points, dtype=np.float64).reshape(-1, 2)
    # Image units are pixel-edge coordinates; OpenCV draws on pixel centres (hence -0.5).
    fixed = np.round((pts * [sx, sy] - 0.5) * 16.0).astype(np.int32)
    if prim.thickness > 0:
        width = max(1, round(prim.thickness * sy))
        cv2.polylines(canvas, [fixed], prim.closed, prim.value, thickness=width, lineType=cv2.LINE_8, shift=4)
    else:
        cv2.fillPoly(canvas, [fixed], prim.value, lineType=cv2.LINE_8, shift=4)


def _rasterize(anat: _Anatomy, prims: Iterable[_Prim], rows: int, cols: int) -> np.ndarray:
    sx, sy = cols / anat.cols_u, float(rows)
    canvases = {name: np.zeros((rows, cols), np.float32) for name in _CANVASES}
    for prim in anat.extra_prims:
        _draw(canvases[prim.canvas], prim, sx, sy)
    for prim in prims:
        _draw(canvases[prim.canvas], prim, sx, sy)
    if anat.marker is not None:
        text, x, y, size = anat.marker
        scale = size * rows / 22.0
        # putText draws on 8-bit images only.
        mask = np.zeros((rows, cols), np.uint8)
        origin = (round(x * sx), round(y * sy))
        cv2.putText(mask, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, round(scale * 2)), cv2.LINE_AA)
        canvases["extra"] += mask.astype(np.float32) * (0.9 / 255.0)

    rng = np.random.default_rng(anat.texture_seed)
    fine = _band_noise(rng, rows, cols, 1.2)
    # Coarse texture is smooth: draw it at half size (half the noise to generate) and enlarge.
    coarse = cv2.resize(
        _band_noise(rng, (rows + 1) // 2, (cols + 1) // 2, 2.0), (cols, rows), interpolation=cv2.INTER_LINEAR
    )
    trabecular = 1.0 + 0.2 * fine + 0.12 * coarse
    density = _soft_tissue(anat, rows, cols)
    density += canvases["trab"] * trabecular
    density += canvases["post"] * (1.0 + 0.12 * coarse)
    for name in ("cortex", "blob", "metal", "extra"):
        density += canvases[name]
    return cv2.GaussianBlur(density, (0, 0), _BLUR_SIGMA)


def _band_noise(rng: np.random.Generator, rows: int, cols: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation.

    Uniform samples are several times cheaper than normal ones, and the filter makes the sum
    Gaussian anyway.
    """
    noise = rng.random((rows, cols), dtype=np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
    blurred -= 0.5
    return blurred * (math.sqrt(12.0) * 2.0 * math.sqrt(math.pi) * sigma)


def _soft_tissue(anat: _Anatomy, rows: int, cols: int) -> np.ndarray:
    """Body silhouette plus lungs, airway, bowel gas, drawn at quarter size (it is smooth)."""
    lr, lc = max(8, rows // 4), max(8, cols // 4)
    centre, half_width, level, slope = anat.soft
    x = (np.arange(lc, dtype=np.float32) + 0.5) * anat.cols_u / lc
    y = (np.arange(lr, dtype=np.float32) + 0.5) / lr
    across = np.sqrt(np.clip(1.0 - ((x - centre) / half_width) ** 2, 0.0, 1.0))
    low = level * across[None, :] * (1.0 + slope * (y[:, None] - 0.5) * 4)
    shapes = np.zeros((lr, lc), np.float32)
    for prim in anat.soft_prims:
        _draw(shapes, prim, lc / anat.cols_u, float(lr))
    low = low + cv2.GaussianBlur(shapes, (0, 0), max(1.0, lr / 150))
    return cv2.resize(low.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)


def _expose(density: np.ndarray, anat: _Anatomy, spec: ImageSpec) -> np.ndarray:
    """Density -> detector values: gain, heel effect, soft saturation, noise, collimation."""
    rows, cols = spec.rows, spec.cols
    if density.shape != (rows, cols):
        density = cv2.resize(density, (cols, rows), interpolation=cv2.INTER_LINEAR)
    heel = (anat.gain + anat.gain * anat.heel * np.linspace(-0.5, 0.5, rows, dtype=np.float32)).reshape(-1, 1)
    x = density * heel
    x += anat.offset
    # Soft saturation above the knee: metal and collimated areas approach white smoothly.
    k = anat.knee
    over = np.maximum(x - k, 0.0)
    y = np.minimum(x, k)
    y += (1.0 - k) * np.tanh(over / (1.0 - k))
    rng = np.random.default_rng(spec.noise_seed)
    sigma = _noise_sigma(spec.difficulty)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    y += noise * (sigma * (0.4 + 0.8 * y))
    if anat.collimated:
        fx0, fy0, fx1, fy1 = anat.field
        inside = np.zeros((rows, cols), bool)
        inside[round(fy0 * rows) : round(fy1 * rows), round(fx0 * rows) : round(fx1 * rows)] = True
        y = np.where(inside, y, anat.collimation_level + noise * sigma)
    maxval = 2**spec.bits_stored - 1
    return np.clip(np.rint(y * maxval), 0, maxval).astype(np.uint16)


def _lesion_box(anat: _Anatomy, spec: ImageSpec, prims: Sequence[_Prim], index: int, work_rows: int) -> LesionBox:
    """Box of everything lesion ``index`` changes: primitives present with it and not without."""
    others = [les for j, les in enumerate(spec.lesions) if j != index]
    without = _scene(anat, spec, others)
    diff = (Counter(prims) - Counter(without)) + (Counter(without) - Counter(prims))
    lo = np.array([np.inf, np.inf])
    hi = -lo
    for prim in diff:
        pts = np.asarray(prim.points).reshape(-1, 2)
        pad = 0.5 * prim.thickness
        lo = np.minimum(lo, pts.min(axis=0) - pad)
        hi = np.maximum(hi, pts.max(axis=0) + pad)
    margin = _BOX_MARGIN_WORK_PX / work_rows
    lo, hi = (lo - margin) * spec.rows, (hi + margin) * spec.rows
    x0, x1 = float(np.clip(lo[0], 0, spec.cols)), float(np.clip(hi[0], 0, spec.cols))
    y0, y1 = float(np.clip(lo[1], 0, spec.rows)), float(np.clip(hi[1], 0, spec.rows))
    return LesionBox(spec.lesions[index].lesion_type, x0, y0, x1, y1)


# --------------------------------------------------------------------------------------------
# DICOM and the dataset
# --------------------------------------------------------------------------------------------


def encode_dicom(pixels: np.ndarray, header: DicomHeader, bits_stored: int) -> bytes:
    """Encode bone-bright uint16 pixels as a DICOM Part 10 file.

    MONOCHROME1 files store inverted values (and a window mirrored to match), so readers must
    invert them back. JPEG 2000 lossless needs pylibjpeg-openjpeg.
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

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.sop_class_uid
    meta.MediaStorageSOPInstanceUID = header.sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = header.sop_class_uid
    ds.SOPInstanceUID = header.sop_instance_uid
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = header.series_instance_uid
    ds.PatientID = header.patient_id
    if header.modality is not None:
        ds.Modality = header.modality
    if header.body_part is not None:
        ds.BodyPartExamined = header.body_part
    if header.view_position is not None:
        ds.ViewPosition = header.view_position
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = header.instance_number
    ds.PixelSpacing = [f"{header.pixel_spacing_mm:.6g}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = header.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = int(centre)
    ds.WindowWidth = int(width)
    if header.transfer_syntax_uid == JPEG2000Lossless:
        # generate_instance_uid=False: pydicom would otherwise replace our seed-derived UID.
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _render_and_write(task: tuple[ImageJob, str]) -> tuple[LesionBox, ...]:
    job, root = task
    rendering = render_radiograph(job.spec)
    data = encode_dicom(rendering.pixels, job.header, job.spec.bits_stored)
    write_bytes_atomic(Path(root) / f"{job.split}_images" / f"{job.image_id}.dicom", data)
    return rendering.boxes


def _init_worker() -> None:
    # One process per core already; OpenCV's own threads would only oversubscribe the CPUs.
    cv2.setNumThreads(1)


def generate_dataset(out: str | Path, config: SynthConfig, progress: bool = True) -> SynthReport:
    """Write a synthetic VinDr-SpineXR dataset to ``out``.

    Args:
        out: Folder to create; it must not exist or be empty.
        config: Sizes, seed, difficulty and file-format mix.
        progress: Show a progress bar on stderr.

    Returns:
        Counts of what was written, and the time it took.

    Raises:
        DatasetError: ``out`` is a file or a non-empty folder.

    Example:
        >>> report = generate_dataset("data/synth", SynthConfig(scale=0.35))  # doctest: +SKIP
        >>> report.images["train"]  # doctest: +SKIP
        300
    """
    start = time.perf_counter()
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root}: the output folder already exists and is not empty; "
            "choose a new folder or delete this one (the generator never mixes two datasets)"
        )
    jobs = plan_dataset(config)
    for split in SPLITS:
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)

    tasks = [(job, str(root)) for job in jobs]
    workers = min(config.workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(tasks), desc="synthesising", unit="img", file=sys.stderr, disable=not progress)
    results: list[tuple[LesionBox, ...]] = []
    try:
        if workers <= 1:
            for task in tasks:
                results.append(_render_and_write(task))
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            chunk = max(1, len(tasks) // (workers * 8))
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
                for boxes in pool.map(_render_and_write, tasks, chunksize=chunk):
                    results.append(boxes)
                    bar.update(1)
    finally:
        bar.close()

    for split in SPLITS:
        rows = [_csv_rows(job, boxes) for job, boxes in zip(jobs, results, strict=True) if job.split == split]
        write_text_atomic(root / "annotations" / f"{split}.csv", _csv_text([r for group in rows for r in group]))
    return _report(root, jobs, results, time.perf_counter() - start)


def _csv_rows(job: ImageJob, boxes: Sequence[LesionBox]) -> list[list[str]]:
    ids = [job.image_id, job.study_id, job.series_id, job.rad_id]
    if not boxes:
        return [[*ids, NO_FINDING, "", "", "", ""]]
    rows = []
    for box in boxes:
        # Round outward to the 0.1 px the real CSVs use, staying inside the image.
        x0, y0 = math.floor(box.xmin * 10) / 10, math.floor(box.ymin * 10) / 10
        x1 = min(math.ceil(box.xmax * 10) / 10, float(job.spec.cols))
        y1 = min(math.ceil(box.ymax * 10) / 10, float(job.spec.rows))
        rows.append([*ids, box.lesion_type, f"{x0:.1f}", f"{y0:.1f}", f"{x1:.1f}", f"{y1:.1f}"])
    return rows


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ANNOTATION_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def _report(
    root: Path, jobs: Sequence[ImageJob], results: Sequence[Sequence[LesionBox]], elapsed: float
) -> SynthReport:
    images = {s: 0 for s in SPLITS}
    normal = {s: 0 for s in SPLITS}
    studies: dict[str, set[str]] = {s: set() for s in SPLITS}
    boxes = {s: {name: 0 for name in CLASS_NAMES} for s in SPLITS}
    with_class = {s: {name: 0 for name in CLASS_NAMES} for s in SPLITS}
    syntaxes: Counter[str] = Counter()
    for job, found in zip(jobs, results, strict=True):
        images[job.split] += 1
        normal[job.split] += not found
        studies[job.split].add(job.study_id)
        for box in found:
            boxes[job.split][box.lesion_type] += 1
        for name in {box.lesion_type for box in found}:
            with_class[job.split][name] += 1
        syntaxes[pydicom.uid.UID(job.header.transfer_syntax_uid).name] += 1
    return SynthReport(
        path=root,
        images=images,
        normal_images=normal,
        studies={s: len(v) for s, v in studies.items()},
        boxes=boxes,
        images_with_class=with_class,
        transfer_syntaxes=dict(sorted(syntaxes.items())),
        elapsed_s=elapsed,
    )
