"""Geometry shared by training, export and runtime: letterbox and the inverse box mapping."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``src_shape`` was placed into a ``size`` x ``size`` canvas.

    Attributes:
        src_shape: (height, width) of the original image.
        size: Side of the square canvas.
        scale: Factor applied to the original image.
        pad_x: Left padding in canvas pixels.
        pad_y: Top padding in canvas pixels.
    """

    src_shape: tuple[int, int]
    size: int
    scale: float
    pad_x: int
    pad_y: int

    def boxes_to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[K, 4]`` xyxy boxes from canvas pixels back to original pixels (clipped)."""
        out: np.ndarray = np.asarray(boxes, dtype=np.float32).copy()
        if out.size == 0:
            return out.reshape(0, 4)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale
        h, w = self.src_shape
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out

    def boxes_to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[K, 4]`` xyxy boxes from original pixels into canvas pixels."""
        out: np.ndarray = np.asarray(boxes, dtype=np.float32).copy().reshape(-1, 4)
        out[:, [0, 2]] = out[:, [0, 2]] * self.scale + self.pad_x
        out[:, [1, 3]] = out[:, [1, 3]] * self.scale + self.pad_y
        return out

    def heatmap_to_source(self, heatmap: np.ndarray) -> np.ndarray:
        """Resize a canvas-aligned heatmap (any resolution) to the original image's shape."""
        canvas = cv2.resize(heatmap.astype(np.float32), (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        h, w = self.src_shape
        nh, nw = round(h * self.scale), round(w * self.scale)
        crop = canvas[self.pad_y : self.pad_y + nh, self.pad_x : self.pad_x + nw]
        return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def plan_letterbox(src_shape: tuple[int, int], size: int) -> Letterbox:
    """Compute the placement of an image of ``src_shape`` (h, w) in a square canvas."""
    h, w = src_shape
    scale = min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return Letterbox(src_shape=(h, w), size=size, scale=scale, pad_x=(size - nw) // 2, pad_y=(size - nh) // 2)


def letterbox(image: np.ndarray, size: int, pad_value: int = 0) -> tuple[np.ndarray, Letterbox]:
    """Resize a 2-D uint8 image into a square canvas keeping its aspect ratio.

    Downscaling uses area interpolation (no aliasing of fine trabecular texture), upscaling linear.

    Args:
        image: Grayscale ``[H, W]`` uint8 image.
        size: Side of the output canvas.
        pad_value: Fill for the borders.

    Returns:
        The ``[size, size]`` uint8 canvas and the placement needed to map results back.

    Example:
        >>> canvas, lb = letterbox(np.zeros((300, 200), np.uint8), 128)
        >>> canvas.shape, lb.pad_x
        ((128, 128), 21)
    """
    if image.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grayscale image, got shape {image.shape}")
    lb = plan_letterbox(image.shape[:2], size)
    nh, nw = round(image.shape[0] * lb.scale), round(image.shape[1] * lb.scale)
    nh, nw = max(1, nh), max(1, nw)
    interp = cv2.INTER_AREA if lb.scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.full((size, size), pad_value, dtype=image.dtype)
    canvas[lb.pad_y : lb.pad_y + nh, lb.pad_x : lb.pad_x + nw] = resized
    return canvas, lb
