"""Writing the dataset: render and encode every planned image in a process pool, then the CSVs."""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import pydicom
from tqdm import tqdm

from spine_edge.constants import ANNOTATION_COLUMNS, CLASS_NAMES, NO_FINDING
from spine_edge.errors import DatasetError
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.training.data.synth.dicom import encode_dicom
from spine_edge.training.data.synth.plan import plan_dataset
from spine_edge.training.data.synth.render import render_radiograph
from spine_edge.training.data.synth.specs import SPLITS, ImageJob, LesionBox, SynthConfig


@dataclass(frozen=True)
class SynthReport:
    """What :func:`generate_dataset` wrote.

    Attributes:
        path: The dataset root.
        images: Images per split.
        normal_images: "No finding" images per split.
        studies: Studies per split.
        boxes: Split -> class -> number of boxes.
        images_with_class: Split -> class -> images with at least one box of the class.
        transfer_syntaxes: Transfer syntax name -> files.
        elapsed_s: Wall time of the whole run.
    """

    path: Path
    images: Mapping[str, int]
    normal_images: Mapping[str, int]
    studies: Mapping[str, int]
    boxes: Mapping[str, Mapping[str, int]]
    images_with_class: Mapping[str, Mapping[str, int]]
    transfer_syntaxes: Mapping[str, int]
    elapsed_s: float

    def __str__(self) -> str:
        total = sum(self.images.values())
        lines = [f"wrote {total} synthetic radiographs to {self.path} in {self.elapsed_s:.1f} s"]
        for split in self.images:
            lines.append(
                f"  {split}: {self.images[split]} images in {self.studies[split]} studies, "
                f"{self.normal_images[split]} normal"
            )
        width = max(len(name) for name in CLASS_NAMES)
        lines.append(f"  {'boxes (images)':<{width}}  " + "  ".join(f"{s:>12}" for s in self.images))
        for name in CLASS_NAMES:
            cells = "  ".join(f"{self.boxes[s][name]:>6} ({self.images_with_class[s][name]:>3})" for s in self.images)
            lines.append(f"  {name:<{width}}  {cells}")
        lines.append("  files: " + ", ".join(f"{n} {name}" for name, n in self.transfer_syntaxes.items()))
        return "\n".join(lines)


def _render_and_write(task: tuple[ImageJob, str]) -> tuple[LesionBox, ...]:
    job, root = task
    rendering = render_radiograph(job.spec)
    data = encode_dicom(rendering.pixels, job.header, job.spec.bits_stored)
    write_bytes_atomic(Path(root) / f"{job.split}_images" / f"{job.image_id}.dicom", data)
    return rendering.boxes


def _init_worker() -> None:
    # One process per core already; OpenCV's own threads would only oversubscribe the CPUs.
    cv2.setNumThreads(1)


def generate_dataset(out: str | Path, config: SynthConfig, progress: bool = True) -> SynthReport:
    """Write a synthetic VinDr-SpineXR dataset to ``out``.

    Args:
        out: Folder to create; it must not exist or be empty.
        config: Sizes, seed, difficulty and file-format mix.
        progress: Show a progress bar on stderr.

    Returns:
        Counts of what was written, and the time it took.

    Raises:
        DatasetError: ``out`` is a file or a non-empty folder.

    Example:
        >>> report = generate_dataset("data/synth", SynthConfig(scale=0.35))  # doctest: +SKIP
        >>> report.images["train"]  # doctest: +SKIP
        300
    """
    start = time.perf_counter()
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root}: the output folder already exists and is not empty; "
            "choose a new folder or delete this one (the generator never mixes two datasets)"
        )
    jobs = plan_dataset(config)
    for split in SPLITS:
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)

    tasks = [(job, str(root)) for job in jobs]
    workers = min(config.workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(tasks), desc="synthesising", unit="img", file=sys.stderr, disable=not progress)
    results: list[tuple[LesionBox, ...]] = []
    try:
        if workers <= 1:
            for task in tasks:
                results.append(_render_and_write(task))
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            chunk = max(1, len(tasks) // (workers * 8))
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
                for boxes in pool.map(_render_and_write, tasks, chunksize=chunk):
                    results.append(boxes)
                    bar.update(1)
    finally:
        bar.close()

    for split in SPLITS:
        rows = [_csv_rows(job, boxes) for job, boxes in zip(jobs, results, strict=True) if job.split == split]
        write_text_atomic(root / "annotations" / f"{split}.csv", _csv_text([r for group in rows for r in group]))
    return _report(root, jobs, results, time.perf_counter() - start)


def _csv_rows(job: ImageJob, boxes: Sequence[LesionBox]) -> list[list[str]]:
    ids = [job.image_id, job.study_id, job.series_id, job.rad_id]
    if not boxes:
        return [[*ids, NO_FINDING, "", "", "", ""]]
    rows = []
    for box in boxes:
        # Round outward to the 0.1 px the real CSVs use, staying inside the image.
        x0, y0 = math.floor(box.xmin * 10) / 10, math.floor(box.ymin * 10) / 10
        x1 = min(math.ceil(box.xmax * 10) / 10, float(job.spec.cols))
        y1 = min(math.ceil(box.ymax * 10) / 10, float(job.spec.rows))
        rows.append([*ids, box.lesion_type, f"{x0:.1f}", f"{y0:.1f}", f"{x1:.1f}", f"{y1:.1f}"])
    return rows


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ANNOTATION_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def _report(
    root: Path, jobs: Sequence[ImageJob], results: Sequence[Sequence[LesionBox]], elapsed: float
) -> SynthReport:
    images = dict.fromkeys(SPLITS, 0)
    normal = dict.fromkeys(SPLITS, 0)
    studies: dict[str, set[str]] = {s: set() for s in SPLITS}
    boxes = {s: dict.fromkeys(CLASS_NAMES, 0) for s in SPLITS}
    with_class = {s: dict.fromkeys(CLASS_NAMES, 0) for s in SPLITS}
    syntaxes: Counter[str] = Counter()
    for job, found in zip(jobs, results, strict=True):
        images[job.split] += 1
        normal[job.split] += not found
        studies[job.split].add(job.study_id)
        for box in found:
            boxes[job.split][box.lesion_type] += 1
        for name in {box.lesion_type for box in found}:
            with_class[job.split][name] += 1
        syntaxes[pydicom.uid.UID(job.header.transfer_syntax_uid).name] += 1
    return SynthReport(
        path=root,
        images=images,
        normal_images=normal,
        studies={s: len(v) for s, v in studies.items()},
        boxes=boxes,
        images_with_class=with_class,
        transfer_syntaxes=dict(sorted(syntaxes.items())),
        elapsed_s=elapsed,
    )
