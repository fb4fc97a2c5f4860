"""The DICOM storage SCP: receive radiographs by C-STORE into an inbox, hand them on for analysis.

What it does with each C-STORE request, by SOP class (tables in :mod:`spine_edge.dicomnet.common`):

- **Radiographs** (DX for presentation / for processing, CR, Secondary Capture): the encoded data
  set is written to ``<inbox>/<SOP Instance UID>.dcm`` atomically (temporary file, fsync, rename)
  and handed to the sink; only then does the sender get "success". A crash after the response
  loses nothing: the file is on disk and the next start resumes it. An instance already in the
  inbox (the same SOP Instance UID sent again) is answered "success" and not analysed twice.
  When the sink has no room (the job queue is full), the file is removed again and the sender
  gets 0xA700 "out of resources", which every storage SCU treats as "try again later".
- **Reports, RT objects, presentation states**: answered "success", not stored, not analysed.
- **CT and MR**: refused with 0x0122 "SOP class not supported", a warning in the log and a
  ``refused`` record handed to the sink (the bundle was trained on radiographs only).
- Anything else is not negotiated: the sender's presentation context is rejected.

Images are accepted in every transfer syntax the reader decodes here (JPEG 2000 lossless included;
see :func:`~spine_edge.dicomnet.common.image_transfer_syntaxes`). The listener binds 127.0.0.1 unless
told otherwise and can restrict calling AE titles to an allow-list.

A listener killed while a file arrives leaves nothing half-written in the inbox: pynetdicom hands
the handler a data set only once it is complete, and the write is atomic.

Example:
    >>> config = ListenerConfig(inbox=Path("out/inbox"), port=11112)
    >>> with StorageListener(config, sink) as listener:  # doctest: +SKIP
    ...     listener.wait()
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.uid import UID

from spine_edge.dicomnet.common import (
    ANALYSED_SOP_CLASSES,
    DEFAULT_AE_TITLE,
    PASSIVE_SOP_CLASSES,
    REFUSED_SOP_CLASSES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    DicomNetError,
    check_ae_title,
    image_transfer_syntaxes,
    oldest_first,
)
from spine_edge.io_utils import write_bytes_atomic
from spine_edge.results import CascadeResult
from spine_edge.support import import_optional

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: C-STORE response statuses (PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_INVALID_SOP_INSTANCE = 0x0117

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: The ``origin`` of jobs and records that came in over DICOM.
ORIGIN = "dicom"


@dataclass(frozen=True)
class ListenerConfig:
    """How the storage SCP listens.

    Attributes:
        inbox: Folder received images are written to (created).
        ae_title: Our AE title (the "called AE title" senders use).
        host: Address to bind; 127.0.0.1 keeps the listener off the network until an operator
            chooses an interface (``0.0.0.0`` for all).
        port: TCP port; 0 picks a free one (see :attr:`StorageListener.port`).
        allowed_calling_aes: Calling AE titles allowed to associate; empty allows any.
        network_timeout_s: ACSE, DIMSE and network timeout.
        max_associations: Associations served at the same time.
    """

    inbox: Path
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: frozenset[str] = field(default_factory=frozenset)
    network_timeout_s: float = 60.0
    max_associations: int = 8

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title)
        for title in self.allowed_calling_aes:
            check_ae_title(title)
        if not 0 <= self.port < 65536:
            raise DicomNetError(f"listening port {self.port} is not a TCP port (0-65535)")


@dataclass(frozen=True)
class ReceivedImage:
    """A radiograph safely in the inbox.

    Attributes:
        path: Its file, ``<inbox>/<SOP Instance UID>.dcm``.
        sop_instance_uid: SOP Instance UID.
        sop_class_uid: SOP Class UID.
        calling_ae_title: Who sent it ("" when resumed from the inbox after a restart).
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae_title: str = ""

    def meta(self) -> dict[str, str]:
        """String metadata for the job (what the worker passes along with the record)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "calling_ae_title": self.calling_ae_title,
        }


class ListenerSink(Protocol):
    """Where the listener hands what it received: the service's job queue and results log."""

    def accept(self, image: ReceivedImage) -> bool:
        """Queue an image for analysis; False when there is no room now (the sender retries)."""
        ...

    def refuse(self, record: Mapping[str, Any]) -> None:
        """Record a ``refused`` result (the listener answers the sender itself)."""
        ...


def refused_record(sop_instance_uid: str, sop_class_uid: str, modality: str, calling_ae_title: str) -> dict[str, Any]:
    """The results.jsonl record of an image refused for its modality.

    It has every key of an ordinary record (``CascadeResult.to_dict()``), with status ``refused``,
    the reason in ``error`` and ``refusal: {code: "modality", reason}``, and where it came from.
    """
    reason = (
        f"{modality} image (SOP class {sop_class_uid}) refused: the bundle judges radiographs "
        "(DX, CR, Secondary Capture) only"
    )
    record = CascadeResult(source=f"dicom://{calling_ae_title or '?'}/{sop_instance_uid}", status="error").to_dict()
    record.update(
        status="refused",
        error=reason,
        refusal={"code": "modality", "reason": reason},
        origin=ORIGIN,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        calling_ae_title=calling_ae_title,
    )
    return record


class StorageListener:
    """A pynetdicom storage SCP that feeds an inbox (see the module docstring).

    Args:
        config: Where to listen and store.
        sink: Receives each stored image and each refusal.
    """

    def __init__(self, config: ListenerConfig, sink: ListenerSink) -> None:
        self.config = config
        self.sink = sink
        self.inbox = config.inbox
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._arriving: set[str] = set()
        self._server: Any = None
        self._stopped = threading.Event()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port it listens on (the chosen one when the config asked for 0)."""
        if self._server is None:
            raise DicomNetError("the DICOM listener is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises:
            DicomNetError: The address cannot be bound (port in use, no permission).
            MissingDependencyError: pynetdicom is not installed (``spine-edge[dicom]``).
        """
        if self._server is not None:
            return
        self._remove_partial_writes()
        ae = self._application_entity()
        evt = import_optional("pynetdicom", "dicom", "The DICOM listener").evt
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        address = (self.config.host, self.config.port)
        try:
            self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise DicomNetError(
                f"cannot listen for DICOM on {self.config.host}:{self.config.port} ({exc}); "
                "choose another --port or stop the program that uses it"
            ) from exc
        self._stopped.clear()
        log.info("DICOM listener %s on %s:%d, inbox %s", self.config.ae_title, self.config.host, self.port, self.inbox)

    def stop(self) -> None:
        """Stop listening; associations in progress are aborted (their senders retry)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` (from another thread or a signal handler); True once stopped."""
        return self._stopped.wait(timeout)

    def inbox_files(self) -> list[Path]:
        """Images in the inbox, oldest first (analysed or not: the results log tells which)."""
        return oldest_first(self.inbox.glob("*.dcm"))

    def _remove_partial_writes(self) -> None:
        # Temporary files of writes a crash interrupted: their senders never got "success".
        for partial in self.inbox.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted receive (the sender will send it again)", partial)
            partial.unlink(missing_ok=True)

    def _application_entity(self) -> Any:
        pynetdicom = import_optional("pynetdicom", "dicom", "The DICOM listener")
        ae = pynetdicom.AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.network_timeout_s
        ae.maximum_associations = self.config.max_associations
        if self.config.allowed_calling_aes:
            ae.require_calling_aet = sorted(self.config.allowed_calling_aes)
        ae.add_supported_context(pynetdicom.sop_class.Verification)
        image_syntaxes = list(image_transfer_syntaxes())
        for sop_class in sorted(ANALYSED_SOP_CLASSES | set(REFUSED_SOP_CLASSES)):
            ae.add_supported_context(sop_class, image_syntaxes)
        for sop_class in sorted(PASSIVE_SOP_CLASSES):
            ae.add_supported_context(sop_class, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
        return ae

    def _on_echo(self, event: Any) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_rejected(self, event: Any) -> None:
        log.warning(
            "association from %s (%s) rejected: calling AE title not in the allow-list, or no common context",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

    def _on_store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        uid = str(event.request.AffectedSOPInstanceUID)
        calling = str(event.assoc.requestor.ae_title).strip()
        if sop_class in REFUSED_SOP_CLASSES:
            modality = REFUSED_SOP_CLASSES[sop_class]
            record = refused_record(uid, sop_class, modality, calling)
            log.warning("%s from %s: %s", uid, calling, record["error"])
            self.sink.refuse(record)
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        if sop_class in PASSIVE_SOP_CLASSES:
            log.info("%s from %s: %s accepted, not analysed (not an image)", uid, calling, _name(sop_class))
            return STATUS_SUCCESS
        if not _UID.match(uid) or len(uid) > 64:
            # The UID names the inbox file: anything but digits and dots could escape the folder.
            log.warning("C-STORE from %s with invalid SOP Instance UID %r refused", calling, uid)
            return STATUS_INVALID_SOP_INSTANCE
        return self._store_image(event, uid, sop_class, calling)

    def _store_image(self, event: Any, uid: str, sop_class: str, calling: str) -> int:
        path = self.inbox / f"{uid}.dcm"
        with self._lock:
            if uid in self._arriving or path.exists():
                log.info("%s from %s: already received, not analysed again", uid, calling)
                return STATUS_SUCCESS
            self._arriving.add(uid)
        try:
            try:
                write_bytes_atomic(path, event.encoded_dataset())
            except OSError as exc:
                log.error("%s from %s: cannot write it to the inbox %s (%s)", uid, calling, self.inbox, exc)
                return STATUS_OUT_OF_RESOURCES
            image = ReceivedImage(path=path, sop_instance_uid=uid, sop_class_uid=sop_class, calling_ae_title=calling)
            if not self.sink.accept(image):
                path.unlink(missing_ok=True)
                log.warning(
                    "%s from %s: the job queue is full; answered 'out of resources' (sender retries)", uid, calling
                )
                return STATUS_OUT_OF_RESOURCES
            log.info("%s from %s: received (%s), queued", uid, calling, _name(sop_class))
            return STATUS_SUCCESS
        finally:
            with self._lock:
                self._arriving.discard(uid)


def _name(sop_class: str) -> str:
    return str(UID(sop_class).name)
