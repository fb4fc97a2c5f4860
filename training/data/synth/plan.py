"""Sampling: classes, lesion placement, image specs, the dataset plan (cheap: no pixels).

Class frequencies follow the paper: each class is present on an abnormal image with
``PAPER_CLASS_FREQUENCY`` (exactly, conditioned on the image having at least one lesion), and
common classes come with several boxes per image (:data:`INSTANCE_COUNT_PROBABILITIES`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from spine_edge.constants import CLASS_NAMES, PAPER_CLASS_FREQUENCY
from spine_edge.training.data.synth.specs import (
    DEFAULT_DIFFICULTY,
    DISC_SPACE_NARROWING,
    FORAMINAL_STENOSIS,
    OSTEOPHYTES,
    OTHER_LESIONS,
    PROJECTIONS,
    REGIONS,
    SPLITS,
    SPONDYLOLYSTHESIS,
    SURGICAL_IMPLANT,
    VERTEBRAL_COLLAPSE,
    DicomHeader,
    ImageJob,
    ImageSpec,
    LesionSpec,
    SynthConfig,
)

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
_SEED_SALT = 0x5EED_5917


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

    def pick(
        slots: Sequence[tuple[int, ...]], k: int, weights: Sequence[float] | np.ndarray | None = None
    ) -> list[tuple[int, ...]]:
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
