"""Helpers shared by the runtime tests."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: ``spine-edge`` in a child process, as a kiosk runs it.
CLI = (sys.executable, "-c", "from spine_edge.cli import main; main()")


@dataclass(frozen=True)
class RunningInfer:
    """A ``spine-edge infer`` process started by :func:`start_slow_infer`.

    Attributes:
        command: Its command line (append ``--resume`` to continue the run).
        process: The process, stdout and stderr piped as text.
        out: Its output folder.
    """

    command: list[str]
    process: subprocess.Popen[str]
    out: Path


def start_slow_infer(bundle: Path, tmp_path: Path, images: int, records: int) -> RunningInfer:
    """Start ``infer --no-guard`` on ``images`` 64 px PNGs, one at a time, and wait for ``records`` results.

    Every other image has a bright block (abnormal), the rest are black. Returns once
    ``results.jsonl`` holds ``records`` lines, the process ended, or 60 s passed, so the caller can
    interrupt a run that is under way.
    """
    folder = tmp_path / "many"
    folder.mkdir()
    bright = np.full((64, 64), 10, np.uint8)
    bright[:32, 32:48] = 255
    for i in range(images):
        cv2.imwrite(str(folder / f"{i:04d}.png"), bright if i % 2 else np.zeros((64, 64), np.uint8))
    out = tmp_path / "out"
    command = [*CLI, "-q", "infer", "--no-guard", str(folder), "--bundle", str(bundle), "-o", str(out)]
    command += ["--batch-size", "1", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if jsonl.is_file() and jsonl.read_text().count("\n") >= records:
            break
        time.sleep(0.01)
    return RunningInfer(command, process, out)
