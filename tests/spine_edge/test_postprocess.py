from __future__ import annotations

import numpy as np
import pytest

from spine_edge.postprocess import box_iou, decode_yolo, xywh_to_xyxy

NUM_CLASSES = 7


def _raw(boxes_xyxy: list[list[float]], scores: list[list[float]]) -> np.ndarray:
    """``[1, 4 + C, A]`` raw output from xyxy boxes and per-class scores."""
    b = np.asarray(boxes_xyxy, np.float32)
    xywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    return np.concatenate([xywh, np.asarray(scores, np.float32)], axis=1).T[None]


def _reference(raw: np.ndarray, conf: float, iou: float, max_det: int) -> list[tuple[int, float, tuple[float, ...]]]:
    """Plain-Python class-aware greedy NMS, written independently of the module under test."""
    rows = []
    for a in range(raw.shape[2]):
        column = [float(v) for v in raw[0, :, a]]
        cls_scores = column[4:]
        cls = max(range(len(cls_scores)), key=lambda c: cls_scores[c])
        if cls_scores[cls] > conf:
            x, y, w, h = column[:4]
            rows.append((cls, cls_scores[cls], (x - w / 2, y - h / 2, x + w / 2, y + h / 2)))

    def overlap(p: tuple[float, ...], q: tuple[float, ...]) -> float:
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    kept: list[tuple[int, float, tuple[float, ...]]] = []
    for row in sorted(rows, key=lambda r: -r[1]):
        if all(k[0] != row[0] or overlap(k[2], row[2]) <= iou for k in kept):
            kept.append(row)
    return kept[:max_det]


def _one_hot(cls: int, score: float) -> list[float]:
    out = [0.0] * NUM_CLASSES
    out[cls] = score
    return out


def test_hand_made_boxes_keep_exactly_the_expected_ones() -> None:
    boxes = [
        [0, 0, 10, 10],  # class 0, 0.9: kept
        [1, 1, 11, 11],  # class 0, 0.8: IoU 81/119 = 0.68 with the first -> suppressed at 0.65
        [20, 20, 30, 30],  # class 0, 0.7: kept, no overlap
        [1, 1, 11, 11],  # class 3, 0.85: same box as a suppressed one, other class -> kept
        [2, 0, 12, 10],  # class 0, 0.6: IoU 80/120 = 0.667 with the first -> suppressed
        [0, 5, 10, 15],  # class 0, 0.5: IoU 50/150 = 0.33 -> kept
        [50, 50, 60, 60],  # 0.25 exactly: not above the threshold -> dropped
    ]
    scores = [
        _one_hot(0, 0.9),
        _one_hot(0, 0.8),
        _one_hot(0, 0.7),
        _one_hot(3, 0.85),
        _one_hot(0, 0.6),
        _one_hot(0, 0.5),
        _one_hot(1, 0.25),
    ]
    det = decode_yolo(_raw(boxes, scores), conf_threshold=0.25, iou_threshold=0.65)[0]
    assert det.scores.tolist() == pytest.approx([0.9, 0.85, 0.7, 0.5])
    assert det.class_ids.tolist() == [0, 3, 0, 0]
    np.testing.assert_allclose(det.boxes, [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 5, 10, 15]])


def test_best_class_only_per_anchor() -> None:
    scores = [[0.6, 0.9, 0.0, 0.0, 0.0, 0.0, 0.3]]
    det = decode_yolo(_raw([[5, 5, 25, 45]], scores), 0.25, 0.7)[0]
    assert det.class_ids.tolist() == [1] and det.scores.tolist() == pytest.approx([0.9])


def test_max_det_keeps_the_highest_scores() -> None:
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(10)]
    scores = [_one_hot(i % NUM_CLASSES, 0.3 + 0.05 * i) for i in range(10)]
    det = decode_yolo(_raw(boxes, scores), 0.25, 0.5, max_det=3)[0]
    assert det.scores.tolist() == pytest.approx([0.75, 0.7, 0.65])


def test_empty_and_batched_outputs() -> None:
    raw = np.zeros((3, 4 + NUM_CLASSES, 50), np.float32)
    raw[1, :4, 7] = [100, 100, 20, 20]
    raw[1, 4 + 6, 7] = 0.8
    out = decode_yolo(raw, 0.25, 0.7)
    assert [len(d) for d in out] == [0, 1, 0]
    assert out[0].boxes.shape == (0, 4) and out[1].class_ids.tolist() == [6]


def _random_raw(seed: int, batch: int = 2, anchors: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 640, (batch, 2, anchors))
    # Clusters of overlapping boxes, as a detector produces around each lesion.
    xy[:, :, : anchors // 2] = rng.uniform(300, 340, (batch, 2, anchors // 2))
    wh = rng.uniform(10, 120, (batch, 2, anchors))
    scores = rng.uniform(0, 1, (batch, NUM_CLASSES, anchors)) ** 4
    return np.concatenate([xy, wh, scores], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_outputs_match_the_independent_reference(seed: int) -> None:
    raw = _random_raw(seed)
    for image, det in enumerate(decode_yolo(raw, 0.25, 0.6, max_det=50)):
        expected = _reference(raw[image : image + 1], 0.25, 0.6, 50)
        assert len(det) == len(expected) > 5
        assert det.class_ids.tolist() == [e[0] for e in expected]
        np.testing.assert_allclose(det.scores, [e[1] for e in expected], rtol=1e-6)
        np.testing.assert_allclose(det.boxes, [e[2] for e in expected], atol=1e-3)


def test_matches_ultralytics_non_max_suppression() -> None:
    nms_module = pytest.importorskip("ultralytics.utils.nms", reason="ultralytics (train extra) not installed")
    import torch

    for seed in (3, 4):
        raw = _random_raw(seed, batch=3)
        theirs = nms_module.non_max_suppression(torch.from_numpy(raw), conf_thres=0.25, iou_thres=0.7, max_det=300)
        ours = decode_yolo(raw, 0.25, 0.7, max_det=300)
        for t, o in zip(theirs, ours, strict=True):
            t = t.numpy()
            assert len(o) == len(t) > 5
            np.testing.assert_allclose(o.boxes, t[:, :4], atol=1e-3)
            np.testing.assert_allclose(o.scores, t[:, 4], rtol=1e-6)
            assert o.class_ids.tolist() == t[:, 5].astype(int).tolist()


def test_box_helpers() -> None:
    np.testing.assert_allclose(xywh_to_xyxy(np.array([[10.0, 20.0, 4.0, 6.0]])), [[8, 17, 12, 23]])
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])
