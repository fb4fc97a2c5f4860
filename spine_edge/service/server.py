"""Run the kiosk service: load the models, then serve HTTP on uvicorn until SIGTERM / Ctrl-C.

The models load *before* the port opens, so a bundle that cannot run here fails the command at once
with one line (exit 3) instead of a service that answers 503 forever; ``/readyz`` then reports
ready from the first request on, and not ready again while the service stops.

With :attr:`ServeConfig.dicom` the same worker also takes images by DICOM C-STORE (see
:mod:`spine_edge.dicomnet.kiosk`): one process, one loaded Cascade, one queue, one results.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from spine_edge.errors import SpineEdgeError
from spine_edge.service.app import AppConfig, DicomEndpoint, create_app
from spine_edge.service.worker import InferenceWorker, WorkerConfig
from spine_edge.support import import_optional

if TYPE_CHECKING:
    # Only for the annotation: the DICOM side is imported when a run asks for it.
    from spine_edge.dicomnet.gateway import DicomGatewayConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """A service run.

    Attributes:
        worker: Models, queue and output folder.
        app: HTTP settings (upload limit, token, timeouts).
        host: Address to bind; anything but loopback exposes the API to the network.
        port: TCP port; 0 picks a free one (printed at start).
        watch: Folders whose new files are also processed (see :mod:`spine_edge.watch`).
        dicom: The DICOM listener on the same worker (see :func:`spine_edge.dicomnet.kiosk.dicom_config`);
            None for HTTP (and watch folders) only.
    """

    worker: WorkerConfig
    app: AppConfig = field(default_factory=AppConfig)
    host: str = LOOPBACK
    port: int = 8000
    watch: tuple[Path, ...] = ()
    dicom: DicomGatewayConfig | None = None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 by the address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket names it, and without NODELAY every keep-alive answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SpineEdgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from exc
    sock.listen(128)
    return sock


def serve(config: ServeConfig, on_listening: Callable[[str, DicomEndpoint | None], None] | None = None) -> None:
    """Load the models, serve until a stop signal, then finish the queued jobs and release everything.

    Start-up loads the models, binds the HTTP port, starts the DICOM gateway on the worker, then
    serves HTTP. Shutdown stops HTTP, the watchers and the DICOM listener, lets the worker finish
    the queued jobs (their SRs written), then stops the gateway's writer and outbox: nothing
    accepted is left unfinished.

    Args:
        config: The run.
        on_listening: Called with the base URL and the DICOM listener (None without one) once both
            accept connections (the CLI prints them).

    Raises:
        MissingDependencyError: uvicorn / starlette / prometheus-client are not installed, or the
            dicom extra (pynetdicom, highdicom) for :attr:`ServeConfig.dicom`.
        SpineEdgeError: The models, the output folder or a port are not usable.
    """
    uvicorn = import_optional("uvicorn", "serve", "spine-edge serve")
    import_optional("starlette", "serve", "spine-edge serve")
    from spine_edge.watch import FolderWatcher, WatchConfig

    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(InferenceWorker(config.worker))
        # Bound before the gateway starts: a busy HTTP port then fails the run before any DICOM
        # sender hears "success" for an image this process would never analyse.
        sock = stack.enter_context(bind(config.host, config.port))
        app_config, gateway = config.app, None
        if config.dicom is not None:
            from spine_edge.dicomnet.kiosk import attach_dicom

            # Leaving the stack stops it (its results writer and outbox) before the worker is released.
            gateway = stack.enter_context(attach_dicom(worker, config.dicom))
            listener = config.dicom.listener
            app_config = dataclasses.replace(
                app_config, dicom=DicomEndpoint(listener.ae_title, listener.host, gateway.listener.port)
            )
        app = create_app(worker, app_config)
        stop_watching = threading.Event()
        watchers = [
            threading.Thread(
                target=FolderWatcher(WatchConfig(folder), worker).run,
                args=(stop_watching,),
                name=f"spine-edge-watch-{i}",
                daemon=True,
            )
            for i, folder in enumerate(config.watch)
        ]
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=30)
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # SIGTERM action that would kill the process before the queued jobs are finished below.
        previous = signal.signal(signal.SIGTERM, _note_stop)
        try:
            for watcher in watchers:
                watcher.start()
            log.info("serving on %s", url)
            if on_listening is not None:
                on_listening(url, app_config.dicom)
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raised Ctrl-C after its graceful shutdown
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop_watching.set()
            for watcher in watchers:
                watcher.join()
            if gateway is not None:
                # No new associations, but the results writer keeps running while the worker
                # drains, so the images already acknowledged get their SR now, not at the next start.
                gateway.listener.stop()
            log.info("stopping: finishing queued jobs")
            worker.stop()


def _note_stop(signum: int, frame: FrameType | None) -> None:
    log.info("stop signal %d received after shutdown", signum)
