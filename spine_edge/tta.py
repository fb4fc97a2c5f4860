"""The classifier's test-time augmentation views, defined once.

Each view is a 2x3 affine matrix in the normalised coordinates of
``torch.nn.functional.affine_grid`` (``align_corners=False``): it maps an output pixel's position to
the input position it samples. Training validates with these views, the exported graph embeds
their sampling grids as constants (one ``GridSample`` per view), so the engine computes exactly
what was validated. The grid is built here in numpy so that export and tests need no second
definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TTAView:
    """One test-time view.

    Attributes:
        name: Stable identifier, recorded in checkpoints and manifests.
        theta: Row-major 2x3 affine matrix (output → input, normalised coordinates).
    """

    name: str
    theta: tuple[tuple[float, float, float], tuple[float, float, float]]

    def grid(self, height: int, width: int) -> np.ndarray:
        """Sampling grid ``[height, width, 2]`` (x, y in [-1, 1]) as ``affine_grid`` builds it."""
        return sampling_grid(self.theta, height, width)


def _rotation(name: str, degrees: float) -> TTAView:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return TTAView(name, ((c, -s, 0.0), (s, c, 0.0)))


def _zoom(name: str, factor: float) -> TTAView:
    z = 1.0 / factor
    return TTAView(name, ((z, 0.0, 0.0), (0.0, z, 0.0)))


#: The five views: identity, horizontal flip, two small rotations, a 10 % zoom-in. The rotations
#: stay inside the ±15° training augmentation so every view is in-distribution.
DEFAULT_VIEWS: tuple[TTAView, ...] = (
    TTAView("identity", ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))),
    TTAView("hflip", ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0))),
    _rotation("rot+7", 7.0),
    _rotation("rot-7", -7.0),
    _zoom("zoom1.1", 1.1),
)

_BY_NAME = {view.name: view for view in DEFAULT_VIEWS}


def views_by_name(names: list[str] | tuple[str, ...]) -> tuple[TTAView, ...]:
    """Look views up by their recorded names.

    Raises:
        KeyError: A name that is not one of ``DEFAULT_VIEWS``.
    """
    return tuple(_BY_NAME[name] for name in names)


def sampling_grid(
    theta: tuple[tuple[float, float, float], tuple[float, float, float]] | np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """Numpy equivalent of ``affine_grid(theta[None], [1, C, H, W], align_corners=False)[0]``."""
    t = np.asarray(theta, dtype=np.float64).reshape(2, 3)
    xs = (2.0 * np.arange(width) + 1.0) / width - 1.0
    ys = (2.0 * np.arange(height) + 1.0) / height - 1.0
    gx, gy = np.meshgrid(xs, ys)
    base = np.stack([gx, gy, np.ones_like(gx)], axis=-1)  # [H, W, 3]
    grid: np.ndarray = (base @ t.T).astype(np.float32)  # [H, W, 2]
    return grid
