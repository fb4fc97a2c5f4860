"""``spine-edge serve`` as a real process: start-up line, warnings, SIGTERM, setup errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.service.conftest import require_serve_extra

require_serve_extra()
import httpx  # noqa: E402

from spine_edge.results import read_jsonl  # noqa: E402
from tests.service.conftest import write_bright_png  # noqa: E402

CLI = [sys.executable, "-c", "from spine_edge.cli import main; main()"]
MODEL = ["--precision", "fp32", "--backend", "onnxruntime", "--provider", "cpu", "--threads", "1"]


def _url(log: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"serving on (http://\S+/)", log.read_text())
        if found:
            return found.group(1).rstrip("/")
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no start-up line:\n{log.read_text()}")


def test_serve_process_answers_then_stops_cleanly_on_sigterm(bundle: Path, tmp_path: Path) -> None:
    out, log, token = tmp_path / "out", tmp_path / "serve.log", tmp_path / "token"
    dropbox = tmp_path / "dropbox"
    dropbox.mkdir()
    token.write_text("kiosk-token\n")
    token.chmod(0o600)
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--bundle",
                str(bundle),
                *MODEL,
                "-o",
                str(out),
                "--host",
                "0.0.0.0",
                "--port",
                "0",
                "--token-file",
                str(token),
                "--watch",
                str(dropbox),
            ],
            stdout=sink,
            stderr=sink,
        )
    try:
        url = _url(log, process).replace("0.0.0.0", "127.0.0.1")
        headers = {"Authorization": "Bearer kiosk-token"}
        assert httpx.get(f"{url}/readyz").status_code == 401
        body = write_bright_png(tmp_path / "PATIENT^NAME.png").read_bytes()
        record = httpx.post(f"{url}/v1/predict", files={"file": ("PATIENT^NAME.png", body)}, headers=headers).json()
        assert record["status"] == "ok" and record["decision"] is True
        write_bright_png(dropbox / "dropped.png")  # the watch folder feeds the same worker
        deadline = time.monotonic() + 30
        while len(read_jsonl(out / "results.jsonl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "warning: listening on 0.0.0.0" in text
    assert "PATIENT" not in text  # logs carry job ids, never file names
    records = read_jsonl(out / "results.jsonl")
    assert [r["origin"] for r in records] == ["http", "watch"] and records[0]["job_id"] == record["job_id"]


def test_serve_with_a_broken_bundle_exits_3_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "-q", "serve", "--bundle", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_dicom_options_without_dicom_port_are_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "-o", str(tmp_path / "out"), "--port", "0", "--send-to", "127.0.0.1:4242:ORTHANC"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: --send-to: only with --dicom-port (without it nothing listens for DICOM)")
    assert not (tmp_path / "out").exists()  # refused before any model or folder was touched


def test_serve_watch_and_listen_take_model_choices_and_defaults_from_the_configs() -> None:
    from spine_edge.backends import BackendChoice, PrecisionChoice
    from spine_edge.backends.onnxruntime import ProviderChoice
    from spine_edge.cascade import CascadeConfig
    from spine_edge.cli.listen import listen
    from spine_edge.cli.serve import serve
    from spine_edge.cli.watch import watch
    from spine_edge.config import field_default, literal_values
    from spine_edge.service.worker import WorkerConfig

    expected = {
        "precision": (literal_values(PrecisionChoice), field_default(CascadeConfig, "precision")),
        "backend": (literal_values(BackendChoice), field_default(CascadeConfig, "backend")),
        "provider": (literal_values(ProviderChoice), field_default(CascadeConfig, "provider")),
        "batch_size": (None, field_default(CascadeConfig, "batch_size")),
        "queue_size": (None, field_default(WorkerConfig, "queue_size")),
    }
    for command in (serve, watch, listen):
        params = {p.name: p for p in command.params}
        for name, (choices, default) in expected.items():
            param = params[name]
            assert param.default == default, (command.name, name)
            if choices is not None:
                assert tuple(param.type.choices) == choices, (command.name, name)  # type: ignore[attr-defined]
