"""The outbox against a real PACS (Orthanc): nothing lost while it is down, sent after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_edge.dicom_writer import DicomUIDs, build_radiograph_dataset, write_dicom
from spine_edge.dicomnet.common import Destination, DicomNetError
from spine_edge.dicomnet.outbox import Outbox, OutboxConfig
from spine_edge.dicomnet.sr import build_sr, read_sr_findings
from tests.dicomnet.programs import OrthancServer, free_port, start_orthanc

IMAGE = "1.2.826.0.1.3680043.8.498.401"


def _sr_file(folder: Path) -> Path:
    source = build_radiograph_dataset(
        np.zeros((64, 64), np.uint16),
        uids=DicomUIDs(IMAGE, "1.2.826.0.1.3680043.8.498.400", "1.2.826.0.1.3680043.8.498.400.1"),
        tags={"Modality": "DX", "PatientID": "P-9"},
    )
    record = {
        "source": "x",
        "status": "ok",
        "probability": 0.7,
        "decision": True,
        "threshold": 0.5,
        "image_size": [64, 64],
        "detections": [{"class_id": 1, "class_name": "Surgical implant", "score": 0.9, "box": [4.0, 8.0, 30.0, 60.0]}],
        "bundle_id": "b",
        "precision": "fp32",
        "backend": "onnxruntime/CPUExecutionProvider",
    }
    return write_dicom(folder / "SR.dcm", build_sr(record, source))


def _config(folder: Path, port: int) -> OutboxConfig:
    return OutboxConfig(
        folder, Destination("127.0.0.1", port, "ORTHANC"), first_retry_s=0.2, max_retry_s=0.5, network_timeout_s=5
    )


def test_pacs_down_loses_nothing_and_a_restart_sends_it(tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    port = free_port()  # nothing listens here yet: the PACS is down
    outbox = Outbox(_config(tmp_path / "outbox", port))
    outbox.put(sr)
    assert outbox.send_due() == 0
    state = outbox.state(outbox.pending()[0])
    assert state.attempts == 1 and "no association" in state.last_error
    time.sleep(0.25)
    assert outbox.send_due() == 0
    second = outbox.state(outbox.pending()[0])
    assert second.attempts == 2 and second.next_attempt - time.time() == pytest.approx(0.4, abs=0.15)  # doubled

    # This process "restarts" and the PACS comes up on its configured port.
    server, process = start_orthanc(tmp_path / "pacs", dicom_port=port)
    try:
        with Outbox(_config(tmp_path / "outbox", port)) as restarted:
            assert restarted.wait_empty(timeout=30)
        instance = server.find_instance(str(pydicom.dcmread(sr).SOPInstanceUID))
        assert instance is not None
        stored = pydicom.dcmread(_download(server, instance, tmp_path / "back.dcm"))
        finding = read_sr_findings(stored).findings[0]
        assert finding.referenced_sop_instance_uid == IMAGE and finding.box == pytest.approx((4.0, 8.0, 30.0, 60.0))
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_what_the_pacs_refuses_for_good_is_set_aside(orthanc: OrthancServer, tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    unknown = build_radiograph_dataset(
        np.zeros((8, 8), np.uint16),
        sop_class="1.2.826.0.1.3680043.8.498.999.1",  # no such storage class
        uids=DicomUIDs(
            "1.2.826.0.1.3680043.8.498.402", "1.2.826.0.1.3680043.8.498.400", "1.2.826.0.1.3680043.8.498.400.2"
        ),
    )
    odd = write_dicom(tmp_path / "odd.dcm", unknown)
    outbox = Outbox(_config(tmp_path / "outbox", orthanc.dicom_port))
    outbox.put(sr)
    outbox.put(odd)
    assert outbox.send_due() == 1
    assert outbox.pending() == [] and [p.name for p in outbox.failed()] == ["1.2.826.0.1.3680043.8.498.402.dcm"]
    assert "does not accept SOP class" in outbox.state(outbox.failed()[0]).last_error
    with pytest.raises(DicomNetError, match="not a readable DICOM file"):
        outbox.put(tmp_path / "missing.dcm")


def _download(server: OrthancServer, instance: str, path: Path) -> Path:
    path.write_bytes(server.get_bytes(f"/instances/{instance}/file"))
    return path


def test_destination_parsing() -> None:
    assert Destination.parse("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    for bad in ("pacs.local:PACS", "pacs:0:PACS", "pacs:104:" + "X" * 17, ":104:PACS"):
        with pytest.raises(DicomNetError):
            Destination.parse(bad)
