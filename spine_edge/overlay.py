"""Pictures for a human reader: lesion boxes and class-activation heatmaps over the radiograph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from spine_edge.results import Detection

if TYPE_CHECKING:
    from spine_edge.explain import Explanation

#: One BGR colour per detector class (colour-blind-safe Okabe-Ito palette), cycled beyond seven.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 159, 230),
    (233, 180, 86),
    (115, 158, 0),
    (66, 228, 240),
    (178, 114, 0),
    (0, 94, 213),
    (167, 121, 204),
)


def _bgr(image: np.ndarray) -> np.ndarray:
    out: np.ndarray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    return out


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """Boxes with ``class score`` labels over the image.

    Args:
        image: uint8 grayscale ``[H, W]`` or BGR ``[H, W, 3]`` image, in the pixels the boxes use.
        detections: Boxes in that image's pixels.

    Returns:
        A new BGR uint8 image.
    """
    canvas = _bgr(image)
    side = min(canvas.shape[:2])
    # Line and text sizes follow the image so labels stay legible on 3000-px radiographs and 64-px tests.
    thickness = max(1, round(side / 400))
    font_scale = max(0.3, side / 1200)
    for det in detections:
        color = PALETTE[det.class_id % len(PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in det.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        label = f"{det.class_name} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = y1 - th - base if y1 - th - base >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + base), color, cv2.FILLED)
        cv2.putText(
            canvas, label, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness, cv2.LINE_AA
        )
    return canvas


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Positive evidence scaled to [0, 1] (negative CAM values carry no "abnormal" evidence, as in Grad-CAM)."""
    positive = np.clip(np.asarray(heatmap, dtype=np.float32), 0, None)
    peak = float(positive.max(initial=0.0))
    return positive / peak if peak > 0 else positive


def _colour_bar(height: int, low: str, high: str) -> np.ndarray:
    """A vertical JET colour bar ``[height, W, 3]`` (high at the top) with its two end labels."""
    font_scale = max(0.3, height / 1600)
    thickness = max(1, round(height / 800))
    (text_w, text_h), _ = cv2.getTextSize(max(low, high, key=len), cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    bar_w = max(8, height // 40)
    margin = max(4, height // 100)
    panel = np.full((height, bar_w + text_w + 3 * margin, 3), 255, np.uint8)
    top, bottom = margin + text_h, height - margin - text_h
    ramp = np.linspace(255, 0, max(1, bottom - top)).astype(np.uint8)[:, None]
    panel[top:bottom, margin : margin + bar_w] = cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), cv2.COLORMAP_JET)
    for label, y in ((high, top - margin // 2), (low, height - margin // 2)):
        cv2.putText(panel, label, (2 * margin + bar_w, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)  # fmt: skip
    return panel


def _draw_boxes(
    canvas: np.ndarray, boxes: Sequence[tuple[float, float, float, float]], colour: tuple[int, int, int]
) -> None:
    thickness = max(1, round(min(canvas.shape[:2]) / 300))
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(canvas, (round(x1), round(y1)), (round(x2), round(y2)), colour, thickness, cv2.LINE_AA)


def draw_heatmap(
    image: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    detections: Sequence[Detection] = (),
    boxes: Sequence[tuple[float, float, float, float]] = (),
    colour_bar: bool = True,
) -> np.ndarray:
    """A class-activation map blended over the image (JET), with the boxes and a colour bar.

    The map should already be upsampled smoothly to the image (``spine_edge.explain.upsample_cam``);
    it is shown as :func:`normalize_heatmap` scales it, so the bar runs from "no evidence" to "the
    strongest evidence in this image" (CAM values are relative to each image's peak).

    Args:
        image: uint8 grayscale ``[H, W]`` or BGR image.
        heatmap: Float ``[H, W]`` map in the same pixels (e.g. ``CascadeResult.heatmap_image()``).
        alpha: Weight of the colour map.
        detections: Detector boxes to draw over the map (with class and score).
        boxes: Other boxes (e.g. ground truth), drawn in white.
        colour_bar: Append the colour bar on the right.

    Returns:
        A new BGR uint8 image (wider than ``image`` by the colour bar).
    """
    base = _bgr(image)
    if heatmap.shape[:2] != base.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} does not match image shape {base.shape[:2]}")
    colored = cv2.applyColorMap((normalize_heatmap(heatmap) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(colored, alpha, base, 1 - alpha, 0)
    _draw_boxes(blended, boxes, (255, 255, 255))
    if detections:
        blended = draw_detections(blended, detections)
    if not colour_bar:
        return blended
    return np.hstack([blended, _colour_bar(blended.shape[0], "none", "strongest")])


def draw_explanation(
    image: np.ndarray,
    explanation: Explanation,
    top: int = 5,
    boxes: Sequence[tuple[float, float, float, float]] = (),
) -> np.ndarray:
    """The picture of an explanation: CAM as a heatmap; LIME with its top superpixels outlined.

    LIME: positive weights (evidence for "abnormal") shaded over the image, the ``top`` superpixels
    outlined in yellow with their rank; ground-truth ``boxes`` in white; a colour bar.

    Args:
        image: uint8 gray ``[H, W]``, the image the explanation's pixels refer to.
        explanation: From ``spine_edge.explain``.
        top: Superpixels to outline (LIME).
        boxes: Ground-truth boxes in the image's pixels.

    Returns:
        A new BGR uint8 image.
    """
    if explanation.method == "cam":
        return draw_heatmap(image, explanation.heatmap, boxes=boxes)
    picture = draw_heatmap(image, explanation.heatmap, alpha=0.3, boxes=boxes, colour_bar=False)
    thickness = max(1, round(min(image.shape[:2]) / 300))
    font_scale = max(0.4, min(image.shape[:2]) / 900)
    for rank, region in enumerate(r for r in explanation.regions[:top] if r.weight > 0):
        mask = (explanation.labels == region.index).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (0, 230, 255), thickness, cv2.LINE_AA)
        x, y = (round(v) for v in region.centroid)
        cv2.putText(picture, str(rank + 1), (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 230, 255), thickness,
                    cv2.LINE_AA)  # fmt: skip
    return np.hstack([picture, _colour_bar(picture.shape[0], "none", "strongest")])
