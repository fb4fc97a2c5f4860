"""A real service for the tests: tiny bundle, a started InferenceWorker and uvicorn on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from spine_edge.cascade import CascadeConfig
from spine_edge.service.app import AppConfig, create_app
from spine_edge.service.server import bind
from spine_edge.service.worker import InferenceWorker, WorkerConfig
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.radiograph_factory import radiograph_pixels, write_radiograph_dicom


def require_serve_extra() -> None:
    """Skip the calling test module where the serve extra or httpx is not installed (runtime-only CI)."""
    for module in ("starlette", "uvicorn", "python_multipart", "prometheus_client", "httpx"):
        pytest.importorskip(module, reason="needs the serve extra and httpx: pip install 'spine-edge[dev]'")


def bright(shape: tuple[int, int], dtype: type = np.uint8, low: int = 10, high: int = 255) -> np.ndarray:
    """An image with one bright block: the tiny bundle calls it abnormal and finds one box."""
    image = np.full(shape, low, dtype)
    image[: shape[0] // 2, shape[1] // 2 : 3 * shape[1] // 4] = high
    return image


def write_bright_png(path: Path) -> Path:
    cv2.imwrite(str(path), bright((128, 256)))
    return path


def write_dark_png(path: Path) -> Path:
    """A dark, textured image (a flat one is refused by the guard) the tiny bundle calls normal."""
    noise = np.random.default_rng(0).normal(0, 8, (200, 160)).astype(np.float32)
    texture = np.linspace(25, 60, 200, dtype=np.float32)[:, None] + cv2.GaussianBlur(noise, (0, 0), 3)
    cv2.imwrite(str(path), texture.clip(0, 255).astype(np.uint8))
    return path


def write_bright_dicom(path: Path) -> Path:
    """A JPEG 2000 DX (VinDr-like) the tiny bundle calls abnormal, with one box (the bright block of :func:`bright`).

    A textured film from the shared factory, not a flat graphic: the guard refuses images that are
    mostly one exact gray level as screenshots. 0.5 mm pixels make its 280 x 240 px cover 140 x 120 mm,
    as much as the guard wants of a spine; it decodes at JPEG 2000 level 1 (140 x 120) for the tiny
    bundle's 64 px models, whose reader covers twice the model input.
    """
    return write_radiograph_dicom(path, radiograph_pixels((280, 240), abnormal=True))


@dataclass
class Service:
    url: str
    worker: InferenceWorker
    out: Path
    server: object
    thread: threading.Thread


def cascade_config(bundle: Path) -> CascadeConfig:
    return CascadeConfig(
        bundle=bundle, precision="fp32", backend="onnxruntime", provider="cpu", batch_size=4, threads=1
    )


def start_service(bundle: Path, out: Path, app_config: AppConfig | None = None, queue_size: int = 16) -> Service:
    import uvicorn

    worker = InferenceWorker(WorkerConfig(cascade_config(bundle), out, queue_size=queue_size))
    worker.start()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(worker, app_config or AppConfig()), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return Service(f"http://{host}:{port}", worker, worker.out, server, thread)


def stop_service(service: Service) -> None:
    service.server.should_exit = True  # type: ignore[attr-defined]
    service.thread.join(10)
    service.worker.stop()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def service(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(bundle, tmp_path_factory.mktemp("service"))
    yield running
    stop_service(running)
