"""Result records of the cascade and the files they are written to.

One :class:`CascadeResult` per input, errors included. A folder run appends them to
``results.jsonl`` (the log that survives an interruption) and rewrites ``results.csv`` from it at the
end. The JSON form (:meth:`CascadeResult.to_dict`) is the contract for downstream tools:

``source, status ("ok"|"refused"|"error"), error, refusal {code, reason} (refused only), flags
[{code, reason}], ood_score, probability, decision, threshold, detector_ran, detections [{class_id,
class_name, score, box [x1, y1, x2, y2] in original pixels}], image_size [height, width],
decoded_size [height, width] (the decoded image the overlay and heatmap PNGs show: smaller than
image_size after a reduced-resolution JPEG 2000 decode), heatmap, overlay (output-relative paths or null), latency_ms {read, preprocess, classifier, detector,
postprocess, total}, bundle_id, precision, backend``.

``refused`` means the file was read but the bundle must not judge it (see :mod:`spine_edge.guard`):
no probability, decision or boxes, and a ``refusal`` that says why. ``ood_score`` is the classifier
graph's in-distribution score wherever the classifier ran (null for bundles without it and for
inputs refused before the model).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from spine_edge.errors import SpineEdgeError
from spine_edge.guard import GuardFlag, Refusal
from spine_edge.io_utils import is_disk_full, write_text_atomic
from spine_edge.preprocess import Letterbox
from spine_edge.support import json_safe

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

log = logging.getLogger(__name__)

Status = Literal["ok", "refused", "error"]


@dataclass(frozen=True)
class Detection:
    """One lesion box.

    Attributes:
        class_id: Index into the bundle's class names.
        class_name: VinDr-SpineXR spelling.
        score: Class score in [0, 1].
        box: ``(x1, y1, x2, y2)`` in the original image's pixels.
    """

    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]


def decode_scale(image_size: tuple[int, int] | list[int], decoded_size: tuple[int, int] | list[int]) -> float:
    """Decoded pixels per original pixel, ``2 ** -level``, of an image decoded at a JPEG 2000 resolution level.

    Args:
        image_size: ``(height, width)`` of the original image.
        decoded_size: ``(height, width)`` decoded: each side of ``image_size`` divided by ``2 ** level``,
            rounded up (what OpenJPEG returns at that level).

    Raises:
        ValueError: The sizes are no such pair (e.g. a picture of another image).

    Example:
        >>> decode_scale((2801, 2300), (701, 575))
        0.25
    """
    (rows, columns), (reduced_rows, reduced_columns) = image_size, decoded_size
    for level in range(32):
        step = 1 << level
        if (-(-rows // step), -(-columns // step)) == (reduced_rows, reduced_columns):
            return 1.0 / step
        if step > max(rows, columns):
            break
    raise ValueError(
        f"{tuple(decoded_size)} is not a reduced-resolution decode of a {tuple(image_size)} image "
        "(each side divided by a power of two, rounded up)"
    )


@dataclass(frozen=True)
class StageLatency:
    """Milliseconds per stage for one image.

    Batched stages (classifier, detector, postprocess) report the batch's time divided by the images
    it held. ``detector`` is None when the gate skipped the detector. ``total`` is the sum.
    """

    read: float = 0.0
    preprocess: float = 0.0
    classifier: float = 0.0
    detector: float | None = None
    postprocess: float = 0.0

    @property
    def total(self) -> float:
        """Sum of the stages."""
        return self.read + self.preprocess + self.classifier + (self.detector or 0.0) + self.postprocess

    def to_dict(self) -> dict[str, float | None]:
        """Rounded to microseconds, with ``total``."""
        out: dict[str, float | None] = {k: None if v is None else round(v, 3) for k, v in asdict(self).items()}
        out["total"] = round(self.total, 3)
        return out


@dataclass(frozen=True)
class CascadeResult:
    """What the cascade concluded about one input.

    Attributes:
        source: The input's path (absolute for folder runs), or ``<array>`` for an in-memory image.
        status: ``ok``, ``refused`` (read, but not for this bundle to judge) or ``error`` (not read).
        error: Why the input could not be processed (``ok``: None).
        refusal: Why the guard refused the input (``refused`` only).
        flags: Guard warnings on an input that was judged (body part, ``--ood flag``).
        ood_score: The classifier graph's in-distribution score (None without one, or when the input
            was refused before the model).
        probability: Ensemble probability that the image is abnormal.
        decision: ``probability >= threshold``.
        threshold: The gate τ from the bundle.
        detector_ran: Whether the detector looked at the image (gate passed, or forced).
        detections: Lesion boxes in original pixels, by descending score.
        image_size: ``(height, width)`` of the original image.
        decoded_size: ``(height, width)`` of :attr:`image`, the size the overlay and heatmap PNGs have:
            ``image_size`` divided by ``2 ** level`` (rounded up) after a decode at JPEG 2000 resolution
            level ``level`` (:func:`decode_scale`), else ``image_size``.
        heatmap: Path of the written heatmap PNG relative to the output folder (folder runs), or None.
        overlay: Path of the written box overlay PNG relative to the output folder, or None.
        latency_ms: Time per stage.
        bundle_id: Id of the bundle that produced it.
        precision: Precision(s) that ran, e.g. ``fp32`` or ``classifier=int8,detector=fp16``.
        backend: Library and device, e.g. ``onnxruntime/CPUExecutionProvider``.
        image: The windowed uint8 image the cascade saw (not serialised; for drawing overlays).
        cam: The classifier's class-activation map on its letterboxed canvas (not serialised).
        letterbox: How the image was placed on the classifier canvas (not serialised).
    """

    source: str
    status: Status
    error: str | None = None
    refusal: Refusal | None = None
    flags: tuple[GuardFlag, ...] = ()
    ood_score: float | None = None
    probability: float | None = None
    decision: bool | None = None
    threshold: float | None = None
    detector_ran: bool = False
    detections: tuple[Detection, ...] = ()
    image_size: tuple[int, int] | None = None
    decoded_size: tuple[int, int] | None = None
    heatmap: str | None = None
    overlay: str | None = None
    latency_ms: StageLatency = field(default_factory=StageLatency)
    bundle_id: str = ""
    precision: str = ""
    backend: str = ""
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)
    letterbox: Letterbox | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the input was processed."""
        return self.status == "ok"

    def heatmap_image(self) -> np.ndarray | None:
        """The class-activation map resized to :attr:`image` (``decoded_size``), float32 ``[H, W]``, or None."""
        if self.cam is None or self.letterbox is None:
            return None
        return self.letterbox.heatmap_to_source(self.cam)

    def detections_on_image(self) -> tuple[Detection, ...]:
        """:attr:`detections` with their boxes in :attr:`image` pixels, for drawing on it.

        The inverse of :meth:`spine_edge.imageio.Radiograph.boxes_to_original`: decoded pixel ``i`` is
        centred on original pixel ``i / scale``.
        """
        if self.image_size is None or self.decoded_size is None or self.decoded_size == self.image_size:
            return self.detections
        scale = decode_scale(self.image_size, self.decoded_size)
        h, w = self.decoded_size
        return tuple(
            replace(
                d,
                box=(
                    min(max((d.box[0] - 0.5) * scale + 0.5, 0.0), w),
                    min(max((d.box[1] - 0.5) * scale + 0.5, 0.0), h),
                    min(max((d.box[2] - 0.5) * scale + 0.5, 0.0), w),
                    min(max((d.box[3] - 0.5) * scale + 0.5, 0.0), h),
                ),
            )
            for d in self.detections
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (arrays left out)."""
        return {
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "refusal": None if self.refusal is None else self.refusal.to_dict(),
            "flags": [f.to_dict() for f in self.flags],
            "ood_score": None if self.ood_score is None else round(self.ood_score, 6),
            "probability": None if self.probability is None else round(self.probability, 6),
            "decision": self.decision,
            "threshold": self.threshold,
            "detector_ran": self.detector_ran,
            "detections": [
                {
                    "class_id": d.class_id,
                    "class_name": d.class_name,
                    "score": round(d.score, 6),
                    "box": [round(v, 2) for v in d.box],
                }
                for d in self.detections
            ],
            "image_size": None if self.image_size is None else list(self.image_size),
            "decoded_size": None if self.decoded_size is None else list(self.decoded_size),
            "heatmap": self.heatmap,
            "overlay": self.overlay,
            "latency_ms": self.latency_ms.to_dict(),
            "bundle_id": self.bundle_id,
            "precision": self.precision,
            "backend": self.backend,
        }


#: Columns of results.csv, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "source",
    "status",
    "error",
    "refusal_code",
    "refusal_reason",
    "flags",
    "ood_score",
    "probability",
    "decision",
    "threshold",
    "detector_ran",
    "n_detections",
    "detections",
    "image_height",
    "image_width",
    "heatmap",
    "overlay",
    "latency_read_ms",
    "latency_preprocess_ms",
    "latency_classifier_ms",
    "latency_detector_ms",
    "latency_postprocess_ms",
    "latency_total_ms",
    "bundle_id",
    "precision",
    "backend",
)


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    size = record.get("image_size") or [None, None]
    latency = record.get("latency_ms") or {}
    row = {k: record.get(k) for k in CSV_COLUMNS if k in record}
    row |= {
        "n_detections": len(record.get("detections") or []),
        # JSON inside one cell keeps every box machine-readable in a spreadsheet-friendly file.
        "detections": json.dumps(record.get("detections") or [], separators=(",", ":")),
        "image_height": size[0],
        "image_width": size[1],
        "refusal_code": (record.get("refusal") or {}).get("code"),
        "refusal_reason": (record.get("refusal") or {}).get("reason"),
        "flags": ";".join(f.get("code", "") for f in record.get("flags") or []) or None,
    }
    row |= {
        f"latency_{stage}_ms": latency.get(stage)
        for stage in ("read", "preprocess", "classifier", "detector", "postprocess", "total")
    }
    return {k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS}


def write_csv(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records (``to_dict`` form) as ``results.csv`` atomically; returns the path.

    A source path that is not valid UTF-8 (decoded by Python with ``surrogateescape``) is written
    as its original bytes, so the cell names the file exactly as the file system does.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(_csv_row(record))
    return write_text_atomic(path, buffer.getvalue())


def record_line(record: dict[str, Any]) -> str:
    """One results.jsonl line: strict JSON (NaN and infinities as null), ASCII only, newline-terminated.

    ``ensure_ascii`` escapes every non-ASCII character, lone surrogates of non-UTF-8 file names
    included (``\\udcff``), which ``json.loads`` turns back into the same ``str``: the source
    path survives the round trip exactly, so ``--resume`` recognises it.
    """
    return json.dumps(json_safe(record), allow_nan=False, ensure_ascii=True) + "\n"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results.jsonl; a line cut short by a crash is skipped with a warning.

    Never fails on the content: a torn or undecodable line is reported and skipped (the next
    :class:`JsonlWriter` over the file rewrites it without that line).
    """
    target = Path(path)
    if not target.is_file():
        return []
    records = []
    with open(target, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: incomplete record (interrupted write?), ignored", target, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("source"), str) and "status" in record:
                records.append(record)
    return records


def latest_by_source(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each source (a retried input's newest outcome wins), in first-seen order."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["source"]] = record
    return latest


class DiskFullError(SpineEdgeError):
    """The output file system has no room left (ENOSPC or EDQUOT) while results were written.

    Attributes:
        path: The file that could not be written.
    """

    def __init__(self, path: str | Path, exc: OSError) -> None:
        self.path = Path(path)
        super().__init__(
            f"{self.path}: the disk is full ({exc.strerror or exc}); every finished record is kept: free space "
            "(or choose another output folder with -o) and rerun with --resume"
        )


class JsonlWriter:
    """Appends records to ``results.jsonl``: each a single ``os.write`` of one whole line, fsync'ed on :meth:`sync`.

    One write call per complete line hands every record to the OS at once, so a killed process
    loses nothing written and never leaves half a line; fsync per batch makes it survive a power
    cut too, without one disk sync per image. When the disk fills in the middle of a line (a short
    write), the partial bytes are cut off again before :class:`DiskFullError` is raised, so the
    file always ends with a complete record.

    Args:
        path: The file.
        keep: Records to start the file with (resume); without, the file starts empty.

    Raises:
        DiskFullError: No room for the records to keep.
    """

    def __init__(self, path: str | Path, keep: Iterable[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Rewriting (atomically) also drops a half-written last line from an interrupted run.
            write_text_atomic(self.path, "".join(record_line(r) for r in keep))
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.path, exc) from exc
            raise
        self._size = os.fstat(self._fd).st_size

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one complete line.

        Raises:
            DiskFullError: No room for the line; the file still ends with the previous record.
            ValueError: The writer is closed.
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: the results writer is closed")
        data = record_line(record).encode("ascii")
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                # A regular file only writes short when the file system is out of room.
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except OSError as exc:
            self._cut_back()
            if is_disk_full(exc):
                raise DiskFullError(self.path, exc) from exc
            raise
        self._size += written

    def _cut_back(self) -> None:
        """Drop bytes past the last complete line (what a short write left)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.warning("%s: could not cut off a partly written record; --resume skips it", self.path)

    def sync(self) -> None:
        """Force what was written onto the disk.

        Raises:
            DiskFullError: The file system reports no room while flushing.
        """
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFullError(self.path, exc) from exc
                raise

    def close(self) -> None:
        """Sync and close (idempotent); the file is closed even when the sync fails."""
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
