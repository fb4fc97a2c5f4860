"""The training cache on a tiny synthetic VinDr set: sizes, pixels, labels, resume and rebuild."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import DatasetError
from spine_edge.imageio import read_image
from spine_edge.training.data.prepare import PrepareConfig, prepare_dataset, resize_long_side, yolo_label_text
from spine_edge.training.data.synth import SynthConfig, generate_dataset
from spine_edge.vindr import Box, ProblemKind

LONG_SIDE = 48


@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "vindr"
    generate_dataset(root, SynthConfig(n_train=14, n_test=4, seed=3, scale=0.05, workers=1), progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(vindr_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cache")
    report = prepare_dataset(vindr_root, out, PrepareConfig(long_side=LONG_SIDE, workers=2), progress=False)
    return out, report


def _header_size(path: Path) -> tuple[int, int]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows)


def _expected_labels(root: Path) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """YOLO boxes per image computed straight from the CSVs and DICOM headers."""
    expected: dict[str, list[tuple[int, float, float, float, float]]] = {}
    for split in ("train", "test"):
        with open(root / "annotations" / f"{split}.csv", newline="") as f:
            for row in csv.DictReader(f):
                boxes = expected.setdefault(row["image_id"], [])
                if row["lesion_type"] == "No finding":
                    continue
                w, h = _header_size(root / f"{split}_images" / f"{row['image_id']}.dicom")
                x0, x1 = max(float(row["xmin"]), 0) / w, min(float(row["xmax"]), w) / w
                y0, y1 = max(float(row["ymin"]), 0) / h, min(float(row["ymax"]), h) / h
                boxes.append((CLASS_NAMES.index(row["lesion_type"]), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return expected


def _cache_files(out: Path) -> dict[Path, int]:
    return {
        p: p.stat().st_mtime_ns
        for p in sorted((out / "images").rglob("*.png")) + sorted((out / "labels").rglob("*.txt"))
    }


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "classification.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_pngs_are_downscaled_area_resamples_of_the_decoded_image(vindr_root: Path, prepared) -> None:
    out, report = prepared
    rows = _rows(out)
    assert len(rows) == 18 and report.converted == 18 and report.failed == 0
    for row in rows:
        source_split = "test" if row["split"] == "test" else "train"
        source = read_image(vindr_root / f"{source_split}_images" / f"{row['image_id']}.dicom").image
        png = cv2.imread(str(out / row["path"]), cv2.IMREAD_UNCHANGED)
        h, w = source.shape
        scale = LONG_SIDE / max(h, w)
        assert scale < 1, "the test set must be larger than LONG_SIDE to test downscaling"
        expected_shape = (round(h * scale), round(w * scale))
        assert png.dtype == np.uint8 and png.shape == expected_shape and max(png.shape) == LONG_SIDE
        expected = cv2.resize(source, expected_shape[::-1], interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(png, expected)


def test_labels_match_boxes_computed_from_the_csv(vindr_root: Path, prepared) -> None:
    out, _ = prepared
    expected = _expected_labels(vindr_root)
    rows = _rows(out)
    assert {r["image_id"] for r in rows} == set(expected)
    for row in rows:
        text = (out / "labels" / row["split"] / f"{row['image_id']}.txt").read_text()
        got = [tuple(float(v) for v in line.split()) for line in text.splitlines()]
        want = expected[row["image_id"]]
        assert len(got) == len(want), row["image_id"]
        for g, e in zip(got, want):
            assert g[0] == e[0]
            np.testing.assert_allclose(g[1:], e[1:], atol=1e-6)
        assert row["abnormal"] == ("1" if want else "0")
        assert (text == "") == (not want)


def test_split_metadata_and_yaml(prepared) -> None:
    out, report = prepared
    rows = _rows(out)
    studies = {split: {r["study_id"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert not studies["train"] & studies["val"]
    assert studies["val"], "validation set is empty"
    state = json.loads((out / "prepare.json").read_text())
    assert state["complete"] is True and state["long_side"] == LONG_SIDE and state["seed"] == 0
    assert state["fingerprint"] == report.fingerprint and len(report.fingerprint) == 64
    for split in ("train", "val", "test"):
        assert state["counts"][split]["images"] == sum(r["split"] == split for r in rows)
        assert state["counts"][split]["abnormal"] == sum(r["split"] == split and r["abnormal"] == "1" for r in rows)
        assert len(list((out / "images" / split).glob("*.png"))) == state["counts"][split]["images"]
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert spec["path"] == str(out.resolve())
    assert (spec["train"], spec["val"], spec["test"]) == ("images/train", "images/val", "images/test")
    assert spec["names"] == dict(enumerate(CLASS_NAMES))


def test_rerun_skips_finished_images_and_redoes_missing_ones(vindr_root: Path, prepared) -> None:
    out, first = prepared
    before = _cache_files(out)
    again = prepare_dataset(vindr_root, out, PrepareConfig(long_side=LONG_SIDE, workers=1), progress=False)
    assert (again.converted, again.skipped, again.rebuilt) == (0, 18, False)
    assert again.fingerprint == first.fingerprint
    assert _cache_files(out) == before

    victim = next(iter((out / "images" / "train").glob("*.png")))
    victim.unlink()
    partial = prepare_dataset(vindr_root, out, PrepareConfig(long_side=LONG_SIDE, workers=1), progress=False)
    assert (partial.converted, partial.skipped) == (1, 17)
    after = _cache_files(out)
    label = out / "labels" / "train" / f"{victim.stem}.txt"
    assert {p for p in after if after[p] != before.get(p)} == {victim, label}


def test_changed_settings_rebuild(vindr_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    first = prepare_dataset(vindr_root, out, PrepareConfig(long_side=LONG_SIDE, workers=1), progress=False)
    smaller = prepare_dataset(vindr_root, out, PrepareConfig(long_side=32, workers=1), progress=False)
    assert smaller.rebuilt and smaller.converted == 18 and smaller.fingerprint != first.fingerprint
    assert {max(cv2.imread(str(p), 0).shape) for p in (out / "images").rglob("*.png")} == {32}
    reseeded = prepare_dataset(vindr_root, out, PrepareConfig(long_side=32, seed=5, workers=1), progress=False)
    assert reseeded.rebuilt and reseeded.converted == 18
    assert len(list((out / "images").rglob("*.png"))) == 18, "stale files of the old split remain"


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_unreadable_image_is_reported_and_excluded(vindr_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "vindr"
    shutil.copytree(vindr_root, root)
    victim = sorted((root / "train_images").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 200])  # header intact, pixel data cut short
    out = tmp_path / "cache"
    report = prepare_dataset(root, out, PrepareConfig(long_side=LONG_SIDE, workers=1), progress=False)
    image_id = victim.stem
    assert report.failed == 1 and report.converted == 17
    (problem,) = [p for p in report.problems if p.kind == ProblemKind.UNREADABLE_IMAGE]
    assert problem.image_id == image_id
    assert image_id not in {r["image_id"] for r in _rows(out)}
    assert not list((out / "images").rglob(f"{image_id}.png"))
    state = json.loads((out / "prepare.json").read_text())
    assert state["counts"]["failed"] == 1 and any(p["image_id"] == image_id for p in state["problems"])


def test_foreign_output_folder_is_refused(vindr_root: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"keep me")
    with pytest.raises(DatasetError, match="choose an empty or new output folder"):
        prepare_dataset(vindr_root, tmp_path, PrepareConfig(workers=1), progress=False)
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"keep me"


def test_yolo_label_text_normalises_and_clips() -> None:
    boxes = [Box(0, 10, 20, 30, 40), Box(6, -5, 150, 50, 250)]
    assert yolo_label_text(boxes, width=100, height=200) == (
        "0 0.200000 0.150000 0.200000 0.100000\n"  # cx 20/100, cy 30/200, w 20/100, h 20/200
        "6 0.250000 0.875000 0.500000 0.250000\n"  # clipped to x 0..50, y 150..200
    )
    assert yolo_label_text([], 100, 200) == ""


def test_resize_long_side_never_upscales() -> None:
    small = np.zeros((30, 64), np.uint8)
    assert resize_long_side(small, 128) is small
    tall = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200).astype(np.uint8)
    assert resize_long_side(tall, 96).shape == (96, 64)
