"""The HTTP face of the kiosk: a Starlette app over one :class:`~spine_edge.service.worker.InferenceWorker`.

Starlette rather than FastAPI: every endpoint reads a raw streamed body or returns a record that
already is JSON, so request models add nothing, and FastAPI's interactive docs load their scripts
from a CDN, which a kiosk without internet cannot reach.

Endpoints (JSON unless noted):

========================================  =====================================================
``GET /healthz``                          process alive (200)
``GET /readyz``                           models loaded: bundle id, backend, precision, τ, the
                                          DICOM listener's address if any (503 if not)
``POST /v1/predict``                      one image (multipart ``file`` or raw body) → its record
                                          (200 ok/refused, 422 unreadable, 413 too large,
                                          503 queue full + ``Retry-After``, 504 still running)
``POST /v1/jobs``                         the same, answered at once: 202 with the job id
``GET /v1/jobs/{id}``                     ``{job_id, status: queued|running|done, record}``
``GET /v1/jobs/{id}/{image,overlay,heatmap}.png``   pictures of a result (PNG)
``GET /v1/results?limit=N``               newest records first (N ≤ 1000, default 20)
``GET /metrics``                          Prometheus text format
``GET /``, ``/static/…``                  the touch-screen page (no data in it, so no token)
========================================  =====================================================

With a token configured every other request needs ``Authorization: Bearer <token>``, compared in
constant time. Logs name the route, status and job id, never a file name or query string: file
names of radiographs often carry the patient's name.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spine_edge.service.upload import UploadError, receive_upload
from spine_edge.service.worker import InferenceWorker, Job, QueueFull, WorkerNotRunning
from spine_edge.support import import_optional

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from spine_edge.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

#: Where uploads are kept, relative to the worker's output folder (the record's ``source``). The DICOM
#: listener of the same process has its own (see :mod:`spine_edge.dicomnet.kiosk`).
INBOX_DIR = "inbox"
#: Largest ``limit`` of ``GET /v1/results``.
MAX_RESULTS = 1000
_PICTURES = ("image", "overlay", "heatmap")
#: Paths served without a token: the page's static shell, which holds no patient data.
_PUBLIC_PREFIXES = ("/static/",)
_PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})


@dataclass(frozen=True)
class DicomEndpoint:
    """Where the same process receives DICOM (``serve --dicom-port``), as ``/readyz`` reports it.

    Attributes:
        ae_title: The AE title senders call.
        host: The address it is bound to.
        port: Its TCP port (the one chosen when 0 was asked for).
    """

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class AppConfig:
    """HTTP settings of the service.

    Attributes:
        max_upload_bytes: Largest request body accepted (413 beyond).
        token: API token every non-page request must carry; None for none (loopback use).
        request_timeout: Seconds ``POST /v1/predict`` waits for its record before answering 504
            with the job id to poll.
        picture_timeout: Seconds a picture request waits for the PNG of a just-finished job.
        dicom: The DICOM listener sharing the worker, reported by ``/readyz``; None when there is none.
    """

    max_upload_bytes: int = 64 * 2**20
    token: str | None = None
    request_timeout: float = 120.0
    picture_timeout: float = 10.0
    dicom: DicomEndpoint | None = None

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
        if self.token is not None and not self.token:
            raise ValueError("the API token is empty: put the token in the file, or run without --token-file")


def static_dir() -> Path:
    """The folder holding the page's HTML, CSS and JavaScript (package data)."""
    return Path(str(resources.files("spine_edge.service") / "static"))


def job_urls(record: dict[str, Any]) -> dict[str, str | None]:
    """URLs of a record's pictures on this service (None where the picture was not drawn)."""
    job_id = record.get("job_id")
    return {name: f"/v1/jobs/{job_id}/{name}.png" if job_id and record.get(name) else None for name in _PICTURES}


def _with_urls(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "urls": job_urls(record)}


def create_app(
    worker: InferenceWorker, config: AppConfig = AppConfig(), metrics: ServiceMetrics | None = None
) -> ASGIApp:
    """Build the ASGI app over a started worker.

    Args:
        worker: The worker (started by the caller, which also stops it).
        config: HTTP settings.
        metrics: Prometheus metrics; None creates them (needs prometheus-client).

    Returns:
        The app, wrapped in the token and request-logging middleware.

    Raises:
        MissingDependencyError: starlette or prometheus-client is not installed.
    """
    import_optional("starlette", "serve", "spine-edge serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from spine_edge.service.metrics import ServiceMetrics

    metrics = metrics or ServiceMetrics(worker)
    static = static_dir()
    inbox = worker.out / INBOX_DIR

    def error(status: int, detail: str, **extra: Any) -> JSONResponse:
        headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
        return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)

    async def page(request: Request) -> Response:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        stats = worker.stats()
        body = {
            "ready": worker.ready,
            "bundle_id": worker.bundle_id,
            "backend": worker.backend,
            "precision": worker.precision,
            "threshold": worker.threshold,
            "queue_size": worker.config.queue_size,
            "queued": stats.queued,
            "dicom": None if config.dicom is None else asdict(config.dicom),
        }
        return JSONResponse(body, status_code=200 if worker.ready else 503)

    async def accept(request: Request) -> tuple[Job, asyncio.Future[Job]] | Response:
        """Stream the upload to the inbox and queue it; a response instead where that fails."""
        if not worker.ready:
            return error(
                503, "the models are not loaded (the service is starting or stopping); retry shortly", retry_after=5
            )
        try:
            worker.ensure_capacity()  # refuse before reading the body: a full kiosk need not absorb 64 MiB first
        except QueueFull as exc:
            return error(503, str(exc), retry_after=exc.retry_after)
        stem = uuid.uuid4().hex
        try:
            upload = await receive_upload(
                request.stream(),
                content_type=request.headers.get("content-type", ""),
                content_length=request.headers.get("content-length"),
                filename_header=request.headers.get("content-disposition"),
                folder=inbox,
                stem=stem,
                limit=config.max_upload_bytes,
            )
        except UploadError as exc:
            return error(exc.status, str(exc))
        meta = {"filename": upload.filename} if upload.filename else {}
        try:
            job = worker.submit(upload.path, origin="http", meta=meta, job_id=stem)
        except QueueFull as exc:
            upload.path.unlink(missing_ok=True)  # never judged: no record, no file
            return error(503, str(exc), retry_after=exc.retry_after)
        except WorkerNotRunning as exc:
            upload.path.unlink(missing_ok=True)
            return error(503, str(exc), retry_after=5)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Job] = loop.create_future()

        def resolve(finished: Job) -> None:
            if not done.done():
                done.set_result(finished)

        def on_finished(finished: Job) -> None:  # on the worker thread (or here): hand over to the event loop
            loop.call_soon_threadsafe(resolve, finished)

        job.add_done_callback(on_finished)
        return job, done

    async def predict(request: Request) -> Response:
        accepted = await accept(request)
        if not isinstance(accepted, tuple):
            return accepted
        job, done = accepted
        try:
            # shield: a client that goes away cancels this wait, never the job (its record is still written).
            finished = await asyncio.wait_for(asyncio.shield(done), config.request_timeout)
        except asyncio.TimeoutError:
            return error(
                504,
                f"the image is still being processed after {config.request_timeout:g} s; poll /v1/jobs/{job.id}",
                job_id=job.id,
            )
        record = finished.record
        if record is None:
            return error(
                503,
                "the service could not record this result (see its log) and stopped taking images; restart it",
                retry_after=30,
            )
        return JSONResponse(_with_urls(record), status_code=422 if record["status"] == "error" else 200)

    async def submit_job(request: Request) -> Response:
        accepted = await accept(request)
        if not isinstance(accepted, tuple):
            return accepted
        job, _ = accepted
        return JSONResponse({"job_id": job.id, "status": job.status, "url": f"/v1/jobs/{job.id}"}, status_code=202)

    async def get_job(request: Request) -> Response:
        job = worker.get(request.path_params["job_id"])
        if job is None:
            return error(
                404,
                "no such job here (unknown id, or older than the service's in-memory history: see its results.jsonl)",
            )
        record = job.record
        return JSONResponse(
            {"job_id": job.id, "status": job.status, "record": None if record is None else _with_urls(record)}
        )

    async def picture(request: Request) -> Response:
        name = request.path_params["picture"]
        job = worker.get(request.path_params["job_id"])
        if name not in _PICTURES or job is None or job.record is None or not job.record.get(name):
            return error(404, f"no {name} picture for this job")
        if not await asyncio.to_thread(job.wait_pictures, config.picture_timeout):
            return error(503, "the picture is still being drawn; retry shortly", retry_after=1)
        path = worker.out / str(job.record[name])
        if not path.is_file():
            return error(404, f"the {name} picture of this job could not be written; see the service log")
        return FileResponse(path, media_type="image/png")

    async def results(request: Request) -> Response:
        raw = request.query_params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_RESULTS:
            return error(400, f"limit must be a whole number from 1 to {MAX_RESULTS}, got {raw!r}")
        return JSONResponse({"results": [_with_urls(r) for r in worker.recent(int(raw))]})

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client left mid-upload: its partial file is already removed; nobody reads this answer.
        return Response(status_code=400)

    async def crash(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.scope.get("route", "?"), exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the service keeps running, see its log")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/v1/jobs", submit_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", get_job),
            Route("/v1/jobs/{job_id}/{picture}.png", picture),
            Route("/v1/results", results),
            Route("/metrics", prometheus),
            Mount("/static", StaticFiles(directory=static), name="static"),
        ],
        exception_handlers={HTTPException: http_error, ClientDisconnect: client_gone, Exception: crash},
    )
    return _Guard(app, config.token, metrics)


class _Guard:
    """ASGI middleware: the API token, request counting and one log line per request."""

    def __init__(self, app: Starlette, token: str | None, metrics: ServiceMetrics) -> None:
        self.app = app
        self._token = None if token is None else f"Bearer {token}".encode()
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        path: str = scope["path"]

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._token is not None and not _public(path) and not self._authorised(scope):
                await _reject(send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self._metrics.requests.labels(scope["method"], route, str(status)).inc()
            log.info("%s %s %d %.0f ms", scope["method"], path, status, (time.perf_counter() - start) * 1e3)

    def _authorised(self, scope: Scope) -> bool:
        assert self._token is not None
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self._token)


def _public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


async def _reject(send: Callable[[Message], Awaitable[None]]) -> None:
    body = b'{"detail":"this service needs its API token: send the header Authorization: Bearer <token>"}'
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
