"""Pictures for a human reader: lesion boxes and class-activation heatmaps over the radiograph."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from spine_edge.results import Detection

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
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image.copy()


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
        cv2.putText(canvas, label, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Positive evidence scaled to [0, 1] (negative CAM values carry no "abnormal" evidence, as in Grad-CAM)."""
    positive = np.clip(np.asarray(heatmap, dtype=np.float32), 0, None)
    peak = float(positive.max(initial=0.0))
    return positive / peak if peak > 0 else positive


def draw_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A class-activation map blended over the image with a JET colour map.

    Args:
        image: uint8 grayscale ``[H, W]`` or BGR image.
        heatmap: Float ``[H, W]`` map in the same pixels (e.g. ``CascadeResult.heatmap_image()``).
        alpha: Weight of the colour map.

    Returns:
        A new BGR uint8 image.
    """
    base = _bgr(image)
    if heatmap.shape[:2] != base.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} does not match image shape {base.shape[:2]}")
    colored = cv2.applyColorMap((normalize_heatmap(heatmap) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(colored, alpha, base, 1 - alpha, 0)
