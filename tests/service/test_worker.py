"""InferenceWorker: the one queue every way in shares (HTTP, DICOM listener, watch folder)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from spine_edge.errors import SpineEdgeError
from spine_edge.service.worker import (
    DuplicateJobError,
    InferenceWorker,
    Job,
    QueueFull,
    WorkerConfig,
    WorkerNotRunning,
)
from tests.service.conftest import cascade_config, write_bright_png, write_dark_png


def test_record_is_on_disk_before_on_done_and_jobs_are_batched(bundle: Path, tmp_path: Path) -> None:
    bright, dark = write_bright_png(tmp_path / "b.png"), write_dark_png(tmp_path / "d.png")
    seen_on_disk: list[bool] = []
    held, gate = threading.Event(), threading.Event()
    with InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "out", queue_size=4)) as worker:

        def on_done(record: dict) -> None:
            lines = (worker.out / "results.jsonl").read_text().splitlines()
            seen_on_disk.append(any(json.loads(line)["job_id"] == record["job_id"] for line in lines))

        def hold(job: Job, record: dict) -> None:  # a listener runs on the worker thread
            if job.id == "hold":
                held.set()
                gate.wait(30)

        worker.add_listener(hold)
        worker.submit(bright, origin="test", job_id="hold")
        assert held.wait(30)  # the worker thread now waits on the gate
        jobs = [
            worker.submit(p, origin="dicom", meta={"calling_ae": "MODALITY1"}, on_done=on_done)
            for p in (bright, dark, bright, dark)
        ]
        assert [j.status for j in jobs] == ["queued"] * 4
        with pytest.raises(QueueFull, match="queue is full") as full:
            worker.submit(bright, origin="dicom")
        assert full.value.retry_after >= 1
        gate.set()
        records = [job.wait(30) for job in jobs]
        assert all(job.status == "done" for job in jobs)
        assert [r["decision"] for r in records] == [True, False, True, False]
        assert records[0]["meta"] == {"calling_ae": "MODALITY1"} and records[0]["origin"] == "dicom"
        assert seen_on_disk == [True] * 4
        assert [r["job_id"] for r in worker.recent(2)] == [jobs[3].id, jobs[2].id]
        assert worker.get(jobs[0].id) is jobs[0]
        assert jobs[0].wait_pictures(10) and (worker.out / records[0]["heatmap"]).is_file()
        stats = worker.stats()
        assert (stats.submitted, stats.rejected, stats.results) == (5, 1, {"ok": 5})


def test_ids_are_checked_and_a_failing_callback_does_not_stop_the_worker(bundle: Path, tmp_path: Path) -> None:
    image = write_bright_png(tmp_path / "b.png")
    with InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "out")) as worker:
        worker.submit(image, origin="test", job_id="1.2.840.113619.2.55", on_done=lambda r: 1 / 0).wait(30)
        with pytest.raises(DuplicateJobError):
            worker.submit(image, origin="test", job_id="1.2.840.113619.2.55")
        with pytest.raises(ValueError, match="job id"):
            worker.submit(image, origin="test", job_id="../escape")
        missing = worker.submit(tmp_path / "gone.png", origin="test").wait(30)
        assert missing is not None and missing["status"] == "error" and "does not exist" in missing["error"]
        assert missing["image"] is None
    with pytest.raises(WorkerNotRunning):
        worker.submit(image, origin="test")


def test_one_output_folder_one_process(bundle: Path, tmp_path: Path) -> None:
    config = WorkerConfig(cascade_config(bundle), tmp_path / "out")
    with InferenceWorker(config), pytest.raises(SpineEdgeError, match="another spine-edge process"):
        InferenceWorker(config).start()
    with InferenceWorker(config) as again:  # released on stop
        assert again.ready


def test_stop_drains_the_queue(bundle: Path, tmp_path: Path) -> None:
    image = write_bright_png(tmp_path / "b.png")
    worker = InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "out", queue_size=8))
    worker.start()
    jobs = [worker.submit(image, origin="test") for _ in range(6)]
    worker.stop()
    assert all(job.record is not None for job in jobs)
    assert not worker.ready


def test_a_refusal_recorded_without_inference_is_counted_and_listed(bundle: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    with InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "out")) as worker:
        worker.add_listener(lambda job, record: seen.append((job.origin, record["status"])))
        refusal = {
            "source": "dicom://MODALITY/1.2.3",
            "status": "refused",
            "error": "CT refused",
            "refusal": {"code": "modality", "reason": "CT refused"},
        }
        written = worker.append_record(refusal, origin="dicom")
        assert written["refusal"]["code"] == "modality" and written["job_id"] and written["image"] is None
        assert worker.recent(1) == [written] and worker.get(written["job_id"]).status == "done"
        assert worker.stats().results == {"refused": 1}
        lines = (worker.out / "results.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [written]
    assert seen == [("dicom", "refused")]


def test_a_worker_that_cannot_record_stops_instead_of_answering_without_a_record(bundle: Path, tmp_path: Path) -> None:
    image = write_bright_png(tmp_path / "b.png")
    worker = InferenceWorker(WorkerConfig(cascade_config(bundle), tmp_path / "out"))
    worker.start()
    try:
        worker.submit(image, origin="test").wait(30)
        # The results file becomes unusable, as on a full or vanished disk.
        worker._writer.close()  # type: ignore[union-attr]
        finished: list[Job] = []
        job = worker.submit(image, origin="test")
        job.add_done_callback(finished.append)
        assert job.wait(30) is None and job.status == "done"
        assert finished == [job]
        assert not worker.ready
        with pytest.raises(WorkerNotRunning):
            worker.submit(image, origin="test")
    finally:
        worker.stop()
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 1
