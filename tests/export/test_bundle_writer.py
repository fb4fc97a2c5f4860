from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from sklearn.metrics import roc_auc_score

from spine_edge.bundle import load_manifest, sha256_file
from spine_edge.cli import EXIT_GATE_FAILED, EXIT_SETUP, main
from spine_edge.constants import CLASS_NAMES
from spine_edge.export.bundle_writer import bundle_id, model_entry, write_onnx
from spine_edge.export.evaluation import run_graph
from spine_edge.export.opcheck import check_symmetric_qdq, check_trt_ops
from spine_edge.export.pipeline import remove_stale_files
from spine_edge.imageio import read_image
from spine_edge.preprocess import letterbox
from tests.export.conftest import EXPORT_MEMBERS, EXPORT_SIZE, EXPORT_THRESHOLD

TENSOR_ROLES = {
    # The export fixture has training images, so the classifier carries the in-distribution score.
    "classifier": [("image", "image"), ("prob", "probability"), ("cam", "cam"), ("ood_score", "ood_score")],
    "detector": [("image", "image"), ("yolo_raw", "yolo_raw")],
}
VARIANTS = {  # file -> (role, precision, target)
    "classifier.fp32.onnx": ("classifier", "fp32", "any"),
    "classifier.fp16.onnx": ("classifier", "fp16", "any"),
    "classifier.int8.trt.onnx": ("classifier", "int8", "tensorrt"),
    "classifier.int8.ort.onnx": ("classifier", "int8", "onnxruntime"),
    "detector.fp32.onnx": ("detector", "fp32", "any"),
    "detector.fp16.onnx": ("detector", "fp16", "any"),
    "detector.int8.trt.onnx": ("detector", "int8", "tensorrt"),
    "detector.int8.ort.onnx": ("detector", "int8", "onnxruntime"),
}


@pytest.fixture(scope="module")
def bundle(exported_bundle: tuple[Path, object]) -> Path:
    folder, result = exported_bundle
    assert result.exit_code in (0, EXIT_GATE_FAILED), result.output  # type: ignore[attr-defined]
    return folder


@pytest.fixture(scope="module")
def report(bundle: Path) -> dict:
    return json.loads((bundle / "accuracy_report.json").read_text())


def test_cli_exit_code_follows_the_gates(exported_bundle: tuple[Path, object], report: dict) -> None:
    _, result = exported_bundle
    expected = EXIT_GATE_FAILED if report["gates_hold"] is False else 0
    assert result.exit_code == expected  # type: ignore[attr-defined]
    assert "wrote" in result.output and "manifest.json" in result.output  # type: ignore[attr-defined]


def test_manifest_lists_every_graph_with_matching_hashes(bundle: Path) -> None:
    manifest = load_manifest(bundle, verify=True)  # raises on any hash mismatch
    files = {m.file: m for m in manifest.models}
    assert set(files) == set(VARIANTS)
    for file, (role, precision, target) in VARIANTS.items():
        entry = files[file]
        assert (entry.role, entry.precision, entry.target, entry.format) == (role, precision, target, "onnx")
        assert entry.sha256 == hashlib.sha256((bundle / file).read_bytes()).hexdigest()
        (image,) = entry.inputs
        assert (
            image.name == "image" and image.dtype == "uint8" and image.shape == ("batch", 1, EXPORT_SIZE, EXPORT_SIZE)
        )
        assert all(o.dtype == "float32" for o in entry.outputs)
        # FP16 and INT8 graphs keep the FP32 graph's tensor names, so every file's tensors carry a role.
        assert [(t.name, t.role) for t in (*entry.inputs, *entry.outputs)] == TENSOR_ROLES[role], file
    fp32 = [bundle / "classifier.fp32.onnx", bundle / "detector.fp32.onnx"]
    digest = hashlib.sha256("".join(sha256_file(p) for p in fp32).encode()).hexdigest()[:12]
    assert manifest.bundle_id == digest == bundle_id(fp32)


def test_manifest_describes_the_models(bundle: Path, report: dict) -> None:
    manifest = load_manifest(bundle)
    assert manifest.class_names == CLASS_NAMES
    c = manifest.classifier
    assert c.input_size == EXPORT_SIZE and c.threshold == EXPORT_THRESHOLD
    assert [(m.name, m.weight) for m in c.members] == list(EXPORT_MEMBERS)
    assert len(c.tta_views) == 5 and c.resize == "letterbox" and c.pad_value == 0
    cam = next(o for o in manifest.find("classifier", "fp32", "onnx").outputs if o.name == "cam")
    assert cam.shape == ("batch", *c.cam_shape)
    d = manifest.detector
    assert (d.input_size, d.conf_threshold, d.iou_threshold, d.pad_value) == (EXPORT_SIZE, 0.25, 0.65, 114)
    assert d.output_layout == "yolo_raw" and d.class_names == CLASS_NAMES
    calibration = manifest.calibration
    assert calibration["count"] == 8 and calibration["method"] == "minmax" and calibration["splits"] == ["train"]
    for role in ("classifier", "detector"):
        assert calibration[role]["seconds"] > 0 and calibration[role]["peak_rss_mb"] > 0
    assert manifest.accuracy["gates_hold"] == report["gates_hold"]
    assert set(manifest.accuracy["variants"]) == {"fp16", "int8-trt", "int8-ort"}
    assert manifest.source["data_fingerprint"]["detector"] == "export-test-data"
    assert Path(manifest.source["detector"]).name == "detector.pt"


def test_every_graph_passes_the_operator_check(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    for entry in manifest.models:
        result = check_trt_ops(bundle / entry.file)
        assert not result.unsupported, result.summary()
        if entry.target == "onnxruntime":
            assert check_symmetric_qdq(bundle / entry.file) and "ONNX Runtime only" in entry.notes
        else:
            assert result.ok and "TensorRT op check: ok" in entry.notes


def test_report_fp32_metrics_are_what_the_graph_computes(bundle: Path, report: dict, export_prepared: Path) -> None:
    import csv

    rows = [r for r in csv.DictReader((export_prepared / "classification.csv").open()) if r["split"] == "val"]
    images = np.stack([letterbox(read_image(export_prepared / r["path"]).image, EXPORT_SIZE, 0)[0] for r in rows])
    probs = run_graph(bundle / "classifier.fp32.onnx", images[:, None], ["prob"], 8)["prob"]
    labels = [int(r["abnormal"]) for r in rows]
    assert report["eval_data"]["images"] == len(rows) == 16
    assert report["classifier_fp32"]["auroc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    assert report["parity"]["classifier_max_abs_dprob"] <= 1e-4
    assert report["parity"]["detector_max_abs_dscore"] <= 1e-4
    for row in report["variants"]:
        gate = report["gates"][row["precision"]]
        for role, limit in (("classifier", gate["auroc_pt"]), ("detector", gate["map50_pt"])):
            verdict = row[f"{role}_verdict"]
            low = verdict["task"]["low_pt"]
            assert verdict["task"]["gate_pt"] == limit
            if not verdict["failures"] and low is not None and low >= -limit:
                assert verdict["verdict"] == "hold"
        assert row["verdict"] in ("hold", "inconclusive", "fail")
        assert row["holds"] == {"hold": True, "fail": False, "inconclusive": None}[row["verdict"]]
        assert row["classifier"]["threshold"] == EXPORT_THRESHOLD
    markdown = (bundle / "accuracy_report.md").read_text()
    assert all(f"| {v} |" in markdown for v in ("fp32", "fp16", "int8-trt", "int8-ort"))


def test_int8_layer_search_and_coverage_are_reported(bundle: Path, report: dict) -> None:
    """Layers kept in FP32 carry no Q/DQ on their weights, and the report and manifest carry the coverage."""
    manifest = load_manifest(bundle)
    for variant in ("int8-trt", "int8-ort"):
        row = next(r for r in report["variants"] if r["variant"] == variant)
        for role in ("classifier", "detector"):
            record = report["sensitivity"][f"{role} {variant}"]
            assert record["steps"] and record["candidates"] > 0
            coverage = row["int8_coverage"][role]
            assert coverage == manifest.accuracy["int8_coverage"][variant][role]
            if variant == "int8-trt":
                # Counted by TensorRT's Q/DQ fusion rule; ONNX Runtime's CPU count (the search's) beside it.
                assert "TensorRT" in coverage["counted_from"]
                cpu = record["int8_coverage"]["int8_flop_share"]
                assert coverage["onnxruntime_cpu_int8_flop_share"] == round(cpu, 4)
                assert coverage["int8_flop_share"] >= cpu
            else:
                assert coverage == record["int8_coverage"]
            assert 0.0 <= coverage["int8_flop_share"] <= 1.0
            file = f"{role}.{variant.replace('-', '.')}.onnx"
            nodes = onnx.load(str(bundle / file)).graph.node
            dequantised = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
            for node in nodes:
                if node.name in record["kept_fp32"]:
                    assert node.input[1] not in dequantised, (file, node.name)
            entry = next(m for m in manifest.models if m.file == file)
            assert "of conv/matmul FLOPs in INT8" in entry.notes
    assert "INT8 FLOPs" in (bundle / "accuracy_report.md").read_text()


def test_bundle_id_depends_on_content_and_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert bundle_id([a, b]) != bundle_id([b, a]) and len(bundle_id([a, b])) == 12


def test_invalid_graphs_are_not_written(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
    )  # wrong output type
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        write_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())
    good = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    path = write_onnx(helper.make_model(good, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ok.onnx")
    entry = model_entry(tmp_path, path, "classifier", "fp32")
    assert entry.inputs[0].shape == ("n",) and entry.outputs[0].dtype == "float32"
    assert entry.sha256 == sha256_file(path) and entry.file == "ok.onnx"


def test_cli_reports_missing_inputs(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "b"), "--precision", "fp32"])
    assert result.exit_code == EXIT_SETUP and "ensemble.json: not found" in result.output
    result = runner.invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "b")])
    assert result.exit_code == EXIT_SETUP and "--calib-data" in result.output


def test_stale_export_files_are_removed_and_others_kept(tmp_path: Path) -> None:
    for name in (
        "classifier.fp32.onnx",
        "classifier.int8.trt.onnx",
        "detector.fp16.onnx",
        "accuracy_report.md",
        "classifier.int8.trt.plan",
        "notes.txt",
    ):
        (tmp_path / name).write_text("x")
    removed = remove_stale_files(tmp_path, [tmp_path / "classifier.fp32.onnx"])
    assert sorted(p.name for p in removed) == ["accuracy_report.md", "classifier.int8.trt.onnx", "detector.fp16.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classifier.fp32.onnx",
        "classifier.int8.trt.plan",
        "notes.txt",
    ]
