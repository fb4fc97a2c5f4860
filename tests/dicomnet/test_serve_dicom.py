"""``spine-edge serve --dicom-port``: HTTP uploads and DICOM C-STORE in one process, on one results.jsonl.

The service runs as a real process (``--port 0 --dicom-port 0``) on the tiny bundle; dcmtk sends
the DICOM, httpx the uploads. A restart on the same folder then checks that the DICOM side's
resume and replay leave the HTTP uploads alone (they have their own inbox).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.service.conftest import require_serve_extra

require_serve_extra()
import httpx  # noqa: E402

from spine_edge.dicom_writer import DicomUIDs  # noqa: E402
from spine_edge.dicomnet.kiosk import INBOX_DIR as DICOM_INBOX_DIR  # noqa: E402
from spine_edge.dicomnet.sr import read_sr_findings  # noqa: E402
from spine_edge.dicomnet.writer import SR_NAME  # noqa: E402
from spine_edge.results import read_jsonl  # noqa: E402
from spine_edge.service.app import INBOX_DIR as HTTP_INBOX_DIR  # noqa: E402
from tests.dicomnet.programs import dcmtk, spine_edge_program  # noqa: E402
from tests.service.conftest import write_bright_dicom, write_bright_png  # noqa: E402
from tests.spine_edge.bundle_factory import make_bundle  # noqa: E402
from tests.spine_edge.radiograph_factory import radiograph_pixels, write_radiograph_dicom  # noqa: E402

MODEL = ["--precision", "fp32", "--backend", "onnxruntime", "--provider", "cpu", "--threads", "1"]
STUDY = "1.2.826.0.1.3680043.8.498.700"
UID = STUDY + ".1.1"
PATIENT = {"PatientID": "P-9", "PatientName": "Doe^Dana", "StudyDate": "20260103"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _radiograph(path: Path) -> Path:
    """A DX the tiny bundle calls abnormal, with a study and a patient."""
    uids = DicomUIDs(UID, STUDY, STUDY + ".1")
    return write_radiograph_dicom(path, radiograph_pixels((240, 200), abnormal=True), uids=uids, tags=PATIENT)


class _Serve:
    """``spine-edge serve --port 0 --dicom-port 0`` as a process, with the addresses it printed."""

    def __init__(self, bundle: Path, out: Path) -> None:
        self.log_path = out.parent / f"{out.name}-serve.log"
        start = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        command = [spine_edge_program(), "serve", "--bundle", str(bundle), *MODEL, "-o", str(out)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--port", "0", "--dicom-port", "0"], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while not (found := self._started(start)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"spine-edge serve did not start:\n{self.log()}")
            time.sleep(0.05)
        self.url, self.dicom_port = found

    def _started(self, start: int) -> tuple[str, int] | None:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")[start:]
        http = re.search(r"serving on (http://\S+)/", text)
        dicom = re.search(r"listening for DICOM as SPINEEDGE@127\.0\.0\.1:(\d+)", text)
        return (http.group(1), int(dicom.group(1))) if http and dicom else None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _wait_records(out: Path, count: int, serve: _Serve, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(records := read_jsonl(out / "results.jsonl")) < count:
        if time.monotonic() > deadline or serve.process.poll() is not None:
            raise AssertionError(f"{len(records)} of {count} records after {timeout} s:\n{serve.log()}")
        time.sleep(0.05)
    return records


def test_http_uploads_and_a_c_store_in_one_serve_process_get_one_record_each(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = _radiograph(tmp_path / "dx.dcm")
    serve = _Serve(bundle, out)
    try:
        ready = httpx.get(f"{serve.url}/readyz").json()
        assert ready["dicom"] == {"ae_title": "SPINEEDGE", "host": "127.0.0.1", "port": serve.dicom_port}
        port = str(serve.dicom_port)
        assert dcmtk("echoscu", "-aet", "MODALITY", "-aec", "SPINEEDGE", "127.0.0.1", port).returncode == 0
        sent = dcmtk("storescu", "-xv", "-aet", "MODALITY", "-aec", "SPINEEDGE", "127.0.0.1", port, str(image))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        png = write_bright_png(tmp_path / "upload.png").read_bytes()
        uploaded = httpx.post(f"{serve.url}/v1/predict", files={"file": ("upload.png", png)}, timeout=60).json()
        # A DICOM over HTTP too: the kind of file the DICOM side's restart logic looks for in its inbox.
        body = write_bright_dicom(tmp_path / "upload.dcm").read_bytes()
        headers = {"Content-Type": "application/dicom"}
        uploaded_dicom = httpx.post(f"{serve.url}/v1/predict", content=body, headers=headers, timeout=60).json()
        assert (uploaded["status"], uploaded_dicom["status"]) == ("ok", "ok")
        records = _wait_records(out, 3, serve)
        deadline = time.monotonic() + 30
        while not (out / "dicom" / UID / SR_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert serve.stop() == 0, serve.log()

    assert sorted(r["origin"] for r in records) == ["dicom", "http", "http"]
    by_origin = {r["origin"]: r for r in records}
    received = by_origin["dicom"]
    assert received["status"] == "ok" and received["decision"] is True
    assert Path(received["source"]) == (out / DICOM_INBOX_DIR / f"{UID}.dcm").absolute()
    http_sources = {Path(r["source"]).name for r in records if r["origin"] == "http"}
    assert http_sources == {f"{uploaded['job_id']}.png", f"{uploaded_dicom['job_id']}.dcm"}
    assert {p.name for p in (out / HTTP_INBOX_DIR).iterdir()} == http_sources
    assert [p.name for p in (out / DICOM_INBOX_DIR).glob("*.dcm")] == [f"{UID}.dcm"]
    # One SR, for the C-STORE only, pointing at the received image's boxes.
    assert [p.name for p in (out / "dicom").iterdir()] == [UID]
    findings = read_sr_findings(pydicom.dcmread(out / "dicom" / UID / SR_NAME))
    assert findings.decision is True and len(findings.findings) == len(received["detections"]) >= 1
    assert all(f.referenced_sop_instance_uid == UID for f in findings.findings)

    # A restart resumes and replays the DICOM inbox: the HTTP uploads are neither analysed again
    # nor given an SR.
    restarted = _Serve(bundle, out)
    time.sleep(1.0)  # the resume runs in the background once the listener is up
    assert restarted.stop() == 0, restarted.log()
    assert len(read_jsonl(out / "results.jsonl")) == 3
    assert [p.name for p in (out / "dicom").iterdir()] == [UID]
