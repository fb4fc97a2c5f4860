"""Ctrl-C and SIGTERM end every command with one line and their own exit status (130, 143)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

# A command that signals it is running, then waits: stands in for any long command of the group.
SCRIPT = """
import sys, time
import click
from spine_edge.cli import main

@main.command("wait-forever")
def wait_forever():
    print("ready", flush=True)
    while True:
        time.sleep(0.05)

main(["wait-forever"], prog_name="spine-edge")
"""


@pytest.mark.parametrize(
    ("signum", "status", "message"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_signal_ends_command_with_its_status(signum: int, status: int, message: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert message in err
    assert "Traceback" not in err
