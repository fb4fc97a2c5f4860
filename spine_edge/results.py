"""Result records of the cascade and the files they are written to.

One :class:`CascadeResult` per input, errors included. A folder run appends them to
``results.jsonl`` (the log that survives an interruption) and rewrites ``results.csv`` from it at the
end. The JSON form (:meth:`CascadeResult.to_dict`) is the contract for downstream tools:

``source, status ("ok"|"error"), error, probability, decision, threshold, detector_ran,
detections [{class_id, class_name, score, box [x1, y1, x2, y2] in original pixels}], image_size
[height, width], heatmap, overlay (output-relative paths or null), latency_ms {read, preprocess,
classifier, detector, postprocess, total}, bundle_id, precision, backend``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from spine_edge.io_utils import write_text_atomic
from spine_edge.preprocess import Letterbox

log = logging.getLogger(__name__)

Status = Literal["ok", "error"]


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
        status: ``ok`` or ``error``.
        error: Why the input could not be processed (``ok``: None).
        probability: Ensemble probability that the image is abnormal.
        decision: ``probability >= threshold``.
        threshold: The gate τ from the bundle.
        detector_ran: Whether the detector looked at the image (gate passed, or forced).
        detections: Lesion boxes in original pixels, by descending score.
        image_size: ``(height, width)`` of the original image.
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
    probability: float | None = None
    decision: bool | None = None
    threshold: float | None = None
    detector_ran: bool = False
    detections: tuple[Detection, ...] = ()
    image_size: tuple[int, int] | None = None
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
        """The class-activation map resized to the original image, float32 ``[H, W]``, or None."""
        if self.cam is None or self.letterbox is None:
            return None
        return self.letterbox.heatmap_to_source(self.cam)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (arrays left out)."""
        return {
            "source": self.source,
            "status": self.status,
            "error": self.error,
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
    }
    row |= {f"latency_{stage}_ms": latency.get(stage) for stage in ("read", "preprocess", "classifier", "detector", "postprocess", "total")}
    return {k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS}


def write_csv(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records (``to_dict`` form) as ``results.csv`` atomically; returns the path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(_csv_row(record))
    return write_text_atomic(path, buffer.getvalue())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results.jsonl; a line cut short by a crash is skipped with a warning."""
    target = Path(path)
    if not target.is_file():
        return []
    records = []
    with open(target, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: incomplete record (interrupted write?), ignored", target, number)
                continue
            if isinstance(record, dict) and "source" in record and "status" in record:
                records.append(record)
    return records


def latest_by_source(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each source (a retried input's newest outcome wins), in first-seen order."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["source"]] = record
    return latest


class JsonlWriter:
    """Appends records to ``results.jsonl``: each line flushed as written, fsync'ed on :meth:`sync`.

    Flushing per record hands every line to the OS, so a killed process loses nothing written;
    fsync per batch makes it survive a power cut too, without one disk sync per image.

    Args:
        path: The file.
        keep: Records to start the file with (resume); without, the file starts empty.
    """

    def __init__(self, path: str | Path, keep: Iterable[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewriting (atomically) also drops a half-written last line from an interrupted run.
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS."""
        if self._file is None:
            raise ValueError(f"{self.path}: the results writer is closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Force what was written onto the disk."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
