from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spine_edge.errors import SpineEdgeError
from spine_edge.export.classifier_graph import read_ensemble_spec, run_ensemble
from spine_edge.export.evaluation import member_prob_tensors, run_graph
from spine_edge.export.opcheck import check_trt_ops
from spine_edge.imageio import read_image
from spine_edge.preprocess import letterbox
from tests.export.conftest import EXPORT_MEMBERS, EXPORT_SIZE, ExportedGraphs


def _canvases(prepared: Path, n: int) -> np.ndarray:
    paths = sorted((prepared / "images" / "val").glob("*.png"))[:n]
    return np.stack([letterbox(read_image(p).image, EXPORT_SIZE, 0)[0] for p in paths])[:, None]


def test_graph_interface(export_graphs: ExportedGraphs) -> None:
    model = onnx.load(str(export_graphs.classifier))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", 1, EXPORT_SIZE, EXPORT_SIZE]
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert set(outputs) == {"prob", "cam"}
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outputs.values())
    assert [d.dim_param or d.dim_value for d in outputs["prob"].shape.dim] == ["batch"]
    assert len(outputs["cam"].shape.dim) == 3
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops  # the TTA warps are in the graph
    assert "BatchNormalization" not in ops  # folded into the convs


def test_fp32_graph_matches_the_pytorch_ensemble(export_graphs: ExportedGraphs, export_prepared: Path) -> None:
    rng = np.random.default_rng(0)
    images = np.concatenate(
        [_canvases(export_prepared, 6), rng.integers(0, 256, (2, 1, EXPORT_SIZE, EXPORT_SIZE), dtype=np.uint8)]
    )
    ref_prob, ref_cam = run_ensemble(export_graphs.ensemble, images)
    got = run_graph(export_graphs.classifier, images, ["prob", "cam"], batch_size=8)
    assert got["prob"].shape == (8,) and got["cam"].shape == ref_cam.shape
    assert np.ptp(ref_prob) > 1e-3  # the images give different probabilities, so parity means something
    assert np.abs(got["prob"] - ref_prob).max() <= 1e-4
    assert np.abs(got["cam"] - ref_cam).max() <= 1e-4
    assert got["cam"].min() >= 0 and got["cam"].max() <= 1 + 1e-6  # normalised in-graph


def test_dynamic_batch_gives_the_same_per_image_results(export_graphs: ExportedGraphs, export_prepared: Path) -> None:
    images = _canvases(export_prepared, 3)
    session = ort.InferenceSession(str(export_graphs.classifier), providers=["CPUExecutionProvider"])
    batch_prob, batch_cam = session.run(None, {"image": images})
    for i in range(3):
        prob, cam = session.run(None, {"image": images[i : i + 1]})
        assert prob[0] == pytest.approx(batch_prob[i], abs=1e-6)
        assert np.abs(cam[0] - batch_cam[i]).max() <= 1e-6


def test_member_probabilities_are_found_in_the_graph(export_graphs: ExportedGraphs, export_prepared: Path) -> None:
    images = _canvases(export_prepared, 4)
    names = member_prob_tensors(onnx.load(str(export_graphs.classifier)), len(EXPORT_MEMBERS))
    got = run_graph(export_graphs.classifier, images, ["prob", *names], batch_size=4)
    with torch.no_grad():
        for member, name in zip(export_graphs.ensemble.members, names):
            ref, _ = member(torch.from_numpy(images))
            assert np.abs(got[name] - ref.numpy()).max() <= 1e-4
    weights = [w for _, w in EXPORT_MEMBERS]
    assert np.abs(sum(w * got[n] for w, n in zip(weights, names)) - got["prob"]).max() <= 1e-5


def test_graph_passes_the_tensorrt_op_check(export_graphs: ExportedGraphs) -> None:
    report = check_trt_ops(export_graphs.classifier)
    assert report.ok, report.summary()


def test_ensemble_spec_resolves_members(export_graphs: ExportedGraphs) -> None:
    spec = export_graphs.spec
    assert [m.name for m in spec.members] == [arch for arch, _ in EXPORT_MEMBERS]
    assert [m.weight for m in spec.members] == [w for _, w in EXPORT_MEMBERS]
    assert all(m.checkpoint.is_file() for m in spec.members)
    assert spec.input_size == EXPORT_SIZE and len(spec.tta_views) == 5


def test_missing_or_broken_ensemble_json_names_the_file(tmp_path: Path, export_checkpoints: Path) -> None:
    with pytest.raises(SpineEdgeError, match=r"ensemble\.json: not found"):
        read_ensemble_spec(tmp_path)
    folder = tmp_path / "ckpt"
    shutil.copytree(export_checkpoints, folder)
    data = json.loads((folder / "ensemble.json").read_text())
    data["members"][0]["checkpoint"] = "classifier_gone.pt"
    (folder / "classifier_test_resnet.pt").unlink()
    (folder / "ensemble.json").write_text(json.dumps(data))
    with pytest.raises(SpineEdgeError, match="does not exist"):
        read_ensemble_spec(folder)
    (folder / "ensemble.json").write_text("{not json")
    with pytest.raises(SpineEdgeError, match="unreadable"):
        read_ensemble_spec(folder)


def test_members_with_zero_weight_are_left_out(tmp_path: Path, export_checkpoints: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(export_checkpoints, folder)
    data = json.loads((folder / "ensemble.json").read_text())
    data["members"][1]["weight"] = 0.0
    (folder / "ensemble.json").write_text(json.dumps(data))
    spec = read_ensemble_spec(folder)
    assert [m.name for m in spec.members] == [EXPORT_MEMBERS[0][0], EXPORT_MEMBERS[2][0]]
