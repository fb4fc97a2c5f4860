"""``spine-edge listen``: a DICOM storage SCP that analyses every radiograph it receives."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.cli import EXIT_USAGE, fail
from spine_edge.cli.serve import cascade_config, cascade_options, dicom_options, gateway_config, quiet_dicom_log
from spine_edge.config import field_default
from spine_edge.dicomnet.gateway import DicomGateway
from spine_edge.dicomnet.kiosk import run_listener
from spine_edge.dicomnet.scp import ListenerConfig
from spine_edge.errors import SpineEdgeError
from spine_edge.service.worker import WorkerConfig


@click.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=field_default(ListenerConfig, "port"),
    show_default=True,
    help="DICOM port (0: a free one).",
)
@click.option(
    "--host",
    default=field_default(ListenerConfig, "host"),
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens it to the network.",
)
@dicom_options
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("spine-edge-listen"),
    show_default=True,
    help="Results folder: results.jsonl, pictures, dicom-inbox/, dicom/, outbox/.",
)
@cascade_options
def listen(
    port: int,
    host: str,
    ae_title: str,
    allow_ae: tuple[str, ...],
    dicom_out: Path | None,
    send_to: str | None,
    no_heatmap_sc: bool,
    out: Path,
    bundle: Path | None,
    precision: PrecisionChoice,
    backend: BackendChoice,
    provider: ProviderChoice | None,
    batch_size: int,
    threads: int | None,
    queue_size: int,
    no_pictures: bool,
) -> None:
    """Receive radiographs by DICOM C-STORE, analyse each, write (and send) an SR and Secondary Captures.

    DX, CR and Secondary Capture images are analysed; reports, RT objects and presentation states
    are accepted and left alone; CT and MR are refused (and logged in results.jsonl). Runs until
    SIGTERM or Ctrl-C; images received but not analysed are resumed at the next start. To take
    HTTP uploads on the same models as well, run `spine-edge serve --dicom-port` instead.
    """
    try:
        worker_config = WorkerConfig(
            cascade=cascade_config(bundle, precision, backend, provider, batch_size, threads),
            out=out.absolute(),
            queue_size=queue_size,
            pictures=not no_pictures,
        )
        config = gateway_config(
            out,
            host=host,
            port=port,
            ae_title=ae_title,
            allow_ae=allow_ae,
            dicom_out=dicom_out,
            send_to=send_to,
            no_heatmap_sc=no_heatmap_sc,
        )
    except SpineEdgeError as exc:
        fail(exc, EXIT_USAGE)
        return
    quiet_dicom_log()
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
