"""`spine-edge listen` against real DICOM software: dcmtk sends, Orthanc stores the results.

Each test starts the listener as its own process on the tiny bundle, so a test can kill it the way
a power cut would. Round-trip times (C-STORE in -> SR stored in Orthanc) are printed (``-s``).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_edge.bundle import load_manifest
from spine_edge.dicom_writer import DicomUIDs, build_radiograph_dataset, write_dicom
from spine_edge.dicomnet.common import derived_uid
from spine_edge.dicomnet.kiosk import INBOX_DIR
from spine_edge.dicomnet.sr import read_sr_findings
from spine_edge.dicomnet.writer import HEATMAP_NAME, OVERLAY_NAME, SR_NAME
from tests.dicomnet.programs import Listener, OrthancServer, dciodvfy, dcmtk, free_port, require_program
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.radiograph_factory import radiograph_pixels, write_radiograph_dicom

STUDY = "1.2.826.0.1.3680043.8.498.100"
PATIENT = {
    "PatientID": "P-7",
    "PatientName": "Roe^Rita",
    "PatientBirthDate": "19550505",
    "PatientSex": "F",
    "StudyID": "S7",
    "AccessionNumber": "ACC7",
    "StudyDate": "20260102",
    "StudyTime": "083000",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _radiograph(
    path: Path, uid: str, *, bright: bool, transfer_syntax: str, size: tuple[int, int] = (128, 256)
) -> Path:
    # bright: one bright region, abnormal with one box (see the tiny bundle); 0.5 mm pixels: 128 mm of spine.
    return write_radiograph_dicom(
        path,
        radiograph_pixels(size, abnormal=bright),
        uids=DicomUIDs(uid, STUDY, STUDY + ".1"),
        transfer_syntax=transfer_syntax,
        tags={"BodyPartExamined": "LSPINE", **PATIENT},
    )


def _store(port: int, *files: Path, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    # -xv proposes JPEG 2000 lossless first (and uncompressed), so a J2K file is sent as it is.
    return dcmtk("storescu", "-xv", "-aet", calling, "-aec", "SPINEEDGE", "127.0.0.1", str(port), *map(str, files))


def _by_uid(records: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {Path(str(r["source"])).stem: r for r in records if r["status"] == "ok"}


def test_storescu_images_give_one_record_and_one_sr_each_and_reach_orthanc(
    bundle: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    bundle_id = load_manifest(bundle, verify=False).bundle_id
    images = {
        "1.2.826.0.1.3680043.8.498.101": _radiograph(
            tmp_path / "j2k.dcm", "1.2.826.0.1.3680043.8.498.101", bright=True, transfer_syntax="jpeg2000-lossless"
        ),
        "1.2.826.0.1.3680043.8.498.102": _radiograph(
            tmp_path / "raw.dcm", "1.2.826.0.1.3680043.8.498.102", bright=False, transfer_syntax="explicit-little"
        ),
    }
    port = free_port()
    listener = Listener(
        bundle, tmp_path / "out", port, "--send-to", f"127.0.0.1:{orthanc.dicom_port}:{orthanc.ae_title}"
    )
    try:
        assert dcmtk("echoscu", "-aet", "MODALITY", "-aec", "SPINEEDGE", "127.0.0.1", str(port)).returncode == 0
        round_trips = []
        for uid, path in images.items():
            started = time.perf_counter()
            sent = _store(port, path)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert orthanc.find_instance(derived_uid(uid, bundle_id, "sr"), timeout=60), listener.log()
            round_trips.append(time.perf_counter() - started)
        print("round trip C-STORE in -> SR in Orthanc (s):", [round(t, 3) for t in round_trips])
        # The same instance again is acknowledged but not analysed twice.
        assert _store(port, images["1.2.826.0.1.3680043.8.498.101"]).returncode == 0
        records = listener.wait_records(2)
        time.sleep(0.5)
        records = listener.records()
    finally:
        assert listener.stop() == 0, listener.log()
    assert len(records) == 2 and {r["origin"] for r in records} == {"dicom"}
    by_uid = _by_uid(records)
    assert set(by_uid) == set(images)
    positive = by_uid["1.2.826.0.1.3680043.8.498.101"]
    assert positive["decision"] is True and len(positive["detections"]) == 1  # type: ignore[arg-type]
    assert by_uid["1.2.826.0.1.3680043.8.498.102"]["decision"] is False

    dicom_out = tmp_path / "out" / "dicom"
    assert sorted(p.name for p in dicom_out.iterdir()) == sorted(images)
    assert sorted(p.name for p in (dicom_out / "1.2.826.0.1.3680043.8.498.101").glob("*.dcm")) == sorted(
        [SR_NAME, OVERLAY_NAME, HEATMAP_NAME]
    )
    for uid, record in by_uid.items():
        sr_id = orthanc.find_instance(derived_uid(uid, bundle_id, "sr"))
        sc_id = orthanc.find_instance(derived_uid(uid, bundle_id, "sc-overlay"))
        assert sr_id and sc_id
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        assert (tags["PatientID"], tags["StudyInstanceUID"], tags["Modality"]) == ("P-7", STUDY, "SR")
        from_pacs = read_sr_findings(pydicom.dcmread(_bytes_file(tmp_path / f"{uid}.sr.dcm", orthanc, sr_id)))
        assert from_pacs.decision is record["decision"]
        assert from_pacs.probability == pytest.approx(record["probability"])
        expected = [(d["class_name"], d["box"]) for d in record["detections"]]  # type: ignore[union-attr]
        assert [(f.class_name, list(f.box)) for f in from_pacs.findings] == [
            (name, pytest.approx(box, abs=1e-3)) for name, box in expected
        ]
        assert all(f.referenced_sop_instance_uid == uid for f in from_pacs.findings)
        sc = pydicom.dcmread(_bytes_file(tmp_path / f"{uid}.sc.dcm", orthanc, sc_id))
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uid and sc.StudyInstanceUID == STUDY
        for path in (dicom_out / uid).glob("*.dcm"):
            errors, warnings = dciodvfy(path)
            assert errors == [], f"{path}: {errors}"
            print(f"dciodvfy {uid}/{path.name}: {len(warnings)} warning(s)", *sorted(set(warnings)), sep="\n  ")


def _bytes_file(path: Path, orthanc: OrthancServer, instance: str) -> Path:
    path.write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
    return path


def test_other_objects_are_accepted_or_refused_and_the_allow_list_holds(bundle: Path, tmp_path: Path) -> None:
    report = write_dicom(
        tmp_path / "report.dcm",
        build_radiograph_dataset(
            with_pixels=False,
            sop_class=pydicom.uid.BasicTextSRStorage,
            uids=DicomUIDs("1.2.826.0.1.3680043.8.498.201", STUDY, STUDY + ".2"),
            tags={"Modality": "SR"},
        ),
    )
    ct = write_dicom(
        tmp_path / "ct.dcm",
        build_radiograph_dataset(
            np.zeros((64, 64), np.uint16),
            sop_class=pydicom.uid.CTImageStorage,
            uids=DicomUIDs("1.2.826.0.1.3680043.8.498.202", STUDY, STUDY + ".3"),
            tags={"Modality": "CT"},
        ),
    )
    unreadable_uid = "1.2.826.0.1.3680043.8.498.203"
    multi_frame = write_dicom(  # a valid DX the reader refuses (multi-frame): an error record
        tmp_path / "frames.dcm",
        build_radiograph_dataset(
            np.zeros((64, 64), np.uint16), frames=3, uids=DicomUIDs(unreadable_uid, STUDY, STUDY + ".4")
        ),
    )
    port = free_port()
    out = tmp_path / "out"
    listener = Listener(bundle, out, port, "--allow-ae", "MODALITY")
    try:
        refused_association = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "SPINEEDGE", "127.0.0.1", str(port))
        assert refused_association.returncode != 0
        assert _store(port, report).returncode == 0
        assert _store(port, ct).returncode != 0  # 0x0122 SOP class not supported
        assert _store(port, multi_frame).returncode == 0
        listener.wait_records(2)
        deadline = time.monotonic() + 30
        while not (out / INBOX_DIR / "failed" / f"{unreadable_uid}.dcm").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        # A good copy of the instance that failed is analysed, not taken for a duplicate.
        fixed = _radiograph(tmp_path / "fixed.dcm", unreadable_uid, bright=False, transfer_syntax="explicit-little")
        assert _store(port, fixed).returncode == 0
        records = listener.wait_records(3)
    finally:
        assert listener.stop() == 0
    refused, failed, fixed_record = records
    assert refused["status"] == "refused" and refused["refusal"]["code"] == "modality"  # type: ignore[index]
    assert "CT image" in str(refused["error"]) and refused["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.202"
    assert "refused: the bundle judges radiographs" in listener.log()
    assert failed["status"] == "error" and fixed_record["status"] == "ok"
    assert [p.name for p in (out / "dicom").iterdir()] == [unreadable_uid]  # no SR for refused or failed
    assert [p.name for p in (out / INBOX_DIR).glob("*.dcm")] == [f"{unreadable_uid}.dcm"]  # nor for the report


class _StallingProxy:
    """Forwards a TCP connection to the listener, and stops forwarding after ``limit`` bytes.

    The sender is then mid-transfer for as long as the test wants: a deterministic "kill while
    a file is arriving".
    """

    def __init__(self, target_port: int, limit: int) -> None:
        self.port = free_port()
        self.stalled = threading.Event()
        self._target = target_port
        self._limit = limit
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(("127.0.0.1", self._target))
        self._sockets += [client, upstream]
        threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()
        self._pipe(client, upstream, self._limit)

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        forwarded = 0
        try:
            while data := source.recv(65536):
                if limit is not None and forwarded + len(data) > limit:
                    sink.sendall(data[: limit - forwarded])
                    self.stalled.set()
                    return
                sink.sendall(data)
                forwarded += len(data)
        except OSError:
            return

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def test_killed_mid_transfer_nothing_half_written_and_restart_resumes_the_inbox(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = free_port()
    big = _radiograph(
        tmp_path / "big.dcm",
        "1.2.826.0.1.3680043.8.498.301",
        bright=True,
        transfer_syntax="explicit-little",
        size=(1024, 2048),
    )  # 4 MiB of pixels
    listener = Listener(bundle, out, port)
    proxy = _StallingProxy(port, limit=1 << 20)
    sender = subprocess.Popen(
        [require_program("storescu"), "-aet", "MODALITY", "-aec", "SPINEEDGE", "127.0.0.1", str(proxy.port), str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proxy.stalled.wait(30), "the sender never got 1 MiB into the transfer"
        listener.kill()
        proxy.close()
        output, _ = sender.communicate(timeout=30)
    finally:
        proxy.close()
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode != 0, output  # the sender knows the image did not arrive and will retry
    inbox = out / INBOX_DIR
    assert list(inbox.glob("*.dcm")) == [] and listener.records() == []

    # Acknowledged before a crash but never analysed: on disk in the inbox, no record yet.
    pending_uid = "1.2.826.0.1.3680043.8.498.302"
    _radiograph(inbox / f"{pending_uid}.dcm", pending_uid, bright=True, transfer_syntax="jpeg2000-lossless")
    (inbox / f".{pending_uid}.dcm.x1y2.tmp").write_bytes(b"half a file")
    restarted = Listener(bundle, out, port)
    try:
        records = restarted.wait_records(1)
        assert [Path(str(r["source"])).stem for r in records] == [pending_uid] and records[0]["status"] == "ok"
        assert not (inbox / f".{pending_uid}.dcm.x1y2.tmp").exists()
        assert _store(port, big).returncode == 0  # the sender's retry now succeeds
        records = restarted.wait_records(2)
        deadline = time.monotonic() + 30
        while not (out / "dicom" / "1.2.826.0.1.3680043.8.498.301" / SR_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert restarted.stop() == 0, restarted.log()
    assert sorted(Path(str(r["source"])).stem for r in records) == sorted(
        [pending_uid, "1.2.826.0.1.3680043.8.498.301"]
    )
    for uid in (pending_uid, "1.2.826.0.1.3680043.8.498.301"):
        assert (out / "dicom" / uid / SR_NAME).is_file()

    # A crash between the record and its DICOM results: the next start writes them from results.jsonl.
    (out / "dicom" / pending_uid / SR_NAME).unlink()
    (out / "dicom" / pending_uid / ".complete").unlink()
    Listener(bundle, out, port).stop()
    assert (out / "dicom" / pending_uid / SR_NAME).is_file() and len(restarted.records()) == 2
