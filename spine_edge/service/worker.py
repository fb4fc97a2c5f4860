"""The kiosk's core: one loaded :class:`~spine_edge.cascade.Cascade`, one bounded queue, one worker thread.

Every way into the kiosk (HTTP, the DICOM listener, the watched folder) calls
:meth:`InferenceWorker.submit`; a single thread owns the Cascade and runs the jobs in order, so the
models are loaded once and never run twice at the same time. A full queue refuses new work at once
(:class:`QueueFull`) instead of piling it up.

A result exists once it is in ``<out>/results.jsonl``: the worker appends the record and fsyncs the
file *before* it marks the job done, calls ``on_done`` or lets an HTTP answer go out, so a crash or
restart never loses a result that anyone was told about. Records are the ``infer`` record
(:meth:`spine_edge.results.CascadeResult.to_dict`) plus the service's fields::

    job_id, origin ("http", "dicom", "watch", ...), received (UTC ISO time), meta {str: str},
    queue_ms (time waiting in the queue), image (windowed PNG the models saw, relative to out)

Pictures (the windowed image, the box overlay, the heatmap, at the radiograph's own size: the DICOM
side builds its Secondary Captures from them) are drawn by a second thread *after* the record is
written: for a 2949 x 1470 radiograph the three PNGs took 0.5-0.8 s here, as long as inferring it,
which would otherwise add to every answer's latency. Their paths are in the record from the start;
:meth:`Job.wait_pictures` tells when the files exist. At most two results wait for their pictures;
beyond that the worker waits, so the queue, not memory, absorbs a backlog.

Output folder::

    results.jsonl          one record per job, appended and fsynced (errors and refusals included)
    images/<job_id>.png    the windowed 8-bit image the models saw (every readable input)
    overlays/<job_id>.png  boxes with class and score (as ``spine-edge infer`` draws them)
    heatmaps/<job_id>.png  class-activation map (positive images)
    .spine-edge.lock       held while a worker runs: two processes never share one results.jsonl

Example:
    >>> config = WorkerConfig(CascadeConfig(Path("runs/bundle")), Path("kiosk-out"))  # doctest: +SKIP
    >>> with InferenceWorker(config) as worker:  # doctest: +SKIP
    ...     job = worker.submit(Path("study/IM0001.dcm"), origin="watch")
    ...     job.wait(timeout=60)["decision"]
    True
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.errors import SpineEdgeError
from spine_edge.infer import HEATMAP_DIR, JSONL_NAME, OVERLAY_DIR, write_pictures
from spine_edge.io_utils import write_image_atomic
from spine_edge.results import CascadeResult, JsonlWriter, read_jsonl

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only the type checker imports this

log = logging.getLogger(__name__)

#: Where the windowed image of every readable input is written, relative to the output folder.
IMAGE_DIR = "images"
LOCK_NAME = ".spine-edge.lock"

#: A job's life: waiting in the queue, on the models, or finished with its record written.
JobStatus = Literal["queued", "running", "done"]

#: Job ids become file names (``images/<id>.png``) and URL segments, so they are kept to this.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: Results whose pictures may wait to be drawn (see ``InferenceWorker._finish``).
_PAINT_BACKLOG = 2
#: Seconds a full queue tells clients to wait, before the worker has timed a single job.
_DEFAULT_JOB_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    """How to run an :class:`InferenceWorker`.

    Attributes:
        cascade: The models and how to run them.
        out: Output folder (created): results.jsonl and pictures, see the module docstring.
        queue_size: Jobs that may wait for the models; one more is refused with :class:`QueueFull`.
        pictures: Draw the windowed image, overlay and heatmap PNGs of each result.
        history: Finished jobs kept in memory for :meth:`InferenceWorker.get` and ``recent``
            (older ones stay in results.jsonl).
    """

    cascade: CascadeConfig
    out: Path
    queue_size: int = 16
    pictures: bool = True
    history: int = 1000

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {self.queue_size}")
        if self.history < 1:
            raise ValueError(f"history must be at least 1, got {self.history}")


class QueueFull(SpineEdgeError):
    """The job queue is full; the caller should retry after ``retry_after`` seconds.

    Attributes:
        size: The queue's capacity.
        retry_after: Whole seconds after which a slot is likely free.
    """

    def __init__(self, size: int, retry_after: int) -> None:
        self.size = size
        self.retry_after = retry_after
        super().__init__(
            f"the inference queue is full ({size} images waiting); retry in {retry_after} s, "
            "or start the service with a larger --queue-size if this happens often"
        )


class WorkerNotRunning(SpineEdgeError):
    """A job was submitted to a worker that is not started, or is stopping."""


class DuplicateJobError(SpineEdgeError):
    """A job id was submitted that the worker already knows (queued, running or in results.jsonl)."""


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of what a worker has done since it started.

    Attributes:
        queued: Jobs waiting for the models now.
        running: Jobs on the models now (0 or a batch).
        submitted: Jobs accepted.
        rejected: Submissions refused because the queue was full.
        results: Records written, by record status (``ok``, ``refused``, ``error``).
    """

    queued: int
    running: int
    submitted: int
    rejected: int
    results: Mapping[str, int]


class Job:
    """One input on its way through the worker.

    Attributes:
        id: Unique id (file-name safe).
        origin: Which way in submitted it (``http``, ``dicom``, ``watch``...).
        source: The file the models read.
        meta: Caller's labels, stored in the record (keep patient names out of them).
        received: When it was submitted (UTC).
        status: ``queued``, ``running`` or ``done`` (record written). The outcome of a done job
            is its record's ``status``: ``ok``, ``refused`` or ``error``.
    """

    def __init__(
        self,
        job_id: str,
        origin: str,
        source: Path,
        meta: Mapping[str, str],
        on_done: Callable[[dict[str, Any]], None] | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.id = job_id
        self.origin = origin
        self.source = source
        self.meta = dict(meta)
        self.received = datetime.now(timezone.utc)
        self.status: JobStatus = "queued"
        self._on_done = on_done
        self._submitted = time.perf_counter()
        self._record = record
        self._done = threading.Event()
        self._pictures = threading.Event()
        self._callbacks: list[Callable[[Job], None]] = []
        self._callbacks_lock = threading.Lock()
        if record is not None:  # a job read back from results.jsonl
            self.status = "done"
            self._done.set()
            self._pictures.set()

    @property
    def record(self) -> dict[str, Any] | None:
        """The record once the job is done, else None."""
        return self._record

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until the record is written; returns it, or None after ``timeout`` seconds."""
        self._done.wait(timeout)
        return self._record

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` once the job is done, at once if it already is (like a future's).

        Unlike ``on_done`` it also runs for a job that ends *without* a record (the worker stopped
        before running it, or could not write results.jsonl): ``job.record`` is then None. It runs
        on the worker thread (or the caller's, if already done) and must be quick.
        """
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        _call(callback, self)

    def wait_pictures(self, timeout: float | None = None) -> bool:
        """Block until the job's PNGs are written (or were never to be); False after ``timeout``."""
        return self._pictures.wait(timeout)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, origin={self.origin!r}, status={self.status!r})"

    def _complete(self) -> None:
        """Mark done (with or without a record), wake waiters and run the done callbacks."""
        self.status = "done"
        if self._record is None:
            self._pictures.set()  # no record, no pictures to wait for
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _call(callback, self)


def _call(callback: Callable[[Job], None], job: Job) -> None:
    try:
        callback(job)
    except Exception:
        log.exception("job %s: a done callback failed", job.id)


_STOP = object()


def _utc_iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def planned_pictures(result: CascadeResult, job_id: str, pictures: bool) -> dict[str, str | None]:
    """Output-relative paths of the PNGs :func:`_draw_pictures` will write for a result.

    Mirrors :func:`spine_edge.infer.write_pictures`' rule (overlay when the image is positive or has
    boxes, heatmap when positive and a CAM exists), because the record naming them is written
    before they are drawn.
    """
    if not pictures or result.image is None:
        return {"image": None, "overlay": None, "heatmap": None}
    name = f"{job_id}.png"
    overlay = bool(result.decision or result.detections)
    heatmap = bool(result.decision) and result.cam is not None and result.letterbox is not None
    return {
        "image": f"{IMAGE_DIR}/{name}",
        "overlay": f"{OVERLAY_DIR}/{name}" if overlay else None,
        "heatmap": f"{HEATMAP_DIR}/{name}" if heatmap else None,
    }


def _draw_pictures(result: CascadeResult, job: Job, out: Path, slot: threading.Semaphore) -> None:
    """Write a result's PNGs, then free its backlog slot; a failure costs this job its pictures, never the service."""
    try:
        assert result.image is not None
        write_image_atomic(out / IMAGE_DIR / f"{job.id}.png", result.image)
        write_pictures(result, Path(job.id), out)
    except Exception:
        log.exception("job %s: could not write its pictures", job.id)
    finally:
        job._pictures.set()
        slot.release()


class _FolderLock:
    """An exclusive ``flock`` on ``<out>/.spine-edge.lock``, so two processes never append to one jsonl."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held for the lock's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpineEdgeError(
                f"{self.path.parent}: another spine-edge process is writing results here; stop it, "
                "or give this one its own output folder"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class InferenceWorker:
    """One Cascade, one bounded queue, one thread that runs the jobs; see the module docstring.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`). It is safe to call
    :meth:`submit`, :meth:`get`, :meth:`recent` and :meth:`stats` from any thread.

    Args:
        config: What to load and where to write.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.out = config.out.absolute()
        self._queue: queue.Queue[Job | object] = queue.Queue(maxsize=config.queue_size)
        self._write_lock = threading.Lock()  # one writer of results.jsonl at a time (jobs, append_record)
        self._lock = threading.Lock()  # guards the fields below
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._known_ids: set[str] = set()
        self._recent: deque[dict[str, Any]] = deque(maxlen=config.history)
        self._accepting = False
        self._submitted = 0
        self._rejected = 0
        self._running = 0
        self._results: dict[str, int] = {}
        self._job_seconds = _DEFAULT_JOB_SECONDS
        self._listeners: list[Callable[[Job, dict[str, Any]], None]] = []
        self._cascade: Cascade | None = None
        self._writer: JsonlWriter | None = None
        self._folder_lock = _FolderLock(self.out)
        self._thread: threading.Thread | None = None
        self._painter: ThreadPoolExecutor | None = None
        self._paint_slots = threading.BoundedSemaphore(_PAINT_BACKLOG)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Lock the output folder, load and warm up the models, read back results.jsonl, start the thread.

        Raises:
            SpineEdgeError: The output folder cannot be created or is used by another process.
            BundleError, BackendError, MissingDependencyError: The models cannot run here.
        """
        if self._thread is not None:
            raise WorkerNotRunning("this InferenceWorker was already started; create a new one")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpineEdgeError(f"{self.out}: cannot create the output folder ({exc.strerror or exc})") from exc
        self._folder_lock.acquire()
        try:
            self._cascade = Cascade.from_config(self.config.cascade)
            self._cascade.warmup()
            previous = read_jsonl(self.out / JSONL_NAME)
            # JsonlWriter rewrites the file with what it keeps, which also drops a line cut short by a crash.
            self._writer = JsonlWriter(self.out / JSONL_NAME, keep=previous)
            for record in previous:
                self._remember(record)
        except BaseException:
            self._release()
            raise
        self._painter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spine-edge-pictures")
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="spine-edge-inference", daemon=True)
        self._thread.start()
        log.info(
            "worker ready: bundle %s on %s %s, queue %d, %d earlier records in %s",
            self.bundle_id,
            self.backend,
            self.precision,
            self.config.queue_size,
            len(previous),
            self.out,
        )

    def stop(self, drain: bool = True) -> None:
        """Stop taking jobs, finish the one running (and, with ``drain``, the queued ones), release everything.

        Jobs left in the queue without ``drain`` finish with no record (``wait`` returns None).
        Idempotent.
        """
        with self._lock:
            was_accepting, self._accepting = self._accepting, False
        if self._thread is not None and was_accepting:
            if not drain:
                self._drop_queued()
            self._queue.put(_STOP)  # blocks only while the worker empties a full queue
            self._thread.join()
        if self._painter is not None:
            self._painter.shutdown(wait=True)
            self._painter = None
        self._release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._cascade is not None:
            self._cascade.close()
            self._cascade = None
        self._folder_lock.release()

    def _drop_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Job):
                log.info("job %s: dropped at shutdown before it ran (no record)", item.id)
                item._complete()

    # -- what the ways in call --------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Models loaded and the worker thread alive and taking jobs."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def bundle_id(self) -> str:
        """Id of the loaded bundle ("" before start)."""
        return self._cascade.manifest.bundle_id if self._cascade is not None else ""

    @property
    def backend(self) -> str:
        """Library and device running the models ("" before start)."""
        return self._cascade.backend if self._cascade is not None else ""

    @property
    def precision(self) -> str:
        """Precision running ("" before start)."""
        return self._cascade.precision if self._cascade is not None else ""

    @property
    def threshold(self) -> float | None:
        """The bundle's gate τ (None before start)."""
        return self._cascade.threshold if self._cascade is not None else None

    def append_record(self, record: Mapping[str, Any], *, origin: str, job_id: str | None = None) -> dict[str, Any]:
        """Write a record that needed no models (an image refused at the door, e.g. a CT at the DICOM listener).

        It gets the service's fields like any job's record (``job_id``, ``origin``, ``received``,
        ``meta``, ``queue_ms``, ``image``), is appended and synced to results.jsonl, shows in
        :meth:`get`, :meth:`recent` and :meth:`stats`, and reaches the listeners (so /metrics counts
        it by status and refusal code).

        Args:
            record: At least ``source`` and ``status`` (``refused`` or ``error``), in the
                ``CascadeResult.to_dict`` form.
            origin: Which way in produced it.
            job_id: Its id; default a new random one.

        Returns:
            The record as written.

        Raises:
            WorkerNotRunning: The worker is not started or is stopping.
            DuplicateJobError: ``job_id`` is already known.
        """
        if "source" not in record or "status" not in record:
            raise ValueError("a record needs at least 'source' and 'status'")
        job = Job(job_id or uuid.uuid4().hex, origin, Path(str(record["source"])), record.get("meta") or {})
        written = {
            "image": None,
            "queue_ms": None,
            **record,
            "job_id": job.id,
            "origin": origin,
            "received": _utc_iso(job.received),
            "meta": job.meta,
        }
        with self._lock:
            if not self._accepting or self._writer is None:
                raise WorkerNotRunning(
                    "the inference worker is not running (starting up or shutting down); retry shortly"
                )
            if job.id in self._known_ids:
                raise DuplicateJobError(f"job id {job.id} was already recorded; each input needs its own id")
            self._known_ids.add(job.id)
            writer = self._writer
        with self._write_lock:
            writer.write(written)
            writer.sync()
        job._record = written
        job._pictures.set()
        job._complete()
        with self._lock:
            self._jobs[job.id] = job
            self._evict()
            self._recent.append(written)
            self._results[written["status"]] = self._results.get(written["status"], 0) + 1
            listeners = list(self._listeners)
        log.info("job %s (%s): %s without inference", job.id, origin, written["status"])
        for listener in listeners:
            try:
                listener(job, written)
            except Exception:
                log.exception("job %s: a result listener failed", job.id)
        return written

    def add_listener(self, listener: Callable[[Job, dict[str, Any]], None]) -> None:
        """Call ``listener(job, record)`` on the worker thread after every record is written (metrics, logs)."""
        with self._lock:
            self._listeners.append(listener)

    def submit(
        self,
        path: Path,
        *,
        origin: str,
        meta: Mapping[str, str] | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Queue one image file for the models.

        Args:
            path: The file to read; it must stay in place until the job is done.
            origin: Which way in this is (``http``, ``dicom``, ``watch``), recorded and counted.
            meta: Labels stored in the record (no patient names: logs and metrics never show them,
                but the record keeps them).
            on_done: Called with the record on the worker thread, after it is written and synced.
                It must be quick and must not call back into the worker's queue synchronously.
            job_id: The job's id (letters, digits, ``.``, ``_``, ``-``; at most 128); default a new
                random one.

        Returns:
            The queued job.

        Raises:
            QueueFull: ``queue_size`` jobs are already waiting.
            WorkerNotRunning: The worker is not started or is stopping.
            DuplicateJobError: ``job_id`` is already known.
            ValueError: ``job_id`` is not a valid id, or ``meta`` holds something other than strings.
        """
        if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("meta must map strings to strings (it is stored in results.jsonl as it is)")
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise ValueError(
                f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-', not starting with a symbol"
            )
        job = Job(job_id or uuid.uuid4().hex, origin, Path(path), meta or {}, on_done)
        with self._lock:
            if not self._accepting:
                raise WorkerNotRunning(
                    "the inference worker is not running (starting up or shutting down); retry shortly"
                )
            if job.id in self._known_ids:
                raise DuplicateJobError(f"job id {job.id} was already submitted; each input needs its own id")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self._rejected += 1
                raise self._full() from None
            self._submitted += 1
            self._known_ids.add(job.id)
            self._jobs[job.id] = job
            self._evict()
        return job

    def ensure_capacity(self) -> None:
        """Raise :class:`QueueFull` (counted as a rejection) if a submit now would find the queue full.

        Lets a way in refuse before it receives a large upload; :meth:`submit` still decides.
        """
        with self._lock:
            if self._queue.full():
                self._rejected += 1
                raise self._full()

    def get(self, job_id: str) -> Job | None:
        """A queued, running or recent job by id (older ones only in results.jsonl), or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records (at most ``history``), newest first."""
        with self._lock:
            records = list(self._recent)
        return records[::-1][: max(0, limit)]

    def stats(self) -> WorkerStats:
        """Counters and the queue depth now."""
        with self._lock:
            return WorkerStats(self._queue.qsize(), self._running, self._submitted, self._rejected, dict(self._results))

    def _full(self) -> QueueFull:
        """The error for a full queue, with a wait estimated from recent job times (caller holds the lock)."""
        waiting = self._queue.qsize() + self._running
        return QueueFull(self.config.queue_size, max(1, round(waiting * self._job_seconds)))

    # -- the worker thread ------------------------------------------------------------------

    def _remember(self, record: dict[str, Any]) -> None:
        """Index a record read back at start (caller holds no lock: start runs before the thread)."""
        self._recent.append(record)
        job_id = record.get("job_id")
        if isinstance(job_id, str):
            self._known_ids.add(job_id)
            self._jobs[job_id] = Job(
                job_id, str(record.get("origin", "")), Path(record["source"]), record.get("meta") or {}, record=record
            )
        self._evict()

    def _evict(self) -> None:
        """Forget the oldest finished jobs beyond ``history`` (queued and running ones stay)."""
        excess = len(self._jobs) - self.config.history
        if excess <= 0:
            return
        for job_id in [j for j, job in self._jobs.items() if job.status == "done"][:excess]:
            del self._jobs[job_id]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[Job] = [first]  # type: ignore[list-item]
            # Take what is already waiting, up to one model batch: a busy kiosk gets batched inference.
            while len(batch) < self.config.cascade.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            try:
                self._process(batch)
            except Exception:
                log.critical("the worker cannot record results any more and stops taking jobs", exc_info=True)
                self._give_up(batch)
                return

    def _give_up(self, batch: list[Job]) -> None:
        """Results can no longer be recorded (disk full, folder gone, a bug): stop taking jobs.

        Answering without a record would break the rule that a result exists once it is in
        results.jsonl, so the jobs in hand and in the queue end without one (``record`` None, their
        done callbacks run), ``ready`` turns False (``/readyz`` answers 503) and submits are refused.
        """
        with self._lock:
            self._accepting = False
            self._running = 0
        for job in batch:
            if job.record is None:
                job._complete()
        self._drop_queued()

    def _process(self, batch: list[Job]) -> None:
        assert self._cascade is not None and self._writer is not None
        started = time.perf_counter()
        with self._lock:
            self._running = len(batch)
        for job in batch:
            job.status = "running"
        try:
            if len(batch) == 1:
                results = [self._cascade.predict(batch[0].source)]
            else:
                results = list(self._cascade.predict_many([job.source for job in batch]))
        except Exception as exc:  # a backend failure costs this batch its results, never the service
            log.exception("inference failed on a batch of %d", len(batch))
            reason = f"internal error while running the models ({type(exc).__name__}); the service keeps running, see its log"
            results = [CascadeResult(source=str(job.source), status="error", error=reason) for job in batch]
        records = [self._record(job, result, started) for job, result in zip(batch, results, strict=True)]
        with self._write_lock:
            for record in records:
                self._writer.write(record)
            self._writer.sync()  # durable before anyone hears of it
        elapsed = time.perf_counter() - started
        with self._lock:
            self._running = 0
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * elapsed / len(batch)
            listeners = list(self._listeners)
            for record in records:
                self._recent.append(record)
                self._results[record["status"]] = self._results.get(record["status"], 0) + 1
        for job, result, record in zip(batch, results, records, strict=True):
            self._finish(job, result, record, listeners)

    def _record(self, job: Job, result: CascadeResult, started: float) -> dict[str, Any]:
        record = result.to_dict()
        pictures = planned_pictures(result, job.id, self.config.pictures)
        record.update(
            overlay=pictures["overlay"],
            heatmap=pictures["heatmap"],
            image=pictures["image"],
            job_id=job.id,
            origin=job.origin,
            received=_utc_iso(job.received),
            meta=job.meta,
            queue_ms=round((started - job._submitted) * 1e3, 3),
        )
        return record

    def _finish(
        self,
        job: Job,
        result: CascadeResult,
        record: dict[str, Any],
        listeners: list[Callable[[Job, dict[str, Any]], None]],
    ) -> None:
        job._record = record
        job.status = "done"
        # Job ids and outcomes only: file names and meta may carry patient names.
        log.info(
            "job %s (%s): %s%s in %.0f ms",
            job.id,
            job.origin,
            record["status"],
            "" if record["decision"] is None else (" abnormal" if record["decision"] else " normal"),
            record["latency_ms"]["total"],
        )
        # Listeners (metrics) first: whoever hears of the result next sees it counted.
        for listener in listeners:
            try:
                listener(job, record)
            except Exception:
                log.exception("job %s: a result listener failed", job.id)
        if job._on_done is not None:
            try:
                job._on_done(record)
            except Exception:
                log.exception("job %s: its on_done callback failed", job.id)
        job._complete()  # after on_done: whoever waits sees everything the callback did
        if record["image"] is not None and self._painter is not None:
            # Drawing a 3000-px radiograph's three PNGs can take longer than inferring it; waiting for a
            # slot here holds the next job back, so a slow painter fills the queue (503s) instead of
            # piling up results, each holding its image in memory.
            self._paint_slots.acquire()
            self._painter.submit(_draw_pictures, result, job, self.out, self._paint_slots)
        else:
            job._pictures.set()
