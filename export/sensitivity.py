"""The INT8 layer search: quantise a graph, measure it, keep the most sensitive parts in FP32, repeat.

Each search is one function from its inputs (the FP32 graph, its calibration, the target, the
evaluation and FP32 reference) to a frozen result (the written graph, its final measurement and
every step taken), so the search rule and the verdict it stops on can change without touching the
rest of the export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spine_edge.export import precision as prec
from spine_edge.export.classifier_graph import member_scope
from spine_edge.export.detector_graph import head_output_nodes
from spine_edge.export.evaluation import ClassifierComparison, ClassifierRun, DetectorComparison, Evaluation
from spine_edge.metrics import ACCURACY_GATES, compute_auroc, count_flips, delta_points

#: What the detector search keeps in FP32 when the quantised head costs too much mAP.
DETECTOR_HEAD = "Detect head output convs and DFL"


@dataclass(frozen=True)
class ClassifierMember:
    """One ensemble member as the search sees it.

    Attributes:
        name: Member name.
        weight: Ensemble weight (the search blames ``weight · mean|Δp|``).
    """

    name: str
    weight: float


@dataclass(frozen=True)
class ClassifierStep:
    """One round of the classifier search: what was kept in FP32 and what INT8 then measured."""

    kept_fp32: tuple[str, ...]
    delta_auroc_pt: float
    flips: int
    member_delta_auroc_pt: dict[str, float]
    member_mean_abs_dprob: dict[str, float]


@dataclass(frozen=True)
class ClassifierSearch:
    """The classifier's INT8 graph and how the search arrived at it.

    Attributes:
        path: The INT8 graph written.
        run: Its outputs on the evaluation set.
        comparison: Its accuracy against FP32.
        kept_fp32: Members (or their later halves) left in FP32.
        steps: Every round, in order.
        auroc_tolerance_pt: AUROC loss accepted.
        max_flips: Gate-decision flips accepted.
    """

    path: Path
    run: ClassifierRun
    comparison: ClassifierComparison
    kept_fp32: tuple[str, ...]
    steps: tuple[ClassifierStep, ...]
    auroc_tolerance_pt: float
    max_flips: int

    def record(self) -> dict[str, Any]:
        """The report's ``sensitivity`` record of this graph."""
        return {
            "steps": [asdict(step) for step in self.steps],
            "kept_fp32": list(self.kept_fp32),
            "auroc_tolerance_pt": self.auroc_tolerance_pt,
            "max_flips": self.max_flips,
        }


@dataclass(frozen=True)
class DetectorStep:
    """One round of the detector search."""

    kept_fp32: tuple[str, ...]
    delta_map50_pt: float


@dataclass(frozen=True)
class DetectorSearch:
    """The detector's INT8 graph and how the search arrived at it.

    Attributes:
        path: The INT8 graph written.
        comparison: Its accuracy against FP32.
        kept_fp32: Layer groups left in FP32.
        steps: Every round, in order.
    """

    path: Path
    comparison: DetectorComparison
    kept_fp32: tuple[str, ...]
    steps: tuple[DetectorStep, ...]

    def record(self) -> dict[str, Any]:
        """The report's ``sensitivity`` record of this graph."""
        return {"steps": [asdict(step) for step in self.steps], "kept_fp32": list(self.kept_fp32)}


def loss_exceeds(delta_pt: float, budget_pt: float) -> bool:
    """Whether a metric fell by more than the budget (a gain or an unmeasurable delta never does)."""
    return not math.isnan(delta_pt) and -delta_pt > budget_pt + 1e-9


def member_nodes(fp32: onnx.ModelProto, body: set[str], index: int) -> tuple[set[str], set[str]]:
    """Body nodes of member ``index``, and its later half: every body node from the first Conv of
    the second half of its Convs (graph order) on.

    Measured on a trained EfficientNetV2-B0 member (symmetric INT8, MinMax): quantising only its last
    stage and head moved its probability by 0.25 and 0.12 on average, every earlier stage by < 0.025,
    and keeping the later half of its Convs in FP32 brought the member from −12 to −0.8 AUROC points;
    its squeeze-excitation blocks alone made no difference.
    """
    scope = member_scope(index)
    ordered = [n.name for n in fp32.graph.node if n.name in body and n.name.startswith(scope)]
    convs = [n for n in ordered if n.endswith("/Conv")]
    later = set(ordered[ordered.index(convs[len(convs) // 2]) :]) if convs else set(ordered)
    return set(ordered), later


def _kept_description(names: Sequence[str], stage: Sequence[int]) -> tuple[str, ...]:
    labels = {1: "later half", 2: "whole member"}
    return tuple(f"{name} ({labels[s]})" for name, s in zip(names, stage, strict=True) if s)


def search_classifier_int8(
    fp32_path: Path,
    out: Path,
    calibration: prec.CalibrationResult,
    target: prec.QuantTarget,
    members: Sequence[ClassifierMember],
    evaluation: Evaluation,
    max_flip_fraction: float,
) -> ClassifierSearch:
    """Quantise the classifier, keeping parts of members in FP32 while the INT8 graph misses the mark.

    The mark, on the evaluation set: ensemble AUROC loss within the INT8 gate (or one swapped pair,
    whichever is larger) and at most ``max_flip_fraction`` of the gate decisions flipped (AUROC alone
    misses a member whose probabilities all shift: the ranking holds, τ no longer does). Each round
    blames the member with the largest weighted probability error ``w·mean|Δp|`` (member AUROC is too
    noisy on a small split to rank by) and keeps its later half, then all of it, in FP32.

    Args:
        fp32_path: The FP32 classifier graph.
        out: The INT8 graph to write (rewritten each round).
        calibration: Its activation ranges.
        target: ``tensorrt`` or ``onnxruntime``.
        members: The members in graph order.
        evaluation: The evaluation set and FP32 reference.
        max_flip_fraction: Share of images whose decision may flip (at least one image).
    """
    fp32 = onnx.load(str(fp32_path))
    body = prec.fp16_body(fp32)
    gate = ACCURACY_GATES["int8"]
    names = [m.name for m in members]
    weights = [m.weight for m in members]
    nodes = [member_nodes(fp32, body, i) for i in range(len(names))]
    labels = evaluation.data.labels
    threshold = evaluation.settings.threshold
    # One swapped (abnormal, normal) pair moves AUROC by 100 / (P·N) points: on a small validation set
    # that step can exceed the gate itself, and a single swap is no evidence of damage.
    pairs = int(labels.sum()) * int((1 - labels).sum())
    tolerance = max(gate.auroc_pt, 100.0 / pairs if pairs else 0.0)
    max_flips = max(1, math.floor(max_flip_fraction * len(labels)))
    stage = [0] * len(names)  # 0: quantised, 1: later half FP32, 2: whole member FP32
    excluded: set[str] = set()
    steps: list[ClassifierStep] = []
    ref = evaluation.classifier_fp32
    while True:
        prec.quantize_graph(fp32_path, out, calibration, target, body, excluded)
        run = evaluation.run_classifier(out)
        ensemble_delta = delta_points(compute_auroc(labels, run.prob), compute_auroc(labels, ref.prob))
        flips = count_flips(ref.prob, run.prob, threshold)
        errors = [float(np.abs(run.members[i] - ref.members[i]).mean()) for i in range(len(names))]
        steps.append(
            ClassifierStep(
                kept_fp32=_kept_description(names, stage),
                delta_auroc_pt=ensemble_delta,
                flips=flips,
                member_delta_auroc_pt={
                    n: delta_points(compute_auroc(labels, run.members[i]), compute_auroc(labels, ref.members[i]))
                    for i, n in enumerate(names)
                },
                member_mean_abs_dprob=dict(zip(names, errors, strict=True)),
            )
        )
        # Only losses count: a gain from quantisation noise is no reason to keep anything in FP32.
        if not loss_exceeds(ensemble_delta, tolerance) and flips <= max_flips:
            break
        candidates = [i for i in range(len(names)) if stage[i] < 2]
        if not candidates:
            break
        worst = max(candidates, key=lambda i: weights[i] * errors[i])
        stage[worst] += 1
        excluded |= nodes[worst][1] if stage[worst] == 1 else nodes[worst][0]
    return ClassifierSearch(
        path=out,
        run=run,
        comparison=evaluation.compare_classifier(run),
        kept_fp32=_kept_description(names, stage),
        steps=tuple(steps),
        auroc_tolerance_pt=tolerance,
        max_flips=max_flips,
    )


def search_detector_int8(
    fp32_path: Path,
    out: Path,
    calibration: prec.CalibrationResult,
    target: prec.QuantTarget,
    evaluation: Evaluation,
) -> DetectorSearch:
    """Quantise the detector's body; if mAP@0.5 leaves the gate, keep the head's output layers in FP32.

    Args:
        fp32_path: The FP32 detector graph.
        out: The INT8 graph to write (rewritten each round).
        calibration: Its activation ranges.
        target: ``tensorrt`` or ``onnxruntime``.
        evaluation: The evaluation set and FP32 reference.
    """
    fp32 = onnx.load(str(fp32_path))
    body = prec.fp16_body(fp32)
    head = head_output_nodes(fp32)
    gate = ACCURACY_GATES["int8"]
    steps: list[DetectorStep] = []
    kept: tuple[str, ...] = ()
    for excluded in (set(), head):
        if excluded:
            kept = (DETECTOR_HEAD,)
        prec.quantize_graph(fp32_path, out, calibration, target, body, excluded)
        comparison = evaluation.compare_detector(evaluation.run_detector(out))
        steps.append(DetectorStep(kept_fp32=kept, delta_map50_pt=comparison.delta_map50_pt))
        if not loss_exceeds(comparison.delta_map50_pt, gate.map50_pt):
            break
    return DetectorSearch(path=out, comparison=comparison, kept_fp32=kept, steps=tuple(steps))
