"""The HTTP service for real: uvicorn on a loopback port, httpx as the client."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.service.conftest import require_serve_extra

require_serve_extra()
import cv2  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from spine_edge.results import read_jsonl  # noqa: E402
from spine_edge.service.app import AppConfig  # noqa: E402
from tests.service.conftest import (  # noqa: E402
    Service,
    start_service,
    stop_service,
    write_bright_dicom,
    write_bright_png,
    write_dark_png,
)

RECORD_KEYS = {
    "source",
    "status",
    "error",
    "probability",
    "decision",
    "threshold",
    "detector_ran",
    "detections",
    "image_size",
    "heatmap",
    "overlay",
    "latency_ms",
    "bundle_id",
    "precision",
    "backend",
    "job_id",
    "origin",
    "received",
    "meta",
    "queue_ms",
    "image",
    "urls",
}


def _records(service: Service) -> dict[str, dict]:
    return {r["job_id"]: r for r in read_jsonl(service.out / "results.jsonl")}


def test_predict_multipart_dicom_returns_the_infer_record_and_pictures(service: Service, tmp_path: Path) -> None:
    path = write_bright_dicom(tmp_path / "DOE^JANE.dcm")
    with httpx.Client(base_url=service.url) as client:
        response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")})
        assert response.status_code == 200, response.text
        record = response.json()
        assert set(record) >= RECORD_KEYS
        assert record["status"] == "ok" and record["decision"] is True and record["origin"] == "http"
        assert record["detections"] and record["detections"][0]["class_name"] == "Osteophytes"
        assert record["precision"] == "fp32" and record["backend"] == "onnxruntime/CPUExecutionProvider"
        assert record["meta"] == {"filename": "DOE^JANE.dcm"}
        # The file kept for the record is named by job id: the patient's name stays out of paths and logs.
        assert Path(record["source"]).name == f"{record['job_id']}.dcm"
        stored = _records(service)[record["job_id"]]
        assert stored == {k: v for k, v in record.items() if k != "urls"}
        for name in ("image", "overlay", "heatmap"):
            png = client.get(record["urls"][name])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        job = client.get(f"/v1/jobs/{record['job_id']}").json()
        assert job["status"] == "done" and job["record"]["job_id"] == record["job_id"]


def test_raw_body_png_negative_has_only_the_image_picture(service: Service, tmp_path: Path) -> None:
    body = write_dark_png(tmp_path / "dark.png").read_bytes()
    with httpx.Client(base_url=service.url) as client:
        record = client.post("/v1/predict", content=body, headers={"content-type": "image/png"}).json()
        assert record["status"] == "ok" and record["decision"] is False and record["detections"] == []
        assert record["urls"]["image"] and record["urls"]["overlay"] is None and record["urls"]["heatmap"] is None
        assert client.get(f"/v1/jobs/{record['job_id']}/heatmap.png").status_code == 404


@pytest.mark.parametrize(
    ("body", "headers", "status", "phrase"),
    [
        (b"scanned on ward 3", {"content-type": "application/octet-stream"}, 422, "not an image"),
        (b"", {"content-type": "application/dicom"}, 400, "empty"),
        (b"a=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "multipart"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason(
    service: Service, body: bytes, headers: dict, status: int, phrase: str
) -> None:
    response = httpx.post(f"{service.url}/v1/predict", content=body, headers=headers)
    assert response.status_code == status
    payload = response.json()
    assert phrase in (payload.get("error") or payload.get("detail") or "")
    assert "Traceback" not in response.text


def test_form_without_a_file_is_400(service: Service) -> None:
    response = httpx.post(f"{service.url}/v1/predict", data={"note": "x"}, files={"other": ("", b"")})
    assert response.status_code in (400, 422)
    response = httpx.post(
        f"{service.url}/v1/predict",
        content=b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400 and "no file" in response.json()["detail"]


def test_async_job_then_poll(service: Service, tmp_path: Path) -> None:
    path = write_bright_png(tmp_path / "b.png")
    with httpx.Client(base_url=service.url) as client:
        accepted = client.post("/v1/jobs", files={"file": (path.name, path.read_bytes())})
        assert accepted.status_code == 202
        job_id = accepted.json()["job_id"]
        service.worker.get(job_id).wait(30)
        job = client.get(accepted.json()["url"]).json()
        assert job["status"] == "done" and job["record"]["decision"] is True
        assert client.get("/v1/jobs/not-a-job").status_code == 404
        recent = client.get("/v1/results", params={"limit": 3}).json()["results"]
        assert recent[0]["job_id"] == job_id
        assert client.get("/v1/results", params={"limit": 0}).status_code == 400


def test_health_ready_and_metrics(service: Service) -> None:
    with httpx.Client(base_url=service.url) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and ready["backend"] == "onnxruntime/CPUExecutionProvider"
        assert ready["precision"] == "fp32" and ready["threshold"] == 0.5
        text = client.get("/metrics").text
    assert 'spine_edge_results_total{origin="http",status="ok"}' in text
    assert "spine_edge_queue_depth" in text and "spine_edge_queue_rejections_total" in text
    assert 'spine_edge_stage_seconds_bucket{le="0.005",stage="classifier"}' in text
    assert 'spine_edge_model_info{backend="onnxruntime/CPUExecutionProvider"' in text


def test_upload_over_the_limit_is_413_and_leaves_nothing(bundle: Path, tmp_path: Path) -> None:
    service = start_service(bundle, tmp_path / "out", AppConfig(max_upload_bytes=1000))
    try:
        big = b"\0" * 5000
        with_length = httpx.post(f"{service.url}/v1/predict", content=big)
        assert with_length.status_code == 413 and "1000 bytes" in with_length.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(5):
                yield b"\0" * 1000

        streamed = httpx.post(f"{service.url}/v1/predict", content=chunks())
        assert streamed.status_code == 413
        assert not list((service.out / "inbox").glob("*")) if (service.out / "inbox").exists() else True
        assert read_jsonl(service.out / "results.jsonl") == []
    finally:
        stop_service(service)


def test_token_is_required_on_every_api_request(bundle: Path, tmp_path: Path) -> None:
    service = start_service(bundle, tmp_path / "out", AppConfig(token="s3cret-token"))
    try:
        with httpx.Client(base_url=service.url) as client:
            for path in ("/healthz", "/readyz", "/metrics", "/v1/results"):
                response = client.get(path)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.get("/readyz", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/readyz", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
            assert client.get("/").status_code == 200  # the page shell holds no data; it asks for the token
            assert client.get("/static/app.js").status_code == 200
    finally:
        stop_service(service)


def test_full_queue_answers_503_with_retry_after_and_no_record(bundle: Path, tmp_path: Path) -> None:
    service = start_service(bundle, tmp_path / "out", queue_size=1)
    body = write_bright_png(tmp_path / "b.png").read_bytes()
    held, gate = threading.Event(), threading.Event()

    def hold(job: object, record: dict) -> None:  # a listener runs on the worker thread
        held.set()
        gate.wait(30)

    try:
        # Hold the worker on its first job so the queue fills deterministically.
        service.worker.add_listener(hold)
        with httpx.Client(base_url=service.url) as client:
            first = client.post("/v1/jobs", content=body).json()["job_id"]
            assert held.wait(30)  # the worker thread now waits on the gate
            second = client.post("/v1/jobs", content=body)
            assert second.status_code == 202
            third = client.post("/v1/predict", content=body)
            assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
            assert "queue is full" in third.json()["detail"]
            gate.set()
            service.worker.get(second.json()["job_id"]).wait(30)
            text = client.get("/metrics").text
        ids = [r["job_id"] for r in read_jsonl(service.out / "results.jsonl")]
        assert sorted(ids) == sorted([first, second.json()["job_id"]])
        assert len(list((service.out / "inbox").iterdir())) == 2  # the refused upload was removed
        assert "spine_edge_queue_rejections_total 1.0" in text
    finally:
        gate.set()
        stop_service(service)


def test_restart_keeps_every_answered_record(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    body = write_bright_png(tmp_path / "b.png").read_bytes()
    service = start_service(bundle, out)
    answered = [httpx.post(f"{service.url}/v1/predict", content=body).json()["job_id"] for _ in range(3)]
    stop_service(service)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"source": "cut sh')  # a crash in the middle of a line
    service = start_service(bundle, out)
    try:
        recent = httpx.get(f"{service.url}/v1/results", params={"limit": 10}).json()["results"]
        assert [r["job_id"] for r in recent] == answered[::-1]
        job = httpx.get(f"{service.url}/v1/jobs/{answered[0]}").json()
        assert job["status"] == "done"
        assert httpx.get(f"{service.url}{job['record']['urls']['image']}").status_code == 200
        lines = (out / "results.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line) for line in lines)
    finally:
        stop_service(service)


def test_a_refused_image_is_answered_with_its_reason_and_counted(service: Service, tmp_path: Path) -> None:
    thumbnail = tmp_path / "thumb.png"
    cv2.imwrite(str(thumbnail), np.full((64, 64), 90, np.uint8))  # the guard refuses thumbnails
    with httpx.Client(base_url=service.url) as client:
        response = client.post("/v1/predict", content=thumbnail.read_bytes(), headers={"content-type": "image/png"})
        assert response.status_code == 200  # read fine; the bundle must not judge it: an answer, not a client error
        record = response.json()
        assert record["status"] == "refused" and record["refusal"]["code"] == "size"
        assert record["probability"] is None and record["decision"] is None
        text = client.get("/metrics").text
    assert 'spine_edge_results_total{origin="http",status="refused"}' in text
    assert 'spine_edge_refusals_total{code="size"}' in text


def test_a_client_that_disconnects_leaves_no_half_result(service: Service, tmp_path: Path) -> None:
    import socket
    import time

    body = write_bright_png(tmp_path / "b.png").read_bytes()
    host, port = service.url.removeprefix("http://").split(":")
    inbox = service.out / "inbox"
    before = {r["job_id"] for r in read_jsonl(service.out / "results.jsonl")}
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    # Gone halfway through the upload: the partial file is removed and no job exists.
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while any(p.name.endswith(".part") for p in inbox.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in inbox.iterdir() if p.name.endswith(".part")]

    # Gone after the whole upload, before the answer: the result is still recorded, exactly once.
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
    deadline = time.monotonic() + 10
    while len(read_jsonl(service.out / "results.jsonl")) == len(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    new = [r for r in read_jsonl(service.out / "results.jsonl") if r["job_id"] not in before]
    assert len(new) == 1 and new[0]["status"] == "ok"
    time.sleep(0.3)
    assert len([r for r in read_jsonl(service.out / "results.jsonl") if r["job_id"] not in before]) == 1
