"""Attach the DICOM side to the kiosk's :class:`~spine_edge.service.worker.InferenceWorker`.

``spine-edge listen`` runs this alone; ``spine-edge serve --dicom-port`` runs it next to the HTTP
service on the same worker, so one process has one loaded Cascade, one queue and one results.jsonl.

Example:
    >>> with InferenceWorker(worker_config) as worker:  # doctest: +SKIP
    ...     with attach_dicom(worker, dicom_config(worker_config.out, port=11112)) as gateway:
    ...         gateway.listener.wait()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from spine_edge.dicomnet.common import DEFAULT_AE_TITLE, Destination
from spine_edge.dicomnet.gateway import DicomGateway, DicomGatewayConfig
from spine_edge.dicomnet.outbox import OutboxConfig
from spine_edge.dicomnet.scp import ORIGIN, ListenerConfig, ReceivedImage
from spine_edge.dicomnet.writer import DicomOutputConfig
from spine_edge.infer import JSONL_NAME
from spine_edge.service.worker import InferenceWorker, QueueFull, WorkerConfig, WorkerNotRunning

log = logging.getLogger(__name__)

#: Folders under the service's output folder, unless chosen otherwise. The inbox is not the HTTP
#: uploads' ``inbox``: at start the gateway analyses every inbox image without a record and writes
#: an SR for every ``ok`` record of an inbox image, so in one folder it would take HTTP uploads for
#: received images.
INBOX_DIR = "dicom-inbox"
DICOM_OUT_DIR = "dicom"
OUTBOX_DIR = "outbox"


def dicom_config(
    out: Path,
    *,
    ae_title: str = DEFAULT_AE_TITLE,
    host: str = "127.0.0.1",
    port: int = 11112,
    allowed_calling_aes: Iterable[str] = (),
    inbox: Path | None = None,
    dicom_out: Path | None = None,
    send_to: Destination | None = None,
    outbox: Path | None = None,
    heatmap_sc: bool = True,
) -> DicomGatewayConfig:
    """The DICOM side's configuration for a service writing to ``out`` (the worker's output folder).

    Args:
        out: The worker's output folder (results.jsonl, pictures).
        ae_title: Our AE title.
        host: Address to listen on (127.0.0.1 unless the operator opens it up).
        port: DICOM port (0: a free one).
        allowed_calling_aes: Calling AE titles allowed; none allows any.
        inbox: Received images; default ``out/dicom-inbox``.
        dicom_out: SR and SC files; default ``out/dicom``.
        send_to: The PACS to send SR and SC to, or None.
        outbox: Files waiting for the PACS; default ``out/outbox``.
        heatmap_sc: Also write (and send) the heatmap as a second SC.
    """
    return DicomGatewayConfig(
        listener=ListenerConfig(
            inbox=inbox or out / INBOX_DIR,
            ae_title=ae_title,
            host=host,
            port=port,
            allowed_calling_aes=frozenset(allowed_calling_aes),
        ),
        results_jsonl=out / JSONL_NAME,
        output=DicomOutputConfig(folder=dicom_out or out / DICOM_OUT_DIR, results_root=out, heatmap=heatmap_sc),
        outbox=None
        if send_to is None
        else OutboxConfig(folder=outbox or out / OUTBOX_DIR, destination=send_to, calling_ae_title=ae_title),
    )


def attach_dicom(worker: InferenceWorker, config: DicomGatewayConfig) -> DicomGateway:
    """A :class:`DicomGateway` that queues received images on ``worker`` and logs refusals in its results.

    Start it (``with``) after the worker and stop it before the worker.
    """

    def submit(image: ReceivedImage, on_done: Callable[[dict[str, Any]], None]) -> bool:
        try:
            worker.submit(image.path.absolute(), origin=ORIGIN, meta=image.meta(), on_done=on_done)
        except (QueueFull, WorkerNotRunning):
            return False
        return True

    def record(refusal: Mapping[str, Any]) -> None:
        try:
            worker.append_record(refusal, origin=ORIGIN)
        except WorkerNotRunning:
            # Shutting down: the sender still hears "refused", only the log line remains.
            log.warning("%s: refusal not recorded, the worker is stopping", refusal.get("source"))

    return DicomGateway(config, submit=submit, record=record)


def run_listener(
    worker_config: WorkerConfig,
    config: DicomGatewayConfig,
    stop: threading.Event,
    ready: Callable[[DicomGateway], None] | None = None,
) -> None:
    """``spine-edge listen``: load the models, listen for DICOM until ``stop`` is set, shut down cleanly.

    Shutdown order keeps every accepted image: stop listening (senders get no new associations),
    let the worker finish the queued jobs (their DICOM results are written), then stop writing
    and sending; whatever is still pending stays on disk for the next start.

    Args:
        worker_config: The models and the results folder.
        config: The DICOM side (see :func:`dicom_config`).
        stop: Set it (from a signal handler) to shut down.
        ready: Called once the listener accepts associations.

    Raises:
        SpineEdgeError: The bundle, backend, output folder or listening address cannot be used.
    """
    with InferenceWorker(worker_config) as worker, attach_dicom(worker, config) as gateway:
        if ready is not None:
            ready(gateway)
        # A timed wait: a signal may be delivered to any thread, and Python runs its handler only
        # when the main thread wakes up; an untimed wait could then sleep through SIGTERM.
        while not stop.wait(0.5):
            pass
        gateway.listener.stop()
        worker.stop()
