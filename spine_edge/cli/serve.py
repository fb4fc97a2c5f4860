"""``spine-edge serve``: the kiosk service (HTTP API + touch-screen page) on one loaded Cascade."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from spine_edge.bundle import default_bundle_path
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_USAGE, fail
from spine_edge.errors import SpineEdgeError

F = TypeVar("F", bound=Callable[..., Any])


def cascade_options(command: F) -> F:
    """The options that choose the models and the output folder (shared with ``spine-edge watch``)."""
    for option in reversed(
        (
            click.option(
                "--bundle",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle].",
            ),
            click.option(
                "--precision",
                type=click.Choice(["auto", "fp32", "fp16", "int8"]),
                default="auto",
                show_default=True,
                help="auto: TensorRT's fastest built plan, or fp32 on ONNX Runtime.",
            ),
            click.option(
                "--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True
            ),
            click.option(
                "--provider",
                type=click.Choice(["cpu", "cuda", "tensorrt"]),
                default=None,
                help="ONNX Runtime execution provider [default: fastest available].",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=4,
                show_default=True,
                help="Most queued images run in one model call.",
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=1),
                default=None,
                help="ONNX Runtime threads [default: the cores available].",
            ),
            click.option(
                "--queue-size",
                type=click.IntRange(min=1),
                default=16,
                show_default=True,
                help="Images that may wait for the models; more are refused (HTTP 503).",
            ),
            click.option("--no-pictures", is_flag=True, help="Do not write image, overlay and heatmap PNGs."),
        )
    ):
        command = option(command)
    return command


def cascade_config(
    bundle: Path | None, precision: str, backend: str, provider: str | None, batch_size: int, threads: int | None
) -> CascadeConfig:
    """The :class:`CascadeConfig` the shared options describe."""
    return CascadeConfig(
        bundle=bundle or default_bundle_path(),
        precision=precision,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        provider=provider,  # type: ignore[arg-type]
        batch_size=batch_size,
        threads=threads,
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
    help="Output folder: results.jsonl, inbox/, images/, overlays/, heatmaps/.",
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
def serve(
    bundle: Path | None,
    precision: str,
    backend: str,
    provider: str | None,
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
) -> None:
    """Serve the cascade over HTTP with a touch-screen page at http://HOST:PORT/.

    Loads the models once (exit 3 if they cannot run here), then answers POST /v1/predict with the
    same record `spine-edge infer` writes, appending every record to OUT/results.jsonl. Stops on
    SIGTERM or Ctrl-C after finishing the queued images.
    """
    from spine_edge.service.app import AppConfig
    from spine_edge.service.server import ServeConfig
    from spine_edge.service.server import serve as run_service
    from spine_edge.service.worker import WorkerConfig

    if not _loopback(host):
        click.echo(
            f"warning: listening on {host}: the API is reachable from the network"
            + ("" if token_file else " WITHOUT a token (add --token-file)"),
            err=True,
        )
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
        )
    except (OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from exc
    except SpineEdgeError as exc:
        fail(exc, EXIT_USAGE)
        return
    try:
        run_service(
            config, on_listening=lambda url: click.echo(f"serving on {url} (results in {out / 'results.jsonl'})")
        )
    except SpineEdgeError as exc:
        fail(exc)
