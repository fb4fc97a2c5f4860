"""What a benchmark run measured: one :class:`PrecisionBench` per precision, the :class:`GateResult`
of every pass/fail criterion (:func:`check_gates`), and the whole :class:`BenchReport`.

Plain data: :mod:`spine_edge.benchmarks.report` turns a report into JSON, tables and plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.benchmarks.accuracy import PrecisionAccuracy, PrecisionRecall
from spine_edge.benchmarks.baseline_torch import BaselineTiming
from spine_edge.benchmarks.config import REFERENCE, BenchConfig
from spine_edge.benchmarks.latency import END_TO_END, CascadeTiming, ModelTimings, Resources, Throughput
from spine_edge.verdict import RoleVerdict


@dataclass(frozen=True)
class GateResult:
    """One pass/fail criterion.

    Attributes:
        name: What is checked, e.g. ``int8 ΔAUROC vs fp32``.
        precision: The precision concerned (the bench label: ``fp16``, ``int8``, ``int8-trt``).
        measured: The value (points for accuracy deltas, ms for latency).
        limit: The bound: ``measured ≥ −limit`` for accuracy deltas (a gain never fails), ``measured ≤ limit``
            for latency.
        unit: ``pt``, ``ms``, or ``inputs`` (guard decisions that changed).
        passed: True/False, or None when it could not be decided (not a failure): the value was not
            measurable, or the accuracy verdict is ``inconclusive``.
        verdict: The accuracy verdict (``hold`` / ``fail`` / ``inconclusive``, :mod:`spine_edge.verdict`);
            empty for latency budgets.
        detail: The verdict's interval, fidelity and notes, one line.
    """

    name: str
    precision: str
    measured: float
    limit: float
    unit: str
    passed: bool | None
    verdict: str = ""
    detail: str = ""

    @property
    def excess(self) -> float:
        """How far a latency is past its budget (≤ 0 when within); accuracy gates report their verdict instead."""
        return self.measured - self.limit

    def message(self) -> str:
        """One line: the gate, its value, its limit and its outcome."""
        if self.verdict:
            return f"{self.name}: {self.verdict.upper()}: {self.detail}"
        if self.passed is None:
            return f"{self.name}: not measurable (limit {self.limit:g} {self.unit})"
        digits = ".0f" if self.unit == "inputs" else ".2f"  # counted gates: whole inputs
        value = f"{self.measured:{digits}} {self.unit} (limit ≤ {self.limit:g} {self.unit})"
        return f"{self.name}: {value} " + ("ok" if self.passed else f"FAILED by {self.excess:{digits}} {self.unit}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "name": self.name,
            "precision": self.precision,
            "measured": self.measured if math.isfinite(self.measured) else None,
            "limit": self.limit,
            "unit": self.unit,
            "passed": self.passed,
            "verdict": self.verdict or None,
            "message": self.message(),
        }


@dataclass(frozen=True)
class PrecisionBench:
    """Everything measured for one precision.

    Attributes:
        label: ``fp32``, ``fp16`` or ``int8``.
        backend: Library/provider that ran it (``Cascade.backend``), e.g. ``onnxruntime/CPUExecutionProvider``.
        files: Bundle files of the classifier and detector that ran.
        latency: Cascade latency at batch 1 (None when only accuracy ran: the FP32 reference of a
            run restricted to other precisions).
        throughput: Images/s at each batch size.
        models: The classifier and the detector timed alone.
        resources: Memory during the batch-1 latency run.
        accuracy: Accuracy against the reference (None without data).
        probs: Probabilities on the evaluated images (for the ROC plot; None without data).
        curves: Detector-alone precision–recall per class (for the plot).
        speedup_vs_torch: Ratios ``torch ms / this ms`` (classifier, detector, models).
    """

    label: str
    backend: str
    files: dict[str, str]
    latency: CascadeTiming | None = None
    throughput: tuple[Throughput, ...] = ()
    models: tuple[ModelTimings, ...] = ()
    resources: Resources | None = None
    accuracy: PrecisionAccuracy | None = None
    probs: np.ndarray | None = None
    curves: dict[str, PrecisionRecall] = field(default_factory=dict)
    speedup_vs_torch: dict[str, float] = field(default_factory=dict)

    def model(self, role: str) -> ModelTimings | None:
        """The isolated timing of a role, or None."""
        return next((m for m in self.models if m.role == role), None)

    def best_throughput(self) -> Throughput | None:
        """The throughput entry with the most images per second."""
        return max(self.throughput, key=lambda t: t.images_per_second, default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "label": self.label,
            "backend": self.backend,
            "files": dict(self.files),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "throughput": [t.to_dict() for t in self.throughput],
            "models": [m.to_dict() for m in self.models],
            "resources": None if self.resources is None else self.resources.to_dict(),
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
            "speedup_vs_torch": {k: round(v, 3) for k, v in self.speedup_vs_torch.items()},
        }


@dataclass(frozen=True)
class BenchReport:
    """The result of :func:`spine_edge.benchmarks.run.run_bench`.

    Attributes:
        created: ISO-8601 UTC time the run started.
        bundle: Bundle folder.
        bundle_id: Its id.
        environment: CPU/GPU names, threads, library versions.
        data: What the images were (source, counts, notes).
        input_sizes: ``{"classifier": S, "detector": S}``.
        threshold: Gate τ.
        precisions: One entry per precision, reference first.
        baseline: PyTorch timings, or None.
        gates: Every gate checked.
        labels: Ground-truth labels of the evaluated images (None without data).
        notes: What was skipped or worth knowing, one line each.
        phase_seconds: Wall time of each phase (accuracy, each precision's latency, baseline).
        seconds: Wall time of the run.
    """

    created: str
    bundle: Path
    bundle_id: str
    environment: dict[str, Any]
    data: dict[str, Any]
    input_sizes: dict[str, int]
    threshold: float
    precisions: tuple[PrecisionBench, ...]
    baseline: BaselineTiming | None
    gates: tuple[GateResult, ...]
    labels: np.ndarray | None = None
    notes: tuple[str, ...] = ()
    phase_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        """Gates that failed."""
        return tuple(g for g in self.gates if g.passed is False)

    @property
    def passed(self) -> bool:
        """No gate failed (an ``inconclusive`` accuracy verdict is not a failure)."""
        return not self.failed_gates

    @property
    def inconclusive_gates(self) -> tuple[GateResult, ...]:
        """Accuracy gates whose verdict is ``inconclusive`` (bench warns, exit status 0)."""
        return tuple(g for g in self.gates if g.verdict == "inconclusive")

    def precision(self, label: str) -> PrecisionBench | None:
        """The entry of a precision, or None."""
        return next((p for p in self.precisions if p.label == label), None)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (plots' raw arrays excepted; latency samples included)."""
        return {
            "created": self.created,
            "bundle": str(self.bundle),
            "bundle_id": self.bundle_id,
            "passed": self.passed,
            "environment": self.environment,
            "data": self.data,
            "input_sizes": self.input_sizes,
            "threshold": self.threshold,
            "reference": REFERENCE,
            "precisions": [p.to_dict() for p in self.precisions],
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "gates": [g.to_dict() for g in self.gates],
            "notes": list(self.notes),
            "phase_seconds": dict(self.phase_seconds),
            "seconds": round(self.seconds, 2),
        }


#: How a verdict maps onto a gate's pass flag: ``inconclusive`` is undecided, not a failure (exit 0 with a warning).
_PASSED: dict[str, bool | None] = {"hold": True, "fail": False, "inconclusive": None}


def verdict_gates(label: str, classifier: RoleVerdict | None, detector: RoleVerdict | None) -> list[GateResult]:
    """The accuracy gates of one precision: one per role, each carrying that role's verdict."""
    gates = []
    for name, verdict in (("ΔAUROC", classifier), ("ΔmAP@0.5 (detector)", detector)):
        if verdict is not None:
            task = verdict.task
            gates.append(
                GateResult(
                    f"{label} {name} vs {REFERENCE}",
                    label,
                    task.delta_pt,
                    task.gate_pt,
                    "pt",
                    _PASSED[verdict.verdict],
                    verdict.verdict,
                    verdict.describe(),
                )
            )
    return gates


def check_gates(precisions: Sequence[PrecisionBench], config: BenchConfig) -> tuple[GateResult, ...]:
    """Every lower precision's accuracy verdict (:mod:`spine_edge.verdict`, export's rule too) and the latency budgets."""
    gates = []
    for bench in precisions:
        acc = bench.accuracy
        if acc is not None:
            gates += verdict_gates(bench.label, acc.classifier_verdict, acc.detector_verdict)
        if bench.latency is None:
            continue
        end_to_end = [(END_TO_END, config.budget_ms)] if config.budget_ms is not None else []
        budgets = end_to_end + list(config.stage_budgets)
        for stage, limit in budgets:
            stats = bench.latency.end_to_end if stage == END_TO_END else bench.latency.stages.get(stage)
            measured = stats.p95 if stats is not None else math.nan
            passed = None if math.isnan(measured) else measured <= limit
            name = f"{bench.label} {stage.replace('_', '-')} p95"
            gates.append(GateResult(name, bench.label, measured, limit, "ms", passed))
    return tuple(gates)
