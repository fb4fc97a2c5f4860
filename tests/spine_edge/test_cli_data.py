"""``spine-edge data synth | prepare | check`` through click's CliRunner, exit codes included."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from spine_edge.cli import EXIT_OK, EXIT_SETUP, EXIT_SOME_INPUTS_FAILED, main


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "vindr"
    result = CliRunner().invoke(
        main,
        [
            "data",
            "synth",
            str(root),
            "--n-train",
            "12",
            "--n-test",
            "4",
            "--seed",
            "1",
            "--scale",
            "0.05",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "wrote 16 synthetic radiographs" in result.stdout
    return root


def test_synth_writes_the_vindr_layout(synth_root: Path) -> None:
    assert len(list((synth_root / "train_images").glob("*.dicom"))) == 12
    assert len(list((synth_root / "test_images").glob("*.dicom"))) == 4
    with open(synth_root / "annotations" / "train.csv", newline="") as f:
        assert len({row["image_id"] for row in csv.DictReader(f)}) == 12


def test_synth_refuses_a_non_empty_folder(synth_root: Path) -> None:
    result = CliRunner().invoke(
        main, ["data", "synth", str(synth_root), "--n-train", "2", "--n-test", "1", "--scale", "0.05"]
    )
    assert result.exit_code == EXIT_SETUP
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_prepare_then_check(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = [
        "data",
        "prepare",
        str(synth_root),
        str(out),
        "--long-side",
        "40",
        "--val-fraction",
        "0.2",
        "--seed",
        "2",
        "--workers",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_OK, result.output
    state = json.loads((out / "prepare.json").read_text())
    assert (state["long_side"], state["val_fraction"], state["seed"]) == (40, 0.2, 2)
    assert sum(state["counts"][s]["images"] for s in ("train", "val", "test")) == 16
    assert "converted 16, already cached 0, failed 0" in result.stdout
    assert f"dataset: {(out / 'dataset.yaml').resolve()}" in result.stdout

    again = CliRunner().invoke(main, args)
    assert again.exit_code == EXIT_OK and "converted 0, already cached 16, failed 0" in again.stdout

    check = CliRunner().invoke(main, ["data", "check", str(synth_root)])
    assert check.exit_code == EXIT_OK, check.output
    train_line = next(line for line in check.stdout.splitlines() if line.startswith("train "))
    assert train_line.split()[1] == "12"
    assert "imbalance (train, most/least frequent class by boxes):" in check.stdout
    assert "problems: none" in check.stdout


def test_check_lists_problems_but_exits_zero(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "vindr"
    shutil.copytree(synth_root, root)
    (root / "train_images" / "stray.dicom").write_bytes(b"not a dicom")
    with open(root / "annotations" / "test.csv", "a", newline="") as f:
        csv.writer(f).writerow(["ghost", "s", "se", "R1", "Broken bone", "1", "1", "5", "5"])
    result = CliRunner().invoke(main, ["data", "check", str(root)])
    assert result.exit_code == EXIT_OK, result.output
    assert "problems: 3" in result.stdout
    for kind in ("unlisted_image: 1", "unknown_class: 1", "missing_image: 1"):
        assert kind in result.stdout


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_prepare_exits_1_when_an_image_cannot_be_read(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "vindr"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "test_images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-200])
    result = CliRunner().invoke(
        main, ["data", "prepare", str(root), str(tmp_path / "cache"), "--long-side", "32", "--workers", "1"]
    )
    assert result.exit_code == EXIT_SOME_INPUTS_FAILED, result.output
    assert "failed 1" in result.stdout and "unreadable_image 1" in result.stdout
    assert "1 image(s) could not be read" in result.stderr


@pytest.mark.parametrize("command", [["data", "check"], ["data", "prepare"]])
def test_missing_folder_is_a_setup_error(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    args = [*command, str(missing)] + ([str(tmp_path / "out")] if command[-1] == "prepare" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_SETUP
    assert result.stderr == f"error: {missing}: dataset folder does not exist; " + result.stderr.split("; ", 1)[1]
    assert "spine-edge data synth" in result.stderr and result.stdout == ""


def test_missing_columns_are_a_setup_error(tmp_path: Path) -> None:
    for folder in ("train_images", "test_images", "annotations"):
        (tmp_path / folder).mkdir()
    (tmp_path / "annotations" / "train.csv").write_text("image_id,lesion_type\n")
    (tmp_path / "annotations" / "test.csv").write_text("image_id,lesion_type\n")
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path)])
    assert result.exit_code == EXIT_SETUP
    assert "train.csv: missing column(s) study_id, series_id, rad_id, xmin, ymin, xmax, ymax" in result.stderr


def test_invalid_option_is_a_usage_error(synth_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "prepare", str(synth_root), str(tmp_path), "--val-fraction", "1.5"])
    assert result.exit_code == 2 and "--val-fraction" in result.stderr
