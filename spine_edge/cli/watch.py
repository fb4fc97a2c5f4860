"""``spine-edge watch IN OUT``: process radiographs dropped into a folder, each exactly once."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from spine_edge.cli import fail
from spine_edge.cli.serve import cascade_config, cascade_options
from spine_edge.errors import SpineEdgeError
from spine_edge.service.worker import InferenceWorker, WorkerConfig
from spine_edge.watch import FolderWatcher, WatchConfig


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@cascade_options
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds between scans of FOLDER.",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds a file must stay unchanged before it is taken (still being copied otherwise).",
)
def watch(
    folder: Path,
    out: Path,
    bundle: Path | None,
    precision: str,
    backend: str,
    provider: str | None,
    batch_size: int,
    threads: int | None,
    queue_size: int,
    no_pictures: bool,
    interval: float,
    settle: float,
) -> None:
    """Process every complete file dropped into FOLDER; results in OUT/results.jsonl.

    Taken files move to OUT/watched/ (FOLDER only holds files not yet taken). After a restart, taken
    files without a record are processed first; no file is ever processed twice. Stops on SIGTERM
    or Ctrl-C after the queued images.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    config = WorkerConfig(
        cascade=cascade_config(bundle, precision, backend, provider, batch_size, threads),
        out=out,
        queue_size=queue_size,
        pictures=not no_pictures,
    )
    try:
        with InferenceWorker(config) as worker:
            watcher = FolderWatcher(WatchConfig(folder, interval=interval, settle=settle), worker)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, on_signal)
            click.echo(f"watching {folder.absolute()}; results in {worker.out / 'results.jsonl'}", err=True)
            watcher.run(stop)
    except SpineEdgeError as exc:
        fail(exc)
