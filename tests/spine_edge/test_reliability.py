"""Reliability of a folder run (issue 11): one run per output folder, odd names, full or read-only disks,
SIGTERM, stale temporary files, mixed resumes, single files, earlier outputs inside the input, strict JSON."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import spine_edge.results
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_DISK_FULL, EXIT_SETUP, EXIT_USAGE, main
from spine_edge.imageio import ScanResult
from spine_edge.infer import NAME_MAX, InferConfig, is_output_dir, run_folder
from spine_edge.io_utils import remove_stale_temp_files, write_bytes_atomic
from spine_edge.results import JsonlWriter, read_jsonl, record_line
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.conftest import CLI, start_slow_infer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _bright(shape: tuple[int, int] = (64, 64), noise: bool = False) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, shape, dtype=np.uint8) if noise else np.full(shape, 10, np.uint8)
    image[: shape[0] // 2, shape[1] // 2 : 3 * shape[1] // 4] = 255
    return image


def _png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", image)
    assert ok
    with open(os.fsencode(path), "wb") as f:  # bytes path: works for names that are not UTF-8
        f.write(data.tobytes())
    return path


def _folder(root: Path, count: int = 4) -> Path:
    folder = root / "incoming"
    for i in range(count):
        _png(folder / f"{i:04d}.png", _bright() if i % 2 == 0 else np.zeros((64, 64), np.uint8))
    return folder


def _jsonl_lines(out: Path) -> list[dict]:
    text = (out / "results.jsonl").read_bytes()
    assert text == b"" or text.endswith(b"\n"), "the last record is torn"
    return [json.loads(line) for line in text.splitlines()]


def _csv_sources(out: Path) -> list[str]:
    with open(out / "results.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [row["source"] for row in csv.DictReader(f)]


def _infer(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "-q", "infer", "--no-guard", *map(str, args)], capture_output=True, text=True, timeout=180
    )


# ------------------------------------------------------------------------------------------ lock


def test_a_second_run_into_the_same_output_folder_is_refused_naming_the_holder(bundle: Path, tmp_path: Path) -> None:
    folder, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from spine_edge.infer import lock_output\n"
            "with lock_output(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(
            main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
        )
        assert result.exit_code == EXIT_SETUP, result.output
        assert f"another spine-edge run is writing here (pid={holder.pid} host=" in result.output
        assert "choose another output folder with -o" in result.output
        assert not (out / "results.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the lock with its process
        holder.wait()
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"pid={os.getpid()}" in (out / ".lock").read_text()


def test_the_summary_adds_up_and_names_folders_that_could_not_be_read(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    (folder / "thumb.gif").write_bytes(b"GIF89a" + b"\0" * 32)
    blocked = folder / "locked-away"
    real_scan = spine_edge.infer.scan_folder

    def scan_with_a_blocked_folder(path: Path) -> ScanResult:
        scan = real_scan(path)
        return ScanResult(scan.images, scan.unsupported, ((blocked, "Permission denied"),))

    monkeypatch.setattr(spine_edge.infer, "scan_folder", scan_with_a_blocked_folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    )
    assert result.exit_code == 1, result.output  # inputs may be missing: not "everything processed"
    assert "5 found: 4 ok (2 positive), 1 failed" in result.stdout
    assert "1 sub-folder(s) could not be read" in result.stdout
    gif = next(r for r in _jsonl_lines(out) if r["source"].endswith("thumb.gif"))
    assert gif["status"] == "error" and "GIF" in gif["error"]
    report = run_folder(
        InferConfig(folder, out=out, resume=True, cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False
    )
    assert (report.found, report.skipped, report.ok, report.failed, report.refused) == (5, 4, 0, 1, 0)
    assert report.adds_up and report.unreadable_dirs == ((blocked, "Permission denied"),)


# ------------------------------------------------------------------------------------------ names


def test_long_and_non_utf8_names_get_records_and_survive_csv_and_resume(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "usb"
    near_limit = "a" * (NAME_MAX - 5) + ".png"  # 255 bytes: its overlay name would pass the limit
    fits = "b" * (NAME_MAX - 9) + ".png"  # 250 bytes: overlay name fits, an old-style temp name did not
    not_utf8 = os.fsdecode(b"scan-\xff\xfe-latin1-\xe9.png")
    for name in (near_limit, fits, not_utf8):
        _png(folder / name, _bright())
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = {Path(r["source"]).name: r for r in _jsonl_lines(out)}
    assert sorted(records) == sorted([near_limit, fits, not_utf8])
    assert all(r["status"] == "ok" and r["decision"] for r in records.values())
    assert records[fits]["overlay"] == f"overlays/{fits}.png"
    shortened = records[near_limit]["overlay"]
    assert len(os.fsencode(Path(shortened).name)) <= NAME_MAX and (out / shortened).is_file()
    assert (out / os.fsencode(records[not_utf8]["overlay"]).decode("utf-8", "surrogateescape")).is_file()
    # The CSV holds the name's original bytes; results.jsonl escapes them and reads back the same str.
    assert b"scan-\xff\xfe-latin1-\xe9.png" in (out / "results.csv").read_bytes()
    assert sorted(Path(s).name for s in _csv_sources(out)) == sorted(records)
    again = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out), "--resume"]
    )
    assert again.exit_code == 0 and "3 skipped" in again.stdout, again.output


def test_an_output_that_cannot_be_written_becomes_that_inputs_record(bundle: Path, tmp_path: Path) -> None:
    folder, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "overlays").write_text("a file where the overlay folder should be")
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "4 found: 2 ok (0 positive), 2 failed" in result.stdout  # positive counts ok records only
    records = _jsonl_lines(out)
    failed = [r for r in records if r["status"] == "error"]
    assert len(records) == 4 and len(failed) == 2
    assert all("could not be written" in r["error"] and r["probability"] is not None for r in failed)


# ------------------------------------------------------------------------------------------ disk


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the simulated ENOSPC test covers it"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_cleanly_with_exit_5_keeping_every_record(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    for i in range(6):
        _png(folder / f"{i}.png", _bright((600, 600), noise=True))  # noisy: overlays of about 700 kB each
    with _tmpfs(tmp_path / "small-disk", "2m") as disk:
        out = disk / "out"
        run = _infer(folder, "--bundle", bundle, "-o", out, "--batch-size", "1", "--workers", "1")
        assert run.returncode == EXIT_DISK_FULL, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk is full" in errors[0] and "--resume" in errors[0], run.stderr
        assert "Traceback" not in run.stderr
        records = _jsonl_lines(out)
        assert 1 <= len(records) < 6
        assert not list(out.rglob(".spine-edge.*.tmp"))
        if (out / "results.csv").exists():  # written when there was still room for it
            assert len(_csv_sources(out)) == len(records)


def test_a_short_write_of_the_jsonl_is_cut_back_and_stops_the_run_with_exit_5(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, out = _folder(tmp_path, count=6), tmp_path / "out"
    real_write = os.write
    calls = {"jsonl": 0}

    def write_until_full(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            return real_write(fd, data)
        calls["jsonl"] += 1
        if calls["jsonl"] < 4:
            return real_write(fd, data)
        return real_write(fd, data[: len(data) // 2])  # the disk filled in the middle of the line

    monkeypatch.setattr(spine_edge.results.os, "write", write_until_full)
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    )
    monkeypatch.undo()
    assert result.exit_code == EXIT_DISK_FULL, result.output
    assert "disk is full" in result.output and "Traceback" not in result.output
    assert len(_jsonl_lines(out)) == 3  # the torn fourth line was cut back
    assert len(_csv_sources(out)) == 3
    resumed = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out), "--resume"]
    )
    assert resumed.exit_code == 0 and "3 skipped" in resumed.stdout, resumed.output
    assert len(_jsonl_lines(out)) == 6


def test_a_read_only_output_folder_is_refused_before_models_load(bundle: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with _tmpfs(tmp_path / "ro-disk", "1m") as disk:
        (disk / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        run = _infer(folder, "--bundle", tmp_path / "no-bundle-needed", "-o", disk / "out")
    assert run.returncode == EXIT_SETUP, run.stderr
    assert "output folder cannot be written (Read-only file system)" in run.stderr
    assert "manifest" not in run.stderr  # refused before the bundle was even opened


def test_a_full_disk_at_the_start_is_refused_before_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = _folder(tmp_path)
    monkeypatch.setattr(spine_edge.infer.os, "fsync", no_room)
    result = CliRunner().invoke(
        main, ["infer", "--no-guard", str(folder), "--bundle", str(tmp_path / "none"), "-o", str(tmp_path / "o")]
    )
    monkeypatch.undo()
    assert result.exit_code == EXIT_DISK_FULL and "disk is full" in result.output, result.output


def test_a_torn_last_line_is_tolerated_and_repaired(tmp_path: Path) -> None:
    jsonl = tmp_path / "results.jsonl"
    whole = record_line({"source": "/a.png", "status": "ok", "bundle_id": "b", "precision": "fp32"})
    jsonl.write_text(whole + whole.replace("/a.png", "/b.png")[:20])
    assert [r["source"] for r in read_jsonl(jsonl)] == ["/a.png"]
    with JsonlWriter(jsonl, keep=read_jsonl(jsonl)) as writer:
        writer.write({"source": "/c.png", "status": "error"})
    assert [json.loads(line)["source"] for line in jsonl.read_text().splitlines()] == ["/a.png", "/c.png"]


def test_nan_and_infinity_are_never_written_as_bare_tokens(tmp_path: Path) -> None:
    line = record_line({"source": "x", "status": "ok", "probability": float("nan"), "threshold": float("inf")})
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token}")) == {
        "source": "x",
        "status": "ok",
        "probability": None,
        "threshold": None,
    }


# ------------------------------------------------------------------------------------------ signals, temp files


def test_sigterm_is_handled_like_ctrl_c_with_exit_143_and_a_csv(bundle: Path, tmp_path: Path) -> None:
    run = start_slow_infer(bundle, tmp_path, images=300, records=10)
    process, out = run.process, run.out
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "interrupted: finished records are kept; rerun with --resume to continue" in stderr
    assert "Traceback" not in stderr
    records = _jsonl_lines(out)
    assert 10 <= len(records) < 300
    assert _csv_sources(out) == [r["source"] for r in records]


def test_temp_files_of_a_killed_run_are_removed_by_the_next_run(bundle: Path, tmp_path: Path) -> None:
    folder, out = _folder(tmp_path), tmp_path / "out"
    orphan = out / "overlays" / "sub" / ".spine-edge.k9x_2abc.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a png")
    unrelated = out / "overlays" / ".notes.tmp"
    unrelated.write_text("not ours")
    report = run_folder(InferConfig(folder, out=out, cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False)
    assert report.stale_temp_files == 1 and not orphan.exists() and unrelated.exists()
    assert remove_stale_temp_files(out) == 0


def test_temp_names_are_short_and_fixed_whatever_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst))[1])
    write_bytes_atomic(tmp_path / ("c" * 250), b"x")
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].startswith(".spine-edge.") and len(seen[0]) == len(".spine-edge.12345678.tmp")


# ------------------------------------------------------------------------------------------ resume, inputs


def test_resume_over_another_bundle_or_precision_is_refused_unless_asked(bundle: Path, tmp_path: Path) -> None:
    folder, out = _folder(tmp_path), tmp_path / "out"
    args = ["-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    records = _jsonl_lines(out)
    records[0] |= {"bundle_id": "0ther0bundle", "precision": "int8"}
    (out / "results.jsonl").write_text("".join(record_line(r) for r in records))
    refused = CliRunner().invoke(main, [*args, "--resume"])
    assert refused.exit_code == EXIT_USAGE, refused.output
    assert "1 by bundle 0ther0bundle at int8" in refused.output and "--resume-any" in refused.output
    assert _jsonl_lines(out) == records  # nothing was rewritten
    mixed = CliRunner().invoke(main, [*args, "--resume-any"])
    assert mixed.exit_code == 0 and "4 skipped" in mixed.stdout, mixed.output


def test_a_single_file_is_accepted_as_the_input(bundle: Path, tmp_path: Path) -> None:
    image = _png(tmp_path / "one" / "IM0001.png", _bright())
    report = run_folder(InferConfig(image, cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False)
    assert (report.found, report.ok, report.positive) == (1, 1, 1)
    assert report.out == tmp_path / "one" / "IM0001.png_results"
    assert (report.out / "overlays" / "IM0001.png.png").is_file()
    result = CliRunner().invoke(
        main, ["-q", "infer", "--no-guard", str(image), "--bundle", str(bundle), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0 and "1 found: 1 ok" in result.stdout, result.output


def test_earlier_output_folders_inside_the_input_are_not_inputs(bundle: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    first = run_folder(
        InferConfig(folder, out=folder / "run1", cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False
    )
    assert first.found == 4 and list((folder / "run1" / "overlays").glob("*.png"))
    (folder / "notes").mkdir()
    (folder / "notes" / "results.jsonl").write_text("my own log, not spine-edge's\n")
    _png(folder / "notes" / "x.png", _bright())
    second = run_folder(
        InferConfig(folder, out=tmp_path / "run2", cascade=CascadeConfig(bundle=bundle, guard=False)), progress=False
    )
    assert second.found == 5 and second.output_dirs == (folder / "run1",)
    assert is_output_dir(folder / "run1") and not is_output_dir(folder / "notes")
    into_itself = InferConfig(folder / "notes", out=folder / "notes", cascade=CascadeConfig(bundle=bundle, guard=False))
    assert run_folder(into_itself, progress=False).found == 1
    assert (folder / "notes" / "overlays" / "x.png.png").is_file()
    assert run_folder(into_itself, progress=False).found == 1  # its own overlays are not inputs


def test_onnxruntime_telemetry_is_switched_off_on_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from spine_edge.backends.onnxruntime import import_onnxruntime

    calls: list[bool] = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(True), raising=False)
    assert import_onnxruntime() is onnxruntime and calls == [True]


def test_bench_baseline_never_takes_checkpoints_from_the_manifest() -> None:
    from spine_edge.benchmarks.baseline_torch import baseline_checkpoints

    assert baseline_checkpoints(None) is None
    assert baseline_checkpoints(Path("/trusted/ckpt")) == Path("/trusted/ckpt")


def test_the_read_ahead_holds_at_most_its_byte_budget_in_flight(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import spine_edge.cascade
    import spine_edge.imageio
    from spine_edge.cascade import Cascade

    folder = _folder(tmp_path, count=8)
    active, peak, lock = [0], [0], threading.Lock()
    real_plan = spine_edge.imageio._plan_read

    def costly_plan(path: Path, target: int | None) -> object:
        planned = real_plan(path, target)

        def slow_decode() -> object:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            try:
                return planned.decode()
            finally:
                with lock:
                    active[0] -= 1

        return spine_edge.imageio._PlannedRead(600, slow_decode)  # as if each decode held 600 bytes

    monkeypatch.setattr(spine_edge.imageio, "_plan_read", costly_plan)
    paths = sorted(folder.glob("*.png"))

    def peak_reads(budget: int) -> int:
        peak[0] = 0
        with Cascade.from_bundle(bundle, read_workers=4, batch_size=4, read_ahead_bytes=budget, guard=False) as cascade:
            assert [r.status for r in cascade.predict_many(paths)] == ["ok"] * 8
        return peak[0]

    assert peak_reads(1000) == 1  # room for one 600-byte read at a time, whatever the workers
    assert peak_reads(10_000) > 1  # the same workers overlap when the budget allows
