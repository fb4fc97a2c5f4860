"""Rasterisation and exposure: one :class:`ImageSpec` -> uint16 pixels and lesion boxes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from spine_edge.training.data.synth.anatomy import Anatomy, Prim, build_anatomy
from spine_edge.training.data.synth.scene import build_scene
from spine_edge.training.data.synth.specs import ImageSpec, LesionBox, Rendering

#: Anatomy is drawn at most this many rows high and then resized to the file's size: the
#: drawing is smooth, and full-resolution noise is added after the resize.
_WORK_MAX_ROWS = 1024
#: System blur (working pixels) and the box margin that covers it, antialiasing and the resize.
_BLUR_SIGMA = 0.7
_BOX_MARGIN_WORK_PX = 2.5

_CANVASES = ("trab", "post", "cortex", "blob", "metal", "extra")


def _noise_sigma(difficulty: float) -> float:
    """Quantum noise, as a fraction of the pixel range, at mid grey."""
    return 0.008 * (0.6 + 1.4 * difficulty)


def render_radiograph(spec: ImageSpec) -> Rendering:
    """Draw one radiograph and the box of each lesion.

    Args:
        spec: What to draw (see :func:`sample_image_spec`).

    Returns:
        uint16 pixels (bone bright, values < ``2**spec.bits_stored``) and one box per lesion.

    Example:
        >>> spec = sample_image_spec(np.random.default_rng(0), lesion_counts={"Osteophytes": 1}, scale=0.1)
        >>> out = render_radiograph(spec)
        >>> out.pixels.shape == (spec.rows, spec.cols), out.boxes[0].lesion_type
        (True, 'Osteophytes')
    """
    anat = build_anatomy(spec)
    prims = build_scene(anat, spec, spec.lesions)
    work_rows = min(spec.rows, _WORK_MAX_ROWS)
    work_cols = max(1, round(spec.cols * work_rows / spec.rows))
    density = _rasterize(anat, prims, work_rows, work_cols)
    pixels = _expose(density, anat, spec)
    boxes = tuple(_lesion_box(anat, spec, prims, i, work_rows) for i in range(len(spec.lesions)))
    return Rendering(pixels=pixels, boxes=boxes)


def _draw(canvas: np.ndarray, prim: Prim, sx: float, sy: float) -> None:
    pts = np.asarray(prim.points, dtype=np.float64).reshape(-1, 2)
    # Image units are pixel-edge coordinates; OpenCV draws on pixel centres (hence -0.5).
    fixed = np.round((pts * [sx, sy] - 0.5) * 16.0).astype(np.int32)
    if prim.thickness > 0:
        width = max(1, round(prim.thickness * sy))
        cv2.polylines(canvas, [fixed], prim.closed, prim.value, thickness=width, lineType=cv2.LINE_8, shift=4)
    else:
        cv2.fillPoly(canvas, [fixed], prim.value, lineType=cv2.LINE_8, shift=4)


def _rasterize(anat: Anatomy, prims: Iterable[Prim], rows: int, cols: int) -> np.ndarray:
    sx, sy = cols / anat.cols_u, float(rows)
    canvases = {name: np.zeros((rows, cols), np.float32) for name in _CANVASES}
    for prim in anat.extra_prims:
        _draw(canvases[prim.canvas], prim, sx, sy)
    for prim in prims:
        _draw(canvases[prim.canvas], prim, sx, sy)
    if anat.marker is not None:
        text, x, y, size = anat.marker
        scale = size * rows / 22.0
        # putText draws on 8-bit images only.
        mask = np.zeros((rows, cols), np.uint8)
        origin = (round(x * sx), round(y * sy))
        cv2.putText(mask, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, round(scale * 2)), cv2.LINE_AA)
        canvases["extra"] += mask.astype(np.float32) * (0.9 / 255.0)

    rng = np.random.default_rng(anat.texture_seed)
    fine = _band_noise(rng, rows, cols, 1.2)
    # Coarse texture is smooth: draw it at half size (half the noise to generate) and enlarge.
    coarse = cv2.resize(
        _band_noise(rng, (rows + 1) // 2, (cols + 1) // 2, 2.0), (cols, rows), interpolation=cv2.INTER_LINEAR
    )
    trabecular = 1.0 + 0.2 * fine + 0.12 * coarse
    density = _soft_tissue(anat, rows, cols)
    density += canvases["trab"] * trabecular
    density += canvases["post"] * (1.0 + 0.12 * coarse)
    for name in ("cortex", "blob", "metal", "extra"):
        density += canvases[name]
    return cv2.GaussianBlur(density, (0, 0), _BLUR_SIGMA)


def _band_noise(rng: np.random.Generator, rows: int, cols: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation.

    Uniform samples are several times cheaper than normal ones, and the filter makes the sum
    Gaussian anyway.
    """
    noise = rng.random((rows, cols), dtype=np.float32)
    blurred: np.ndarray = cv2.GaussianBlur(noise, (0, 0), sigma)
    blurred -= 0.5
    return blurred * (math.sqrt(12.0) * 2.0 * math.sqrt(math.pi) * sigma)


def _soft_tissue(anat: Anatomy, rows: int, cols: int) -> np.ndarray:
    """Body silhouette plus lungs, airway, bowel gas, drawn at quarter size (it is smooth)."""
    lr, lc = max(8, rows // 4), max(8, cols // 4)
    centre, half_width, level, slope = anat.soft
    x = (np.arange(lc, dtype=np.float32) + 0.5) * anat.cols_u / lc
    y = (np.arange(lr, dtype=np.float32) + 0.5) / lr
    across = np.sqrt(np.clip(1.0 - ((x - centre) / half_width) ** 2, 0.0, 1.0))
    low = level * across[None, :] * (1.0 + slope * (y[:, None] - 0.5) * 4)
    shapes = np.zeros((lr, lc), np.float32)
    for prim in anat.soft_prims:
        _draw(shapes, prim, lc / anat.cols_u, float(lr))
    low = low + cv2.GaussianBlur(shapes, (0, 0), max(1.0, lr / 150))
    return cv2.resize(low.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)


def _expose(density: np.ndarray, anat: Anatomy, spec: ImageSpec) -> np.ndarray:
    """Density -> detector values: gain, heel effect, soft saturation, noise, collimation."""
    rows, cols = spec.rows, spec.cols
    if density.shape != (rows, cols):
        density = cv2.resize(density, (cols, rows), interpolation=cv2.INTER_LINEAR)
    heel = (anat.gain + anat.gain * anat.heel * np.linspace(-0.5, 0.5, rows, dtype=np.float32)).reshape(-1, 1)
    x = density * heel
    x += anat.offset
    # Soft saturation above the knee: metal and collimated areas approach white smoothly.
    k = anat.knee
    over = np.maximum(x - k, 0.0)
    y = np.minimum(x, k)
    y += (1.0 - k) * np.tanh(over / (1.0 - k))
    rng = np.random.default_rng(spec.noise_seed)
    sigma = _noise_sigma(spec.difficulty)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    y += noise * (sigma * (0.4 + 0.8 * y))
    if anat.collimated:
        fx0, fy0, fx1, fy1 = anat.field
        inside = np.zeros((rows, cols), bool)
        inside[round(fy0 * rows) : round(fy1 * rows), round(fx0 * rows) : round(fx1 * rows)] = True
        y = np.where(inside, y, anat.collimation_level + noise * sigma)
    maxval = 2**spec.bits_stored - 1
    return np.clip(np.rint(y * maxval), 0, maxval).astype(np.uint16)


def _lesion_box(anat: Anatomy, spec: ImageSpec, prims: Sequence[Prim], index: int, work_rows: int) -> LesionBox:
    """Box of everything lesion ``index`` changes: primitives present with it and not without."""
    others = [les for j, les in enumerate(spec.lesions) if j != index]
    without = build_scene(anat, spec, others)
    diff = (Counter(prims) - Counter(without)) + (Counter(without) - Counter(prims))
    lo = np.array([np.inf, np.inf])
    hi = -lo
    for prim in diff:
        pts = np.asarray(prim.points).reshape(-1, 2)
        pad = 0.5 * prim.thickness
        lo = np.minimum(lo, pts.min(axis=0) - pad)
        hi = np.maximum(hi, pts.max(axis=0) + pad)
    margin = _BOX_MARGIN_WORK_PX / work_rows
    lo, hi = (lo - margin) * spec.rows, (hi + margin) * spec.rows
    x0, x1 = float(np.clip(lo[0], 0, spec.cols)), float(np.clip(hi[0], 0, spec.cols))
    y0, y1 = float(np.clip(lo[1], 0, spec.rows)), float(np.clip(hi[1], 0, spec.rows))
    return LesionBox(spec.lesions[index].lesion_type, x0, y0, x1, y1)
