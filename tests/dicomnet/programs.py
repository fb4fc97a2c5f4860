"""Real DICOM software for the DICOM tests (helpers; fixtures in conftest.py): dcmtk, dicom3tools and an Orthanc PACS on loopback ports.

The Debian packages come from scripts/system-deps.sh. A test that needs a program that is absent
skips and names the program and the package that provides it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PACKAGES = {"storescu": "dcmtk", "echoscu": "dcmtk", "dciodvfy": "dicom3tools", "Orthanc": "orthanc"}


def require_program(name: str) -> str:
    """The program's path, or skip the test naming the Debian package (scripts/system-deps.sh)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {PACKAGES[name]}; run scripts/system-deps.sh as root)")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' IOD validator on a file; returns (errors, warnings) as printed."""
    program = require_program("dciodvfy")
    done = subprocess.run([program, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


@dataclass(frozen=True)
class OrthancServer:
    """An Orthanc started for the tests.

    Attributes:
        http_port: REST API port on 127.0.0.1.
        dicom_port: DICOM port.
        ae_title: Its AE title.
    """

    http_port: int
    dicom_port: int
    ae_title: str

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource as bytes (e.g. ``/instances/{id}/file``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return bytes(response.read())

    def find_instance(self, sop_instance_uid: str, timeout: float = 30.0) -> str | None:
        """Orthanc's id of the instance with that SOP Instance UID, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/tools/lookup", data=sop_instance_uid.encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                found = [r for r in json.loads(response.read()) if r.get("Type") == "Instance"]
            if found:
                return str(found[0]["ID"])
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def start_orthanc(
    folder: Path, ae_title: str = "ORTHANC", dicom_port: int | None = None
) -> tuple[OrthancServer, subprocess.Popen[bytes]]:
    """Start Orthanc with its own configuration and storage under ``folder``, on free ports (or ``dicom_port``)."""
    program = require_program("Orthanc")
    server = OrthancServer(http_port=free_port(), dicom_port=dicom_port or free_port(), ae_title=ae_title)
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "spine-edge-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": ae_title,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomAlwaysAllowStore": True,
        "HttpsVerifyPeers": False,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - kept open for the process's lifetime
    process = subprocess.Popen([program, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                server.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}") from None
                time.sleep(0.2)
        wait_for_port(server.dicom_port)
    except BaseException:
        process.kill()
        raise
    return server, process


def spine_edge_program() -> str:
    """The ``spine-edge`` console script of the running interpreter's environment."""
    found = shutil.which("spine-edge", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(f"spine-edge is not installed next to {sys.executable}: pip install -e .")
    return found


class Listener:
    """``spine-edge listen`` started as a separate process (so a test can kill it like a crash).

    Args:
        bundle: The bundle folder.
        out: Its results folder.
        port: DICOM port.
        args: Further command-line options (``--send-to``, ``--allow-ae``...).
    """

    def __init__(self, bundle: Path, out: Path, port: int, *args: str) -> None:
        self.out = out
        self.port = port
        self.log_path = out.parent / f"{out.name}-listener.log"
        command = [
            spine_edge_program(),
            "listen",
            "--bundle",
            str(bundle),
            "-o",
            str(out),
            "--port",
            str(port),
            "--precision",
            "fp32",
            "--backend",
            "onnxruntime",
            "--provider",
            "cpu",
            *args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        start = self.log_path.stat().st_size  # a restart appends to the same log
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"listening as" not in self.log_path.read_bytes()[start:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"spine-edge listen did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """Everything it printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self.process.kill()
        self.process.wait(timeout=30)
        self._log.close()

    def records(self) -> list[dict[str, Any]]:
        """Its results.jsonl."""
        path = self.out / "results.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def wait_records(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until results.jsonl holds at least ``count`` records; returns them."""
        deadline = time.monotonic() + timeout
        while len(records := self.records()) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{len(records)} of {count} records after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return records


def dcmtk(program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk program (``echoscu``, ``storescu``), skipping the test when dcmtk is absent."""
    return subprocess.run([require_program(program), *args], capture_output=True, text=True, timeout=timeout)
