from __future__ import annotations

import json

import numpy as np
import pytest

from spine_edge.fidelity import (
    PLAN_GATES,
    FidelityGates,
    compare_classifier,
    compare_detections,
    gate_violations,
)
from spine_edge.metrics import ImageBoxes, evaluate_detection
from spine_edge.postprocess import Detections


def _dets(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(classes, np.int64)
    )


def test_classifier_differences_and_flips() -> None:
    ref = np.array([0.10, 0.49, 0.51, 0.90], np.float32)
    cand = np.array([0.12, 0.51, 0.495, 0.90], np.float32)
    fid = compare_classifier(ref, cand, threshold=0.5)
    assert fid.count == 4 and fid.flips == 2 and fid.nonfinite == 0
    assert fid.max_abs_dprob == pytest.approx(0.02, abs=1e-6)
    assert fid.mean_abs_dprob == pytest.approx((0.02 + 0.02 + 0.015) / 4, abs=1e-6)
    assert fid.flip_fraction == 0.5
    json.dumps(fid.to_dict(), allow_nan=False)


def test_nan_candidate_never_looks_close() -> None:
    fid = compare_classifier(np.array([0.2, 0.8]), np.array([np.nan, 0.8]), threshold=0.5)
    assert fid.nonfinite == 1 and fid.flips == 1 and fid.max_abs_dprob == float("inf")
    assert fid.to_dict()["max_abs_dprob"] is None  # strict JSON
    assert any("NaN" in p for p in gate_violations(PLAN_GATES["fp16"], classifier=fid))


def test_classifier_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="compare the same images"):
        compare_classifier(np.zeros(3), np.zeros(4), 0.5)
    assert compare_classifier(np.zeros(0), np.zeros(0), 0.5).flip_fraction == 0.0


def test_identical_detections_agree_perfectly() -> None:
    ref = [_dets([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 3]), _dets([], [], [])]
    fid = compare_detections(ref, ref)
    assert (fid.ap, fid.recall, fid.mean_iou, fid.matched, fid.ref_boxes) == (1.0, 1.0, 1.0, 2, 2)
    assert [c.class_id for c in fid.per_class] == [0, 3]
    json.dumps(fid.to_dict(), allow_nan=False)


def test_nothing_on_either_side_is_agreement() -> None:
    empty = [_dets([], [], [])] * 3
    fid = compare_detections(empty, empty)
    assert fid.ap == 1.0 and fid.recall == 1.0 and fid.per_class == ()


def test_missing_extra_and_shifted_boxes_lower_agreement() -> None:
    ref = [_dets([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.9], [0, 0])]
    # One box shifted beyond IoU 0.5, one kept, plus a spurious box of a class the reference lacks.
    cand = [_dets([[0, 0, 10, 10], [58, 58, 78, 78], [0, 0, 5, 5]], [0.9, 0.8, 0.7], [0, 0, 2])]
    fid = compare_detections(ref, cand, iou=0.5)
    assert fid.matched == 1 and fid.recall == 0.5
    by_class = {c.class_id: c for c in fid.per_class}
    assert by_class[0].ap == pytest.approx(0.5, abs=0.01)
    assert by_class[2].ap == 0.0 and by_class[2].ref_boxes == 0 and by_class[2].cand_boxes == 1
    # A class without reference boxes has no AP (COCO's rule): the spurious box shows in cand_boxes.
    assert fid.ap == pytest.approx(0.5, abs=0.01) and fid.class_mean_ap == pytest.approx(0.5, abs=0.01)
    assert fid.cand_boxes == 3 and fid.matched == 1
    assert gate_violations(PLAN_GATES["fp16"], detector=fid)


def test_low_score_boxes_of_another_class_do_not_lower_an_identical_candidate() -> None:
    """build-engines decodes the candidate down to half the threshold: extra low boxes must not read as disagreement.

    Measured before the fix: an OpenVINO detector whose raw output matched ONNX Runtime's to 1.5e-4
    scored 0.56 on one parity canvas, because four low-score boxes of a class the reference lacked
    were weighted in with AP 0.
    """
    ref = [_dets([[203.7, 1.9, 216.4, 17.2]], [0.26], [0])]
    cand = [
        _dets([[203.7, 1.9, 216.4, 17.2], [107, 200, 158, 237], [101, 209, 162, 248]], [0.26, 0.18, 0.15], [0, 4, 4])
    ]
    fid = compare_detections(ref, cand)
    assert fid.ap == 1.0 and fid.class_mean_ap == 1.0 and fid.recall == 1.0
    assert not gate_violations(PLAN_GATES["fp16"], detector=fid)
    # With no reference box at all, boxes the candidate invents are all it has: no agreement.
    invented = compare_detections([_dets([], [], [])], [_dets([[0, 0, 9, 9]], [0.9], [1])])
    assert invented.ap == 0.0 and invented.class_mean_ap == 0.0


def test_one_lost_box_of_a_rare_class_moves_the_agreement_by_its_share_of_the_boxes() -> None:
    common = [[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(19)]
    ref = [_dets([*common, [0, 50, 20, 70]], [0.9] * 20, [0] * 19 + [3])]
    cand = [_dets(common, [0.9] * 19, [0] * 19)]  # everything agrees but the rare class's only box
    fid = compare_detections(ref, cand)
    assert fid.class_mean_ap == pytest.approx(0.5)  # the plain class mean halves
    assert fid.ap == pytest.approx(19 / 20)  # the box-weighted agreement loses one box in twenty


def test_box_ap_matches_pycocotools_at_iou_05() -> None:
    rng = np.random.default_rng(3)
    ref, cand, gt, det = [], [], [], []
    for _ in range(6):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 60, (n, 2))], axis=1).astype(np.float32)
        classes = rng.integers(0, 3, n)
        noisy = boxes + rng.normal(0, 6, boxes.shape).astype(np.float32)
        scores = rng.uniform(0.3, 1.0, n).astype(np.float32)
        ref.append(Detections(boxes, np.ones(n, np.float32), classes))
        cand.append(Detections(noisy, scores, classes))
        gt.append(ImageBoxes(boxes, classes))
        det.append(ImageBoxes(noisy, classes, scores))
    fid = compare_detections(ref, cand, iou=0.5)
    coco = evaluate_detection(gt, det, ["a", "b", "c"])
    assert fid.class_mean_ap == pytest.approx(coco.map50, abs=1e-6)
    assert 0.0 < fid.class_mean_ap < 1.0  # the noise is large enough that the check has teeth
    weights = [c.ref_boxes for c in fid.per_class]
    assert fid.ap == pytest.approx(np.average([c.ap for c in fid.per_class], weights=weights))


def test_detection_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="same images"):
        compare_detections([_dets([], [], [])], [])
    with pytest.raises(ValueError, match="iou"):
        compare_detections([], [], iou=0.0)


def test_gates() -> None:
    gates = FidelityGates(max_abs_dprob=0.01, max_flip_fraction=0.0, min_box_ap=0.9)
    ok = compare_classifier(np.array([0.2, 0.7]), np.array([0.205, 0.7]), 0.5)
    assert gate_violations(gates, classifier=ok) == ()
    bad = compare_classifier(np.array([0.2, 0.7]), np.array([0.6, 0.7]), 0.5)
    problems = gate_violations(gates, classifier=bad)
    assert len(problems) == 2 and "1 of 2 gate decisions flipped" in problems[1]
    assert set(PLAN_GATES) == {"fp32", "fp16", "int8"}
    assert PLAN_GATES["fp32"].max_abs_dprob < PLAN_GATES["fp16"].max_abs_dprob < PLAN_GATES["int8"].max_abs_dprob


def test_flips_inside_the_allowed_band_are_reported_not_refused() -> None:
    gates = FidelityGates(max_abs_dprob=0.02, max_flip_fraction=0.0, min_box_ap=0.9)
    near = compare_classifier(np.array([0.49, 0.1]), np.array([0.505, 0.1]), 0.5, margin=gates.max_abs_dprob)
    assert (near.flips, near.decisive_flips) == (1, 0)
    assert gate_violations(gates, classifier=near) == ()
    far = compare_classifier(np.array([0.40, 0.1]), np.array([0.51, 0.1]), 0.5, margin=gates.max_abs_dprob)
    assert far.decisive_flips == 1
    assert any("at least 0.02 from τ" in p for p in gate_violations(gates, classifier=far))
