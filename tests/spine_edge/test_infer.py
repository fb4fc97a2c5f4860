from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spine_edge.cascade import CascadeConfig
from spine_edge.cli import main
from spine_edge.infer import InferConfig, default_output_dir, run_folder
from spine_edge.results import CascadeResult
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.conftest import start_slow_infer
from tests.spine_edge.dicom_factory import BASIC_TEXT_SR, build_test_dataset, write_test_dicom

GOOD_POSITIVE = ("bright.png", "scan.dicom", "sixteen.png")
GOOD_NEGATIVE = ("sub/dark.png", "sub/1.2.826.0.1.3680043.8.498.1")
#: Bad inputs and a phrase their error record must contain.
BAD = {
    "empty.png": "file is empty",
    "truncated.dcm": "truncated",
    "notes.png": "not an image",
    "report.dcm": "no pixel data",
    "cine.dcm": "multi-frame",
    "huge.dcm": "implausibly large",
    "gone.png": "does not exist",
    "pipe.dcm": "not a regular file",
}


def _bright(shape: tuple[int, int], dtype: type = np.uint8, low: int = 10, high: int = 255) -> np.ndarray:
    image = np.full(shape, low, dtype)
    image[: shape[0] // 2, shape[1] // 2 : 3 * shape[1] // 4] = high
    return image


def make_folder(root: Path) -> Path:
    """Good PNGs and DICOMs mixed with every kind of bad input."""
    folder = root / "incoming"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "bright.png"), _bright((128, 256)))
    cv2.imwrite(str(folder / "sixteen.png"), _bright((96, 96), np.uint16, 300, 60000))
    cv2.imwrite(str(folder / "sub/dark.png"), np.full((100, 80), 20, np.uint8))
    write_test_dicom(
        folder / "scan.dicom",
        _bright((120, 100), np.uint16, 100, 4000),
        window=(2048, 4096),
        transfer_syntax="jpeg2000-lossless",
    )
    write_test_dicom(folder / GOOD_NEGATIVE[1], np.full((64, 80), 300, np.uint16), window=(2048, 4096))
    (folder / "empty.png").write_bytes(b"")
    whole = write_test_dicom(folder / "truncated.dcm", _bright((64, 64), np.uint16)).read_bytes()
    (folder / "truncated.dcm").write_bytes(whole[: len(whole) - 3000])
    (folder / "notes.png").write_text("scanned on ward 3, please review\n")
    write_test_dicom(folder / "report.dcm", with_pixels=False, sop_class=BASIC_TEXT_SR)
    write_test_dicom(folder / "cine.dcm", _bright((32, 32), np.uint16), frames=3)
    huge = build_test_dataset(_bright((16, 16), np.uint16))
    huge.Rows, huge.Columns = 60000, 60000
    huge.save_as(folder / "huge.dcm", enforce_file_format=True)
    (folder / "gone.png").symlink_to(folder / "deleted-before-the-run.png")
    os.mkfifo(folder / "pipe.dcm")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_mixed_folder_gets_one_record_per_input(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out), "--batch-size", "3"]
    )
    assert result.exit_code == 1, result.output
    assert "5 ok (3 positive), 8 failed" in result.stdout
    records = {Path(r["source"]).relative_to(folder).as_posix(): r for r in _records(out)}
    assert sorted(records) == sorted([*GOOD_POSITIVE, *GOOD_NEGATIVE, *BAD])
    for name, phrase in BAD.items():
        assert records[name]["status"] == "error" and phrase in records[name]["error"], (name, records[name]["error"])
        assert records[name]["probability"] is None and records[name]["detections"] == []
    for name in GOOD_POSITIVE:
        record = records[name]
        assert record["status"] == "ok" and record["decision"] is True and record["detections"], name
        overlay = cv2.imread(str(out / record["overlay"]))
        heatmap = cv2.imread(str(out / record["heatmap"]))
        assert overlay.shape[:2] == tuple(record["image_size"])
        # The heatmap PNG is the image, plus a colour bar on its right.
        assert heatmap.shape[0] == record["image_size"][0] and heatmap.shape[1] >= record["image_size"][1]
        assert record["overlay"] == f"overlays/{name}.png" and record["heatmap"] == f"heatmaps/{name}.png"
    for name in GOOD_NEGATIVE:
        assert records[name]["status"] == "ok" and records[name]["decision"] is False
        assert records[name]["overlay"] is None and not records[name]["detector_ran"]
    assert records["bright.png"]["detections"][0]["box"] == [112.0, 0.0, 208.0, 80.0]
    with open(out / "results.csv", newline="") as f:
        rows = {Path(r["source"]).relative_to(folder).as_posix(): r for r in csv.DictReader(f)}
    assert rows.keys() == records.keys()
    assert rows["bright.png"]["n_detections"] == "1" and rows["truncated.dcm"]["status"] == "error"
    assert json.loads(rows["bright.png"]["detections"]) == records["bright.png"]["detections"]


def test_resume_skips_finished_inputs_and_retries_failed_ones(bundle: Path, folder: Path, tmp_path: Path) -> None:
    config = InferConfig(folder, out=tmp_path / "out", cascade=CascadeConfig(bundle=bundle, guard=False, batch_size=2))
    first = run_folder(config, progress=False)
    assert (first.found, first.ok, first.failed, first.positive) == (13, 5, 8, 3)
    before = {r["source"]: r for r in _records(first.out)}
    seen: list[str] = []
    second = run_folder(
        InferConfig(folder, out=tmp_path / "out", resume=True, cascade=CascadeConfig(bundle=bundle, guard=False)),
        progress=False,
        on_result=lambda r: seen.append(r.source),
    )
    assert sorted(seen) == sorted(s for s, r in before.items() if r["status"] == "error")
    # ok/failed count this run's inputs; with skipped they add up to every input found.
    assert (second.skipped, second.processed, second.ok, second.failed, second.positive) == (5, 8, 0, 8, 0)
    assert second.adds_up and second.found == 13
    after = _records(second.out)
    assert len(after) == 13 and len({r["source"] for r in after}) == 13
    assert [r for r in after if r["status"] == "ok"] == [r for r in before.values() if r["status"] == "ok"]


def test_interrupted_run_keeps_completed_records(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def stop_after_four(result: CascadeResult, count: list[int] = [0]) -> None:  # noqa: B006
        count[0] += 1
        if count[0] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_folder(
            InferConfig(folder, out=out, cascade=CascadeConfig(bundle=bundle, guard=False, batch_size=3)),
            progress=False,
            on_result=stop_after_four,
        )
    kept = _records(out)
    assert len(kept) == 4
    with open(out / "results.csv", newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == [r["source"] for r in kept]
    report = run_folder(
        InferConfig(folder, out=out, resume=True, cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False
    )
    final = _records(out)
    assert len(final) == len({r["source"] for r in final}) == 13
    assert report.skipped == sum(r["status"] == "ok" for r in kept)


def test_killed_process_loses_nothing_already_written(bundle: Path, tmp_path: Path) -> None:
    run = start_slow_infer(bundle, tmp_path, images=400, records=20)
    command, process, out = run.command, run.process, run.out
    jsonl = out / "results.jsonl"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    lines = jsonl.read_text().split("\n")
    complete = [json.loads(line) for line in lines[:-1]]  # every newline-terminated line is a whole record
    assert 20 <= len(complete) < 400
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(complete)} skipped" in resumed.stdout
    final = _records(out)
    assert len(final) == len({r["source"] for r in final}) == 400


def test_setup_and_usage_errors_have_their_exit_codes(folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        main, ["infer", "--no-guard", str(folder), "--bundle", str(tmp_path / "nobundle"), "-o", str(tmp_path / "o")]
    )
    assert missing.exit_code == 3
    assert "no manifest.json" in missing.output and "spine-edge export" in missing.output
    assert runner.invoke(main, ["infer", "--no-guard", str(tmp_path / "no-such-folder")]).exit_code == 2


def test_all_good_inputs_exit_0_and_outputs_inside_the_folder_are_not_inputs(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clean"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _bright((80, 120)))
    cv2.imwrite(str(folder / "b.png"), np.zeros((80, 120), np.uint8))
    runner = CliRunner()
    args = ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(folder / "results")]
    first = runner.invoke(main, args)
    second = runner.invoke(main, args)
    assert first.exit_code == second.exit_code == 0, second.output
    assert "2 ok (1 positive), 0 failed" in second.stdout
    assert (folder / "results/overlays/a.png.png").is_file()


def test_no_overlays_and_default_output_folder(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _bright((80, 120)))
    seen: list[CascadeResult] = []
    config = InferConfig(folder, overlays=False, cascade=CascadeConfig(bundle=bundle, guard=False))
    report = run_folder(config, progress=False, on_result=seen.append)
    assert report.out == default_output_dir(folder) == tmp_path / "scans_results"
    assert report.positive == 1 and not (report.out / "overlays").exists()
    assert _records(report.out)[0]["heatmap"] is None
    # No heatmap PNG is drawn, so the run does not keep the CAMs either (one rule: InferConfig.cascade_to_load).
    assert config.cascade.heatmaps and not config.cascade_to_load.heatmaps
    assert [r.cam for r in seen] == [None]


def test_jpeg_pictures_from_the_command_line(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _bright((80, 120)))
    out = tmp_path / "out"
    args = ["infer", str(folder), "-o", str(out), "--bundle", str(bundle), "--no-guard", "--picture-format", "jpeg"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = _records(out)[0]
    assert record["overlay"] == "overlays/a.png.jpg" and record["heatmap"] == "heatmaps/a.png.jpg"
    for kind in ("overlay", "heatmap"):
        data = (out / record[kind]).read_bytes()
        assert data[:3] == b"\xff\xd8\xff"  # a JPEG, not a PNG named .jpg
        picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] == 80 and picture.shape[1] >= 120  # heatmap: + colour bar
    bad = CliRunner().invoke(main, [*args[:-1], "gif"])
    assert bad.exit_code == 2 and "png" in bad.output and "jpeg" in bad.output


def test_pictures_are_drawn_behind_the_cascade_in_order_and_bounded() -> None:
    import threading

    from spine_edge.infer import pictures_in_order

    drawing, most, lock = [0], [0], threading.Lock()
    produced: list[int] = []

    def results():  # type: ignore[no-untyped-def]
        for i in range(20):
            produced.append(i)
            yield i

    def draw(i):  # type: ignore[no-untyped-def]
        with lock:
            drawing[0] += 1
            most[0] = max(most[0], len(produced) - i)  # results the drawer is behind by
        time.sleep(0.002 * (i % 3))
        with lock:
            drawing[0] -= 1
        return i * 10

    assert list(pictures_in_order(results(), draw, depth=3)) == [i * 10 for i in range(20)]  # type: ignore[arg-type]
    assert most[0] <= 3 + 1  # never more than `depth` results wait for their pictures

    def failing(i):  # type: ignore[no-untyped-def]
        if i == 5:
            raise OSError(28, "No space left on device")
        return i

    out = pictures_in_order(iter(range(10)), failing, depth=2)  # type: ignore[arg-type]
    assert [next(out) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(OSError, match="No space"):
        next(out)  # the error surfaces in order, after every earlier result
