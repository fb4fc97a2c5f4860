"""``spine-edge listen``: a DICOM storage SCP that analyses every radiograph it receives."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_USAGE, fail
from spine_edge.dicomnet.common import Destination
from spine_edge.dicomnet.gateway import DicomGateway
from spine_edge.dicomnet.kiosk import dicom_config, run_listener
from spine_edge.errors import SpineEdgeError
from spine_edge.service.worker import WorkerConfig


@click.command()
@click.option(
    "--ae-title", default="SPINEEDGE", show_default=True, help="Our AE title (the called AE title senders use)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=11112, show_default=True, help="DICOM port (0: a free one)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on; 0.0.0.0 opens it to the network."
)
@click.option(
    "--allow-ae",
    "allow_ae",
    multiple=True,
    metavar="AET",
    help="Accept associations only from this calling AE title (repeat for more) [default: any].",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("spine-edge-listen"),
    show_default=True,
    help="Results folder: results.jsonl, pictures, inbox/, dicom/, outbox/.",
)
@click.option(
    "--dicom-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where SR and Secondary Capture files go [default: OUT/dicom].",
)
@click.option(
    "--send-to",
    default=None,
    metavar="HOST:PORT:AET",
    help="Send every SR and SC to this PACS with C-STORE (durable outbox, retried until stored).",
)
@click.option("--no-heatmap-sc", is_flag=True, help="Do not write the heatmap as a second Secondary Capture.")
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "tensorrt"]),
    default=None,
    help="ONNX Runtime execution provider [default: fastest available].",
)
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Images waiting for the models; beyond it senders are told to retry.",
)
def listen(
    ae_title: str,
    port: int,
    host: str,
    allow_ae: tuple[str, ...],
    out: Path,
    dicom_out: Path | None,
    send_to: str | None,
    no_heatmap_sc: bool,
    bundle: Path | None,
    precision: str,
    backend: str,
    provider: str | None,
    queue_size: int,
) -> None:
    """Receive radiographs by DICOM C-STORE, analyse each, write (and send) an SR and Secondary Captures.

    DX, CR and Secondary Capture images are analysed; reports, RT objects and presentation states
    are accepted and left alone; CT and MR are refused (and logged in results.jsonl). Runs until
    SIGTERM or Ctrl-C; images received but not analysed are resumed at the next start.
    """
    try:
        worker_config = WorkerConfig(
            cascade=CascadeConfig(bundle=bundle, precision=precision, backend=backend, provider=provider),  # type: ignore[arg-type]
            out=out.absolute(),
            queue_size=queue_size,
        )
        config = dicom_config(
            out.absolute(),
            ae_title=ae_title,
            host=host,
            port=port,
            allowed_calling_aes=allow_ae,
            dicom_out=None if dicom_out is None else dicom_out.absolute(),
            send_to=None if send_to is None else Destination.parse(send_to),
            heatmap_sc=not no_heatmap_sc,
        )
    except SpineEdgeError as exc:
        fail(exc, EXIT_USAGE)
        return
    # highdicom logs every attribute module it copies at INFO: noise in a service's log.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Set from another thread: the handler runs inside the main thread's stop.wait(), which may
        # hold the event's (non-reentrant) lock at that moment.
        threading.Thread(target=stop.set, name="spine-edge-stop").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready(gateway: DicomGateway) -> None:
        target = f"; sending results to {send_to}" if send_to else ""
        click.echo(f"listening as {ae_title} on {host}:{gateway.listener.port}; results in {out}{target}", err=True)

    try:
        run_listener(worker_config, config, stop, ready)
    except SpineEdgeError as exc:
        fail(exc)
