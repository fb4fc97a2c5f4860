"""Split VinDr-SpineXR's training images into train and validation sets, by study.

The algorithm is iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011) applied to
studies instead of images, so that no study (and so no patient visit) is in both sets:

1. Group images by ``study_id``. A study's labels are the lesion classes on its boxes, plus a
   "normal" label when it has a normal image (so the triage prevalence is stratified too).
2. For each label seen in ``n`` studies, the validation set should receive
   ``val_fraction * n`` of them, raised to at least 1 and capped at ``n - 1`` when ``n >= 2``:
   this is what puts a rare class (Vertebral collapse, Other lesions) into validation at all.
   The training set should receive the rest. Each set also has a capacity in images
   (``val_fraction`` of all images for validation).
3. Repeatedly take the label with the fewest unassigned studies (rarest first; ties: fewest
   studies in all), and give each of
   its unassigned studies, in a seeded random order, to the set that still wants the most studies
   of that label (ties: the set with the most image capacity left, then train). Assigning a study
   lowers that set's wants for every label the study carries and its image capacity.
4. Studies with no label (abnormal images whose boxes were all invalid) fill the remaining
   capacity.
5. Repair, rarest label first: if a label held by at least two studies still ended up entirely
   in one set (its studies were taken while other labels were placed), move its smallest study
   across; when that would take another label out of the source set, also move back a study
   carrying it. No move takes a label of two or more studies out of a set. What remains
   unfixed are labels whose few studies overlap so that no assignment satisfies them all
   (three labels on the three pairs of three studies).

The result depends only on the records (not their order), ``val_fraction`` and ``seed``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np

from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import DatasetError
from spine_edge.vindr import ImageRecord

#: Label index used for "this study has a normal image", after the lesion class indices.
NORMAL_LABEL = len(CLASS_NAMES)
_TRAIN, _VAL = 0, 1


@dataclass(frozen=True)
class TrainValSplit:
    """Result of :func:`split_train_val`.

    Attributes:
        train: Training records (``split == "train"``), sorted by image id.
        val: Validation records (``split == "val"``), sorted by image id.
        val_fraction: Requested share of images in validation.
        seed: Seed of the random study order.
    """

    train: tuple[ImageRecord, ...]
    val: tuple[ImageRecord, ...]
    val_fraction: float
    seed: int


@dataclass
class _Study:
    study_id: str
    records: list[ImageRecord]
    labels: frozenset[int]
    rank: int

    @property
    def size(self) -> int:
        return len(self.records)


def split_train_val(records: Sequence[ImageRecord], val_fraction: float = 0.15, seed: int = 0) -> TrainValSplit:
    """Split records into train and validation by study, stratified on lesion classes.

    Args:
        records: Images of VinDr-SpineXR's training CSV.
        val_fraction: Share of images to put in validation, in (0, 1).
        seed: Seed of the study order; the same records and seed give the same split.

    Returns:
        The two sets, with each record's ``split`` set to ``train`` or ``val``.

    Raises:
        ValueError: ``val_fraction`` is not strictly between 0 and 1.
        DatasetError: Fewer than two studies, so no split is possible.

    Example:
        >>> split = split_train_val(read_vindr(root).train, val_fraction=0.15, seed=0)
        >>> len(split.val) / (len(split.train) + len(split.val))
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    studies = _group_studies(records, seed)
    if len(studies) < 2:
        raise DatasetError(
            f"cannot split {len(records)} training image(s) from {len(studies)} study into train and "
            "validation sets: add images from at least two studies to annotations/train.csv"
        )
    assignment = _stratify(studies, val_fraction)
    _repair(studies, assignment)

    train = [replace(r, split="train") for s in studies if assignment[s.study_id] == _TRAIN for r in s.records]
    val = [replace(r, split="val") for s in studies if assignment[s.study_id] == _VAL for r in s.records]
    by_id = attrgetter("image_id")
    return TrainValSplit(
        train=tuple(sorted(train, key=by_id)),
        val=tuple(sorted(val, key=by_id)),
        val_fraction=val_fraction,
        seed=seed,
    )


def _group_studies(records: Sequence[ImageRecord], seed: int) -> list[_Study]:
    grouped: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        grouped[record.study_id].append(record)
    study_ids = sorted(grouped)
    # The seeded permutation of the *sorted* ids is the tie-breaking order, so the input order of
    # the records never changes the split.
    ranks = np.random.default_rng(seed).permutation(len(study_ids))
    studies = []
    for study_id, rank in zip(study_ids, ranks):
        members = sorted(grouped[study_id], key=lambda r: r.image_id)
        labels = {class_id for r in members for class_id in r.class_ids}
        if any(not r.abnormal for r in members):
            labels.add(NORMAL_LABEL)
        studies.append(_Study(study_id, members, frozenset(labels), int(rank)))
    return sorted(studies, key=lambda s: s.rank)


def _stratify(studies: list[_Study], val_fraction: float) -> dict[str, int]:
    studies_per_label: dict[int, int] = defaultdict(int)
    for study in studies:
        for label in study.labels:
            studies_per_label[label] += 1
    wants: list[dict[int, float]] = [{}, {}]
    for label, n in studies_per_label.items():
        val_want = val_fraction * n
        if n >= 2:
            val_want = min(max(val_want, 1.0), n - 1.0)
        wants[_VAL][label] = val_want
        wants[_TRAIN][label] = n - val_want
    total_images = sum(s.size for s in studies)
    capacity = [total_images * (1.0 - val_fraction), total_images * val_fraction]
    assignment: dict[str, int] = {}

    def assign(study: _Study, subset: int) -> None:
        assignment[study.study_id] = subset
        capacity[subset] -= study.size
        for label in study.labels:
            wants[subset][label] -= 1.0

    while True:
        remaining: dict[int, list[_Study]] = defaultdict(list)
        for study in studies:
            if study.study_id not in assignment:
                for label in study.labels:
                    remaining[label].append(study)
        if not remaining:
            break
        label = min(remaining, key=lambda lab: (len(remaining[lab]), studies_per_label[lab], lab))
        for study in remaining[label]:
            subset = max((_TRAIN, _VAL), key=lambda k: (wants[k][label], capacity[k], k == _TRAIN))
            assign(study, subset)

    for study in studies:
        if study.study_id not in assignment:
            assign(study, max((_TRAIN, _VAL), key=lambda k: (capacity[k], k == _TRAIN)))
    return assignment


def _repair(studies: list[_Study], assignment: dict[str, int]) -> None:
    """Give every label held by two or more studies a study in each set, rarest label first.

    A label is fixed by moving one of its studies across, or, when that would take another label
    out of the source set, by also moving back one study that carries those labels. A move never
    takes a label of two or more studies out of a set, so a fix never undoes an earlier one.
    """
    counts = [Counter[int](), Counter[int]()]
    for study in studies:
        counts[assignment[study.study_id]].update(study.labels)
    studies_per_label = counts[_TRAIN] + counts[_VAL]
    shared = {label for label, n in studies_per_label.items() if n >= 2}
    for label in sorted(shared, key=lambda lab: (studies_per_label[lab], lab)):
        for target in (_VAL, _TRAIN):
            if counts[target][label]:
                continue
            for study in _find_move(label, 1 - target, studies, assignment, counts, shared):
                source = assignment[study.study_id]
                counts[source].subtract(study.labels)
                counts[1 - source].update(study.labels)
                assignment[study.study_id] = 1 - source


def _find_move(
    label: int,
    source: int,
    studies: list[_Study],
    assignment: dict[str, int],
    counts: list[Counter[int]],
    shared: set[int],
) -> tuple[_Study, ...]:
    """Studies to move so that ``label`` reaches the other set; empty when there is no safe move.

    ``shared`` are the labels held by two or more studies: the only ones a set must keep.
    """
    target = 1 - source
    by_size = sorted(studies, key=lambda s: (s.size, s.rank))
    for study in (s for s in by_size if label in s.labels and assignment[s.study_id] == source):
        lost = {m for m in study.labels & shared if counts[source][m] == 1}
        if not lost:
            return (study,)
        for back in by_size:
            if assignment[back.study_id] != target or not lost <= back.labels:
                continue
            # ``back`` may leave the target set only if the target keeps its shared labels.
            if all(counts[target][m] + (m in study.labels) > 1 for m in back.labels & shared):
                return study, back
    return ()
