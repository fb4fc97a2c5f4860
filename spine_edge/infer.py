"""Run the cascade over a folder and write results, overlays and heatmaps.

Output folder layout (default ``<FOLDER>_results`` next to the input folder, so that a rerun never
mistakes its own outputs for inputs)::

    .lock                       held (flock) by the run writing here: its pid, host and start time
    results.jsonl               one record per input, errors included (see spine_edge.results)
    results.csv                 the same, one row per input, rewritten atomically at the end
    overlays/<relative path>.png   boxes with class and score, for positive images (or any with boxes)
    heatmaps/<relative path>.png   class-activation map over the image, for positive images
                                   (``.jpg`` instead with ``picture_format="jpeg"``, see below)

With ``--dicom-out DIR`` each ``ok`` DICOM input also gets ``DIR/<its SOP Instance UID>/SR.dcm`` and
Secondary Captures (:mod:`spine_edge.dicomnet.writer`), written after its record; a failure there is
logged for that input and the run goes on.

The PNGs show the image as the models saw it: after a reduced-resolution JPEG 2000 decode they are
smaller than the original (the record's ``decoded_size``), while its boxes and ``image_size`` are
in original pixels.

Picture format: PNG (lossless, the default) or JPEG (quality 95, 4:4:4 chroma). The pictures are
a visual aid next to the DICOM, never a diagnostic copy; JPEG encodes about 10x faster, which is
what a 2-core box needs to keep up with the models (README, "Speed"). ``<relative path>`` is the
input's path below the folder with ``.png`` (or ``.jpg``) appended (``a/b.dicom`` →
``overlays/a/b.dicom.png``), so ``x.png`` and ``x.dcm`` never collide. A name that would pass the
file system's 255-byte limit is shortened and given a hash of the full name (the record names the
file written). The input may also be a single file: its folder is then the base of the relative path.

One run per output folder: :func:`run_folder` takes an exclusive lock on ``OUT/.lock`` first, and a
second run into the same folder is refused with :class:`OutputBusyError` naming the holder, instead
of two runs replacing each other's results.jsonl. Then, before any model is loaded, it proves the
folder writable (a read-only or full disk is refused at once) and removes temporary files a killed
run left behind (``spine_edge.io_utils.remove_stale_temp_files``).

Inputs: every file :func:`spine_edge.imageio.scan_folder` lists, the formats it does not support
included (each gets an error record that says so). Sub-folders that cannot be listed are reported
(:attr:`InferReport.unreadable_dirs`). Folders holding an earlier run's output (a results.jsonl of
spine-edge records) are not inputs, wherever they are below the input folder.

Durability: each record is one ``os.write`` of a whole line and the file is fsync'ed once per batch,
so an interrupted run keeps every record written before it stopped and never leaves half a line.
A full disk stops the run with :class:`spine_edge.results.DiskFullError`, every finished record
kept and results.csv written if there is still room for it. A problem writing one input's overlay
or heatmap (a name the file system refuses, a permission) becomes that input's error record.

Resume: ``resume=True`` keeps the records of inputs that finished ``ok`` and skips those inputs;
inputs whose last record is an error are tried again (the usual cause is a file still being
copied, or fixed since), and their old error record is dropped, so the jsonl keeps one record per
input. Kept records made by another bundle or precision are refused (:class:`ResumeMismatchError`)
unless ``resume_any`` says to mix them knowingly. Without ``resume`` an existing results.jsonl is
started afresh.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.dicomnet.common import DicomNetError
from spine_edge.dicomnet.writer import DicomOutputConfig, write_dicom_results
from spine_edge.errors import SpineEdgeError
from spine_edge.explain import upsample_cam
from spine_edge.imageio import scan_folder
from spine_edge.io_utils import TEMP_PREFIX, TEMP_SUFFIX, is_disk_full, remove_stale_temp_files, write_image_atomic
from spine_edge.overlay import draw_detections, draw_heatmap
from spine_edge.results import CascadeResult, DiskFullError, JsonlWriter, latest_by_source, read_jsonl, write_csv
from spine_edge.support import import_optional

log = logging.getLogger(__name__)

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
OVERLAY_DIR = "overlays"
HEATMAP_DIR = "heatmaps"
LOCK_NAME = ".lock"
#: Longest file name (in bytes) most file systems accept (ext4, XFS, btrfs, NTFS via ntfs-3g, exFAT in UTF-8).
NAME_MAX = 255
#: Keys every results.jsonl record has; a results.jsonl whose first record has them is spine-edge output.
_RECORD_KEYS = frozenset({"source", "status", "bundle_id", "precision"})
#: Bytes written, fsync'ed and removed to prove the output folder takes data before models load.
_PROBE_BYTES = 64 * 1024


PictureFormat = Literal["png", "jpeg"]
#: File suffix of each picture format.
PICTURE_SUFFIX: dict[PictureFormat, str] = {"png": ".png", "jpeg": ".jpg"}


class OutputBusyError(SpineEdgeError):
    """Another run holds the output folder's lock."""


class ResumeMismatchError(SpineEdgeError):
    """``--resume`` would mix records of another bundle or precision into this run's results."""


@dataclass(frozen=True)
class InferConfig:
    """A folder run: where to read and write, and the cascade that runs (its settings live only there).

    Attributes:
        folder: Input folder, scanned recursively (``spine_edge.imageio.scan_folder``), or one file.
        out: Output folder; None for ``<folder>_results`` next to it.
        resume: Skip inputs already ``ok`` in results.jsonl (see the module docstring).
        resume_any: With ``resume``, keep and skip ``ok`` records even when another bundle or
            precision made them (otherwise such a resume is refused).
        overlays: Write overlay and heatmap PNGs. The class-activation map only feeds the heatmap
            PNGs (results.jsonl does not record it), so without them the run loads the cascade with
            ``heatmaps=False`` whatever ``cascade.heatmaps`` says (:attr:`cascade_to_load`).
        picture_format: ``png`` (lossless) or ``jpeg`` (quality 95, about 10x faster to encode) for
            the overlay and heatmap pictures.
        dicom_out: Also write each ``ok`` DICOM input's results as DICOM here: a TID 1500 SR and
            Secondary Captures (:func:`spine_edge.dicomnet.writer.write_dicom_results`); None for none.
            Needs highdicom (``spine-edge[dicom]``), checked before anything runs.
        cascade: Bundle, precision, backend, batch size, read workers... (:class:`CascadeConfig`).
    """

    folder: Path
    out: Path | None = None
    resume: bool = False
    resume_any: bool = False
    overlays: bool = True
    picture_format: PictureFormat = "png"
    dicom_out: Path | None = None
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    @property
    def cascade_to_load(self) -> CascadeConfig:
        """:attr:`cascade` as this run loads it: no CAMs kept when no heatmap PNG will be drawn."""
        return self.cascade if self.overlays else replace(self.cascade, heatmaps=False)


@dataclass(frozen=True)
class InferReport:
    """What a folder run did. ``found == skipped + ok + failed + refused`` (:attr:`adds_up`).

    Attributes:
        out: The output folder.
        found: Inputs found (images and files of unsupported formats; earlier outputs left out).
        skipped: Inputs skipped because a previous run finished them (resume).
        processed: Inputs run now.
        ok: Inputs run now whose record is ``ok``.
        failed: Inputs run now whose record is an error (unreadable, unsupported, an output that
            could not be written).
        refused: Inputs run now whose record is ``refused`` (read fine, but not for this bundle).
        positive: Inputs run now judged abnormal (``ok`` records with ``decision``).
        seconds: Wall time of the processing loop.
        backend: Library and device that ran the models.
        precision: Precision that ran.
        unreadable_dirs: Sub-folders that could not be listed, with the reason: their files are
            not among the inputs.
        output_dirs: Earlier runs' output folders found below the input folder, not read as inputs.
        stale_temp_files: Temporary files of a killed run removed from the output folder.
        dicom_failed: ``ok`` records whose DICOM results (``dicom_out``) could not be written (logged).
    """

    out: Path
    found: int
    skipped: int
    processed: int
    ok: int
    failed: int
    refused: int
    positive: int
    seconds: float
    backend: str
    precision: str
    unreadable_dirs: tuple[tuple[Path, str], ...] = ()
    output_dirs: tuple[Path, ...] = ()
    stale_temp_files: int = 0
    dicom_failed: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of this run's processing loop."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def adds_up(self) -> bool:
        """Whether every input found has exactly one outcome: skipped, ok, failed or refused."""
        return self.found == self.skipped + self.ok + self.failed + self.refused


def default_output_dir(folder: str | Path) -> Path:
    """``<folder>_results`` next to the input folder (or file)."""
    source = Path(folder).absolute()
    return source.parent / f"{source.name}_results"


def picture_name(relative: Path, suffix: str = ".png") -> Path:
    """The overlay/heatmap path for an input: ``relative`` with ``suffix`` appended, each part within :data:`NAME_MAX`.

    A last part that would pass the limit keeps as much of the name as fits, then ``~`` and 12 hex
    digits of the full name's sha256, so two long names that share a beginning never collide.
    (Temporary files use a fixed short name, so they add nothing to this.)
    """
    name = relative.name + suffix
    encoded = os.fsencode(name)
    if len(encoded) <= NAME_MAX:
        return relative.with_name(name)
    tag = "~" + hashlib.sha256(encoded).hexdigest()[:12] + suffix
    stem = relative.name
    while len(os.fsencode(stem + tag)) > NAME_MAX:
        stem = stem[:-1]
    return relative.with_name(stem + tag)


def write_pictures(
    result: CascadeResult, relative: Path, out: Path, picture_format: PictureFormat = "png"
) -> CascadeResult:
    """Write the overlay and heatmap pictures of one result; returns it with their paths filled in.

    Args:
        result: An ``ok`` result that still holds its image.
        relative: The input's path relative to the input folder.
        out: The output folder.
        picture_format: ``png`` or ``jpeg``.

    Raises:
        OSError: A PNG could not be written (full disk, permission, a name the file system refuses).
    """
    if not result.ok or result.image is None:
        return result
    name = picture_name(relative, PICTURE_SUFFIX[picture_format])
    overlay = heatmap = None
    if result.decision or result.detections:
        write_image_atomic(out / OVERLAY_DIR / name, draw_detections(result.image, result.detections_on_image()))
        overlay = (Path(OVERLAY_DIR) / name).as_posix()
    if result.decision and result.cam is not None and result.letterbox is not None:
        # Bicubic, not linear: a coarse CAM grid (8 x 8 in the cpu profile) would show as facets.
        cam = upsample_cam(result.cam, result.letterbox)
        write_image_atomic(
            out / HEATMAP_DIR / name, draw_heatmap(result.image, cam, detections=result.detections_on_image())
        )
        heatmap = (Path(HEATMAP_DIR) / name).as_posix()
    return replace(result, overlay=overlay, heatmap=heatmap)


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.lock`` for the duration, with the holder's pid, host and start time in it.

    ``flock`` is released by the kernel when the process ends, however it ends, so a killed run
    never leaves a stale lock; the file itself stays (deleting it would let a third run lock a new
    file while the second still holds the old one).

    Raises:
        OutputBusyError: Another process holds the lock (its details in the message).
        SpineEdgeError: The lock file cannot be created (read-only folder, permission).
        DiskFullError: No room for the lock file's few bytes.
    """
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
            raise OutputBusyError(
                f"{out}: another spine-edge run is writing here ({' '.join(holder.split())}); wait for it to "
                "finish, or choose another output folder with -o"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = f"pid={os.getpid()} host={socket.gethostname()} started={started}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError as exc:
            raise _not_writable(out, exc) from exc
        yield
    finally:
        os.close(fd)  # also releases the flock


def _not_writable(out: Path, exc: OSError) -> SpineEdgeError:
    """The error for an output folder that refuses a write: full (its own type) or not writable."""
    if is_disk_full(exc):
        return DiskFullError(out, exc)
    return SpineEdgeError(
        f"{out}: the output folder cannot be written ({exc.strerror or exc}); make it writable for this user, "
        "or choose another with -o"
    )


def probe_writable(out: Path) -> None:
    """Write, fsync and remove a small file in ``out``, so a read-only or full disk is found before models load.

    Raises:
        DiskFullError: No room.
        SpineEdgeError: The folder refuses writes (read-only file system, permission).
    """
    probe = out / f"{TEMP_PREFIX}probe{os.getpid() % 1000:03d}{TEMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise _not_writable(out, exc) from exc


def is_output_dir(folder: Path) -> bool:
    """Whether a folder holds spine-edge output: a results.jsonl that is empty or starts with a result record."""
    jsonl = folder / JSONL_NAME
    try:
        with open(jsonl, "rb") as f:
            first = f.readline()
    except OSError:
        return False
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and record.keys() >= _RECORD_KEYS


def _inputs(folder: Path, out: Path) -> tuple[list[Path], tuple[tuple[Path, str], ...], tuple[Path, ...]]:
    """The inputs below ``folder``, the sub-folders that could not be listed, and earlier outputs left out.

    Folders are checked once each, from the input folder down to each file's folder, so a file
    anywhere below an output folder (its overlays/ PNGs) is never an input. When the output folder
    is the input folder itself, its overlays/ and heatmaps/ are what is left out.
    """
    scan = scan_folder(folder)
    verdicts: dict[Path, bool] = {}

    def is_output(d: Path) -> bool:
        if d not in verdicts:
            pictures = d.name in (OVERLAY_DIR, HEATMAP_DIR) and (d.parent == out or is_output_dir(d.parent))
            verdicts[d] = d == out or pictures or is_output_dir(d)
        return verdicts[d]

    inputs = []
    for path in sorted((*scan.images, *scan.unsupported)):
        below = path.parent.relative_to(folder).parts if path != folder else ()
        chain = [folder.joinpath(*below[: i + 1]) for i in range(len(below))]
        if not any(is_output(d) for d in chain):
            inputs.append(path)
    outputs = tuple(sorted(d for d, verdict in verdicts.items() if verdict and d != out))
    return inputs, scan.unreadable_dirs, outputs


def _check_resume(kept: Iterable[dict[str, Any]], cascade: Cascade, jsonl: Path) -> None:
    """Refuse kept records that another bundle or precision made (a resumed run must not mix them)."""
    made_by: dict[tuple[str, str], int] = {}
    for record in kept:
        key = (str(record.get("bundle_id")), str(record.get("precision")))
        made_by[key] = made_by.get(key, 0) + 1
    now = (cascade.manifest.bundle_id, cascade.precision)
    other = {key: n for key, n in made_by.items() if key != now}
    if other:
        seen = ", ".join(f"{n} by bundle {b} at {p}" for (b, p), n in sorted(other.items()))
        raise ResumeMismatchError(
            f"{jsonl}: --resume would mix records made by another bundle or precision ({seen}) with this run's "
            f"(bundle {now[0]} at {now[1]}); rerun with the same --bundle and --precision, or without --resume to "
            "start afresh, or into another folder with -o, or with --resume-any to keep them on purpose"
        )


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
        BundleError, BackendError, MissingDependencyError: The models cannot run here (or, with
            ``dicom_out``, highdicom is not installed).
        OutputBusyError: Another run writes into the output folder.
        ResumeMismatchError: ``resume`` over records of another bundle or precision.
        DiskFullError: The output disk is full (before the run, or during it: finished records kept).
        SpineEdgeError: The input cannot be scanned or the output folder created or written.

    Example:
        >>> config = InferConfig(Path("incoming"), cascade=CascadeConfig(precision="int8"))
        >>> report = run_folder(config)  # doctest: +SKIP
        >>> report.failed, report.out
        (0, PosixPath('/data/incoming_results'))
    """
    if config.dicom_out is not None:  # fail now, naming the extra, not after the models have loaded
        import_optional("highdicom", "dicom", "Writing results as DICOM SR and Secondary Capture (--dicom-out)")
    folder = config.folder.absolute()
    out = (config.out or default_output_dir(folder)).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(out, exc) from exc
        raise SpineEdgeError(
            f"{out}: cannot create the output folder ({exc.strerror or exc}); choose another with -o"
        ) from exc
    with lock_output(out):
        probe_writable(out)
        stale = remove_stale_temp_files(out)
        if stale:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", out, stale)
        return _run_locked(config, folder, out, stale, progress, on_result)


def _run_locked(
    config: InferConfig,
    folder: Path,
    out: Path,
    stale: int,
    progress: bool,
    on_result: Callable[[CascadeResult], None] | None,
) -> InferReport:
    """:func:`run_folder` once the output folder is locked and known to be writable."""
    base = folder.parent if folder.is_file() else folder  # relative paths of overlays
    inputs, unreadable, outputs = _inputs(folder, out)
    for path, reason in unreadable:
        log.warning("%s: folder not read (%s); its files are not processed", path, reason)
    for path in outputs:
        log.info("%s: an earlier run's output folder, not read as input", path)
    jsonl = out / JSONL_NAME
    finished = {
        source: record
        for source, record in (latest_by_source(read_jsonl(jsonl)).items() if config.resume else ())
        if record["status"] == "ok"
    }
    todo = [p for p in inputs if str(p) not in finished]
    counts = {"ok": 0, "error": 0, "refused": 0}
    positive = dicom_failed = 0
    with Cascade.from_config(config.cascade_to_load) as cascade:
        if not config.resume_any:
            _check_resume(finished.values(), cascade, jsonl)
        log.info(
            "%d inputs in %s (%d already done), bundle %s, %s %s",
            len(inputs),
            folder,
            len(inputs) - len(todo),
            cascade.manifest.bundle_id,
            cascade.backend,
            cascade.precision,
        )
        start = time.perf_counter()
        try:
            with (
                JsonlWriter(jsonl, keep=finished.values()) as writer,
                logging_redirect_tqdm(),
                tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar,
            ):
                results: Iterable[CascadeResult] = cascade.predict_many(todo)
                if config.overlays:
                    results = pictures_in_order(
                        results,
                        lambda r: _with_pictures(r, Path(r.source).relative_to(base), out, config.picture_format),
                        depth=2 * cascade.config.batch_size,
                    )
                for count, result in enumerate(results, 1):
                    record = result.to_dict()
                    writer.write(record)
                    if config.dicom_out is not None:
                        dicom_failed += not _write_dicom(record, result, config.dicom_out, out)
                    if count % cascade.config.batch_size == 0:
                        writer.sync()
                    counts[result.status if result.status in counts else "error"] += 1
                    positive += bool(result.ok and result.decision)
                    if result.refusal is not None:
                        log.warning("%s: refused (%s): %s", result.source, result.refusal.code, result.refusal.reason)
                    elif not result.ok:
                        log.warning("%s: %s", result.source, result.error)
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
        finally:
            # Also after an interruption or a full disk: the CSV then matches every record in the jsonl.
            _write_csv_if_possible(out, jsonl)
    return InferReport(
        out=out,
        found=len(inputs),
        skipped=len(inputs) - len(todo),
        processed=len(todo),
        ok=counts["ok"],
        failed=counts["error"],
        refused=counts["refused"],
        positive=positive,
        seconds=time.perf_counter() - start,
        backend=cascade.backend,
        precision=cascade.precision,
        unreadable_dirs=unreadable,
        output_dirs=outputs,
        stale_temp_files=stale,
        dicom_failed=dicom_failed,
    )


def _write_dicom(record: dict[str, Any], result: CascadeResult, dicom_out: Path, out: Path) -> bool:
    """Write one record's SR and SCs (``--dicom-out``); a failure is this record's warning, never the run's end.

    Returns:
        False when its DICOM results could not be written (the reason is logged).
    """
    try:
        write_dicom_results(record, DicomOutputConfig(folder=dicom_out, results_root=out), image=result.image)
    except DicomNetError as exc:
        log.warning("%s: no DICOM results written: %s", result.source, exc)
        return False
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(exc.filename or dicom_out, exc) from exc
        log.warning("%s: no DICOM results written in %s (%s)", result.source, dicom_out, exc.strerror or exc)
        return False
    return True


def pictures_in_order(
    results: Iterable[CascadeResult], draw: Callable[[CascadeResult], CascadeResult], depth: int
) -> Iterator[CascadeResult]:
    """``draw(result)`` for every result on a background thread, yielded in input order.

    Drawing and PNG-encoding the overlay and heatmap of a full-size image took as long as both
    cpu-profile models (measured: ``infer`` on 40 real-size files, 6.2 images/s with pictures drawn
    inline, 9.5 without them); OpenCV releases the GIL while it draws and encodes, so one thread
    does it while the cascade works on the next images. At most ``depth`` results wait for their
    pictures (each holds its decoded image), so memory stays bounded; a record is still written only
    once its pictures exist, and an error raised by ``draw`` (a full disk) reaches the caller in order.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spine-edge-pictures") as pool:
        pending: deque[Future[CascadeResult]] = deque()
        for result in results:
            pending.append(pool.submit(draw, result))
            while len(pending) > depth or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _with_pictures(
    result: CascadeResult, relative: Path, out: Path, picture_format: PictureFormat = "png"
) -> CascadeResult:
    """:func:`write_pictures`, with a failure for this one input turned into its error record.

    Raises:
        DiskFullError: The disk is full: the run must stop, not fail every input that follows.
    """
    try:
        return write_pictures(result, relative, out, picture_format)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(exc.filename or out / OVERLAY_DIR, exc) from exc
        reason = f"could not be written in {exc.filename or out} ({exc.strerror or exc})"
    except Exception as exc:  # a drawing bug must cost this input's pictures, not the rest of the run
        log.exception("%s: unexpected error while drawing its overlay/heatmap", result.source)
        reason = f"could not be drawn (unexpected {type(exc).__name__}: {exc})"
    return replace(
        result,
        status="error",
        error=f"the result was computed but its overlay/heatmap {reason}; probability and boxes are kept in "
        "this record: fix the output folder (or rename the input) and rerun with --resume",
        overlay=None,
        heatmap=None,
    )


def _write_csv_if_possible(out: Path, jsonl: Path) -> None:
    """Rewrite results.csv from the jsonl; a failure is logged, never raised (the jsonl is the record)."""
    try:
        write_csv(out / CSV_NAME, latest_by_source(read_jsonl(jsonl)).values())
    except OSError as exc:
        log.error("%s: not rewritten (%s); %s is complete", out / CSV_NAME, exc.strerror or exc, jsonl)
