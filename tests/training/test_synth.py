"""The synthetic VinDr-SpineXR generator: layout, DICOM validity, determinism, labels, lesions."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES, NO_FINDING, PAPER_CLASS_FREQUENCY
from spine_edge.errors import DatasetError
from spine_edge.imageio import read_image
from spine_edge.training.data import synth
from spine_edge.training.data.synth import (
    INSTANCE_COUNT_PROBABILITIES,
    DicomHeader,
    SynthConfig,
    encode_dicom,
    generate_dataset,
    plan_dataset,
    render_radiograph,
    sample_image_spec,
    sample_lesion_counts,
)

# Tiny images (about 80-180 rows) keep the whole file to a few seconds.
SMALL = SynthConfig(n_train=7, n_test=4, seed=3, scale=0.06, jpeg2000_fraction=0.5, workers=1)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == ANNOTATION_COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthReport]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, generate_dataset(out, SMALL, progress=False)


@pytest.fixture(scope="module")
def small_set_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_again") / "set"
    generate_dataset(out, SMALL, progress=False)
    return out


def test_layout_and_annotations_match_vindr(small_set: tuple[Path, synth.SynthReport]) -> None:
    root, report = small_set
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "test_images", "train_images"]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["test.csv", "train.csv"]
    for split, n in (("train", SMALL.n_train), ("test", SMALL.n_test)):
        files = sorted((root / f"{split}_images").iterdir())
        assert len(files) == n == report.images[split]
        assert all(re.fullmatch(r"[0-9a-f]{32}\.dicom", f.name) for f in files)
        rows = _read_csv(root / "annotations" / f"{split}.csv")
        assert {r["image_id"] for r in rows} == {f.stem for f in files}
        normal_ids = {r["image_id"] for r in rows if r["lesion_type"] == NO_FINDING}
        assert len(normal_ids) == report.normal_images[split]
        for row in rows:
            assert re.fullmatch(r"[0-9a-f]{32}", row["study_id"]) and re.fullmatch(r"[0-9a-f]{32}", row["series_id"])
            if row["lesion_type"] == NO_FINDING:
                assert [row[c] for c in ("xmin", "ymin", "xmax", "ymax")] == ["", "", "", ""]
                continue
            assert row["lesion_type"] in CLASS_NAMES and row["image_id"] not in normal_ids
            ds = pydicom.dcmread(root / f"{split}_images" / f"{row['image_id']}.dicom", stop_before_pixels=True)
            x0, y0, x1, y1 = (float(row[c]) for c in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
        boxes = {name: sum(r["lesion_type"] == name for r in rows) for name in CLASS_NAMES}
        assert boxes == dict(report.boxes[split])
        # Every class is guaranteed on at least min_images_per_class images of the split.
        assert all(report.images_with_class[split][name] >= SMALL.min_images_per_class for name in CLASS_NAMES)
        # A study never has both normal and abnormal images, and studies group 1-3 images.
        by_study: dict[str, set[str]] = {}
        for row in rows:
            by_study.setdefault(row["study_id"], set()).add(row["image_id"])
        assert len(by_study) == report.studies[split]
        assert all(1 <= len(ids) <= 3 for ids in by_study.values())
        assert all(ids <= normal_ids or not ids & normal_ids for ids in by_study.values())


def test_dicom_files_are_valid_radiographs(small_set: tuple[Path, synth.SynthReport]) -> None:
    root, _ = small_set
    syntaxes = set()
    for path in sorted(root.glob("*_images/*.dicom")):
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        syntaxes.add(meta.TransferSyntaxUID)
        assert meta.TransferSyntaxUID in (JPEG2000Lossless, ExplicitVRLittleEndian)
        assert ds.SOPClassUID in (DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage)
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64
        assert ds.PatientID
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
        assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert float(ds.PixelSpacing[0]) == pytest.approx(0.14 / SMALL.scale, rel=0.06)
        assert float(ds.WindowWidth) > 1 and 0 <= float(ds.WindowCenter) < 2**ds.BitsStored
        assert "StudyDate" not in ds and "ContentDate" not in ds
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint16
        assert int(pixels.max()) < 2**ds.BitsStored
        # A radiograph, not a flat field: bone, soft tissue and background span much of the range.
        assert np.percentile(pixels, 99) - np.percentile(pixels, 1) > 0.2 * 2**ds.BitsStored
    assert syntaxes == {JPEG2000Lossless, ExplicitVRLittleEndian}


def test_same_seed_writes_identical_files(small_set: tuple[Path, synth.SynthReport], small_set_again: Path) -> None:
    first, _ = small_set
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(small_set_again) for p in small_set_again.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (small_set_again / rel).read_bytes(), rel


def test_worker_processes_write_the_same_files(tmp_path: Path) -> None:
    config = replace(SMALL, n_train=3, n_test=1, min_images_per_class=0)
    one, two = tmp_path / "one", tmp_path / "two"
    generate_dataset(one, config, progress=False)
    generate_dataset(two, replace(config, workers=2), progress=False)
    for path in sorted(p for p in one.rglob("*") if p.is_file()):
        assert path.read_bytes() == (two / path.relative_to(one)).read_bytes(), path


def test_other_seed_gives_other_data() -> None:
    a = plan_dataset(replace(SMALL, seed=1))
    b = plan_dataset(replace(SMALL, seed=2))
    assert {j.image_id for j in a}.isdisjoint({j.image_id for j in b})
    assert [j.spec for j in a] != [j.spec for j in b]


def test_class_frequencies_follow_the_paper() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_lesion_counts(rng) for _ in range(4000)]
    assert all(d for d in draws)
    for name in CLASS_NAMES:
        share = np.mean([name in d for d in draws])
        assert share == pytest.approx(PAPER_CLASS_FREQUENCY[name], abs=0.03), name
    expected = sum((k + 1) * p for k, p in enumerate(INSTANCE_COUNT_PROBABILITIES["Osteophytes"]))
    mean = np.mean([d["Osteophytes"] for d in draws if "Osteophytes" in d])
    assert mean == pytest.approx(expected, abs=0.08)


def test_plan_has_half_normal_images_and_rare_classes_in_both_splits() -> None:
    jobs = plan_dataset(SynthConfig(n_train=400, n_test=30, scale=0.05))
    train = [j for j in jobs if j.split == "train"]
    test = [j for j in jobs if j.split == "test"]
    assert len(train) == 400 and len(test) == 30
    assert abs(sum(not j.abnormal for j in train) - 200) <= 3
    for split in (train, test):
        for name in CLASS_NAMES:
            assert sum(any(les.lesion_type == name for les in j.spec.lesions) for j in split) >= 2, name
    # Views of one study share the region (one exam of one patient).
    regions: dict[str, set[str]] = {}
    for job in jobs:
        regions.setdefault(job.study_id, set()).add(job.spec.region)
    assert all(len(r) == 1 for r in regions.values())


def _single_lesion_spec(name: str, projection: str, seed: int) -> synth.ImageSpec:
    rng = np.random.default_rng(seed)
    spec = sample_image_spec(rng, lesion_counts={name: 1}, scale=0.12, projection=projection, region="lumbar")
    return replace(spec, lesions=(replace(spec.lesions[0], severity=0.8),))


@pytest.mark.parametrize("projection", ["lateral", "AP"])
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_each_lesion_changes_pixels_only_inside_its_box(name: str, projection: str) -> None:
    spec = _single_lesion_spec(name, projection, seed=CLASS_NAMES.index(name))
    with_lesion = render_radiograph(spec)
    without = render_radiograph(replace(spec, lesions=()))
    (box,) = with_lesion.boxes
    assert box.lesion_type == name and without.boxes == ()
    assert 0 <= box.xmin < box.xmax <= spec.cols and 0 <= box.ymin < box.ymax <= spec.rows
    maxval = 2**spec.bits_stored - 1
    diff = np.abs(with_lesion.pixels.astype(np.int64) - without.pixels.astype(np.int64)) / maxval
    inside = np.zeros(diff.shape, bool)
    inside[int(box.ymin) : int(np.ceil(box.ymax)), int(box.xmin) : int(np.ceil(box.xmax))] = True
    assert diff[~inside].max() < 0.01
    assert diff[inside].mean() > 0.01
    assert (diff[inside] > 0.04).mean() > 0.1
    # Tight: the box is small against the image (a vertebra or a few, not the whole spine).
    assert (box.xmax - box.xmin) * (box.ymax - box.ymin) < 0.2 * spec.rows * spec.cols


def test_boxes_stay_inside_the_image_and_rendering_is_pure() -> None:
    rng = np.random.default_rng(7)
    for _ in range(6):
        spec = sample_image_spec(rng, lesion_counts=sample_lesion_counts(rng), scale=0.08)
        first, second = render_radiograph(spec), render_radiograph(spec)
        assert np.array_equal(first.pixels, second.pixels) and first.boxes == second.boxes
        assert first.pixels.shape == (spec.rows, spec.cols) and first.pixels.dtype == np.uint16
        assert int(first.pixels.max()) < 2**spec.bits_stored
        assert [b.lesion_type for b in first.boxes] == [les.lesion_type for les in spec.lesions]
        for b in first.boxes:
            assert 0 <= b.xmin < b.xmax <= spec.cols and 0 <= b.ymin < b.ymax <= spec.rows


@pytest.mark.parametrize("name", [n for n in CLASS_NAMES if n != "Surgical implant"])
def test_difficulty_weakens_lesions(name: str) -> None:
    """Total pixel change a lesion makes (size x contrast) drops as difficulty rises; metal is metal."""
    spec = _single_lesion_spec(name, "lateral", seed=11)

    def signal(difficulty: float) -> float:
        harder = replace(spec, difficulty=difficulty)
        with_lesion = render_radiograph(harder).pixels.astype(np.float64)
        without = render_radiograph(replace(harder, lesions=())).pixels.astype(np.float64)
        return float(np.abs(with_lesion - without).sum())

    assert signal(0.0) > 1.3 * signal(1.0)


def test_monochrome1_reads_back_like_monochrome2(tmp_path: Path) -> None:
    spec = sample_image_spec(np.random.default_rng(5), lesion_counts={}, scale=0.08, bits_stored=12)
    pixels = render_radiograph(spec).pixels
    header = DicomHeader(
        sop_class_uid=DigitalXRayImageStorageForPresentation,
        sop_instance_uid="2.25.1",
        study_instance_uid="2.25.2",
        series_instance_uid="2.25.3",
        patient_id="p",
        photometric="MONOCHROME2",
        transfer_syntax_uid=JPEG2000Lossless,
        pixel_spacing_mm=0.14,
        series_number=1,
        instance_number=1,
        modality=None,
        body_part=None,
        view_position=None,
    )
    images = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = tmp_path / f"{photometric}.dicom"
        path.write_bytes(encode_dicom(pixels, replace(header, photometric=photometric), spec.bits_stored))
        stored = pydicom.dcmread(path).pixel_array
        expected = 4095 - pixels if photometric == "MONOCHROME1" else pixels
        assert np.array_equal(stored, expected)  # JPEG 2000 lossless round trip is exact
        radiograph = read_image(path)
        assert radiograph.photometric == photometric and radiograph.bits_stored == 12
        images[photometric] = radiograph.image.astype(np.int64)
    assert images["MONOCHROME2"].shape == pixels.shape
    assert np.abs(images["MONOCHROME1"] - images["MONOCHROME2"]).max() <= 1
    # Bone bright after reading (MONOCHROME1 inverted back): the 8-bit image follows the rendering.
    assert np.corrcoef(images["MONOCHROME1"].ravel(), pixels.ravel())[0, 1] > 0.9


def test_bad_settings_and_used_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="difficulty"):
        SynthConfig(difficulty=1.5)
    with pytest.raises(DatasetError, match="n_train"):
        SynthConfig(n_train=0, n_test=0)
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        generate_dataset(tmp_path, SMALL, progress=False)
    with pytest.raises(ValueError, match="unknown lesion classes"):
        sample_image_spec(np.random.default_rng(0), lesion_counts={"Fracture": 1})
