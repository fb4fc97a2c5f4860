"""Run the cascade over a folder and write results, overlays and heatmaps.

Output folder layout (default ``<FOLDER>_results`` next to the input folder, so that a rerun never
mistakes its own outputs for inputs)::

    results.jsonl               one record per input, errors included (see spine_edge.results)
    results.csv                 the same, one row per input, rewritten atomically at the end
    overlays/<relative path>.png   boxes with class and score, for positive images (or any with boxes)
    heatmaps/<relative path>.png   class-activation map over the image, for positive images

``<relative path>`` is the input's path below the folder with ``.png`` appended (``a/b.dicom`` →
``overlays/a/b.dicom.png``), so ``x.png`` and ``x.dcm`` never collide.

Durability: each record is flushed to the OS as it is written and the file is fsync'ed once per
batch, so an interrupted run keeps every record written before it stopped.

Resume: ``resume=True`` keeps the records of inputs that finished ``ok`` and skips those inputs;
inputs whose last record is an error are tried again (the usual cause is a file still being
copied, or fixed since), and their old error record is dropped, so the jsonl keeps one record per
input. Without ``resume`` an existing results.jsonl is started afresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.errors import SpineEdgeError
from spine_edge.imageio import find_images
from spine_edge.io_utils import write_image_atomic
from spine_edge.overlay import draw_detections, draw_heatmap
from spine_edge.results import CascadeResult, JsonlWriter, latest_by_source, read_jsonl, write_csv

log = logging.getLogger(__name__)

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
OVERLAY_DIR = "overlays"
HEATMAP_DIR = "heatmaps"


@dataclass(frozen=True)
class InferConfig:
    """A folder run: where to read and write, and the cascade that runs (its settings live only there).

    Attributes:
        folder: Input folder, scanned recursively (``spine_edge.imageio.find_images``).
        out: Output folder; None for ``<folder>_results`` next to it.
        resume: Skip inputs already ``ok`` in results.jsonl (see the module docstring).
        overlays: Write overlay and heatmap PNGs. The class-activation map only feeds the heatmap
            PNGs (results.jsonl does not record it), so without them the run loads the cascade with
            ``heatmaps=False`` whatever ``cascade.heatmaps`` says (:attr:`cascade_to_load`).
        cascade: Bundle, precision, backend, batch size, read workers... (:class:`CascadeConfig`).
    """

    folder: Path
    out: Path | None = None
    resume: bool = False
    overlays: bool = True
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    @property
    def cascade_to_load(self) -> CascadeConfig:
        """:attr:`cascade` as this run loads it: no CAMs kept when no heatmap PNG will be drawn."""
        return self.cascade if self.overlays else replace(self.cascade, heatmaps=False)


@dataclass(frozen=True)
class InferReport:
    """What a folder run did.

    Attributes:
        out: The output folder.
        found: Inputs found in the folder.
        skipped: Inputs skipped because a previous run finished them (resume).
        processed: Inputs run now.
        ok: Inputs with an ``ok`` record after this run (skipped ones included).
        failed: Inputs whose record is an error.
        positive: Inputs judged abnormal (``ok`` records with ``decision``).
        seconds: Wall time of the processing loop.
        backend: Library and device that ran the models.
        precision: Precision that ran.
    """

    out: Path
    found: int
    skipped: int
    processed: int
    ok: int
    failed: int
    positive: int
    seconds: float
    backend: str
    precision: str

    @property
    def images_per_second(self) -> float:
        """Throughput of this run's processing loop."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def default_output_dir(folder: str | Path) -> Path:
    """``<folder>_results`` next to the input folder."""
    source = Path(folder).absolute()
    return source.parent / f"{source.name}_results"


def write_pictures(result: CascadeResult, relative: Path, out: Path) -> CascadeResult:
    """Write the overlay and heatmap PNGs of one result; returns it with their paths filled in.

    Args:
        result: An ``ok`` result that still holds its image.
        relative: The input's path relative to the input folder.
        out: The output folder.
    """
    if not result.ok or result.image is None:
        return result
    name = relative.with_name(relative.name + ".png")
    overlay = heatmap = None
    if result.decision or result.detections:
        write_image_atomic(out / OVERLAY_DIR / name, draw_detections(result.image, result.detections))
        overlay = (Path(OVERLAY_DIR) / name).as_posix()
    cam = result.heatmap_image() if result.decision else None
    if cam is not None:
        write_image_atomic(out / HEATMAP_DIR / name, draw_heatmap(result.image, cam))
        heatmap = (Path(HEATMAP_DIR) / name).as_posix()
    return replace(result, overlay=overlay, heatmap=heatmap)


def run_folder(
    config: InferConfig,
    progress: bool = True,
    on_result: Callable[[CascadeResult], None] | None = None,
) -> InferReport:
    """Run the cascade over every image of a folder; see the module docstring for the outputs.

    Args:
        config: The run.
        progress: Show a progress bar (images/s) on stderr.
        on_result: Called after each record is written (e.g. by a UI, or a test).

    Returns:
        Counts and where the outputs are.

    Raises:
        BundleError, BackendError, MissingDependencyError: The models cannot run here.
        SpineEdgeError: The input folder cannot be scanned or the output folder created.

    Example:
        >>> config = InferConfig(Path("incoming"), cascade=CascadeConfig(precision="int8"))
        >>> report = run_folder(config)  # doctest: +SKIP
        >>> report.failed, report.out
        (0, PosixPath('/data/incoming_results'))
    """
    folder = config.folder.absolute()
    out = (config.out or default_output_dir(folder)).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpineEdgeError(
            f"{out}: cannot create the output folder ({exc.strerror or exc}); choose another with -o"
        ) from exc
    # An output folder inside the input folder must not feed its own PNGs back in on the next run.
    images = [p for p in find_images(folder) if not p.is_relative_to(out)]
    jsonl = out / JSONL_NAME
    finished = {
        source: record
        for source, record in (latest_by_source(read_jsonl(jsonl)).items() if config.resume else ())
        if record["status"] == "ok"
    }
    todo = [p for p in images if str(p) not in finished]
    cascade = Cascade.from_config(config.cascade_to_load)
    log.info(
        "%d images in %s (%d already done), bundle %s, %s %s",
        len(images),
        folder,
        len(images) - len(todo),
        cascade.manifest.bundle_id,
        cascade.backend,
        cascade.precision,
    )
    start = time.perf_counter()
    try:
        with (
            cascade,
            JsonlWriter(jsonl, keep=finished.values()) as writer,
            logging_redirect_tqdm(),
            tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar,
        ):
            for count, result in enumerate(cascade.predict_many(todo), 1):
                if config.overlays:
                    result = write_pictures(result, Path(result.source).relative_to(folder), out)
                writer.write(result.to_dict())
                if count % cascade.config.batch_size == 0:
                    writer.sync()
                if not result.ok:
                    log.warning("%s: %s", result.source, result.error)
                bar.update(1)
                if on_result is not None:
                    on_result(result)
    finally:
        # Also after an interruption: the CSV then matches every record that made it to the jsonl.
        records = latest_by_source(read_jsonl(jsonl)).values()
        write_csv(out / CSV_NAME, records)
    seconds = time.perf_counter() - start
    current = {str(p) for p in images}
    here = [r for r in records if r["source"] in current]
    return InferReport(
        out=out,
        found=len(images),
        skipped=len(images) - len(todo),
        processed=len(todo),
        ok=sum(r["status"] == "ok" for r in here),
        failed=sum(r["status"] != "ok" for r in here),
        positive=sum(bool(r["status"] == "ok" and r["decision"]) for r in here),
        seconds=seconds,
        backend=cascade.backend,
        precision=cascade.precision,
    )
