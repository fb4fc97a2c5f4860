"""Decode the detector's raw YOLO output and suppress overlapping boxes, in numpy.

The semantics are those of ``ultralytics.utils.nms.non_max_suppression`` with ``multi_label=False``
and ``agnostic=False`` (what ultralytics' predictor and validator use for detection):

1. per anchor, the best class and its score; keep anchors whose score is ``> conf_threshold``;
2. keep at most ``max_nms`` candidates, highest scores first;
3. greedy NMS per class (boxes of different classes never suppress each other), dropping boxes whose
   IoU with a kept box is ``> iou_threshold``; results sorted by descending score;
4. keep the first ``max_det``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Ultralytics' default cap on candidates entering NMS.
MAX_NMS = 30000


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    Attributes:
        boxes: ``[K, 4]`` float32 xyxy, in the pixels of the image the detector saw.
        scores: ``[K]`` float32 class scores, descending.
        class_ids: ``[K]`` int64 class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre/size boxes ``[..., 4]`` to corner boxes."""
    out = np.empty_like(boxes)
    half = boxes[..., 2:4] / 2
    out[..., 0:2] = boxes[..., 0:2] - half
    out[..., 2:4] = boxes[..., 0:2] + half
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a [M, 4]`` with every box in ``b [K, 4]`` (xyxy) → ``[M, K]``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``[K, 4]`` xyxy.
        scores: ``[K]``.
        iou_threshold: A box is dropped when its IoU with a kept, higher-scoring box is greater.
        limit: Stop after this many kept boxes (later picks never change earlier ones).

    Returns:
        Indices of kept boxes, by descending score.
    """
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        best, rest = order[0], order[1:]
        keep.append(int(best))
        if rest.size:
            rest = rest[box_iou(boxes[best : best + 1], boxes[rest])[0] <= iou_threshold]
        order = rest
    return np.asarray(keep, dtype=np.int64)


def decode_yolo(
    raw: np.ndarray,
    conf_threshold: float,
    iou_threshold: float,
    max_det: int = 300,
    max_nms: int = MAX_NMS,
) -> list[Detections]:
    """Boxes from a YOLO head's raw output, per image (rules in the module docstring).

    Args:
        raw: ``[N, 4 + C, A]``: xywh in input pixels, then C class scores after sigmoid.
        conf_threshold: Minimum class score (strictly greater is kept).
        iou_threshold: NMS IoU threshold.
        max_det: Boxes kept per image.
        max_nms: Candidates entering NMS per image.

    Returns:
        One :class:`Detections` per image, boxes in input pixels.

    Example:
        >>> raw = np.zeros((1, 6, 1), np.float32); raw[0, :4, 0] = [50, 50, 20, 10]; raw[0, 5, 0] = 0.9
        >>> d = decode_yolo(raw, 0.25, 0.7)[0]
        >>> d.boxes.tolist(), d.class_ids.tolist()
        ([[40.0, 45.0, 60.0, 55.0]], [1])
    """
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"expected a YOLO output [N, 4 + classes, anchors], got shape {raw.shape}")
    results = []
    for image in raw:
        class_scores = image[4:]  # [C, A]
        class_ids = class_scores.argmax(axis=0)
        scores = np.take_along_axis(class_scores, class_ids[None], axis=0)[0]
        candidates = np.flatnonzero(scores > conf_threshold)
        if candidates.size > max_nms:
            candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:max_nms]]
        boxes = xywh_to_xyxy(image[:4, candidates].T.astype(np.float32))
        scores, class_ids = scores[candidates].astype(np.float32), class_ids[candidates].astype(np.int64)
        # Class-aware NMS in one pass: shift each class to its own region of the plane so boxes of
        # different classes never overlap (the ultralytics trick), in float64 so the shift is exact.
        offset = class_ids[:, None].astype(np.float64) * (float(np.abs(boxes).max(initial=0.0)) + 1.0) * 2
        kept = nms(boxes.astype(np.float64) + offset, scores, iou_threshold, limit=max_det)
        results.append(Detections(boxes[kept], scores[kept], class_ids[kept]))
    return results
