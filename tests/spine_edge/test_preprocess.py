from __future__ import annotations

import numpy as np

from spine_edge.preprocess import letterbox, plan_letterbox


def test_letterbox_keeps_aspect_and_pads_centrally() -> None:
    image = np.full((200, 100), 200, np.uint8)
    canvas, lb = letterbox(image, 64, pad_value=7)
    assert canvas.shape == (64, 64)
    assert lb.scale == 64 / 200
    assert lb.pad_y == 0 and lb.pad_x == (64 - 32) // 2
    assert (canvas[:, : lb.pad_x] == 7).all() and (canvas[:, lb.pad_x + 32 :] == 7).all()
    assert (canvas[:, lb.pad_x : lb.pad_x + 32] == 200).all()


def test_box_round_trip_through_canvas() -> None:
    lb = plan_letterbox((1172, 1485), 384)
    boxes = np.array([[10.0, 20.0, 300.0, 1000.0], [0.0, 0.0, 1485.0, 1172.0]], np.float32)
    back = lb.boxes_to_source(lb.boxes_to_canvas(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_boxes_in_padding_are_clipped_to_the_image() -> None:
    lb = plan_letterbox((100, 50), 100)  # 25 px padding left and right
    out = lb.boxes_to_source(np.array([[0.0, -5.0, 100.0, 120.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.0, 50.0, 100.0]])


def test_heatmap_to_source_recovers_a_marked_region() -> None:
    lb = plan_letterbox((40, 80), 80)  # 20 px padding top and bottom
    heat = np.zeros((80, 80), np.float32)
    heat[20:60, 40:80] = 1.0  # right half of the image area
    full = lb.heatmap_to_source(heat)
    assert full.shape == (40, 80)
    assert full[:, 45:].mean() > 0.95 and full[:, :35].mean() < 0.05
