"""The VinDr-SpineXR reader on hand-written CSVs and tiny DICOMs: every messy case is a Problem."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES
from spine_edge.errors import DatasetError
from spine_edge.vindr import (
    Box,
    ProblemKind,
    format_summary,
    read_vindr,
    summarize_dataset,
)

OST, IMPLANT, VC = (
    CLASS_NAMES.index("Osteophytes"),
    CLASS_NAMES.index("Surgical implant"),
    CLASS_NAMES.index("Vertebral collapse"),
)


def write_dicom(path: Path, width: int, height: int) -> None:
    """A minimal uncompressed 12-bit MONOCHROME2 DICOM with the given size."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(width * height, dtype=np.uint16).reshape(height, width) % 4096).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ANNOTATION_COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def row(image_id: str, lesion: str, *coords: object, study: str | None = None, series: str = "se") -> list[str]:
    values = [str(c) for c in coords] if coords else ["", "", "", ""]
    return [image_id, f"st_{image_id}" if study is None else study, series, "R1", lesion, *values]


TRAIN_ROWS = [
    row("normal", "No finding"),
    row("clean", "Osteophytes", 10, 20, 30, 40),
    row("clean", "Surgical implant", 5.5, 6.5, 60, 70),
    row("clipped", "Osteophytes", -10, 50, 40, 130),  # image is 100x120: ymax past the bottom
    row("outside", "Osteophytes", 200, 200, 250, 250),
    row("empty", "Osteophytes", 10, 10, 10, 50),
    row("empty", "Osteophytes", 30, 10, 20, 50),
    row("unknown", "Broken bone", 1, 1, 5, 5),
    row("unknown", "osteophytes", 1, 1, 5, 5),
    row("unknownmixed", "Osteophytes", 2, 2, 6, 6),
    row("unknownmixed", "Fracture", 1, 1, 5, 5),
    row("missing", "Osteophytes", 1, 1, 5, 5),
    row("conflict", "No finding"),
    row("conflict", "Vertebral collapse", 1, 2, 3, 4),
    row("badnum", "Osteophytes", "abc", 1, 5, 5),
    row("badnum", "Osteophytes", "nan", 1, 5, 5),
    row("dup", "Osteophytes", 1, 1, 9, 9),
    row("dup", "Osteophytes", 1, 1, 9, 9),
    row("dup", "Surgical implant", 1, 1, 9, 9),  # same box, other class: not a duplicate
    row("corrupt", "No finding"),
    row("", "No finding"),
    row("shared", "No finding"),
    row("twostudies", "No finding", study="A"),
    row("twostudies", "No finding", study="B"),
    row("nostudy", "No finding", study=""),
]
TEST_ROWS = [row("t1", "Osteophytes", 0, 0, 100, 120), row("shared", "No finding")]


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vindr")
    for image_id in (
        "normal",
        "clean",
        "clipped",
        "outside",
        "empty",
        "unknown",
        "unknownmixed",
        "conflict",
        "badnum",
        "dup",
        "unlisted",
        "shared",
        "twostudies",
        "nostudy",
    ):
        write_dicom(root / "train_images" / f"{image_id}.dicom", width=100, height=120)
    (root / "train_images" / "corrupt.dicom").write_bytes(b"this is not a DICOM file" * 10)
    for image_id in ("t1", "shared"):
        write_dicom(root / "test_images" / f"{image_id}.dicom", width=100, height=120)
    write_csv(root / "annotations" / "train.csv", TRAIN_ROWS)
    write_csv(root / "annotations" / "test.csv", TEST_ROWS)
    return root


@pytest.fixture(scope="module")
def messy(messy_root: Path):
    return read_vindr(messy_root)


def _record(dataset, image_id: str, split: str = "train"):
    matches = [r for r in dataset.split(split) if r.image_id == image_id]
    assert len(matches) == 1, f"{image_id} not in {split}"
    return matches[0]


def _problems(dataset, kind: ProblemKind, image_id: str | None = None):
    return [p for p in dataset.problems if p.kind == kind and (image_id is None or p.image_id == image_id)]


def test_clean_images_are_read_with_header_size_and_labels(messy) -> None:
    normal = _record(messy, "normal")
    assert (normal.width, normal.height, normal.abnormal, normal.boxes) == (100, 120, False, ())
    clean = _record(messy, "clean")
    assert clean.abnormal and clean.study_id == "st_clean" and clean.series_id == "se" and clean.split == "train"
    assert clean.boxes == (Box(OST, 10, 20, 30, 40), Box(IMPLANT, 5.5, 6.5, 60, 70))
    assert clean.path.name == "clean.dicom"
    assert not [p for p in messy.problems if p.image_id in ("normal", "clean")]


def test_box_partly_outside_is_clipped(messy) -> None:
    assert _record(messy, "clipped").boxes == (Box(OST, 0, 50, 40, 120),)
    (problem,) = _problems(messy, ProblemKind.BOX_CLIPPED)
    assert problem.image_id == "clipped" and problem.source == "annotations/train.csv:5"
    assert problem.message.endswith("clipped to (0, 50, 40, 120)")


def test_box_fully_outside_is_dropped_but_image_stays_abnormal(messy) -> None:
    record = _record(messy, "outside")
    assert record.boxes == () and record.abnormal
    assert len(_problems(messy, ProblemKind.BOX_OUTSIDE, "outside")) == 1


def test_zero_and_negative_area_boxes_are_dropped(messy) -> None:
    assert _record(messy, "empty").boxes == ()
    assert len(_problems(messy, ProblemKind.EMPTY_BOX, "empty")) == 2


def test_unknown_lesion_type_is_reported_with_a_suggestion(messy) -> None:
    problems = _problems(messy, ProblemKind.UNKNOWN_CLASS, "unknown")
    assert len(problems) == 2
    assert "Broken bone" in problems[0].message
    assert "did you mean 'Osteophytes'" in problems[1].message
    # Only unknown rows: normal or abnormal cannot be told, so the image is left out.
    assert "unknown" not in {r.image_id for r in messy.train}
    assert len(_problems(messy, ProblemKind.UNCERTAIN_LABEL, "unknown")) == 1
    mixed = _record(messy, "unknownmixed")
    assert mixed.abnormal and mixed.boxes == (Box(OST, 2, 2, 6, 6),)


def test_listed_image_missing_on_disk_is_excluded(messy) -> None:
    assert "missing" not in {r.image_id for r in messy.train}
    (problem,) = _problems(messy, ProblemKind.MISSING_IMAGE)
    assert problem.image_id == "missing" and "missing.dicom" in problem.message


def test_dicom_without_csv_row_is_reported(messy) -> None:
    (problem,) = _problems(messy, ProblemKind.UNLISTED_IMAGE)
    assert problem.image_id == "unlisted" and problem.source == "train_images/unlisted.dicom"
    assert "unlisted" not in {r.image_id for r in messy.train}


def test_no_finding_mixed_with_lesions_keeps_the_lesions(messy) -> None:
    record = _record(messy, "conflict")
    assert record.abnormal and record.boxes == (Box(VC, 1, 2, 3, 4),)
    assert len(_problems(messy, ProblemKind.CONFLICTING_LABELS, "conflict")) == 1


def test_non_numeric_coordinates_are_reported(messy) -> None:
    problems = _problems(messy, ProblemKind.BAD_COORDINATES, "badnum")
    assert len(problems) == 2 and "'abc'" in problems[0].message
    assert _record(messy, "badnum").abnormal


def test_duplicate_boxes_are_dropped_once(messy) -> None:
    assert _record(messy, "dup").boxes == (Box(OST, 1, 1, 9, 9), Box(IMPLANT, 1, 1, 9, 9))
    assert len(_problems(messy, ProblemKind.DUPLICATE_BOX, "dup")) == 1


def test_unreadable_dicom_header_is_excluded(messy) -> None:
    assert "corrupt" not in {r.image_id for r in messy.train}
    assert len(_problems(messy, ProblemKind.UNREADABLE_HEADER, "corrupt")) == 1


def test_inconsistent_and_missing_study_ids(messy) -> None:
    assert _record(messy, "twostudies").study_id == "A"
    (problem,) = _problems(messy, ProblemKind.INCONSISTENT_IDS)
    assert problem.image_id == "twostudies" and "kept the first" in problem.message
    assert _record(messy, "nostudy").study_id == "nostudy"
    assert len(_problems(messy, ProblemKind.BAD_ROW, "nostudy")) == 1


def test_row_without_image_id_and_image_in_both_splits(messy) -> None:
    assert len(_problems(messy, ProblemKind.BAD_ROW, "")) == 1
    assert len(_problems(messy, ProblemKind.IMAGE_IN_BOTH_SPLITS, "shared")) == 1
    assert "shared" not in {r.image_id for r in messy.train}
    assert _record(messy, "shared", "test").split == "test"


def test_every_problem_is_accounted_for(messy) -> None:
    counts = summarize_dataset(messy).problem_counts
    assert counts == {
        "empty_box": 2,
        "unknown_class": 3,
        "uncertain_label": 1,
        "bad_coordinates": 2,
        "box_clipped": 1,
        "box_outside": 1,
        "missing_image": 1,
        "unlisted_image": 1,
        "conflicting_labels": 1,
        "duplicate_box": 1,
        "unreadable_header": 1,
        "bad_row": 2,
        "inconsistent_ids": 1,
        "image_in_both_splits": 1,
    }
    assert [r.image_id for r in messy.train] == sorted(r.image_id for r in messy.train)


def test_summary_counts_and_report(messy) -> None:
    summary = summarize_dataset(messy)
    train, test = summary.splits
    # normal, clean, clipped, outside, empty, unknownmixed, conflict, badnum, dup, twostudies, nostudy
    assert (train.images, train.abnormal, train.normal) == (11, 8, 3)
    assert train.boxes_per_class["Osteophytes"] == 4 and train.boxes_per_class["Surgical implant"] == 2
    assert train.images_per_class["Osteophytes"] == 4
    assert train.imbalance_ratio == float("inf")  # several classes have no boxes
    assert (test.images, test.abnormal) == (2, 1)
    text = format_summary(summary, examples=1)
    assert "empty_box: 2" in text and "... and 1 more" in text
    assert "inf (" in text


def test_imbalance_ratio_is_most_over_least_boxes() -> None:
    from spine_edge.vindr import SplitSummary

    boxes = dict.fromkeys(CLASS_NAMES, 10) | {"Osteophytes": 469, "Vertebral collapse": 10}
    split = SplitSummary("train", 1, 0, 1, boxes, dict.fromkeys(CLASS_NAMES, 1))
    assert split.imbalance_ratio == pytest.approx(46.9)


def test_missing_columns_are_fatal_and_named(tmp_path: Path) -> None:
    (tmp_path / "train_images").mkdir()
    (tmp_path / "test_images").mkdir()
    header = tuple(c for c in ANNOTATION_COLUMNS if c not in ("study_id", "ymax"))
    write_csv(tmp_path / "annotations" / "train.csv", [], header=header)
    write_csv(tmp_path / "annotations" / "test.csv", [])
    with pytest.raises(DatasetError, match=r"train\.csv: missing column\(s\) study_id, ymax"):
        read_vindr(tmp_path)


def test_header_with_bom_and_spaces_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "train_images").mkdir()
    (tmp_path / "test_images").mkdir()
    (tmp_path / "annotations").mkdir()
    header = ", ".join(ANNOTATION_COLUMNS)
    (tmp_path / "annotations" / "train.csv").write_text("\ufeff" + header + "\n", encoding="utf-8")
    (tmp_path / "annotations" / "test.csv").write_text(header + "\n", encoding="utf-8")
    dataset = read_vindr(tmp_path)
    assert dataset.train == () and dataset.problems == ()


@pytest.mark.parametrize("remove", ["", "train_images", "annotations/test.csv"])
def test_missing_layout_is_fatal_with_what_to_do(tmp_path: Path, remove: str) -> None:
    root = tmp_path / "vindr"
    if remove:
        for rel in ("train_images", "test_images"):
            (root / rel).mkdir(parents=True)
        write_csv(root / "annotations" / "train.csv", [])
        write_csv(root / "annotations" / "test.csv", [])
        target = root / remove
        target.rmdir() if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match="spine-edge data synth") as info:
        read_vindr(root)
    assert (remove or "does not exist") in str(info.value)
