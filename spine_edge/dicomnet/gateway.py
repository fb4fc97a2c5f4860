"""The DICOM side of the kiosk process: listener in, SR + SC out, outbox to the PACS.

It owns no queue and no model: received images go to the service's job queue through ``submit``,
refusals go to its results log through ``record``, and each finished record comes back through
the callback passed with the job. What follows from a record (the SR and SCs, their sending) is
derived from results.jsonl alone, so it is replayed after a crash::

    C-STORE ─► StorageListener ─► inbox/<uid>.dcm ─► submit(job, on_done) ─► worker ─► results.jsonl
                                                                              │ on_done(record)
                         outbox/pending ◄── put ◄── dicom_out/<uid>/SR.dcm, SC-*.dcm ◄┘

On start it (1) replays ``ok`` records of inbox images whose result folder lacks its ``.complete``
marker (results not all written, or not all queued for sending), (2) starts the outbox, which sends what is pending from before, (3) starts
the listener, and (4) submits, in the background, inbox images that have no record yet (received
before a crash but not analysed), waiting whenever the queue is full.

Example:
    >>> with DicomGateway(config, submit=submit_to_worker, record=append_record) as gateway:  # doctest: +SKIP
    ...     gateway.listener.wait()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from spine_edge.dicomnet.common import DicomNetError
from spine_edge.dicomnet.outbox import Outbox, OutboxConfig
from spine_edge.dicomnet.scp import ListenerConfig, ReceivedImage, StorageListener
from spine_edge.dicomnet.writer import (
    DicomOutputConfig,
    result_folder,
    write_secondary_captures,
    write_sr,
)
from spine_edge.errors import SpineEdgeError
from spine_edge.results import latest_by_source, read_jsonl
from spine_edge.support import import_optional

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: Where inbox images whose record is an error are moved, relative to the inbox.
FAILED_DIR = "failed"

#: Written into a result folder once all its files are written (and queued for sending); its absence
#: at start means "write (and queue) them again".
COMPLETE_MARKER = ".complete"

#: ``submit(image, on_done)``: queue one received image; False when the queue has no room now.
Submit = Callable[[ReceivedImage, Callable[[dict[str, Any]], None]], bool]
#: ``record(record)``: append a record (a refusal) to results.jsonl.
Record = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class DicomGatewayConfig:
    """The DICOM side of one process.

    Attributes:
        listener: The storage SCP.
        results_jsonl: The service's results log, read at start to replay and resume.
        output: Where SR and SCs go; None writes none (then nothing is sent either).
        outbox: Where and how to send them; None keeps them local.
        resume_poll_s: Wait between tries while resuming into a full queue.
        picture_wait_s: How long to wait for the worker's PNGs (windowed image, heatmap) before writing without them.
    """

    listener: ListenerConfig
    results_jsonl: Path
    output: DicomOutputConfig | None = None
    outbox: OutboxConfig | None = None
    resume_poll_s: float = 0.2
    picture_wait_s: float = 10.0


class DicomGateway:
    """Listener, results writer and outbox around the service's queue (see the module docstring).

    Args:
        config: The DICOM side's configuration.
        submit: Queues a received image (see :data:`Submit`).
        record: Appends a refusal to results.jsonl (see :data:`Record`).
    """

    def __init__(self, config: DicomGatewayConfig, *, submit: Submit, record: Record) -> None:
        if config.outbox is not None and config.output is None:
            raise DicomNetError("sending results to a PACS needs a DICOM output folder (--dicom-out)")
        self.config = config
        self._submit = submit
        self._record = record
        self.listener = StorageListener(config.listener, self)
        self.outbox = Outbox(config.outbox) if config.outbox is not None else None
        self._stopping = threading.Event()
        self._resumer: threading.Thread | None = None
        self._writer: ThreadPoolExecutor | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Replay, start sending, start listening, resume the inbox (see the module docstring)."""
        if self.config.output is not None:
            # Importing highdicom takes over a second: pay it now, not on the first image, and fail
            # at start, not at the first result, when it is missing.
            import_optional("highdicom", "dicom", "Writing results as DICOM SR and Secondary Capture")
        records = latest_by_source(read_jsonl(self.config.results_jsonl))
        self.replay(records.values())
        # DICOM results are built off the worker's thread: decoding the image again and encoding
        # an SC would otherwise delay the next inference.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spine-edge-dicom-results")
        if self.outbox is not None:
            self.outbox.start()
        self.listener.start()
        waiting = self.unprocessed(records)
        if waiting:
            log.info("resuming %d image(s) received before the last stop but not analysed", len(waiting))
            self._stopping.clear()
            self._resumer = threading.Thread(
                target=self._resume, args=(waiting,), name="spine-edge-resume", daemon=True
            )
            self._resumer.start()

    def stop(self) -> None:
        """Stop listening, resuming and sending; pending work stays on disk for the next start."""
        self._stopping.set()
        self.listener.stop()
        if self._resumer is not None:
            self._resumer.join()
            self._resumer = None
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self.outbox is not None:
            self.outbox.stop()

    def accept(self, image: ReceivedImage) -> bool:
        """:class:`~spine_edge.dicomnet.scp.ListenerSink`: queue an image; its record comes back to :meth:`on_done`."""
        return self._submit(image, self.on_done)

    def refuse(self, record: Mapping[str, Any]) -> None:
        """:class:`~spine_edge.dicomnet.scp.ListenerSink`: log a refusal in results.jsonl."""
        self._record(record)

    def on_done(self, record: Mapping[str, Any]) -> None:
        """The job callback: hand the finished record to the results thread (returns at once)."""
        writer = self._writer
        try:
            if writer is not None:
                writer.submit(self.on_result, record)
                return
        except RuntimeError:  # shut down between the check and the submit
            pass
        # Stopped meanwhile: the record is in results.jsonl, and the next start replays it.
        log.info("%s: DICOM results left for the next start (stopping)", record.get("source"))

    def on_result(self, record: Mapping[str, Any]) -> None:
        """Write and queue the DICOM results of a finished record (once it is in results.jsonl).

        An image whose record is an error leaves the inbox for ``inbox/failed/``, so that a good copy
        sent again is analysed instead of being taken for a duplicate. Never raises: a result that
        cannot be written as DICOM is logged, and its JSON record stands.
        """
        source = str(record.get("source"))
        if record.get("status") == "error" and self._in_inbox(source):
            self._set_aside(Path(source))
            return
        if self.config.output is None:
            return
        try:
            sr = write_sr(record, self.config.output)
            if sr is None:
                return
            # The SR is the result a viewer or a worklist acts on: it leaves before the pictures.
            self._send(sr)
            for picture in write_secondary_captures(record, self.config.output, image=self._windowed_image(record)):
                if picture is not None:
                    self._send(picture)
            (sr.parent / COMPLETE_MARKER).touch()
        except SpineEdgeError as exc:
            log.error("%s: no DICOM result: %s", record.get("source"), exc)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Write (and queue) the DICOM results of ``ok`` inbox records that lack them; returns how many."""
        if self.config.output is None:
            return 0
        replayed = 0
        for record in records:
            if record.get("status") != "ok" or not self._in_inbox(str(record.get("source"))):
                continue
            folder = result_folder(self.config.output.folder, Path(str(record["source"])).stem)
            if not (folder / COMPLETE_MARKER).is_file():
                self.on_result(record)
                replayed += 1
        if replayed:
            log.info("replayed the DICOM results of %d record(s) interrupted by the last stop", replayed)
        return replayed

    def unprocessed(self, records: Mapping[str, Mapping[str, Any]]) -> list[Path]:
        """Inbox images without a record, oldest first."""
        done = {_key(source) for source in records}
        return [path for path in self.listener.inbox_files() if _key(str(path)) not in done]

    def _send(self, path: Path) -> None:
        if self.outbox is not None:
            self.outbox.put(path)

    def _set_aside(self, path: Path) -> None:
        failed = self.config.listener.inbox / FAILED_DIR
        failed.mkdir(parents=True, exist_ok=True)
        try:
            path.replace(failed / path.name)
        except FileNotFoundError:
            return
        log.info("%s could not be analysed (see results.jsonl); moved to %s", path.name, failed)

    def _windowed_image(self, record: Mapping[str, Any]) -> np.ndarray | None:
        """The worker's PNG of the windowed image, once its pictures are drawn (None: decode again).

        The worker draws its PNGs after writing the record; waiting for them (the image and the
        heatmap, written atomically) saves decoding the radiograph a second time, and the heatmap
        SC is made from the heatmap PNG.
        """
        root = self.config.output.results_root if self.config.output is not None else None
        if root is None:
            return None
        pictures = [root / str(record[key]) for key in ("image", "heatmap") if record.get(key)]
        deadline = time.monotonic() + self.config.picture_wait_s
        while not all(p.is_file() for p in pictures) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not record.get("image"):
            return None
        image = cv2.imread(str(root / str(record["image"])), cv2.IMREAD_GRAYSCALE)
        return None if image is None else np.asarray(image)

    def _in_inbox(self, source: str) -> bool:
        return Path(source).resolve().parent == self.config.listener.inbox.resolve()

    def _resume(self, paths: list[Path]) -> None:
        for path in paths:
            image = ReceivedImage(path=path, sop_instance_uid=path.stem, sop_class_uid=_sop_class(path))
            while not self._stopping.is_set() and not self._submit(image, self.on_done):
                self._stopping.wait(self.config.resume_poll_s)
            if self._stopping.is_set():
                return


def _sop_class(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPClassUID", ""))
    except (InvalidDicomError, OSError):
        # The worker reads the file again and records why it cannot; the job still runs.
        return ""


def _key(source: str) -> str:
    return str(Path(source).resolve())
