"""Geometry: the lesion-independent anatomy of one image, drawn from ``ImageSpec.anatomy_seed``.

Coordinates are in units of the image height: y in [0, 1], x in [0, cols / rows]. Shapes are
:class:`Prim` records (a polygon or polyline on a named canvas) that :mod:`.render` rasterises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spine_edge.training.data.synth.specs import ImageSpec


def _mimic(difficulty: float) -> float:
    """Amplitude of the normal variants that look like lesions: 0.1 at difficulty 0, 1 at 1."""
    return 0.1 + 0.9 * difficulty


@dataclass(frozen=True)
class Vertebra:
    """A vertebral body in its own frame: u across (+u anterior / image right), v down the column.

    ``size`` is the nominal body height, which lesion details scale with; lesions that change the
    body (narrowing, collapse) leave it alone so that nothing else on the vertebra moves.
    Endplate distances are measured from the centre at the back (-u) and front (+u) walls. The
    core rectangle spans v in [-core_top, core_bot]; the caps above and below it hold the
    endplates, so that narrowing a disc only redraws the caps next to it.
    """

    cx: float
    cy: float
    angle: float
    facing: int
    half_w: float
    size: float
    top_back: float
    top_front: float
    bot_back: float
    bot_front: float
    core_top: float
    core_bot: float
    density: float
    top_sclerosis: float = 0.0
    bot_sclerosis: float = 0.0

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """Map local (u, v) points [N, 2] to image units."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        eu = np.array([self.facing * c, -self.facing * s])
        ev = np.array([s, c])
        return np.array([self.cx, self.cy]) + uv[:, :1] * eu + uv[:, 1:2] * ev

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The local u and v axes as unit vectors in image units."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([self.facing * c, -self.facing * s]), np.array([s, c])


@dataclass(frozen=True)
class Prim:
    """One shape drawn with overwrite semantics on a canvas; filled when thickness == 0."""

    canvas: str
    points: tuple[float, ...]
    value: float
    thickness: float = 0.0
    closed: bool = False


@dataclass(frozen=True)
class Anatomy:
    """The lesion-independent part of an image, drawn from ``ImageSpec.anatomy_seed``."""

    cols_u: float
    field: tuple[float, float, float, float]
    collimated: bool
    vertebrae: tuple[Vertebra, ...]
    lipping: tuple[tuple[int, int, int, float], ...]  # (vertebra, side, end, length in heights)
    islands: tuple[tuple[int, float, float, float, float], ...]  # (vertebra, u, v, radius, density)
    foramen_scale: Mapping[tuple[int, int], float]
    post_density: float
    cortex: float
    base_prims: tuple[Prim, ...]
    extra_prims: tuple[Prim, ...]
    soft: tuple[float, float, float, float]  # body silhouette: centre x, half width, density, slope
    soft_prims: tuple[Prim, ...]
    marker: tuple[str, float, float, float] | None  # side letter, x, y, height
    offset: float
    gain: float
    heel: float
    knee: float
    collimation_level: float
    texture_seed: int


def poly(canvas: str, pts: np.ndarray, value: float, thickness: float = 0.0, closed: bool = False) -> Prim:
    """A primitive from ``[N, 2]`` points in image units."""
    return Prim(
        canvas, tuple(np.asarray(pts, dtype=np.float64).ravel().tolist()), float(value), float(thickness), closed
    )


def ellipse(
    cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, n: int = 28, wobble: np.ndarray | None = None
) -> np.ndarray:
    """``n`` points [n, 2] on an ellipse rotated by ``angle``; ``wobble`` scales each radius by 1 + wobble."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    r = 1.0 if wobble is None else 1.0 + wobble
    x, y = ax * r * np.cos(t), ay * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def build_anatomy(spec: ImageSpec) -> Anatomy:
    """The anatomy of ``spec``: a pure function of its size, view, difficulty and ``anatomy_seed``."""
    rng = np.random.default_rng(spec.anatomy_seed)
    mimic = _mimic(spec.difficulty)
    lateral = spec.projection == "lateral"
    cols_u = spec.cols / spec.rows

    collimated = bool(rng.random() < 0.35)
    if collimated:
        left, right = rng.uniform(0.0, 0.1, 2) * cols_u
        top, bottom = rng.uniform(0.0, 0.05, 2)
        field_rect = (float(left), float(top), float(cols_u - right), float(1.0 - bottom))
    else:
        field_rect = (0.0, 0.0, cols_u, 1.0)
    fx0, fy0, fx1, fy1 = field_rect

    head = {"cervical": (0.16, 0.24), "thoracic": (0.05, 0.1), "lumbar": (0.05, 0.1)}[spec.region]
    tail = {"cervical": (0.1, 0.18), "thoracic": (0.05, 0.1), "lumbar": (0.16, 0.24)}[spec.region]
    y_top = fy0 + rng.uniform(*head) * (fy1 - fy0)
    y_bot = fy1 - rng.uniform(*tail) * (fy1 - fy0)
    disc_ratio = {"cervical": 0.32, "thoracic": 0.22, "lumbar": 0.33}[spec.region] * rng.uniform(0.9, 1.1)
    aspect = {
        ("cervical", "lateral"): 1.2,
        ("thoracic", "lateral"): 1.05,
        ("lumbar", "lateral"): 1.3,
        ("cervical", "AP"): 1.55,
        ("thoracic", "AP"): 1.35,
        ("lumbar", "AP"): 1.6,
    }[(spec.region, spec.projection)] * rng.uniform(0.9, 1.1)

    n = spec.n_vertebrae
    growth = 1.0 + rng.uniform(0.1, 0.3) * np.linspace(0.0, 1.0, n)
    height_var = 1.0 + rng.uniform(-0.06, 0.06, n) * mimic
    heights = growth * height_var
    disc_factor = rng.uniform(1.0 - 0.3 * mimic, 1.0 + 0.12 * mimic, n - 1)
    gaps = disc_ratio * 0.5 * (heights[:-1] + heights[1:]) * disc_factor
    unit = (y_bot - y_top) / (heights.sum() + gaps.sum())
    heights, gaps = heights * unit, gaps * unit
    widths = heights * aspect

    # Keep the column and its posterior elements inside the field (posterior reaches ~3 widths).
    a_max = 0.5 * float(widths.max())
    span_back, span_front = (3.1 * a_max, 1.5 * a_max) if lateral else (2.4 * a_max, 2.4 * a_max)
    left_room, right_room = (span_back, span_front) if spec.facing == 1 else (span_front, span_back)
    lo, hi = fx0 + left_room, fx1 - right_room
    centre = 0.5 * (fx0 + fx1) + (rng.uniform(-0.12, 0.12) if lateral else rng.uniform(-0.04, 0.04)) * (fx1 - fx0)
    x_mid = float(np.clip(centre, lo, hi)) if lo < hi else 0.5 * (lo + hi)
    if lateral:
        bow = spec.facing * (rng.uniform(0.02, 0.05) if spec.region != "thoracic" else -rng.uniform(0.015, 0.04))
    else:
        bow = rng.uniform(-0.02, 0.02)
    tilt = rng.uniform(-0.04, 0.04)
    span_y = y_bot - y_top

    def centre_x(y: float) -> float:
        t = (y - y_top) / span_y
        return x_mid + bow * (math.sin(math.pi * t) - 0.64) + tilt * (t - 0.5) * span_y

    def slope(y: float) -> float:
        t = (y - y_top) / span_y
        return bow * math.pi * math.cos(math.pi * t) / span_y + tilt

    density_base = rng.uniform(0.28, 0.38)
    vertebrae = []
    y = y_top
    for k in range(n):
        h = float(heights[k])
        cy = y + 0.5 * h
        angle = math.atan(slope(cy))
        jitter = rng.normal(0.0, 0.02 * mimic) * widths[k]
        eu_x = spec.facing * math.cos(angle)
        cx = centre_x(cy) + jitter * eu_x
        cy += jitter * -spec.facing * math.sin(angle)
        half = 0.5 * h
        wedge = 1.0 - rng.uniform(0.0, 0.1 * mimic) if spec.region == "thoracic" else 1.0
        vertebrae.append(
            Vertebra(
                cx=cx,
                cy=cy,
                angle=angle,
                facing=spec.facing,
                half_w=0.5 * float(widths[k]),
                size=h,
                top_back=half,
                top_front=half * wedge,
                bot_back=half,
                bot_front=half * (0.5 + 0.5 * wedge),
                core_top=0.55 * half * wedge,
                core_bot=0.55 * half,
                density=density_base * rng.uniform(0.92, 1.08),
                top_sclerosis=float(rng.uniform(0.0, 0.4 * mimic)) if rng.random() < 0.3 else 0.0,
                bot_sclerosis=float(rng.uniform(0.0, 0.4 * mimic)) if rng.random() < 0.3 else 0.0,
            )
        )
        y += h + (float(gaps[k]) if k < n - 1 else 0.0)

    # Normal variants that mimic lesions: small corner lipping, bone islands, smaller foramina.
    # Every draw happens whatever the difficulty, so one seed keeps its anatomy across difficulties.
    lipping = []
    for k in range(n):
        for s in (-1, 1):
            for e in (-1, 1):
                chance, length = rng.random(), rng.uniform(0.03, 0.06 + 0.06 * mimic)
                if chance < 0.15 + 0.25 * mimic:
                    lipping.append((k, s, e, float(length)))
    islands = []
    for k in range(n):
        chance, u, w, r, value = rng.random(), *rng.uniform((-0.5, -0.4, 0.03, 0.04), (0.5, 0.4, 0.07, 0.1))
        if chance < 0.1 + 0.2 * mimic:
            islands.append((k, float(u), float(w), float(r), float(value * (0.5 + mimic))))
    sides = (-1,) if lateral else (-1, 1)
    foramen_scale = {(d, s): float(rng.uniform(1.0 - 0.25 * mimic, 1.08)) for d in range(n - 1) for s in sides}
    post_density = float(rng.uniform(0.18, 0.26))
    cortex = float(rng.uniform(0.16, 0.22))

    base = tuple(vertebrae)
    base_prims = tuple(_posterior_blocks(base, lateral, post_density))
    extra_prims, soft_prims = _region_extras(rng, spec, base, x_mid, y_top, y_bot, cols_u)
    soft = (
        float(x_mid + spec.facing * rng.uniform(0.05, 0.2)) if lateral else float(x_mid),
        float(rng.uniform(0.18, 0.3) if spec.region == "cervical" else rng.uniform(0.35, 0.6)),
        float(rng.uniform(0.16, 0.26)),
        float(rng.uniform(-0.06, 0.06)),
    )
    marker = None
    if rng.random() < 0.6:
        corner_x = fx0 + 0.04 * cols_u if rng.random() < 0.5 else fx1 - 0.1 * cols_u
        marker = (
            str(rng.choice(("L", "R"))),
            float(corner_x),
            float(fy0 + rng.uniform(0.06, 0.1)),
            float(rng.uniform(0.03, 0.05)),
        )
    return Anatomy(
        cols_u=cols_u,
        field=field_rect,
        collimated=collimated,
        vertebrae=base,
        lipping=tuple(lipping),
        islands=tuple(islands),
        foramen_scale=foramen_scale,
        post_density=post_density,
        cortex=cortex,
        base_prims=base_prims,
        extra_prims=tuple(extra_prims),
        soft=soft,
        soft_prims=tuple(soft_prims),
        marker=marker,
        offset=float(rng.uniform(0.04, 0.12)),
        gain=float(rng.uniform(0.5, 0.68)),
        heel=float(rng.uniform(-0.15, 0.15)),
        knee=float(rng.uniform(0.72, 0.8)),
        collimation_level=float(rng.uniform(0.82, 0.92)),
        texture_seed=int(rng.integers(0, 2**63 - 1)),
    )


def gap_below(vertebrae: Sequence[Vertebra], k: int) -> float:
    """Disc height below vertebra ``k`` (a nominal 0.3 body heights below the last one)."""
    if k + 1 < len(vertebrae):
        a, b = vertebrae[k], vertebrae[k + 1]
        distance = math.hypot(b.cx - a.cx, b.cy - a.cy)
        return max(0.0, distance - 0.5 * (a.bot_back + a.bot_front) - 0.5 * (b.top_back + b.top_front))
    return 0.3 * vertebrae[k].size


def _gap_above(vertebrae: Sequence[Vertebra], k: int) -> float:
    return gap_below(vertebrae, k - 1) if k > 0 else 0.3 * vertebrae[k].size


def _posterior_blocks(vertebrae: Sequence[Vertebra], lateral: bool, density: float) -> list[Prim]:
    """Pedicles/laminae (the band the foramina are cut into), spinous and transverse processes."""
    prims = []
    for k, v in enumerate(vertebrae):
        a, h = v.half_w, v.size
        up = v.top_back + 0.55 * _gap_above(vertebrae, k)
        down = v.bot_back + 0.55 * gap_below(vertebrae, k)
        sides = (-1,) if lateral else (-1, 1)
        for s in sides:
            inner, outer = (0.95 * a, 2.0 * a) if lateral else (0.95 * a, 1.8 * a)
            block = np.array([[s * inner, -up], [s * outer, -0.8 * up], [s * outer, 0.8 * down], [s * inner, down]])
            prims.append(poly("post", v.to_image(block), density))
        if lateral:
            spinous = np.array([[-1.9 * a, -0.35 * h], [-2.9 * a, 0.15 * h], [-3.0 * a, 0.35 * h], [-1.9 * a, 0.3 * h]])
            prims.append(poly("post", v.to_image(spinous), 0.9 * density))
        else:
            spinous = ellipse(0.0, 0.35 * v.bot_back, 0.12 * a, 0.3 * h, n=16)
            prims.append(poly("post", v.to_image(spinous), 0.7 * density))
            for s in (-1, 1):
                bar = np.array(
                    [
                        [s * 1.7 * a, -0.22 * h],
                        [s * 2.3 * a, -0.12 * h],
                        [s * 2.3 * a, 0.02 * h],
                        [s * 1.7 * a, 0.05 * h],
                    ]
                )
                prims.append(poly("post", v.to_image(bar), 0.8 * density))
    return prims


def foramen(vertebrae: Sequence[Vertebra], d: int, s: int, lateral: bool) -> tuple[np.ndarray, float, float, float]:
    """Centre, semi-axes and angle of the foramen at disc ``d`` on side ``s`` (base geometry)."""
    upper, lower = vertebrae[d], vertebrae[d + 1]
    off = 1.42 if lateral else 1.38
    p = upper.to_image(np.array([[s * off * upper.half_w, upper.bot_back]]))[0]
    q = lower.to_image(np.array([[s * off * lower.half_w, -lower.top_back]]))[0]
    a = 0.5 * (upper.half_w + lower.half_w)
    h = 0.5 * (upper.size + lower.size)
    su = (0.26 if lateral else 0.2) * a
    sv = 0.5 * float(np.hypot(*(q - p))) + 0.22 * h
    return 0.5 * (p + q), su, sv, 0.5 * (upper.angle + lower.angle)


def _region_extras(
    rng: np.random.Generator,
    spec: ImageSpec,
    vertebrae: Sequence[Vertebra],
    x_mid: float,
    y_top: float,
    y_bot: float,
    cols_u: float,
) -> tuple[list[Prim], list[Prim]]:
    """Sharp bony extras (skull, ribs, pelvis, sacrum...) and smooth soft-tissue shapes."""
    lateral = spec.projection == "lateral"
    f = spec.facing
    first, last = vertebrae[0], vertebrae[-1]
    a = max(v.half_w for v in vertebrae)
    extra: list[Prim] = []
    soft: list[Prim] = []
    if spec.region == "cervical":
        if lateral:
            skull = ellipse(x_mid - f * 0.08, y_top - 0.14, 0.34, 0.16, angle=f * 0.15)
            extra.append(poly("extra", skull, 0.22))
            extra.append(poly("extra", skull, 0.2, thickness=0.012, closed=True))
            jaw = np.array(
                [
                    [x_mid + f * 2.0 * a, y_top - 0.06],
                    [x_mid + f * 3.2 * a, y_top + 0.02],
                    [x_mid + f * 4.8 * a, y_top + 0.05],
                ]
            )
            extra.append(poly("extra", jaw, 0.25, thickness=0.022))
            soft.append(
                poly(
                    "soft", ellipse(x_mid + f * 2.3 * a, 0.5 * (y_top + y_bot), 0.35 * a, 0.55 * (y_bot - y_top)), -0.1
                )
            )
        else:
            jaw = np.array([[x_mid - 5 * a, y_top - 0.02], [x_mid, y_top + 0.06], [x_mid + 5 * a, y_top - 0.02]])
            extra.append(poly("extra", jaw, 0.22, thickness=0.03))
            soft.append(poly("soft", ellipse(x_mid, 0.5 * (y_top + y_bot), 0.4 * a, 0.6 * (y_bot - y_top)), -0.07))
            for s in (-1, 1):
                clav = np.array(
                    [
                        [x_mid + s * 0.6 * a, y_bot + 0.02],
                        [x_mid + s * 3.5 * a, y_bot - 0.03],
                        [x_mid + s * 7 * a, y_bot - 0.05],
                    ]
                )
                extra.append(poly("extra", clav, 0.22, thickness=0.03))
        soft.append(poly("soft", np.array([[0, y_bot + 0.02], [cols_u, y_bot + 0.02], [cols_u, 1.2], [0, 1.2]]), 0.12))
    elif spec.region == "thoracic":
        for v in vertebrae:
            for s in (-1, 1) if not lateral else (-1,):
                start = v.to_image(np.array([[s * 1.6 * v.half_w, -0.1 * v.size]]))[0]
                t = np.linspace(0.0, 1.0, 8)
                reach = 0.35 if not lateral else 0.22
                direction = s * (1 if not lateral else f)
                pts = np.stack([start[0] + direction * reach * np.sin(t * 1.4), start[1] + 0.12 * t**1.6], axis=1)
                extra.append(poly("extra", pts, 0.1, thickness=0.018))
        if lateral:
            soft.append(poly("soft", ellipse(x_mid + f * 0.22, 0.45, 0.16, 0.33), -0.1))
        else:
            for s in (-1, 1):
                soft.append(poly("soft", ellipse(x_mid + s * 0.22, 0.45, 0.14, 0.35), -0.1))
            soft.append(poly("soft", ellipse(x_mid + 0.08, 0.62, 0.16, 0.12), 0.06))
    else:
        sacrum_top = last.to_image(
            np.array([[-last.half_w, last.bot_back + 0.3 * last.size], [last.half_w, last.bot_front + 0.3 * last.size]])
        )
        down = np.array([math.sin(last.angle), math.cos(last.angle)])
        lean = (np.array([f * 0.5, 0.0]) if lateral else np.zeros(2)) * last.size
        sacrum = np.array(
            [
                sacrum_top[0],
                sacrum_top[1],
                sacrum_top[1] + down * 1.6 * last.size + lean * 2,
                sacrum_top[0] + down * 1.8 * last.size + lean,
            ]
        )
        extra.append(poly("trab", sacrum, last.density * 0.9))
        extra.append(poly("extra", sacrum, 0.14, thickness=0.008, closed=True))
        centres = (
            [(x_mid + f * 0.05, y_bot + 0.12)]
            if lateral
            else [(x_mid - 0.26, y_bot + 0.05), (x_mid + 0.26, y_bot + 0.05)]
        )
        for cx, cy in centres:
            wing = ellipse(cx, cy, 0.2, 0.15, angle=float(rng.uniform(-0.3, 0.3)))
            extra.append(poly("extra", wing, 0.1))
            extra.append(poly("extra", wing, 0.14, thickness=0.01, closed=True))
        for _ in range(int(rng.integers(4, 11))):
            gx = x_mid + (f * rng.uniform(0.0, 0.4) if lateral else rng.uniform(-0.35, 0.35))
            gy = rng.uniform(y_top + 0.2, y_bot + 0.1)
            blob = ellipse(
                gx, gy, rng.uniform(0.015, 0.05), rng.uniform(0.012, 0.035), wobble=rng.uniform(-0.25, 0.25, 28) * 0.5
            )
            soft.append(poly("soft", blob, -float(rng.uniform(0.04, 0.1))))
    # Spine of the top vertebra continues out of view in thoracic/lumbar images.
    if spec.region != "cervical":
        above = first.to_image(
            np.array(
                [
                    [-first.half_w, -first.top_back - 1.3 * first.size],
                    [first.half_w, -first.top_front - 1.3 * first.size],
                    [first.half_w, -first.top_front - 0.35 * first.size],
                    [-first.half_w, -first.top_back - 0.35 * first.size],
                ]
            )
        )
        extra.append(poly("trab", above, first.density))
        extra.append(poly("extra", above, 0.18, thickness=0.12 * first.half_w, closed=True))
    return extra, soft
