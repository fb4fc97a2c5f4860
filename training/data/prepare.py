"""Convert a VinDr-SpineXR folder once into the training cache described in docs/CONTRACTS.md.

Decoding a 12-bit JPEG 2000 DICOM takes a quarter of a second, so training never reads DICOM:
this step writes every image once as an 8-bit windowed PNG (long side at most ``long_side``),
a YOLO label file per image, the ultralytics ``dataset.yaml``, ``classification.csv`` for the
classifiers and ``prepare.json`` with the settings, counts and a fingerprint that checkpoints
record.

The conversion is resumable: ``prepare.json`` is written first (marked incomplete) with the
fingerprint of the data and settings, and a re-run with the same fingerprint only converts the
images whose PNG or label file is missing. Any other fingerprint (new annotations, another
``long_side``, ``seed`` or ``val_fraction``) clears the images and labels and converts everything.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import DatasetError, ImageReadError
from spine_edge.imageio import read_image
from spine_edge.io_utils import write_image_atomic, write_text_atomic
from spine_edge.training.data.split import split_train_val
from spine_edge.vindr import Box, ImageRecord, Problem, ProblemKind, read_vindr, summarize_split

#: Version of the cache layout, stored in prepare.json.
CACHE_VERSION = 1
#: The cache's splits, in the order they are listed everywhere.
CACHE_SPLITS: tuple[str, ...] = ("train", "val", "test")
PREPARE_JSON = "prepare.json"


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of ``spine-edge data prepare``.

    Attributes:
        long_side: Longest side of the cached PNGs; larger images are downscaled (area
            interpolation), smaller ones are kept as they are.
        val_fraction: Share of training images (by study) held out for validation.
        seed: Seed of the train/validation split.
        workers: Processes that decode images; None means one per CPU core.
    """

    long_side: int = 512
    val_fraction: float = 0.15
    seed: int = 0
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.long_side < 1:
            raise ValueError(f"long_side must be a positive number of pixels, got {self.long_side}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    def settings(self) -> dict[str, Any]:
        """The settings that decide the cache's content (what the fingerprint covers)."""
        return {
            "version": CACHE_VERSION,
            "long_side": self.long_side,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "class_names": list(CLASS_NAMES),
        }


@dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_dataset` did.

    Attributes:
        out: The cache folder.
        dataset_yaml: The ultralytics dataset file.
        fingerprint: sha256 of image ids, annotation CSV bytes and settings.
        counts: Per-split image/normal/abnormal/box counts of the images in the cache.
        converted: Images decoded and written by this run.
        skipped: Images already in the cache from an earlier run with the same fingerprint.
        failed: Images that could not be read (excluded, listed in ``problems``).
        rebuilt: True when an earlier cache with other settings or data was cleared.
        problems: Problems of the source data followed by conversion failures.
    """

    out: Path
    dataset_yaml: Path
    fingerprint: str
    counts: dict[str, Any]
    converted: int
    skipped: int
    failed: int
    rebuilt: bool
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class _Task:
    """One image to convert, in plain types so that it pickles cheaply to a worker."""

    image_id: str
    source: str
    png: str
    label: str
    label_text: str
    width: int
    height: int
    long_side: int


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Downscale ``image`` so that its longest side is ``long_side``; never upscale.

    Area interpolation averages the source pixels under each output pixel, so fine bone texture
    does not alias; the aspect ratio is kept (each side rounded to the nearest pixel).
    """
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def yolo_label_text(boxes: Iterable[Box], width: int, height: int) -> str:
    """YOLO label file content: one ``class cx cy w h`` line per box, normalised to [0, 1].

    Coordinates are relative to the image, so they hold for the downscaled PNG too. Boxes are
    clipped to the image; a normal image gives an empty string (an empty label file).
    """
    lines = []
    for box in boxes:
        x0, x1 = (min(max(v / width, 0.0), 1.0) for v in (box.xmin, box.xmax))
        y0, y1 = (min(max(v / height, 0.0), 1.0) for v in (box.ymin, box.ymax))
        if x1 <= x0 or y1 <= y0:
            continue
        lines.append(f"{box.class_id} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n")
    return "".join(lines)


def compute_fingerprint(root: Path, records: dict[str, Sequence[ImageRecord]], settings: dict[str, Any]) -> str:
    """sha256 over the image ids per source split, the annotation CSVs' bytes and the settings."""
    digest = hashlib.sha256()
    ids = {split: sorted(r.image_id for r in recs) for split, recs in records.items()}
    digest.update(json.dumps({"image_ids": ids, "settings": settings}, sort_keys=True).encode())
    for name in ("train", "test"):
        digest.update((root / "annotations" / f"{name}.csv").read_bytes())
    return digest.hexdigest()


def prepare_dataset(
    root: str | Path, out: str | Path, config: PrepareConfig = PrepareConfig(), progress: bool = True
) -> PrepareReport:
    """Convert a VinDr-SpineXR folder into the training cache (resumable, parallel).

    Args:
        root: VinDr-SpineXR folder (``train_images/``, ``test_images/``, ``annotations/``).
        out: Cache folder; created if needed. A folder holding ``images/`` or ``labels/`` that
            this function did not write is refused rather than overwritten.
        config: Image size, split and worker settings.
        progress: Show a progress bar on stderr.

    Returns:
        Counts, the fingerprint and every problem found.

    Raises:
        DatasetError: The source layout is unusable, or ``out`` holds another tool's files.

    Example:
        >>> report = prepare_dataset("/data/vindr", "runs/cache", PrepareConfig(long_side=512))
        >>> report.dataset_yaml  # pass to ultralytics
    """
    root, out = Path(root).resolve(), Path(out).resolve()
    dataset = read_vindr(root)
    split = split_train_val(dataset.train, config.val_fraction, config.seed)
    splits = {"train": split.train, "val": split.val, "test": dataset.test}
    settings = config.settings()
    fingerprint = compute_fingerprint(root, {"train": dataset.train, "test": dataset.test}, settings)

    rebuilt = _reset_if_stale(out, fingerprint)
    state = {"source": str(root), **settings, "fingerprint": fingerprint, "complete": False}
    write_text_atomic(out / PREPARE_JSON, json.dumps(state, indent=2) + "\n")

    tasks, skipped = _plan(out, splits, config.long_side)
    failures = {outcome.image_id: outcome for outcome in _run(tasks, config.workers, progress) if outcome is not None}
    kept = {name: tuple(r for r in recs if r.image_id not in failures) for name, recs in splits.items()}

    counts = _count(kept, len(failures))
    problems = dataset.problems + tuple(failures.values())
    _write_classification_csv(out, kept)
    dataset_yaml = _write_dataset_yaml(out)
    state.update(
        counts=counts,
        complete=True,
        problems=[
            {"kind": p.kind.value, "source": p.source, "image_id": p.image_id, "message": p.message} for p in problems
        ],
    )
    write_text_atomic(out / PREPARE_JSON, json.dumps(state, indent=2) + "\n")
    return PrepareReport(
        out=out,
        dataset_yaml=dataset_yaml,
        fingerprint=fingerprint,
        counts=counts,
        converted=len(tasks) - len(failures),
        skipped=skipped,
        failed=len(failures),
        rebuilt=rebuilt,
        problems=problems,
    )


def read_prepare_json(out: str | Path) -> dict[str, Any] | None:
    """The cache's ``prepare.json``, or None when there is none or it cannot be parsed."""
    path = Path(out) / PREPARE_JSON
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _reset_if_stale(out: Path, fingerprint: str) -> bool:
    """Clear images/labels written with other data or settings; True if anything was cleared."""
    owned = [out / "images", out / "labels"]
    present = [p for p in owned if p.exists()]
    if not present:
        return False
    if not (out / PREPARE_JSON).exists():
        raise DatasetError(
            f"{out}: holds {', '.join(p.name + '/' for p in present)} but no {PREPARE_JSON}, so it was not "
            "written by `spine-edge data prepare`; choose an empty or new output folder"
        )
    state = read_prepare_json(out)
    if state is not None and state.get("fingerprint") == fingerprint:
        # Same data and settings: keep finished files, drop temporaries of an interrupted write.
        for folder in present:
            for tmp in folder.rglob(".*.tmp"):
                tmp.unlink()
        return False
    for folder in present:
        shutil.rmtree(folder)
    return True


def _plan(out: Path, splits: dict[str, tuple[ImageRecord, ...]], long_side: int) -> tuple[list[_Task], int]:
    tasks: list[_Task] = []
    skipped = 0
    for name in CACHE_SPLITS:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "labels" / name).mkdir(parents=True, exist_ok=True)
        for record in splits[name]:
            png = out / "images" / name / f"{record.image_id}.png"
            label = out / "labels" / name / f"{record.image_id}.txt"
            # The label is written after the PNG, so its presence means the image is complete.
            if png.exists() and label.exists():
                skipped += 1
                continue
            tasks.append(
                _Task(
                    image_id=record.image_id,
                    source=str(record.path),
                    png=str(png),
                    label=str(label),
                    label_text=yolo_label_text(record.boxes, record.width, record.height),
                    width=record.width,
                    height=record.height,
                    long_side=long_side,
                )
            )
    return tasks, skipped


def _run(tasks: list[_Task], workers: int | None, progress: bool) -> Iterator[Problem | None]:
    workers = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
    if workers == 1:
        with tqdm(
            total=len(tasks), desc="prepare", unit="img", file=sys.stderr, disable=not (progress and tasks)
        ) as bar:
            for task in tasks:
                yield _convert(task)
                bar.update()
        return
    # The pool starts before the progress bar so that no bar thread exists when workers fork.
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert, task) for task in tasks]
        with tqdm(total=len(tasks), desc="prepare", unit="img", file=sys.stderr, disable=not progress) as bar:
            for future in as_completed(futures):
                yield future.result()
                bar.update()


def _convert(task: _Task) -> Problem | None:
    """Decode one image and write its PNG, then its label. Returns a Problem if it is unusable."""
    try:
        image = read_image(task.source).image
    except ImageReadError as exc:
        return Problem(ProblemKind.UNREADABLE_IMAGE, task.source, task.image_id, f"{exc.reason}; excluded")
    except Exception as exc:  # noqa: BLE001 - one undecodable file must not end a many-hour conversion
        return Problem(
            ProblemKind.UNREADABLE_IMAGE,
            task.source,
            task.image_id,
            f"decoder failed ({type(exc).__name__}: {exc}); excluded",
        )
    if image.shape[:2] != (task.height, task.width):
        return Problem(
            ProblemKind.SIZE_MISMATCH,
            task.source,
            task.image_id,
            f"decoded pixels are {image.shape[1]}x{image.shape[0]} but the header says {task.width}x{task.height}, "
            "so its boxes cannot be placed; excluded",
        )
    write_image_atomic(task.png, resize_long_side(image, task.long_side))
    write_text_atomic(task.label, task.label_text)
    return None


def _count(kept: dict[str, tuple[ImageRecord, ...]], failed: int) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for name in CACHE_SPLITS:
        summary = summarize_split(name, kept[name])
        counts[name] = {
            "images": summary.images,
            "normal": summary.normal,
            "abnormal": summary.abnormal,
            "boxes": summary.boxes_per_class,
        }
    counts["failed"] = failed
    return counts


def _write_classification_csv(out: Path, kept: dict[str, tuple[ImageRecord, ...]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "study_id", "split", "abnormal", "path"])
    for name in CACHE_SPLITS:
        for record in kept[name]:
            writer.writerow(
                [record.image_id, record.study_id, name, int(record.abnormal), f"images/{name}/{record.image_id}.png"]
            )
    return write_text_atomic(out / "classification.csv", buffer.getvalue())


def _write_dataset_yaml(out: Path) -> Path:
    # JSON strings are valid YAML double-quoted scalars, so no YAML library is needed here.
    lines = [
        "# ultralytics dataset, written by `spine-edge data prepare`",
        f"path: {json.dumps(str(out))}",
        *(f"{name}: images/{name}" for name in CACHE_SPLITS),
        "names:",
        *(f"  {i}: {json.dumps(name)}" for i, name in enumerate(CLASS_NAMES)),
    ]
    return write_text_atomic(out / "dataset.yaml", "\n".join(lines) + "\n")
