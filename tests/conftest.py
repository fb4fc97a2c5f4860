"""Session-wide test setup: GPU-marked tests skip cleanly where there is no TensorRT + GPU."""

from __future__ import annotations

import importlib.util
import shutil

import pytest


def _gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
