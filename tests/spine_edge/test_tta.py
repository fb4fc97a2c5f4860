from __future__ import annotations

import numpy as np
import pytest

from spine_edge.tta import DEFAULT_VIEWS, sampling_grid, views_by_name


def test_five_distinct_views_with_identity_first() -> None:
    names = [v.name for v in DEFAULT_VIEWS]
    assert len(names) == 5 and len(set(names)) == 5
    assert names[0] == "identity"
    assert views_by_name(names) == DEFAULT_VIEWS


@pytest.mark.parametrize("view", DEFAULT_VIEWS, ids=lambda v: v.name)
def test_numpy_grid_equals_torch_affine_grid(view) -> None:
    torch = pytest.importorskip("torch")
    h, w = 12, 9
    theta = torch.tensor([view.theta], dtype=torch.float64)
    expected = torch.nn.functional.affine_grid(theta, [1, 1, h, w], align_corners=False)[0].numpy()
    np.testing.assert_allclose(view.grid(h, w), expected, atol=1e-6)


def test_identity_and_flip_sample_pixel_centres() -> None:
    grid = sampling_grid(DEFAULT_VIEWS[0].theta, 4, 4)
    np.testing.assert_allclose(grid[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    flipped = sampling_grid(DEFAULT_VIEWS[1].theta, 4, 4)
    np.testing.assert_allclose(flipped[0, :, 0], [0.75, 0.25, -0.25, -0.75])
