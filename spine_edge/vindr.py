"""Read and validate a VinDr-SpineXR folder (the real dataset, or the synthetic one in its layout).

The layout::

    ROOT/train_images/<image_id>.dicom
    ROOT/test_images/<image_id>.dicom
    ROOT/annotations/train.csv     image_id, study_id, series_id, rad_id, lesion_type,
    ROOT/annotations/test.csv      xmin, ymin, xmax, ymax   (one row per box; "No finding" rows
                                   mark normal images and carry no coordinates)

Real annotation files are messy, so the reader never stops at the first odd row: everything it
can work around (a box partly outside the image, an unknown class name, a file without
annotations...) becomes a :class:`Problem` on the returned dataset, and only a layout that cannot
be read at all (a missing folder, a CSV without the required columns) raises
:class:`~spine_edge.errors.DatasetError`.

Image sizes, needed to clip boxes, come from the DICOM header alone (Rows/Columns, read with
``stop_before_pixels``), so validating the full dataset never decodes a JPEG 2000 frame.
"""

from __future__ import annotations

import csv
import enum
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES, NO_FINDING
from spine_edge.errors import DatasetError
from spine_edge.imageio import DICOM_SUFFIXES

#: The two splits shipped with VinDr-SpineXR, as named in its folders and CSVs.
SOURCE_SPLITS: tuple[str, ...] = ("train", "test")
#: Boxes are duplicates when all four clipped coordinates agree to this many decimals (pixels).
_DUPLICATE_DECIMALS = 2

_GET_DATA_HINT = (
    "download VinDr-SpineXR from PhysioNet (physionet.org/content/vindr-spinexr) and point at its "
    "top folder, or create a synthetic set in the same layout with `spine-edge data synth OUT`"
)


class ProblemKind(str, enum.Enum):
    """What is wrong with one row, box or file. The value is the short name printed in reports."""

    MISSING_IMAGE = "missing_image"
    UNLISTED_IMAGE = "unlisted_image"
    UNREADABLE_HEADER = "unreadable_header"
    BAD_ROW = "bad_row"
    INCONSISTENT_IDS = "inconsistent_ids"
    UNKNOWN_CLASS = "unknown_class"
    BAD_COORDINATES = "bad_coordinates"
    EMPTY_BOX = "empty_box"
    BOX_OUTSIDE = "box_outside"
    BOX_CLIPPED = "box_clipped"
    DUPLICATE_BOX = "duplicate_box"
    CONFLICTING_LABELS = "conflicting_labels"
    UNCERTAIN_LABEL = "uncertain_label"
    IMAGE_IN_BOTH_SPLITS = "image_in_both_splits"
    UNREADABLE_IMAGE = "unreadable_image"
    SIZE_MISMATCH = "size_mismatch"


@dataclass(frozen=True)
class Problem:
    """One issue found in the data, with what was done about it.

    Attributes:
        kind: Category, used to group problems in reports.
        source: Where it was found: ``annotations/train.csv:17`` (file and line) or a file path.
        image_id: The image concerned, or an empty string.
        message: What is wrong and what the reader did (kept, clipped, dropped, excluded).
    """

    kind: ProblemKind
    source: str
    image_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class Box:
    """One lesion box in original image pixels (clipped to the image, positive area).

    Attributes:
        class_id: Index into :data:`spine_edge.constants.CLASS_NAMES`.
        xmin: Left edge.
        ymin: Top edge.
        xmax: Right edge.
        ymax: Bottom edge.
    """

    class_id: int
    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]


@dataclass(frozen=True)
class ImageRecord:
    """One radiograph and its labels.

    Attributes:
        image_id: The VinDr image id (the file name without extension).
        study_id: Study the image belongs to; splits never separate a study.
        series_id: Series id from the CSV.
        split: ``train`` or ``test`` as read; ``train`` or ``val`` after a train/val split.
        path: The DICOM file.
        boxes: Valid lesion boxes (may be empty for an abnormal image whose boxes were dropped).
        width: Columns from the DICOM header.
        height: Rows from the DICOM header.
        abnormal: True when the CSV has at least one row of a known lesion class for the image,
            whether or not its box survived validation; False for "No finding" images. (An image
            whose only lesion rows name unknown classes is excluded: its label is unknown.)
    """

    image_id: str
    study_id: str
    series_id: str
    split: str
    path: Path
    boxes: tuple[Box, ...]
    width: int
    height: int
    abnormal: bool

    @property
    def class_ids(self) -> frozenset[int]:
        """Classes with at least one box on this image."""
        return frozenset(box.class_id for box in self.boxes)


@dataclass(frozen=True)
class VinDrDataset:
    """A validated VinDr-SpineXR folder.

    Attributes:
        root: The folder read.
        train: Usable images of ``annotations/train.csv``, sorted by image id.
        test: Usable images of ``annotations/test.csv``, sorted by image id.
        problems: Everything odd that was found, in reading order.
    """

    root: Path
    train: tuple[ImageRecord, ...]
    test: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...] = ()

    def split(self, name: str) -> tuple[ImageRecord, ...]:
        """Records of the split ``name`` (``train`` or ``test``)."""
        if name not in SOURCE_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SOURCE_SPLITS}")
        return self.train if name == "train" else self.test


@dataclass
class _RawBox:
    class_id: int
    coords: tuple[float, float, float, float]
    line: int


@dataclass
class _RawImage:
    """Everything the CSV says about one image, before image sizes are known."""

    study_id: str
    series_id: str
    first_line: int
    no_finding: bool = False
    lesion_rows: int = 0
    unknown_rows: int = 0
    boxes: list[_RawBox] = field(default_factory=list)


@dataclass(frozen=True)
class _Annotations:
    images: dict[str, _RawImage]
    problems: tuple[Problem, ...]


def read_vindr(root: str | Path) -> VinDrDataset:
    """Read and validate a VinDr-SpineXR folder.

    Args:
        root: Folder with ``train_images/``, ``test_images/`` and ``annotations/``.

    Returns:
        The usable records of both splits and every problem found.

    Raises:
        DatasetError: A folder or CSV is missing, or a CSV lacks required columns.

    Example:
        >>> dataset = read_vindr("/data/vindr-spinexr")
        >>> len(dataset.train), len(dataset.problems)
    """
    root = Path(root)
    _check_layout(root)
    problems: list[Problem] = []
    annotations = {name: _read_annotations(root / "annotations" / f"{name}.csv", root) for name in SOURCE_SPLITS}
    for name in SOURCE_SPLITS:
        problems.extend(annotations[name].problems)
    in_both, both_problems = _report_images_in_both_splits(annotations["train"].images, annotations["test"].images)
    problems.extend(both_problems)

    splits: dict[str, tuple[ImageRecord, ...]] = {}
    for name in SOURCE_SPLITS:
        excluded = in_both if name == "train" else set()
        records, split_problems = _build_records(root, name, annotations[name].images, excluded)
        splits[name] = records
        problems.extend(split_problems)
    return VinDrDataset(root=root, train=splits["train"], test=splits["test"], problems=tuple(problems))


def _read_annotations(csv_path: Path, root: Path) -> _Annotations:
    """Parse one annotation CSV into per-image rows, reporting bad rows instead of failing.

    Checks done here need no image: required columns, empty ids, class names, numeric and
    positive-area coordinates, "No finding" mixed with lesions, ids that disagree between rows.

    Args:
        csv_path: ``annotations/train.csv`` or ``annotations/test.csv``.
        root: Dataset root, used only to print short ``annotations/x.csv:LINE`` locations.

    Raises:
        DatasetError: The file is empty, unreadable, or lacks a required column.
    """
    shown = _display_path(csv_path, root)
    images: dict[str, _RawImage] = {}
    problems: list[Problem] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [name.strip() for name in reader.fieldnames or []]
            _check_columns(csv_path, header)
            reader.fieldnames = header
            for row in reader:
                _parse_row(row, f"{shown}:{reader.line_num}", reader.line_num, images, problems)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"{csv_path}: cannot be read as a CSV file ({exc}); restore it from the dataset download"
        ) from exc

    for image_id, raw in images.items():
        if raw.no_finding and raw.lesion_rows:
            problems.append(
                Problem(
                    ProblemKind.CONFLICTING_LABELS,
                    f"{shown}:{raw.first_line}",
                    image_id,
                    f"image {image_id} has both '{NO_FINDING}' and {raw.lesion_rows} lesion row(s); "
                    "kept as abnormal with its lesion boxes",
                )
            )
    return _Annotations(images=images, problems=tuple(problems))


def _check_layout(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist; {_GET_DATA_HINT}")
    missing = [
        rel
        for rel in ("train_images", "test_images", "annotations/train.csv", "annotations/test.csv")
        if not (root / rel).exists()
    ]
    if missing:
        raise DatasetError(
            f"{root}: not a VinDr-SpineXR folder, missing {', '.join(missing)}; expected train_images/, "
            f"test_images/ and annotations/{{train,test}}.csv: {_GET_DATA_HINT}"
        )


def _check_columns(csv_path: Path, header: list[str]) -> None:
    if not header:
        raise DatasetError(f"{csv_path}: empty file, no header row; restore it from the dataset download")
    missing = [column for column in ANNOTATION_COLUMNS if column not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; the header must name "
            f"{', '.join(ANNOTATION_COLUMNS)} (found: {', '.join(header)})"
        )


def _parse_row(
    row: dict[str | None, str | None],
    where: str,
    line: int,
    images: dict[str, _RawImage],
    problems: list[Problem],
) -> None:
    image_id = (row.get("image_id") or "").strip()
    if not image_id:
        problems.append(Problem(ProblemKind.BAD_ROW, where, "", "row without image_id; ignored"))
        return
    study_id = (row.get("study_id") or "").strip()
    series_id = (row.get("series_id") or "").strip()
    raw = images.get(image_id)
    if raw is None:
        if not study_id:
            problems.append(
                Problem(
                    ProblemKind.BAD_ROW, where, image_id, f"image {image_id} has no study_id; treated as its own study"
                )
            )
            study_id = image_id
        raw = images[image_id] = _RawImage(study_id=study_id, series_id=series_id, first_line=line)
    elif (study_id and study_id != raw.study_id) or (series_id and series_id != raw.series_id):
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT_IDS,
                where,
                image_id,
                f"image {image_id} has study/series {study_id}/{series_id} here but "
                f"{raw.study_id}/{raw.series_id} on line {raw.first_line}; kept the first",
            )
        )

    lesion_type = (row.get("lesion_type") or "").strip()
    if lesion_type == NO_FINDING:
        raw.no_finding = True
        return
    if lesion_type not in CLASS_NAMES:
        raw.unknown_rows += 1
        problems.append(Problem(ProblemKind.UNKNOWN_CLASS, where, image_id, _unknown_class_message(lesion_type)))
        return
    raw.lesion_rows += 1
    class_id = CLASS_NAMES.index(lesion_type)
    coords = _parse_coords(row)
    if coords is None:
        shown = ", ".join(f"{k}={row.get(k)!r}" for k in ("xmin", "ymin", "xmax", "ymax"))
        problems.append(
            Problem(
                ProblemKind.BAD_COORDINATES,
                where,
                image_id,
                f"{lesion_type} box has non-numeric or missing coordinates ({shown}); box dropped",
            )
        )
        return
    xmin, ymin, xmax, ymax = coords
    if xmax <= xmin or ymax <= ymin:
        problems.append(
            Problem(
                ProblemKind.EMPTY_BOX,
                where,
                image_id,
                f"{lesion_type} box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) has zero or negative area; box dropped",
            )
        )
        return
    raw.boxes.append(_RawBox(class_id=class_id, coords=coords, line=line))


def _unknown_class_message(lesion_type: str) -> str:
    known = {name.casefold(): name for name in (*CLASS_NAMES, NO_FINDING)}
    guess = known.get(lesion_type.casefold())
    suggestion = f" (did you mean '{guess}'?)" if guess else f"; known classes: {', '.join(CLASS_NAMES)}"
    return f"unknown lesion_type '{lesion_type}'{suggestion}; row ignored"


def _parse_coords(row: dict[str | None, str | None]) -> tuple[float, float, float, float] | None:
    values = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        try:
            value = float((row.get(key) or "").strip())
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return values[0], values[1], values[2], values[3]


def _report_images_in_both_splits(
    train: dict[str, _RawImage], test: dict[str, _RawImage]
) -> tuple[set[str], list[Problem]]:
    """Images listed in both CSVs are kept in test only, so that no test image is trained on."""
    both = train.keys() & test.keys()
    problems = [
        Problem(
            ProblemKind.IMAGE_IN_BOTH_SPLITS,
            f"annotations/train.csv:{train[image_id].first_line}",
            image_id,
            f"image {image_id} is listed in both train.csv and test.csv; kept in test only",
        )
        for image_id in sorted(both)
    ]
    return both, problems


def _index_images(folder: Path) -> dict[str, Path]:
    return {
        path.name[: -len(path.suffix)]: path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix.lower() in DICOM_SUFFIXES
    }


def _build_records(
    root: Path, split: str, raw_images: dict[str, _RawImage], excluded: set[str]
) -> tuple[tuple[ImageRecord, ...], list[Problem]]:
    """Records of one split; ``excluded`` ids are listed in the CSV but deliberately left out."""
    folder = root / f"{split}_images"
    csv_name = f"annotations/{split}.csv"
    on_disk = _index_images(folder)
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    for image_id in sorted(raw_images.keys() - excluded):
        raw = raw_images[image_id]
        path = on_disk.get(image_id)
        if path is None:
            problems.append(
                Problem(
                    ProblemKind.MISSING_IMAGE,
                    f"{csv_name}:{raw.first_line}",
                    image_id,
                    f"image {image_id} is listed but {folder.name}/{image_id}.dicom does not exist; excluded",
                )
            )
            continue
        if raw.unknown_rows and not raw.lesion_rows:
            # Calling it normal could teach the classifier that a lesion is normal anatomy.
            problems.append(
                Problem(
                    ProblemKind.UNCERTAIN_LABEL,
                    f"{csv_name}:{raw.first_line}",
                    image_id,
                    f"image {image_id} has only rows of unknown lesion types, so whether it is normal is unknown; excluded",
                )
            )
            continue
        size = _read_size(path, _display_path(path, root), image_id, problems)
        if size is None:
            continue
        width, height = size
        boxes = _clip_boxes(raw.boxes, width, height, image_id, csv_name, problems)
        records.append(
            ImageRecord(
                image_id=image_id,
                study_id=raw.study_id,
                series_id=raw.series_id,
                split=split,
                path=path,
                boxes=boxes,
                width=width,
                height=height,
                abnormal=raw.lesion_rows > 0,
            )
        )
    for image_id in sorted(on_disk.keys() - raw_images.keys()):
        problems.append(
            Problem(
                ProblemKind.UNLISTED_IMAGE,
                _display_path(on_disk[image_id], root),
                image_id,
                f"image {image_id} has no row in {csv_name}; excluded (its label is unknown)",
            )
        )
    return tuple(records), problems


def _read_size(path: Path, shown: str, image_id: str, problems: list[Problem]) -> tuple[int, int] | None:
    """(width, height) from the DICOM header, without touching the pixel data."""
    try:
        # force=True accepts files without the 128-byte preamble; a file that is not DICOM at all
        # then fails the Rows/Columns check below instead of raising.
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Rows", "Columns"])
        height, width = int(header.Rows), int(header.Columns)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad file; all mean "unusable"
        problems.append(
            Problem(
                ProblemKind.UNREADABLE_HEADER,
                shown,
                image_id,
                f"cannot read Rows/Columns from the DICOM header ({type(exc).__name__}: {exc}); excluded",
            )
        )
        return None
    if width <= 0 or height <= 0:
        problems.append(
            Problem(
                ProblemKind.UNREADABLE_HEADER, shown, image_id, f"DICOM header says {width}x{height} pixels; excluded"
            )
        )
        return None
    return width, height


def _clip_boxes(
    raw_boxes: list[_RawBox], width: int, height: int, image_id: str, csv_name: str, problems: list[Problem]
) -> tuple[Box, ...]:
    boxes: list[Box] = []
    seen: set[tuple[int, float, float, float, float]] = set()
    for raw in raw_boxes:
        where = f"{csv_name}:{raw.line}"
        name = CLASS_NAMES[raw.class_id]
        xmin, ymin, xmax, ymax = raw.coords
        cx0, cy0 = min(max(xmin, 0.0), width), min(max(ymin, 0.0), height)
        cx1, cy1 = min(max(xmax, 0.0), width), min(max(ymax, 0.0), height)
        shown = f"({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})"
        if cx1 <= cx0 or cy1 <= cy0:
            problems.append(
                Problem(
                    ProblemKind.BOX_OUTSIDE,
                    where,
                    image_id,
                    f"{name} box {shown} lies outside the {width}x{height} image; box dropped",
                )
            )
            continue
        if (cx0, cy0, cx1, cy1) != (xmin, ymin, xmax, ymax):
            problems.append(
                Problem(
                    ProblemKind.BOX_CLIPPED,
                    where,
                    image_id,
                    f"{name} box {shown} extends past the {width}x{height} image; clipped to "
                    f"({cx0:g}, {cy0:g}, {cx1:g}, {cy1:g})",
                )
            )
        d = _DUPLICATE_DECIMALS
        key = (raw.class_id, round(cx0, d), round(cy0, d), round(cx1, d), round(cy1, d))
        if key in seen:
            problems.append(
                Problem(
                    ProblemKind.DUPLICATE_BOX, where, image_id, f"{name} box {shown} repeats an earlier row; dropped"
                )
            )
            continue
        seen.add(key)
        boxes.append(Box(raw.class_id, cx0, cy0, cx1, cy1))
    return tuple(boxes)


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class SplitSummary:
    """Counts for one split.

    Attributes:
        name: Split name.
        images: Usable images.
        normal: Images without lesions.
        abnormal: Images with at least one lesion row.
        boxes_per_class: Box count per class name (every class present, zeros included).
        images_per_class: Number of images with at least one box of each class.
    """

    name: str
    images: int
    normal: int
    abnormal: int
    boxes_per_class: dict[str, int]
    images_per_class: dict[str, int]

    @property
    def imbalance_ratio(self) -> float:
        """Boxes of the most frequent class over boxes of the least frequent (inf if one has none)."""
        counts = list(self.boxes_per_class.values())
        most, least = max(counts), min(counts)
        if most == 0:
            return float("nan")
        return most / least if least else float("inf")


@dataclass(frozen=True)
class DatasetSummary:
    """What ``spine-edge data check`` reports.

    Attributes:
        root: Dataset folder.
        splits: One summary per split.
        problems: All problems, in reading order.
    """

    root: Path
    splits: tuple[SplitSummary, ...]
    problems: tuple[Problem, ...]

    @property
    def problem_counts(self) -> dict[str, int]:
        """Problems per kind, most frequent first."""
        return dict(Counter(p.kind.value for p in self.problems).most_common())


def summarize_split(name: str, records: tuple[ImageRecord, ...] | list[ImageRecord]) -> SplitSummary:
    """Count images, normal/abnormal images and boxes per class in ``records``."""
    boxes = Counter(box.class_id for record in records for box in record.boxes)
    images = Counter(class_id for record in records for class_id in record.class_ids)
    abnormal = sum(record.abnormal for record in records)
    return SplitSummary(
        name=name,
        images=len(records),
        normal=len(records) - abnormal,
        abnormal=abnormal,
        boxes_per_class={n: boxes[i] for i, n in enumerate(CLASS_NAMES)},
        images_per_class={n: images[i] for i, n in enumerate(CLASS_NAMES)},
    )


def summarize_dataset(dataset: VinDrDataset) -> DatasetSummary:
    """Per-split counts and the problem list of a dataset."""
    return DatasetSummary(
        root=dataset.root,
        splits=tuple(summarize_split(name, dataset.split(name)) for name in SOURCE_SPLITS),
        problems=dataset.problems,
    )


def format_summary(summary: DatasetSummary, examples: int = 3) -> str:
    """Render a summary as the plain-text report printed by ``spine-edge data check``.

    Args:
        summary: From :func:`summarize_dataset`.
        examples: How many problems to show per kind.
    """
    lines = [f"VinDr-SpineXR layout at {summary.root}", ""]
    lines.append(f"{'split':<8}{'images':>8}{'normal':>8}{'abnormal':>10}{'boxes':>8}")
    for s in summary.splits:
        lines.append(f"{s.name:<8}{s.images:>8}{s.normal:>8}{s.abnormal:>10}{sum(s.boxes_per_class.values()):>8}")
    lines.append("")
    header = f"{'class':<22}" + "".join(f"{s.name + ' boxes':>13}{s.name + ' images':>14}" for s in summary.splits)
    lines.append(header)
    for name in CLASS_NAMES:
        cells = "".join(f"{s.boxes_per_class[name]:>13}{s.images_per_class[name]:>14}" for s in summary.splits)
        lines.append(f"{name:<22}{cells}")
    lines.append("")
    for s in summary.splits:
        lines.append(f"imbalance ({s.name}, most/least frequent class by boxes): {_format_ratio(s)}")
    lines.append("")
    if not summary.problems:
        lines.append("problems: none")
        return "\n".join(lines)
    lines.append(f"problems: {len(summary.problems)}")
    for kind, count in summary.problem_counts.items():
        lines.append(f"  {kind}: {count}")
        shown = [p for p in summary.problems if p.kind.value == kind][:examples]
        lines.extend(f"    {p}" for p in shown)
        if count > len(shown):
            lines.append(f"    ... and {count - len(shown)} more")
    return "\n".join(lines)


def _format_ratio(split: SplitSummary) -> str:
    ratio = split.imbalance_ratio
    if math.isnan(ratio):
        return "n/a (no boxes)"
    most = max(split.boxes_per_class, key=split.boxes_per_class.__getitem__)
    least = min(split.boxes_per_class, key=split.boxes_per_class.__getitem__)
    if math.isinf(ratio):
        return f"inf ({least} has no boxes; {most} has {split.boxes_per_class[most]})"
    return f"{ratio:.1f}:1 ({most} {split.boxes_per_class[most]} / {least} {split.boxes_per_class[least]})"
