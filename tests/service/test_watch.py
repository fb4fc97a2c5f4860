"""The watch folder: files dropped while it runs, a slow copy, a kill -9 and a restart; never twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from spine_edge.errors import SpineEdgeError
from spine_edge.results import read_jsonl
from spine_edge.service.worker import InferenceWorker, WorkerConfig
from spine_edge.watch import WATCHED_DIR, FolderWatcher, WatchConfig
from tests.service.conftest import cascade_config, write_bright_dicom, write_bright_png, write_dark_png


def _start(bundle: Path, folder: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-c",
        "from spine_edge.cli import main; main()",
        "watch",
        str(folder),
        str(out),
        "--bundle",
        str(bundle),
        "--precision",
        "fp32",
        "--backend",
        "onnxruntime",
        "--provider",
        "cpu",
        "--threads",
        "1",
        "--interval",
        "0.1",
        "--settle",
        "0.4",
    ]
    with open(log, "ab") as sink:  # a file, not a pipe: nobody reads the logs while it runs
        return subprocess.Popen(command, stdout=sink, stderr=sink)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def _records(out: Path) -> list[dict]:
    return read_jsonl(out / "results.jsonl")


def test_watch_processes_each_dropped_file_once_across_a_kill(bundle: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "ward").mkdir(parents=True)
    write_bright_png(folder / "early.png")  # there before the watcher starts
    process = _start(bundle, folder, out, tmp_path / "watch.log")
    try:
        _wait_for(lambda: len(_records(out)) == 1)
        write_dark_png(folder / "ward" / "dark.png")
        write_bright_dicom(folder / "IM0001.dcm")
        # A slow copy: half the file, a pause longer than a scan, then the rest. Taken only when complete.
        whole = write_bright_dicom(tmp_path / "slow.dcm").read_bytes()
        with open(folder / "slow.dcm", "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            for _ in range(3):
                time.sleep(0.25)
                f.write(b"")
                os.utime(f.fileno())
            f.write(whole[len(whole) // 2 :])
        (folder / ".hidden.dcm").write_bytes(whole)  # copy tools' temporary names are never taken
        (folder / "copying.dcm.part").write_bytes(whole)
        _wait_for(lambda: len(_records(out)) == 4)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    write_bright_png(folder / "ward" / "dark.png")  # the same name again, while it is down: a new input
    write_bright_png(folder / "late.png")
    process = _start(bundle, folder, out, tmp_path / "watch.log")
    try:
        _wait_for(lambda: len(_records(out)) == 6)
        time.sleep(1.0)  # several more scans: nothing is taken or processed again
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "watch.log").read_text()

    records = _records(out)
    assert len(records) == 6
    assert all(r["status"] == "ok" and r["origin"] == "watch" for r in records), records
    assert Counter(r["source"] for r in records).most_common(1)[0][1] == 1
    assert sorted(r["meta"]["relative"] for r in records) == sorted(
        ["early.png", "ward/dark.png", "IM0001.dcm", "slow.dcm", "ward/dark~1.png", "late.png"]
    )
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [".hidden.dcm", "copying.dcm.part"]
    slow = next(r for r in records if r["meta"]["relative"] == "slow.dcm")
    assert slow["decision"] is True  # read whole, not truncated


def test_taken_files_without_a_record_are_processed_after_a_restart(bundle: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    taken = out / WATCHED_DIR
    taken.mkdir(parents=True)
    config = WorkerConfig(cascade_config(bundle), out)
    with InferenceWorker(config) as worker:
        done = write_bright_png(taken / "done.png")
        worker.submit(done, origin="watch").wait(30)
    pending = write_dark_png(taken / "pending.png")  # taken, then the process died before its record
    with InferenceWorker(config) as worker:
        watcher = FolderWatcher(WatchConfig(folder, interval=0.1, settle=0.0), worker)
        assert watcher.recover() == 1
        assert watcher.scan_once() == 1
        _wait_for(lambda: len(_records(out)) == 2)
    sources = [r["source"] for r in _records(out)]
    assert sources == [str(done), str(pending)]


def test_output_inside_the_drop_folder_is_refused(bundle: Path, tmp_path: Path) -> None:
    with (
        InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "in" / "out")) as worker,
        pytest.raises(SpineEdgeError, match="overlap"),
    ):
        FolderWatcher(WatchConfig(tmp_path / "in"), worker)
