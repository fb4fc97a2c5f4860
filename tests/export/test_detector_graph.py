from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import SpineEdgeError
from spine_edge.export.detector_graph import (
    build_detector_module,
    detect_scope,
    export_detector_graph,
    head_output_nodes,
    run_detector_module,
)
from spine_edge.export.evaluation import run_graph
from spine_edge.export.opcheck import check_trt_ops
from spine_edge.imageio import read_image
from spine_edge.postprocess import decode_yolo
from spine_edge.preprocess import letterbox
from tests.export.conftest import EXPORT_SIZE, ExportedGraphs

CONF, IOU = 0.25, 0.65


def _canvases(prepared: Path, n: int) -> np.ndarray:
    paths = sorted((prepared / "images" / "val").glob("*.png"))[:n]
    return np.stack([letterbox(read_image(p).image, EXPORT_SIZE, 114)[0] for p in paths])[:, None]


def test_plain_onnx_with_uint8_input_and_yolo_raw_output(export_graphs: ExportedGraphs) -> None:
    model = onnx.load(str(export_graphs.detector))
    onnx.checker.check_model(model, full_check=True)
    assert export_graphs.detector.read_bytes()[:1] == b"\x08"  # a protobuf ModelProto from byte 0: no header
    assert not model.metadata_props
    (image,) = model.graph.input
    (raw,) = model.graph.output
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 1, 64, 64]
    anchors = sum((EXPORT_SIZE // s) ** 2 for s in (8, 16, 32))
    assert [d.dim_param or d.dim_value for d in raw.type.tensor_type.shape.dim] == ["batch", 4 + 7, anchors]
    assert not {"NonMaxSuppression", "TopK"} & {n.op_type for n in model.graph.node}


def test_graph_matches_the_pytorch_module_for_any_batch(export_graphs: ExportedGraphs, export_prepared: Path) -> None:
    images = _canvases(export_prepared, 3)
    ref = run_detector_module(export_graphs.detector_module, images)
    got = run_graph(export_graphs.detector, images, ["yolo_raw"], batch_size=3)["yolo_raw"]
    assert np.abs(got[:, :4] - ref[:, :4]).max() <= 1e-3  # pixels
    assert np.abs(got[:, 4:] - ref[:, 4:]).max() <= 1e-5
    single = run_graph(export_graphs.detector, images, ["yolo_raw"], batch_size=1)["yolo_raw"]
    assert np.abs(single - got).max() <= 1e-4


def test_onnx_plus_numpy_nms_agrees_with_ultralytics_predict(
    export_graphs: ExportedGraphs, export_prepared: Path
) -> None:
    from ultralytics import YOLO

    yolo = YOLO(str(export_graphs.checkpoints / "detector.pt"))
    images = _canvases(export_prepared, 6)
    raw = run_graph(export_graphs.detector, images, ["yolo_raw"], batch_size=6)["yolo_raw"]
    total = 0
    for canvas, ours in zip(images, decode_yolo(raw, CONF, IOU, max_det=300)):
        bgr = np.repeat(canvas[0][..., None], 3, axis=2)  # what ultralytics reads from a gray PNG
        theirs = yolo.predict(bgr, imgsz=EXPORT_SIZE, conf=CONF, iou=IOU, verbose=False)[0].boxes
        order = np.argsort(-theirs.conf.numpy(), kind="stable")
        assert len(ours) == len(theirs)
        # ultralytics clips boxes to the image after NMS; the runtime clips when mapping to source pixels.
        np.testing.assert_allclose(ours.boxes.clip(0, EXPORT_SIZE), theirs.xyxy.numpy()[order], atol=1.0)
        np.testing.assert_allclose(ours.scores, theirs.conf.numpy()[order], atol=1e-3)
        np.testing.assert_array_equal(ours.class_ids, theirs.cls.numpy()[order].astype(np.int64))
        total += len(ours)
    assert total >= 3  # the comparison covered real boxes


def test_graph_passes_the_tensorrt_op_check(export_graphs: ExportedGraphs) -> None:
    report = check_trt_ops(export_graphs.detector)
    assert report.ok, report.summary()


def test_checkpoint_facts_and_head_nodes(export_graphs: ExportedGraphs) -> None:
    _, source = build_detector_module(export_graphs.checkpoints / "detector.pt")
    assert source.class_names == CLASS_NAMES and source.in_channels == 3 and source.stride == 32
    model = onnx.load(str(export_graphs.detector))
    scope = detect_scope(model)
    head = head_output_nodes(model)
    convs = sorted(n for n in head if n.endswith("/Conv"))
    # The last 1x1 conv of each of the 3 box and 3 class branches, and the DFL conv.
    assert len(convs) == 7 and f"{scope}dfl/conv/Conv" in convs
    assert all(".2/Conv" in n for n in convs if "dfl" not in n)
    assert not any("cv2.0.0" in n or "cv3.1.1" in n for n in head)


def test_bad_size_and_bad_checkpoint(tmp_path: Path, export_graphs: ExportedGraphs) -> None:
    module, source = build_detector_module(export_graphs.checkpoints / "detector.pt")
    with pytest.raises(SpineEdgeError, match="multiple of the model stride 32"):
        export_detector_graph(module, source, tmp_path / "d.onnx", 100)
    bogus = tmp_path / "detector.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(SpineEdgeError, match="not a loadable ultralytics checkpoint"):
        build_detector_module(bogus)
    with pytest.raises(SpineEdgeError, match="not found"):
        build_detector_module(tmp_path / "missing.pt")
