"""Fixtures of the DICOM tests: pynetdicom and highdicom present, an Orthanc PACS per module."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed: pip install 'spine-edge[dicom]'")
pytest.importorskip("highdicom", reason="highdicom is not installed: pip install 'spine-edge[dicom]'")

from tests.dicomnet.programs import OrthancServer, start_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc PACS for the module, stopped afterwards."""
    server, process = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
