"""Receive one uploaded image: streamed to disk under a size limit, never held whole in memory.

``POST`` bodies come in two shapes: ``multipart/form-data`` with one file part (what a browser's form
or ``curl -F file=@IM0001.dcm`` sends), or the raw file as the body (``curl --data-binary @IM0001.dcm
-H 'Content-Type: application/dicom'``). Both are written chunk by chunk to a hidden temporary file
next to the destination and renamed into place only when the whole body arrived, so a client that
disconnects halfway leaves no file that could become a job. The writes happen on the event loop,
chunk by chunk into the page cache (microseconds each); the upload is not fsynced, because the
durable fact is the record, which the worker syncs.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from spine_edge.errors import SpineEdgeError
from spine_edge.imageio import DICOM_SUFFIXES, RASTER_SUFFIXES

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

#: Suffix for a raw body by its content type (the reader sniffs the content anyway; the suffix
#: only helps a person browsing the inbox).
_SUFFIX_BY_TYPE = {
    "application/dicom": ".dcm",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/tiff": ".tif",
}
_KNOWN_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES
#: Bytes of non-file form fields accepted in a multipart body (a browser may add a few).
_FIELD_LIMIT = 64 * 1024


class UploadError(SpineEdgeError):
    """The request body is not an acceptable image upload.

    Attributes:
        status: The HTTP status to answer with (400, 411, 413, 415).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Upload:
    """A received file.

    Attributes:
        path: Where it was written.
        filename: The client's file name (may carry a patient name: never log it), or "".
        size: Bytes written.
    """

    path: Path
    filename: str
    size: int


def _suffix(filename: str, content_type: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix in _KNOWN_SUFFIXES:
        return suffix
    return _SUFFIX_BY_TYPE.get(content_type, ".bin")


def _too_large(limit: int) -> UploadError:
    return UploadError(
        413,
        f"the upload is larger than this service's limit of {limit / 2**20:g} MiB ({limit} bytes); "
        "send a smaller file, or start the service with a larger --max-upload-mb",
    )


def _clean_filename(raw: str) -> str:
    """The base name of a client's file name, without control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", "", raw.replace("\\", "/").rsplit("/", 1)[-1])[:255]


class _Sink:
    """A temporary file that becomes ``<stem><suffix>`` on :meth:`commit`, or disappears."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder = folder
        self.stem = stem
        self.temp = folder / f".{stem}.part"
        self.size = 0
        self._file: IO[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.temp, "wb")  # noqa: SIM115  (written across many calls, closed in commit/discard)
        self._file.write(data)
        self.size += len(data)

    def commit(self, suffix: str) -> Path:
        if self._file is None:
            raise UploadError(
                400, "the upload is empty: send the image file as the body or as a multipart 'file' field"
            )
        self._file.close()
        self._file = None
        target = self.folder / f"{self.stem}{suffix}"
        os.replace(self.temp, target)
        return target

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temp.unlink(missing_ok=True)


async def receive_upload(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str,
    content_length: str | None,
    filename_header: str | None,
    folder: Path,
    stem: str,
    limit: int,
) -> Upload:
    """Write one uploaded image to ``folder/<stem><suffix>``.

    Args:
        chunks: The request body as it arrives.
        content_type: The request's ``Content-Type`` header ("" if none).
        content_length: Its ``Content-Length`` header, if any (checked before reading a byte).
        filename_header: A ``Content-Disposition`` header naming the file of a raw body, if any.
        folder: Destination folder (created).
        stem: File name without suffix (the job id).
        limit: Most body bytes accepted.

    Returns:
        The written file.

    Raises:
        UploadError: Too large (413), empty or malformed (400), or a form without a file (400).
    """
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    from python_multipart.multipart import parse_options_header

    media, params = parse_options_header(content_type)
    media_type = media.decode("latin-1").lower()
    if media_type == "application/x-www-form-urlencoded":
        raise UploadError(415, "a url-encoded form cannot carry an image: send multipart/form-data or the raw file")
    sink = _Sink(folder, stem)
    try:
        if media_type == "multipart/form-data":
            boundary = params.get(b"boundary")
            if not boundary:
                raise UploadError(400, "the multipart body has no boundary in its Content-Type header")
            filename = await _receive_multipart(chunks, boundary, sink, limit)
            suffix = _suffix(filename, "")
        else:
            filename = ""
            if filename_header:
                _, disposition = parse_options_header(filename_header)
                filename = _clean_filename(disposition.get(b"filename", b"").decode("utf-8", "replace"))
            async for chunk in chunks:
                if sink.size + len(chunk) > limit:
                    raise _too_large(limit)
                if chunk:
                    sink.write(chunk)
            suffix = _suffix(filename, media_type)
        path = sink.commit(suffix)
    except BaseException:
        sink.discard()  # disconnects (CancelledError, ClientDisconnect) included
        raise
    return Upload(path, filename, sink.size)


class _Parts:
    """Header state of the multipart part being parsed; only the first file part is kept."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.field = b""
        self.value = b""
        self.disposition = b""
        self.in_file = False
        self.files = 0
        self.filename = ""
        self.field_bytes = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.field.lower() == b"content-disposition":
            self.disposition = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.disposition)
        is_file = b"filename" in options
        self.in_file = is_file and self.files == 0
        if self.in_file:
            self.filename = _clean_filename(options[b"filename"].decode("utf-8", "replace"))
        self.files += is_file
        self.disposition = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.sink.write(data[start:end])
            return
        self.field_bytes += end - start
        if self.field_bytes > _FIELD_LIMIT:
            raise UploadError(400, f"the form's non-file fields exceed {_FIELD_LIMIT} bytes; send only the image")


async def _receive_multipart(chunks: AsyncIterator[bytes], boundary: bytes, sink: _Sink, limit: int) -> str:
    """Stream the first file part into ``sink``; returns the client's file name."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    parts = _Parts(sink)
    callbacks: MultipartCallbacks = {
        "on_header_field": parts.on_header_field,
        "on_header_value": parts.on_header_value,
        "on_header_end": parts.on_header_end,
        "on_headers_finished": parts.on_headers_finished,
        "on_part_data": parts.on_part_data,
    }
    parser = MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"the multipart body is malformed ({exc}); send one file field") from exc
    if parts.files == 0:
        raise UploadError(
            400,
            "the form has no file: send the image as a multipart field with a filename (e.g. curl -F file=@IM0001.dcm)",
        )
    return parts.filename
