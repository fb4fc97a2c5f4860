"""A durable outbox: DICOM results wait on disk until the PACS has stored them.

Layout::

    <outbox>/pending/<SOP Instance UID>.dcm         waiting to be sent
    <outbox>/pending/<SOP Instance UID>.dcm.json    attempts so far, when to try next, the last error
    <outbox>/failed/<SOP Instance UID>.dcm(.json)   refused for good by the PACS (e.g. SOP class not
                                                    supported): retrying cannot help; an operator
                                                    moves them back to pending/ after fixing the PACS

A file enters ``pending/`` atomically (written to a temporary name, fsynced, renamed) and leaves it
only after the PACS answered the C-STORE with success or a warning, so a PACS that is down, a
network cut or a restart of this process loses nothing: the next start sends what is pending.
Transient failures (no connection, association rejected or aborted, timeout, "out of resources")
are retried for ever with exponential backoff (``first_retry_s`` doubling up to ``max_retry_s``).
Sent files are removed from the outbox; the copy in the DICOM output folder stays.

Example:
    >>> config = OutboxConfig(Path("out/outbox"), Destination.parse("127.0.0.1:4242:ORTHANC"))
    >>> with Outbox(config) as outbox:  # doctest: +SKIP
    ...     outbox.put(Path("out/dicom/1.2.3/SR.dcm"))
    ...     outbox.wait_empty(timeout=30)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pydicom.uid
from pydicom.errors import InvalidDicomError

from spine_edge.dicomnet.common import DEFAULT_AE_TITLE, Destination, DicomNetError, check_ae_title, oldest_first
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.support import import_optional

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

log = logging.getLogger(__name__)

PENDING = "pending"
FAILED = "failed"

#: C-STORE failure statuses that no retry will change (PS3.4 B.2.3, PS3.7 C): the PACS does not
#: take this SOP class, does not understand the object, or says it does not match its class.
_PERMANENT_FAILURES: tuple[range, ...] = (
    range(0x0122, 0x0123),  # SOP class not supported
    range(0x0124, 0x0125),  # not authorised
    range(0xA900, 0xAA00),  # data set does not match SOP class
    range(0xC000, 0xD000),  # cannot understand
)


@dataclass(frozen=True)
class OutboxConfig:
    """Where results wait and where they go.

    Attributes:
        folder: The outbox folder (created).
        destination: The PACS (``--send-to HOST:PORT:AET``).
        calling_ae_title: Our AE title as the PACS sees it.
        first_retry_s: Wait after the first failure; doubles with each further failure.
        max_retry_s: Longest wait between two attempts.
        network_timeout_s: Connection, association and response timeout.
    """

    folder: Path
    destination: Destination
    calling_ae_title: str = DEFAULT_AE_TITLE
    first_retry_s: float = 2.0
    max_retry_s: float = 300.0
    network_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_ae_title(self.calling_ae_title)
        if not 0 < self.first_retry_s <= self.max_retry_s:
            raise DicomNetError(
                f"outbox retry waits must satisfy 0 < first ({self.first_retry_s}) <= max ({self.max_retry_s})"
            )


@dataclass(frozen=True)
class SendState:
    """The outbox's memory of one pending file (its ``.json`` sidecar).

    Attributes:
        attempts: Failed attempts so far.
        next_attempt: Unix time before which the file is not tried again.
        last_error: Why the last attempt failed, or "".
    """

    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""


class Outbox:
    """Sends every file put into it to one destination, in a background thread, until it is stored.

    Use as a context manager (or :meth:`start` / :meth:`stop`); :meth:`put` may be called from any
    thread. :meth:`send_due` runs one pass in the caller's thread (what the thread does each time).
    """

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        self.pending_dir = config.folder / PENDING
        self.failed_dir = config.folder / FAILED
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pass_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the sending thread; files pending from an earlier run are sent first."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="spine-edge-outbox", daemon=True)
        self._thread.start()
        waiting = len(self.pending())
        if waiting:
            log.info("outbox: %d file(s) pending for %s from an earlier run", waiting, self.config.destination)

    def stop(self) -> None:
        """Stop the thread after the current attempt; pending files stay for the next start."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._thread = None

    def put(self, path: Path) -> Path:
        """Queue a DICOM file for sending: it is copied into ``pending/`` atomically.

        Returns:
            The pending copy.

        Raises:
            DicomNetError: The file is not a DICOM Part 10 file with a SOP Instance UID.
        """
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            raise DicomNetError(f"{path}: cannot queue it for sending: not a readable DICOM file ({exc})") from exc
        uid = str(header.get("SOPInstanceUID") or "")
        if not uid or not all(c.isdigit() or c == "." for c in uid):
            raise DicomNetError(f"{path}: cannot queue it for sending: no valid SOP Instance UID")
        target = self.pending_dir / f"{uid}.dcm"
        # State first: the sending thread only sees the file once its sidecar exists.
        self._write_state(target, SendState())
        write_bytes_atomic(target, Path(path).read_bytes())
        self._wake.set()
        return target

    def pending(self) -> list[Path]:
        """Files waiting to be sent, oldest first."""
        return oldest_first(self.pending_dir.glob("*.dcm"))

    def failed(self) -> list[Path]:
        """Files the destination refused for good."""
        return sorted(self.failed_dir.glob("*.dcm"))

    def wait_empty(self, timeout: float) -> bool:
        """Wait until nothing is pending; returns whether that happened within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def state(self, path: Path) -> SendState:
        """The sidecar state of a pending file (a fresh state when there is none)."""
        sidecar = path.with_name(path.name + ".json")
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            return SendState(int(data["attempts"]), float(data["next_attempt"]), str(data["last_error"]))
        except (OSError, ValueError, KeyError, TypeError):
            return SendState()

    def send_due(self) -> int:
        """Send every pending file that is due, over one association.

        Returns:
            How many files the destination stored.
        """
        with self._pass_lock:
            now = time.time()
            due = [p for p in self.pending() if self.state(p).next_attempt <= now]
            if not due:
                return 0
            return self._send(due)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.send_due()
            except Exception:  # the sender thread must outlive any one bad file or network error
                log.exception("outbox: unexpected error while sending; retrying later")
            self._wake.wait(timeout=self._seconds_to_next())
            self._wake.clear()

    def _seconds_to_next(self) -> float:
        times = [self.state(p).next_attempt for p in self.pending()]
        if not times:
            return 5.0
        return float(min(5.0, max(0.05, min(times) - time.time())))

    def _send(self, files: list[Path]) -> int:
        pynetdicom = import_optional("pynetdicom", "dicom", "Sending results to a PACS")
        datasets: list[tuple[Path, Any]] = []
        for path in files:
            try:
                datasets.append((path, pydicom.dcmread(path)))
            except (InvalidDicomError, OSError) as exc:
                self._fail_permanently(path, f"unreadable in the outbox: {exc}")
        if not datasets:
            return 0
        ae = pynetdicom.AE(ae_title=self.config.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.network_timeout_s
        ae.connection_timeout = self.config.network_timeout_s
        for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
            ae.add_requested_context(
                sop_class, [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian]
            )
        destination = self.config.destination
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            reason = f"no association with {destination} (refused, rejected or unreachable)"
            for path, _ in datasets:
                self._retry_later(path, reason)
            return 0
        sent = 0
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for path, ds in datasets:
                if self._stopping.is_set() or not assoc.is_established:
                    break
                if str(ds.SOPClassUID) not in accepted:
                    self._fail_permanently(path, f"{destination} does not accept SOP class {ds.SOPClassUID.name}")
                    continue
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is not None and (code == 0x0000 or 0xB000 <= code <= 0xBFFF):
                    self._done(path)
                    sent += 1
                elif code is not None and any(code in r for r in _PERMANENT_FAILURES):
                    self._fail_permanently(path, f"{destination} answered C-STORE with failure 0x{code:04X}")
                else:
                    what = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                    self._retry_later(path, f"{destination}: {what}")
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            log.info("outbox: %d file(s) stored by %s", sent, destination)
        return sent

    def _done(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)

    def _retry_later(self, path: Path, reason: str) -> None:
        previous = self.state(path)
        attempts = previous.attempts + 1
        wait = min(self.config.max_retry_s, self.config.first_retry_s * 2 ** (attempts - 1))
        self._write_state(path, SendState(attempts, time.time() + wait, reason))
        log.warning("outbox: %s not sent (attempt %d): %s; next try in %.0f s", path.name, attempts, reason, wait)

    def _fail_permanently(self, path: Path, reason: str) -> None:
        previous = self.state(path)
        target = self.failed_dir / path.name
        path.replace(target)
        self._write_state(target, SendState(previous.attempts + 1, 0.0, reason))
        path.with_name(path.name + ".json").unlink(missing_ok=True)
        log.error("outbox: %s refused for good: %s; it is kept in %s", path.name, reason, self.failed_dir)

    def _write_state(self, path: Path, state: SendState) -> None:
        payload = {"attempts": state.attempts, "next_attempt": state.next_attempt, "last_error": state.last_error}
        write_text_atomic(path.with_name(path.name + ".json"), json.dumps(payload))
