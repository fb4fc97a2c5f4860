"""Load test of ``spine-edge serve``: N concurrent clients on loopback for a bounded time.

What it measures and checks, per concurrency level:

- throughput (answered images per second), client-side latency p50 / p95 / p99 of ``POST
  /v1/predict``, 503 answers (queue full) and other errors;
- **no lost or duplicated results**: after the run, every accepted request (an answer carrying a
  job id) has exactly one record in the service's results.jsonl, and no record exists that no
  answer announced;
- **service overhead**: at concurrency 1, each file through ``Cascade.predict`` in this process
  (same bundle, same threads) and then through the idle service, alternating, so drifting load on a
  shared machine hits both alike (target: service within 10 %).

The service runs as its own process (``spine-edge serve --port 0``), as on a kiosk, so the clients'
Python does not share its interpreter. Clients back off 0.25 s after a 503 instead of the
``Retry-After`` they are told (1 s or more): the point is to keep the queue full.

Example:
    python -m spine_edge.benchmarks.load_service --bundle runs/bundle --clients 1,4,16 --duration 20 \\
        --synthetic dicom -o runs/load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spine_edge.backends import BackendChoice, PrecisionChoice
from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.imageio import find_images
from spine_edge.results import read_jsonl
from spine_edge.support import import_optional

#: Client back-off after a 503, seconds (see the module docstring).
BACKOFF_S = 0.25
#: Content type sent with each file, by suffix.
_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


@dataclass(frozen=True)
class LoadConfig:
    """A load test.

    Attributes:
        bundle: Bundle the service and the baseline load.
        out: Working folder: the service's output (``service/``), synthetic images, the report.
        clients: Concurrency levels, run in order.
        duration: Seconds per level.
        images: Input files; empty: synthesise them (``synthetic``).
        synthetic: ``png`` (small 8-bit PNGs: HTTP overhead dominates) or ``dicom`` (JPEG 2000 DICOM
            at real VinDr-SpineXR sizes: decoding dominates, as on a kiosk).
        queue_size: The service's queue.
        precision: See :class:`spine_edge.cascade.CascadeConfig`.
        backend: See :class:`spine_edge.cascade.CascadeConfig`.
        threads: ONNX Runtime threads in the service and the baseline (None: default).
        baseline_rounds: Passes over the images for the paired comparison at concurrency 1.
        pictures: Let the service draw its PNGs (``--no-pictures`` otherwise).
    """

    bundle: Path
    out: Path
    clients: tuple[int, ...] = (1, 4, 16, 32)
    duration: float = 15.0
    images: tuple[Path, ...] = ()
    synthetic: str = "png"
    queue_size: int = 16
    precision: PrecisionChoice = "fp32"
    backend: BackendChoice = "onnxruntime"
    threads: int | None = None
    baseline_rounds: int = 3
    pictures: bool = True


@dataclass(frozen=True)
class LevelReport:
    """One concurrency level.

    Attributes:
        clients: Concurrent clients.
        requests: Requests sent.
        accepted: Answers with a job id (200 or 422).
        rejected_503: Queue-full answers.
        errors: Anything else (transport errors, 4xx other than 422, 5xx other than 503).
        error_kinds: What the errors were: HTTP status codes, or the transport exception's name.
        images_per_second: Accepted answers per second of the level.
        p50_ms: Client-side latency of accepted requests.
        p95_ms: See p50_ms.
        p99_ms: See p50_ms.
        service_p50_ms: The records' own ``latency_ms.total`` p50 (the models' view).
    """

    clients: int
    requests: int
    accepted: int
    rejected_503: int
    errors: int
    error_kinds: dict[str, int]
    images_per_second: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    service_p50_ms: float | None


@dataclass(frozen=True)
class LoadReport:
    """The whole run.

    Attributes:
        levels: One report per concurrency level.
        paired: Service against ``Cascade.predict`` at concurrency 1.
        within_target: ``paired.ratio_p50 <= 0.10``.
        lost: Accepted job ids with no record.
        duplicated: Job ids with more than one record.
        unannounced: Records whose job id no answer carried.
        images: How many distinct files were sent, and their kind.
        load_average: The machine's 1-minute load average at the start and the end (a shared box
            that is busy elsewhere slows everything measured here).
    """

    levels: tuple[LevelReport, ...]
    paired: PairedReport
    within_target: bool
    lost: int
    duplicated: int
    unannounced: int
    images: str
    load_average: tuple[float, float]


def _percentiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return round(float(p50), 2), round(float(p95), 2), round(float(p99), 2)


def synthetic_images(folder: Path, kind: str, count: int = 8) -> list[Path]:
    """Half bright-block (abnormal for the tiny test bundle), half dark PNGs; or DICOMs at real sizes."""
    if kind == "dicom":
        from spine_edge.benchmarks.synthetic import write_synthetic_radiographs

        return write_synthetic_radiographs(folder, count)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        # A smooth gradient with soft texture: a flat or noisy picture would be refused by the guard.
        noise = cv2.GaussianBlur(rng.normal(0, 8, (384, 320)).astype(np.float32), (0, 0), 3)
        image = (np.linspace(25, 60, 384, dtype=np.float32)[:, None] + noise).clip(0, 255).astype(np.uint8)
        if i % 2 == 0:
            image[40:200, 120:260] = 250
        path = folder / f"synthetic_{i:02d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class PairedReport:
    """Service against ``Cascade.predict`` at concurrency 1, measured in alternation.

    Each file goes through ``Cascade.predict`` in this process, then through the idle service,
    back to back, so a machine whose load drifts (other work on a shared box) slows both alike.

    Attributes:
        pairs: Measured pairs.
        predict_p50_ms: ``Cascade.predict`` wall time p50.
        service_p50_ms: ``POST /v1/predict`` wall time p50 (client side).
        ratio_p50: p50 over the pairs of service / predict, minus 1 (the overhead, as a fraction).
        http_overhead_p50_ms: p50 of client latency minus the record's own ``latency_ms.total``
            (upload, queue hand-over, fsync of the record, the answer).
    """

    pairs: int
    predict_p50_ms: float
    service_p50_ms: float
    ratio_p50: float
    http_overhead_p50_ms: float


def paired_overhead(
    config: LoadConfig, url: str, images: Sequence[Path], bodies: Sequence[tuple[bytes, str]]
) -> PairedReport:
    """Alternate ``Cascade.predict`` and the service on each file (see :class:`PairedReport`)."""
    httpx = import_optional("httpx", "dev", "The service load test")
    cascade_config = CascadeConfig(
        bundle=config.bundle,
        precision=config.precision,
        backend=config.backend,
        threads=config.threads,
    )
    predict, service, ratio, overhead = [], [], [], []
    with Cascade.from_config(cascade_config) as cascade, httpx.Client(timeout=300.0) as client:
        cascade.warmup()
        cascade.predict(images[0])
        for _ in range(config.baseline_rounds):
            for path, (body, content_type) in zip(images, bodies, strict=True):
                start = time.perf_counter()
                cascade.predict(path)
                predict.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                response = client.post(f"{url}/v1/predict", content=body, headers={"content-type": content_type})
                service.append((time.perf_counter() - start) * 1e3)
                response.raise_for_status()
                record = response.json()
                ratio.append(service[-1] / predict[-1] - 1)
                overhead.append(service[-1] - record["latency_ms"]["total"])
                if record["urls"]["image"]:
                    # Untimed: wait for the service to finish drawing this result's PNGs, so its picture
                    # thread does not run into (and slow down) the next in-process predict.
                    client.get(f"{url}{record['urls']['image']}")
    return PairedReport(
        pairs=len(predict),
        predict_p50_ms=round(float(np.median(predict)), 2),
        service_p50_ms=round(float(np.median(service)), 2),
        ratio_p50=round(float(np.median(ratio)), 4),
        http_overhead_p50_ms=round(float(np.median(overhead)), 2),
    )


def start_service(config: LoadConfig, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``spine-edge serve`` on a free loopback port; returns the process and its base URL."""
    command = (
        [
            sys.executable,
            "-c",
            "from spine_edge.cli import main; main()",
            "serve",
            "--bundle",
            str(config.bundle),
            "--precision",
            config.precision,
            "--backend",
            config.backend,
            "-o",
            str(config.out / "service"),
            "--port",
            "0",
            "--queue-size",
            str(config.queue_size),
        ]
        + (["--threads", str(config.threads)] if config.threads else [])
        + ([] if config.pictures else ["--no-pictures"])
    )
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"serving on (http://\S+)/", log.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"spine-edge serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"spine-edge serve did not start within 120 s:\n{log.read_text()}")


async def _client(
    client: Any,
    url: str,
    bodies: Sequence[tuple[bytes, str]],
    offset: int,
    deadline: float,
    outcomes: list[tuple[int, float, str | None, float | None]],
) -> None:
    # Each outcome: (HTTP status or 0, ms, the job id (or the exception's name for status 0), record's total ms).
    httpx = import_optional("httpx", "dev", "The service load test")
    i = offset
    while time.monotonic() < deadline:
        body, content_type = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            response = await client.post(f"{url}/v1/predict", content=body, headers={"content-type": content_type})
        except httpx.HTTPError as exc:
            outcomes.append((0, 0.0, type(exc).__name__, None))
            continue
        elapsed = (time.perf_counter() - start) * 1e3
        if response.status_code in (200, 422):
            record = response.json()
            outcomes.append((response.status_code, elapsed, record["job_id"], record["latency_ms"]["total"]))
        else:
            outcomes.append((response.status_code, elapsed, None, None))
            if response.status_code == 503:
                await asyncio.sleep(BACKOFF_S)


async def _level(
    url: str, bodies: Sequence[tuple[bytes, str]], clients: int, duration: float
) -> tuple[LevelReport, list[str]]:
    httpx = import_optional("httpx", "dev", "The service load test")
    outcomes: list[tuple[int, float, str | None, float | None]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
        await asyncio.gather(*(_client(client, url, bodies, k, start + duration, outcomes) for k in range(clients)))
    seconds = time.monotonic() - start
    accepted = [o for o in outcomes if o[0] in (200, 422)]
    p50, p95, p99 = _percentiles([o[1] for o in accepted])
    service = _percentiles([o[3] for o in accepted if o[3] is not None])[0]
    codes = Counter(o[0] for o in outcomes)
    report = LevelReport(
        clients=clients,
        requests=len(outcomes),
        accepted=len(accepted),
        rejected_503=codes[503],
        errors=len(outcomes) - len(accepted) - codes[503],
        error_kinds=dict(
            Counter(str(o[2]) if o[0] == 0 else str(o[0]) for o in outcomes if o[0] not in (200, 422, 503))
        ),
        images_per_second=round(len(accepted) / seconds, 2),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        service_p50_ms=service,
    )
    return report, [str(o[2]) for o in accepted]


def run_load_test(config: LoadConfig) -> LoadReport:
    """Run the baseline, start the service, drive each level, stop it, check results.jsonl."""
    config.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    images = list(config.images) or synthetic_images(config.out / "images", config.synthetic)
    kind = f"{len(images)} {'files' if config.images else config.synthetic}" + (
        "" if config.pictures else ", no pictures"
    )
    bodies = [(p.read_bytes(), _CONTENT_TYPES.get(p.suffix.lower(), "application/dicom")) for p in images]
    process, url = start_service(config, config.out / "serve.log")
    announced: list[str] = []
    levels = []
    try:
        # One untimed request first: the service's own first-call costs are not the test.
        asyncio.run(_level(url, bodies, 1, 0.001))
        paired = paired_overhead(config, url, images, bodies)
        print(json.dumps(asdict(paired)), flush=True)
        before = {r.get("job_id") for r in read_jsonl(config.out / "service" / "results.jsonl")}
        for clients in config.clients:
            report, ids = asyncio.run(_level(url, bodies, clients, config.duration))
            levels.append(report)
            announced += ids
            print(json.dumps(asdict(report)), flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    records = [r for r in read_jsonl(config.out / "service" / "results.jsonl") if r.get("job_id") not in before]
    counts = Counter(r["job_id"] for r in records)
    wanted = set(announced)
    return LoadReport(
        levels=tuple(levels),
        paired=paired,
        within_target=paired.ratio_p50 <= 0.10,
        lost=sum(1 for job_id in wanted if counts[job_id] == 0),
        duplicated=sum(1 for n in counts.values() if n > 1),
        unannounced=sum(1 for job_id in counts if job_id not in wanted),
        images=kind,
        load_average=(round(load_start, 2), round(os.getloadavg()[0], 2)),
    )


def format_report(report: LoadReport) -> str:
    """A Markdown table and the checks."""
    lines = [
        f"images: {report.images}; load average {report.load_average[0]} at the start, {report.load_average[1]} at the end",
        "",
        "| clients | requests | accepted | 503 | errors | images/s | p50 ms | p95 ms | p99 ms | service p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report.levels:
        lines.append(
            f"| {lv.clients} | {lv.requests} | {lv.accepted} | {lv.rejected_503} | {lv.errors} | "
            f"{lv.images_per_second} | {lv.p50_ms} | {lv.p95_ms} | {lv.p99_ms} | {lv.service_p50_ms} |"
        )
    lines += [f"errors at {lv.clients} clients: {lv.error_kinds}" for lv in report.levels if lv.error_kinds]
    paired = report.paired
    lines += [
        "",
        f"concurrency 1, {paired.pairs} alternating pairs: Cascade.predict p50 {paired.predict_p50_ms} ms, "
        f"service p50 {paired.service_p50_ms} ms, paired overhead p50 {paired.ratio_p50 * 100:+.1f} % "
        f"({'within' if report.within_target else 'NOT within'} the 10 % target), "
        f"HTTP + record overhead p50 {paired.http_overhead_p50_ms} ms",
        f"lost {report.lost}, duplicated {report.duplicated}, records nobody was told of {report.unannounced}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit 1 when a result was lost or duplicated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/load_service"))
    parser.add_argument("--clients", default="1,4,16,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--duration", type=float, default=15.0, help="Seconds per level.")
    parser.add_argument("--images", type=Path, default=None, help="Folder of input files (default: synthetic).")
    parser.add_argument("--synthetic", choices=["png", "dicom"], default="png")
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="fp32")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-pictures", action="store_true", help="Start the service with --no-pictures.")
    args = parser.parse_args(argv)
    config = LoadConfig(
        bundle=args.bundle,
        out=args.out,
        clients=tuple(int(c) for c in args.clients.split(",")),
        duration=args.duration,
        images=tuple(find_images(args.images)) if args.images else (),
        synthetic=args.synthetic,
        queue_size=args.queue_size,
        precision=args.precision,
        backend=args.backend,
        threads=args.threads,
        pictures=not args.no_pictures,
    )
    report = run_load_test(config)
    (config.out / "load_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(format_report(report))
    return 1 if report.lost or report.duplicated or report.unannounced else 0


if __name__ == "__main__":
    sys.exit(main())
