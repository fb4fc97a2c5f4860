"""``spine-edge serve``: the kiosk service (HTTP API + touch-screen page) on one loaded Cascade."""

from __future__ import annotations

import ipaddress
import logging
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_USAGE, fail
from spine_edge.config import field_default, literal_values
from spine_edge.dicomnet.scp import ListenerConfig
from spine_edge.errors import SpineEdgeError
from spine_edge.service.worker import WorkerConfig

if TYPE_CHECKING:
    from spine_edge.dicomnet.gateway import DicomGatewayConfig

F = TypeVar("F", bound=Callable[..., Any])


def _cascade_default(name: str) -> Any:
    return field_default(CascadeConfig, name)


def _listener_default(name: str) -> Any:
    return field_default(ListenerConfig, name)


def _apply(command: F, options: tuple[Callable[[F], F], ...]) -> F:
    # Applied last to first, so ``--help`` lists them in the order written.
    for option in reversed(options):
        command = option(command)
    return command


def cascade_options(command: F) -> F:
    """The options that choose the models and the queue (shared by ``serve``, ``watch`` and ``listen``).

    Choices come from the ``Literal`` types and defaults from :class:`CascadeConfig` and
    :class:`WorkerConfig`, so a new precision or provider, or a changed default, reaches every command.
    """
    return _apply(
        command,
        (
            click.option(
                "--bundle",
                type=click.Path(file_okay=False, path_type=Path),
                default=_cascade_default("bundle"),
                help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
            ),
            click.option(
                "--precision",
                type=click.Choice(literal_values(PrecisionChoice)),
                default=_cascade_default("precision"),
                show_default=True,
                help="auto: TensorRT's fastest built plan, or fp32 on ONNX Runtime.",
            ),
            click.option(
                "--backend",
                type=click.Choice(literal_values(BackendChoice)),
                default=_cascade_default("backend"),
                show_default=True,
                help="auto: TensorRT when the bundle has plans and tensorrt is installed.",
            ),
            click.option(
                "--provider",
                type=click.Choice(literal_values(ProviderChoice)),
                default=_cascade_default("provider"),
                help="ONNX Runtime execution provider [default: fastest available].",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=_cascade_default("batch_size"),
                show_default=True,
                help="Most queued images run in one model call.",
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=1),
                default=_cascade_default("threads"),
                help="ONNX Runtime threads [default: the cores available].",
            ),
            click.option(
                "--queue-size",
                type=click.IntRange(min=1),
                default=field_default(WorkerConfig, "queue_size"),
                show_default=True,
                help="Images that may wait for the models; more are refused (HTTP 503, DICOM 0xA700: retry).",
            ),
            click.option(
                "--no-pictures",
                is_flag=True,
                default=not field_default(WorkerConfig, "pictures"),
                help="Do not write image, overlay and heatmap PNGs.",
            ),
        ),
    )


def cascade_config(
    bundle: Path | None, precision: str, backend: str, provider: str | None, batch_size: int, threads: int | None
) -> CascadeConfig:
    """The :class:`CascadeConfig` the shared options describe (None: the default bundle location)."""
    # The casts hold: click.Choice, built from the same Literal types, has checked each value.
    return CascadeConfig(
        bundle=bundle,
        precision=cast(PrecisionChoice, precision),
        backend=cast(BackendChoice, backend),
        provider=cast("ProviderChoice | None", provider),
        batch_size=batch_size,
        threads=threads,
    )


def dicom_options(command: F) -> F:
    """The DICOM options ``listen`` and ``serve --dicom-port`` share (each names its own host and port)."""
    return _apply(
        command,
        (
            click.option(
                "--ae-title",
                default=_listener_default("ae_title"),
                show_default=True,
                help="Our AE title (the called AE title senders use).",
            ),
            click.option(
                "--allow-ae",
                "allow_ae",
                multiple=True,
                metavar="AET",
                help="Accept associations only from this calling AE title (repeat for more) [default: any].",
            ),
            click.option(
                "--dicom-out",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Where SR and Secondary Capture files go [default: OUT/dicom].",
            ),
            click.option(
                "--send-to",
                default=None,
                metavar="HOST:PORT:AET",
                help="Send every SR and SC to this PACS with C-STORE (durable outbox, retried until stored).",
            ),
            click.option(
                "--no-heatmap-sc", is_flag=True, help="Do not write the heatmap as a second Secondary Capture."
            ),
        ),
    )


def quiet_dicom_log() -> None:
    """Keep highdicom's INFO lines (one per attribute module it copies) out of a service's log."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def gateway_config(
    out: Path,
    *,
    host: str,
    port: int,
    ae_title: str,
    allow_ae: tuple[str, ...],
    dicom_out: Path | None,
    send_to: str | None,
    no_heatmap_sc: bool,
) -> DicomGatewayConfig:
    """The DICOM side the shared options describe, for a worker writing to ``out``.

    Raises:
        DicomNetError: An AE title, the port or ``--send-to`` is malformed.
    """
    # Imported here: ``serve`` without --dicom-port never needs the DICOM side.
    from spine_edge.dicomnet.common import Destination
    from spine_edge.dicomnet.kiosk import dicom_config

    return dicom_config(
        out.absolute(),
        ae_title=ae_title,
        host=host,
        port=port,
        allowed_calling_aes=allow_ae,
        dicom_out=None if dicom_out is None else dicom_out.absolute(),
        send_to=None if send_to is None else Destination.parse(send_to),
        heatmap_sc=not no_heatmap_sc,
    )


def read_token(path: Path) -> str:
    """The API token in ``path`` (surrounding whitespace removed); warns when others may read the file."""
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise SpineEdgeError(f"{path}: the token file is empty; write the token in it")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: {path} is readable by other users; chmod 600 it", err=True)
    return token


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@cascade_options
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("kiosk_results"),
    show_default=True,
    help="Output folder: results.jsonl, inbox/, images/, overlays/, heatmaps/ (and dicom-inbox/, dicom/, outbox/).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the API to the network: use --token-file.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File holding an API token every request must send as 'Authorization: Bearer <token>'.",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="Largest upload accepted (HTTP 413 beyond).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds POST /v1/predict waits before answering 504 with a job id to poll.",
)
@click.option(
    "--watch",
    "watch_folders",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Also process files dropped into this folder (repeatable); see spine-edge watch.",
)
@click.option(
    "--dicom-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also receive images by DICOM C-STORE on this port (0: a free one), as spine-edge listen does "
    "[default: no DICOM].",
)
@click.option(
    "--dicom-host",
    default=_listener_default("host"),
    show_default=True,
    help="Address the DICOM listener binds; 0.0.0.0 opens it to the network.",
)
@dicom_options
def serve(
    bundle: Path | None,
    precision: PrecisionChoice,
    backend: BackendChoice,
    provider: ProviderChoice | None,
    batch_size: int,
    threads: int | None,
    queue_size: int,
    no_pictures: bool,
    out: Path,
    host: str,
    port: int,
    token_file: Path | None,
    max_upload_mb: float,
    request_timeout: float,
    watch_folders: tuple[Path, ...],
    dicom_port: int | None,
    dicom_host: str,
    ae_title: str,
    allow_ae: tuple[str, ...],
    dicom_out: Path | None,
    send_to: str | None,
    no_heatmap_sc: bool,
) -> None:
    """Serve the cascade over HTTP with a touch-screen page at http://HOST:PORT/.

    Loads the models once (exit 3 if they cannot run here), then answers POST /v1/predict with the
    same record `spine-edge infer` writes, appending every record to OUT/results.jsonl. With
    --dicom-port the same models and queue also analyse images received by DICOM C-STORE and write
    (and send) their SR and Secondary Captures, as `spine-edge listen` does. Stops on SIGTERM or
    Ctrl-C after finishing the queued images.
    """
    from spine_edge.service.app import AppConfig, DicomEndpoint
    from spine_edge.service.server import ServeConfig
    from spine_edge.service.server import serve as run_service

    if not _loopback(host):
        click.echo(
            f"warning: listening on {host}: the API is reachable from the network"
            + ("" if token_file else " WITHOUT a token (add --token-file)"),
            err=True,
        )
    dicom_only = {"--dicom-out": dicom_out, "--send-to": send_to, "--allow-ae": allow_ae}
    if dicom_port is None and any(dicom_only.values()):
        # Silently ignoring them would leave an operator waiting for SRs that nothing writes.
        named = ", ".join(name for name, value in dicom_only.items() if value)
        click.echo(f"error: {named}: only with --dicom-port (without it nothing listens for DICOM)", err=True)
        raise SystemExit(EXIT_USAGE)
    try:
        token = read_token(token_file) if token_file else None
        config = ServeConfig(
            worker=WorkerConfig(
                cascade=cascade_config(bundle, precision, backend, provider, batch_size, threads),
                out=out,
                queue_size=queue_size,
                pictures=not no_pictures,
            ),
            app=AppConfig(max_upload_bytes=int(max_upload_mb * 2**20), token=token, request_timeout=request_timeout),
            host=host,
            port=port,
            watch=watch_folders,
            dicom=None
            if dicom_port is None
            else gateway_config(
                out,
                host=dicom_host,
                port=dicom_port,
                ae_title=ae_title,
                allow_ae=allow_ae,
                dicom_out=dicom_out,
                send_to=send_to,
                no_heatmap_sc=no_heatmap_sc,
            ),
        )
    except (OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from exc
    except SpineEdgeError as exc:
        fail(exc, EXIT_USAGE)
        return

    if config.dicom is not None:
        quiet_dicom_log()

    def listening(url: str, dicom: DicomEndpoint | None) -> None:
        click.echo(f"serving on {url} (results in {out / 'results.jsonl'})")
        if dicom is not None:
            target = f"; sending results to {send_to}" if send_to else ""
            click.echo(f"listening for DICOM as {dicom}{target}")

    try:
        run_service(config, on_listening=listening)
    except SpineEdgeError as exc:
        fail(exc)
