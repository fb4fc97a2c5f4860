"""Scene: anatomy + lesions -> primitives.

Each lesion has its own signature inside its box: Osteophytes (a beak at a vertebral corner),
Disc space narrowing (endplates closer together and sclerotic), Surgical implant (bright metal),
Spondylolysthesis (a body shifted against its neighbours), Foraminal stenosis (a foramen squeezed
by bone), Vertebral collapse (a wedged, denser body), Other lesions (a lytic or sclerotic blob).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from spine_edge.training.data.synth.anatomy import Anatomy, Prim, Vertebra, ellipse, foramen, gap_below, poly
from spine_edge.training.data.synth.specs import (
    DISC_SPACE_NARROWING,
    FORAMINAL_STENOSIS,
    OSTEOPHYTES,
    OTHER_LESIONS,
    SPONDYLOLYSTHESIS,
    SURGICAL_IMPLANT,
    VERTEBRAL_COLLAPSE,
    ImageSpec,
    LesionSpec,
)

_METAL = 2.5


def _lesion_gain(difficulty: float) -> float:
    """Multiplies lesion size and contrast: 2 at difficulty 0, about 1 at 0.5, 0.5 at 1.

    Steeper at the easy end, so that low settings give lesions a small network sees at 128 px.
    """
    return 0.5 + 1.5 * (1.0 - difficulty) ** 1.6


def _endplate_outline(a: float, back: float, front: float, core: float, conc: float) -> np.ndarray:
    """Top-endplate outline from the core line at the back wall to the core line at the front.

    Distances grow toward the endplate; callers negate them for the upper endplate.
    """
    r = max(1e-6, min(0.22 * a, 0.45 * (min(back, front) - core)))

    def plate(u: np.ndarray) -> np.ndarray:
        return back + (front - back) * (u + a) / (2 * a) - conc * (1.0 - (u / a) ** 2)

    t = np.linspace(0.0, 1.0, 5)[:, None]

    def corner(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2

    u_mid = np.linspace(-a + r, a - r, 7)[1:-1]
    back_corner = corner(
        np.array([-a, back - r]), np.array([-a, back]), np.array([-a + r, plate(np.array([-a + r]))[0]])
    )
    front_corner = corner(
        np.array([a - r, plate(np.array([a - r]))[0]]), np.array([a, front]), np.array([a, front - r])
    )
    return np.concatenate(
        [
            [[-a, core]],
            back_corner,
            np.stack([u_mid, plate(u_mid)], axis=1),
            front_corner,
            [[a, core]],
        ]
    )


def _body_prims(v: Vertebra, cortex: float) -> list[Prim]:
    a = v.half_w
    conc = 0.05 * v.size
    top = _endplate_outline(a, v.top_back, v.top_front, v.core_top, conc) * [1.0, -1.0]
    bot = _endplate_outline(a, v.bot_back, v.bot_front, v.core_bot, conc)
    core = np.array([[-a, -v.core_top], [a, -v.core_top], [a, v.core_bot], [-a, v.core_bot]])
    rim = 0.12 * a
    walls = [np.array([[s * a, -v.core_top], [s * a, v.core_bot]]) for s in (-1, 1)]
    return [
        poly("trab", v.to_image(core), v.density),
        poly("trab", v.to_image(top), v.density),
        poly("trab", v.to_image(bot), v.density),
        *[poly("cortex", v.to_image(w), cortex, thickness=rim) for w in walls],
        poly("cortex", v.to_image(top), cortex * (1 + 0.6 * v.top_sclerosis), thickness=rim * (1 + v.top_sclerosis)),
        poly("cortex", v.to_image(bot), cortex * (1 + 0.6 * v.bot_sclerosis), thickness=rim * (1 + v.bot_sclerosis)),
    ]


def _spur(v: Vertebra, side: int, end: int, length: float, cortex: float) -> list[Prim]:
    """A bony beak at a corner, growing outward and toward the disc; ``length`` in body heights."""
    a = v.half_w
    plate = {(-1, -1): v.top_back, (1, -1): v.top_front, (-1, 1): v.bot_back, (1, 1): v.bot_front}[(side, end)]
    L = length * v.size
    beak = np.array(
        [
            [a - 0.35 * L, plate - 0.35 * L],
            [a, plate - 0.9 * L],
            [a + 0.45 * L, plate - 0.25 * L],
            [a + 0.8 * L, plate + 0.35 * L],
            [a + 0.55 * L, plate + 0.32 * L],
            [a + 0.15 * L, plate + 0.06 * L],
            [a - 0.35 * L, plate + 0.02 * L],
        ]
    )
    outline = v.to_image(beak * [side, end])
    return [poly("trab", outline, v.density), poly("cortex", outline, cortex, thickness=0.06 * v.size, closed=True)]


def build_scene(anat: Anatomy, spec: ImageSpec, lesions: Sequence[LesionSpec]) -> list[Prim]:
    """All primitives of an image with ``lesions`` drawn; order = drawing order per canvas."""
    gain = _lesion_gain(spec.difficulty)
    lateral = spec.projection == "lateral"
    verts = list(anat.vertebrae)
    for les in lesions:
        k, sev = les.level, les.severity
        if les.lesion_type == SPONDYLOLYSTHESIS:
            v = verts[k]
            eu, _ = v.axes()
            shift = les.side * 2 * v.half_w * float(np.clip((0.15 + 0.2 * sev) * gain, 0.06, 0.45))
            verts[k] = replace(v, cx=v.cx + shift * eu[0], cy=v.cy + shift * eu[1])
        elif les.lesion_type == VERTEBRAL_COLLAPSE:
            verts[k] = _collapse(verts[k], float(np.clip((0.3 + 0.25 * sev) * gain, 0.12, 0.65)), gain, sev)
        elif les.lesion_type == DISC_SPACE_NARROWING:
            narrow = float(np.clip((0.45 + 0.35 * sev) * gain, 0.15, 0.9))
            delta = 0.5 * narrow * gap_below(anat.vertebrae, k)
            sclerosis = 0.6 + 0.8 * sev * gain
            up, low = verts[k], verts[k + 1]
            verts[k] = replace(
                up,
                bot_back=up.bot_back + delta,
                bot_front=up.bot_front + delta,
                bot_sclerosis=max(up.bot_sclerosis, sclerosis),
            )
            verts[k + 1] = replace(
                low,
                top_back=low.top_back + delta,
                top_front=low.top_front + delta,
                top_sclerosis=max(low.top_sclerosis, sclerosis),
            )

    prims: list[Prim] = list(anat.base_prims)
    stenosis = {(les.level, les.side): les for les in lesions if les.lesion_type == FORAMINAL_STENOSIS}
    overgrowth = []
    for (d, s), scale in anat.foramen_scale.items():
        centre, su, sv, angle = foramen(anat.vertebrae, d, s, lateral)
        narrowing = stenosis.get((d, s))
        if narrowing is not None:
            squeeze = float(np.clip((0.45 + 0.3 * narrowing.severity) * gain, 0.2, 0.85))
            scale *= 1.0 - squeeze
            ca, sa = math.cos(angle), math.sin(angle)
            toward_body = -s * spec.facing
            bump = centre + toward_body * 0.7 * su * np.array([ca, -sa])
            grow = 0.5 + 0.5 * narrowing.severity
            overgrowth.append(
                poly("cortex", ellipse(bump[0], bump[1], 0.55 * su * grow, 0.5 * sv * grow, angle=-angle), anat.cortex)
            )
        prims.append(poly("post", ellipse(centre[0], centre[1], su * scale, sv * scale, angle=-angle), 0.0))

    for v in verts:
        prims.extend(_body_prims(v, anat.cortex))
    for k, s, e, length in anat.lipping:
        prims.extend(_spur(verts[k], s, e, length, anat.cortex))
    for les in lesions:
        if les.lesion_type == OSTEOPHYTES:
            length = min(0.8, (0.25 + 0.3 * les.severity) * gain)
            prims.extend(_spur(verts[les.level], les.side, les.end, length, anat.cortex))
    prims.extend(overgrowth)
    for k, u, w, r, value in anat.islands:
        v = verts[k]
        blob = ellipse(u * v.half_w, w * v.size, r * v.size, 0.8 * r * v.size, n=16)
        prims.append(poly("blob", v.to_image(blob), value))
    for les in lesions:
        if les.lesion_type == OTHER_LESIONS:
            prims.extend(_other_lesion(verts[les.level], les, gain, anat.cortex))
        elif les.lesion_type == SURGICAL_IMPLANT:
            prims.extend(_implant(anat.vertebrae, les, lateral))
    return prims


def _collapse(v: Vertebra, loss: float, gain: float, severity: float) -> Vertebra:
    """Wedge: the front loses ``loss`` of its height, the back a quarter of that; bone gets denser."""
    front = (v.top_front + v.bot_front) * (1.0 - loss)
    back = (v.top_back + v.bot_back) * (1.0 - 0.25 * loss)
    bottom_before = 0.5 * (v.bot_back + v.bot_front)
    bottom_after = 0.25 * (front + back)
    _, ev = v.axes()
    move = bottom_before - bottom_after
    return replace(
        v,
        cx=v.cx + move * ev[0],
        cy=v.cy + move * ev[1],
        top_back=0.5 * back,
        bot_back=0.5 * back,
        top_front=0.5 * front,
        bot_front=0.5 * front,
        core_top=0.55 * 0.5 * min(front, back),
        core_bot=0.55 * 0.5 * min(front, back),
        density=v.density * (1.0 + (0.15 + 0.2 * severity) * gain),
        top_sclerosis=max(v.top_sclerosis, 0.5 + 0.5 * severity),
    )


def _other_lesion(v: Vertebra, les: LesionSpec, gain: float, cortex: float) -> list[Prim]:
    rng = np.random.default_rng(les.seed)
    r = min(0.3, (0.18 + 0.14 * les.severity) * (0.7 + 0.3 * gain)) * v.size
    u = float(rng.uniform(-0.35, 0.35)) * v.half_w
    w = float(rng.uniform(-0.2, 0.2)) * v.size
    shape = ellipse(
        u,
        w,
        r,
        r * float(rng.uniform(0.75, 1.0)),
        angle=float(rng.uniform(0, math.pi)),
        wobble=rng.uniform(-0.12, 0.12, 28),
    )
    contrast = (0.15 + 0.15 * les.severity) * gain
    pts = v.to_image(shape)
    if les.variant == 0:
        return [poly("blob", pts, -contrast), poly("cortex", pts, 0.6 * cortex, thickness=0.14 * r, closed=True)]
    return [poly("blob", pts, contrast)]


def _implant(vertebrae: Sequence[Vertebra], les: LesionSpec, lateral: bool) -> list[Prim]:
    rng = np.random.default_rng(les.seed)
    levels = range(les.level, min(len(vertebrae), les.level + les.span))
    prims: list[Prim] = []
    if lateral and les.variant == 1:
        plate: list[np.ndarray] = []
        for k in levels:
            v = vertebrae[k]
            a, h = v.half_w, v.size
            plate.extend(v.to_image(np.array([[1.1 * a, -0.45 * h], [1.1 * a, 0.45 * h]])))
            screw = np.array([[1.1 * a, -0.05 * h], [0.1 * a, float(rng.uniform(-0.1, 0.1)) * h]])
            prims.append(poly("metal", v.to_image(screw), _METAL, thickness=0.07 * h))
        prims.append(poly("metal", np.array(plate), _METAL, thickness=0.09 * vertebrae[les.level].half_w))
        return prims
    heads: dict[int, list[np.ndarray]] = {-1: [], 1: []}
    for k in levels:
        v = vertebrae[k]
        a, h = v.half_w, v.size
        tilt = float(rng.uniform(-0.08, 0.08)) * h
        if lateral:
            screw = np.array([[-2.0 * a, -0.12 * h + tilt], [0.5 * a, 0.02 * h]])
            heads[-1].append(v.to_image(screw[:1])[0])
            prims.append(poly("metal", v.to_image(screw), _METAL, thickness=0.085 * h))
            prims.append(poly("metal", v.to_image(ellipse(-2.0 * a, -0.12 * h + tilt, 0.1 * h, 0.1 * h, n=12)), _METAL))
        else:
            for s in (-1, 1):
                screw = np.array([[s * 1.05 * a, -0.2 * h + tilt], [s * 0.15 * a, 0.02 * h]])
                heads[s].append(v.to_image(screw[:1])[0])
                prims.append(poly("metal", v.to_image(screw), _METAL, thickness=0.08 * h))
                prims.append(
                    poly("metal", v.to_image(ellipse(s * 1.05 * a, -0.2 * h + tilt, 0.11 * h, 0.09 * h, n=12)), _METAL)
                )
    rod_width = 0.06 * vertebrae[les.level].size
    for pts in heads.values():
        if len(pts) >= 2:
            prims.append(poly("metal", np.array(pts), _METAL, thickness=rod_width))
    if les.variant == 2:
        for k in list(levels)[:-1]:
            v = vertebrae[k]
            a = v.half_w
            gap = gap_below(vertebrae, k)
            mid = v.bot_back + 0.5 * gap
            cage = np.array(
                [
                    [-0.6 * a, mid - 0.4 * gap],
                    [0.6 * a, mid - 0.4 * gap],
                    [0.6 * a, mid + 0.4 * gap],
                    [-0.6 * a, mid + 0.4 * gap],
                ]
            )
            prims.append(poly("metal", v.to_image(cage), 0.6 * _METAL, thickness=0.04 * v.size, closed=True))
    return prims
