"""The precision verdict: hand-made hold / fail / inconclusive / gain cases, and the bootstrap against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from spine_edge.metrics import ImageBoxes, compute_auroc, evaluate_detection
from spine_edge.verdict import (
    BootstrapSettings,
    combine,
    judge_classifier,
    judge_detector,
    resample_counts,
    resample_indices,
    task_verdict,
    weighted_auroc,
    weighted_map50,
)

CLASSES = ["a", "b", "c"]


def _classifier_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.2, n), 0.001, 0.999)
    return labels, probs


def _detection_set(n: int, seed: int = 0) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    """Ground truth and a decent detector: jittered true boxes plus a few false positives."""
    rng = np.random.default_rng(seed)
    truth, found = [], []
    for _ in range(n):
        k = int(rng.integers(0, 3))
        xy = rng.uniform(0, 80, (k, 2))
        boxes = np.hstack([xy, xy + rng.uniform(10, 20, (k, 2))])
        classes = rng.integers(0, len(CLASSES), k)
        truth.append(ImageBoxes(boxes, classes))
        keep = rng.random(k) < 0.8
        det = boxes[keep] + rng.normal(0, 1.5, (int(keep.sum()), 4))
        extra = int(rng.integers(0, 2))
        fxy = rng.uniform(0, 80, (extra, 2))
        det = np.vstack([det, np.hstack([fxy, fxy + 15])])
        det_classes = np.concatenate([classes[keep], rng.integers(0, len(CLASSES), extra)])
        scores = rng.uniform(0.3, 1.0, len(det))
        found.append(ImageBoxes(det, det_classes, scores))
    return truth, found


def test_bootstrap_auroc_matches_brute_force_resamples() -> None:
    labels, probs = _classifier_set(40)
    settings = BootstrapSettings(n_boot=25, seed=3)
    indices = resample_indices(len(labels), settings)
    vectorised = weighted_auroc(labels, probs, resample_counts(indices))
    brute = [compute_auroc(labels[row], probs[row]) for row in indices]
    np.testing.assert_allclose(vectorised, brute, rtol=0, atol=1e-12, equal_nan=True)
    assert weighted_auroc(labels, probs, np.ones((1, len(labels))))[0] == pytest.approx(compute_auroc(labels, probs))


def test_bootstrap_map_matches_pycocotools_on_resampled_image_lists() -> None:
    truth, found = _detection_set(30)
    settings = BootstrapSettings(n_boot=6, seed=1)
    indices = resample_indices(len(truth), settings)
    vectorised = weighted_map50(truth, found, resample_counts(indices))
    for row, value in zip(indices, vectorised, strict=True):
        coco = evaluate_detection([truth[i] for i in row], [found[i] for i in row], CLASSES).map50
        assert value == pytest.approx(coco, abs=1e-9)
    full = weighted_map50(truth, found, np.ones((1, len(truth))))[0]
    assert full == pytest.approx(evaluate_detection(truth, found, CLASSES).map50, abs=1e-9)


def test_task_rule_only_losses_fail() -> None:
    assert task_verdict(-0.2, -0.5, 0.1, 1.0) == "hold"
    assert task_verdict(-3.0, -4.0, -2.0, 1.0) == "fail"
    assert task_verdict(-0.5, -3.0, 2.0, 1.0) == "inconclusive"
    assert task_verdict(7.0, 2.0, 12.0, 1.5) == "hold"  # a gain is never a failure
    assert task_verdict(float("nan"), float("nan"), float("nan"), 1.0) == "inconclusive"
    assert combine(["hold", "inconclusive"]) == "inconclusive"
    assert combine(["hold", "fail", "inconclusive"]) == "fail"
    assert combine(["hold", "hold"]) == "hold"


def test_classifier_hold_when_the_candidate_tracks_fp32() -> None:
    labels, probs = _classifier_set(300)
    rng = np.random.default_rng(1)
    verdict = judge_classifier("int8", labels, probs, probs + rng.normal(0, 0.003, len(probs)), 0.5)
    assert verdict.verdict == "hold", verdict.describe()
    assert verdict.task.low_pt >= -1.0 and verdict.task.high_pt <= 1.0
    assert verdict.within_gates


def test_classifier_fails_on_a_real_loss() -> None:
    labels, probs = _classifier_set(400)
    rng = np.random.default_rng(2)
    # Scramble a third of the images: AUROC drops by several points on a set large enough to show it.
    damaged = probs.copy()
    chosen = rng.choice(len(probs), len(probs) // 3, replace=False)
    damaged[chosen] = rng.uniform(0, 1, len(chosen))
    verdict = judge_classifier("int8", labels, probs, damaged, 0.5)
    assert verdict.task.verdict == "fail"
    assert verdict.verdict == "fail"
    assert verdict.task.high_pt < -1.0


def test_fidelity_gates_fail_on_their_own() -> None:
    labels, probs = _classifier_set(200)
    shifted = np.clip(probs + 0.3, 0, 1)  # AUROC nearly unchanged (monotone shift), decisions are not
    verdict = judge_classifier("int8", labels, probs, shifted, 0.5)
    assert verdict.verdict == "fail"
    assert any("flipped" in f for f in verdict.failures)


def test_inconclusive_on_few_images() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    ref = np.array([0.30, 0.62, 0.41, 0.55, 0.80, 0.20, 0.47, 0.52])
    cand = np.array([0.31, 0.60, 0.49, 0.54, 0.79, 0.22, 0.46, 0.50])  # one pair swaps: −6 pt on 16 pairs
    verdict = judge_classifier("int8", labels, ref, cand, 0.9)
    assert verdict.task.delta_pt < -1.0
    assert verdict.verdict == "inconclusive", verdict.describe()
    assert any("too few images" in note for note in verdict.notes)


def test_a_gain_is_never_a_fail_and_a_large_one_is_flagged() -> None:
    """The issue's case: on a small set one low-score box of a rare class moves mAP by many points."""
    truth, found = _detection_set(40, seed=4)
    truth = [ImageBoxes(t.boxes[t.classes != 2], t.classes[t.classes != 2]) for t in truth]
    reference = [
        ImageBoxes(f.boxes[f.classes != 2], f.classes[f.classes != 2], f.scores[f.classes != 2]) for f in found
    ]
    rare = np.array([[10.0, 10.0, 30.0, 30.0]])
    truth[0] = ImageBoxes(np.vstack([truth[0].boxes, rare]), np.append(truth[0].classes, 2))
    candidate = list(reference)
    first = reference[0]
    assert first.scores is not None
    candidate[0] = ImageBoxes(np.vstack([first.boxes, rare]), np.append(first.classes, 2), np.append(first.scores, 0.2))
    verdict = judge_detector("int8", truth, reference, candidate, agreement_conf=0.25)
    assert verdict.task.delta_pt > 1.5
    assert verdict.verdict != "fail", verdict.describe()
    assert verdict.task.large_gain
    assert any("evaluation set is too small" in note for note in verdict.notes)


def test_detector_agreement_fails_when_boxes_move() -> None:
    truth, found = _detection_set(30, seed=5)
    moved = [ImageBoxes(b.boxes + 8.0, b.classes, b.scores) for b in found]
    verdict = judge_detector("int8", truth, found, moved)
    assert verdict.verdict == "fail"
    assert verdict.detector is not None and verdict.detector.ap < 0.7


def test_identical_outputs_hold_exactly() -> None:
    truth, found = _detection_set(20, seed=6)
    verdict = judge_detector("fp16", truth, found, found)
    assert verdict.verdict == "hold"
    assert verdict.task.low_pt == verdict.task.high_pt == 0.0
    assert verdict.detector is not None and verdict.detector.ap == pytest.approx(1.0)


def test_bench_gates_carry_the_same_verdict() -> None:
    """bench turns each role's verdict into a gate: fail fails the run, inconclusive does not."""
    from spine_edge.benchmarks.results import verdict_gates

    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    ref = np.array([0.30, 0.62, 0.41, 0.55, 0.80, 0.20, 0.47, 0.52])
    cand = np.array([0.31, 0.60, 0.49, 0.54, 0.79, 0.22, 0.46, 0.50])
    inconclusive = judge_classifier("int8", labels, ref, cand, 0.9)
    failing = judge_classifier("int8", labels, ref, np.clip(ref + 0.4, 0, 1), 0.5)
    gates = verdict_gates("int8-trt", inconclusive, failing)
    assert [(g.verdict, g.passed) for g in gates] == [("inconclusive", None), ("fail", False)]
    assert gates[0].precision == "int8-trt" and "INCONCLUSIVE" in gates[0].message()
