"""``/metrics`` in the Prometheus text format (prometheus-client), one registry per service.

A registry of its own (not prometheus-client's global one) keeps two services in one process, as
tests start them, from sharing counters. Result counters are labelled by the record's status, so a
new status (``refused``) appears as a new label value, not a new metric.

Metrics:
    spine_edge_http_requests_total{method, route, code}
    spine_edge_results_total{origin, status}          status: ok / refused / error
    spine_edge_refusals_total{code}                   the guard's refusal code
    spine_edge_queue_rejections_total                 submissions answered "queue full"
    spine_edge_queue_depth                            jobs waiting now
    spine_edge_stage_seconds{stage}                   histogram: read, preprocess, classifier,
                                                      detector, postprocess, total, queue
    spine_edge_model_info{bundle_id, backend, precision}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spine_edge.service.worker import InferenceWorker, Job
from spine_edge.support import import_optional

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

#: Latency buckets in seconds: from a GPU's few milliseconds to a slow CPU box's seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGES = ("read", "preprocess", "classifier", "detector", "postprocess", "total")


class ServiceMetrics:
    """The service's Prometheus metrics, fed by a worker listener and the HTTP layer.

    Args:
        worker: The worker whose results, rejections and queue depth are reported.

    Raises:
        MissingDependencyError: prometheus-client is not installed.
    """

    def __init__(self, worker: InferenceWorker) -> None:
        prometheus = import_optional("prometheus_client", "serve", "The service's /metrics endpoint")
        self._prometheus = prometheus
        self.registry: CollectorRegistry = prometheus.CollectorRegistry()
        self._worker = worker
        self.requests = prometheus.Counter(
            "spine_edge_http_requests", "HTTP requests answered", ["method", "route", "code"], registry=self.registry
        )
        self.results = prometheus.Counter(
            "spine_edge_results", "Records written, by way in and status", ["origin", "status"], registry=self.registry
        )
        self.refusals = prometheus.Counter(
            "spine_edge_refusals", "Inputs the guard refused, by refusal code", ["code"], registry=self.registry
        )
        self.stage_seconds = prometheus.Histogram(
            "spine_edge_stage_seconds",
            "Seconds per image and stage (queue: waiting for the models)",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        prometheus.Gauge("spine_edge_queue_depth", "Jobs waiting for the models", registry=self.registry).set_function(
            lambda: worker.stats().queued
        )
        self.registry.register(_WorkerCollector(worker, import_optional("prometheus_client.core", "serve", "/metrics")))
        worker.add_listener(self.observe)

    def observe(self, job: Job, record: dict[str, Any]) -> None:
        """Count one written record (a worker listener)."""
        self.results.labels(job.origin, record["status"]).inc()
        refusal = record.get("refusal")
        if isinstance(refusal, dict):
            self.refusals.labels(str(refusal.get("code", "unknown"))).inc()
        latency = record.get("latency_ms") or {}
        for stage in _STAGES:
            value = latency.get(stage)
            if value is not None and (stage != "detector" or record.get("detector_ran")):
                self.stage_seconds.labels(stage).observe(value / 1e3)
        if record.get("queue_ms") is not None:
            self.stage_seconds.labels("queue").observe(record["queue_ms"] / 1e3)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return self._prometheus.generate_latest(self.registry), self._prometheus.CONTENT_TYPE_LATEST


class _WorkerCollector:
    """Values read from the worker at scrape time (rejections, model info)."""

    def __init__(self, worker: InferenceWorker, core: Any) -> None:
        self._worker = worker
        self._core = core

    def collect(self) -> Iterator[Metric]:
        rejected = self._core.CounterMetricFamily(
            "spine_edge_queue_rejections", "Submissions refused because the queue was full"
        )
        rejected.add_metric([], self._worker.stats().rejected)
        yield rejected
        info = self._core.InfoMetricFamily("spine_edge_model", "The loaded bundle and how it runs")
        info.add_metric(
            [],
            {
                "bundle_id": self._worker.bundle_id,
                "backend": self._worker.backend,
                "precision": self._worker.precision,
            },
        )
        yield info

    def describe(self) -> list[Metric]:
        return []  # nothing to check for name clashes up front; collect() runs at each scrape
