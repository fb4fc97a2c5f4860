"""The export's structure: frozen step results, one report built once, defaults written once."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import click
import numpy as np
import pytest
from onnx import TensorProto, helper

from spine_edge.bundle import CalibrationMethod, Precision, load_manifest
from spine_edge.cli import export as export_cli
from spine_edge.config import literal_values
from spine_edge.errors import SpineEdgeError
from spine_edge.export import (
    bundle_writer,
    calibration,
    config,
    evaluation,
    pipeline,
    precision,
    sensitivity,
    sources,
    variants,
)
from spine_edge.export.bundle_writer import write_onnx
from spine_edge.export.config import PRECISIONS, ExportConfig, field_default
from spine_edge.export.evaluation import (
    ClassifierComparison,
    ClassifierRun,
    DetectorComparison,
    EvalSet,
    EvalSettings,
    Evaluation,
)
from spine_edge.export.variants import GraphFile, Parity, Variant, model_entry_of
from spine_edge.fidelity import ClassifierFidelity, DetectionFidelity
from spine_edge.metrics import ACCURACY_GATES, ClassificationMetrics, DetectionMetrics, ImageBoxes
from spine_edge.verdict import DeltaInterval, RoleVerdict, task_verdict

STEP_MODULES = (config, sources, evaluation, calibration, sensitivity, variants, pipeline, bundle_writer)


def test_every_config_and_step_result_is_frozen(tmp_path: Path) -> None:
    classes = [
        obj
        for module in STEP_MODULES
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
    ]
    assert len(classes) >= 15
    assert [c.__qualname__ for c in classes if not c.__dataclass_params__.frozen] == []  # type: ignore[attr-defined]
    settings = ExportConfig(tmp_path / "ckpt", tmp_path / "bundle")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.calib_images = 4  # type: ignore[misc]


def _metrics(auroc: float, map50: float) -> tuple[ClassificationMetrics, DetectionMetrics]:
    return ClassificationMetrics(auroc, 0.5, 0.5, 0.5, 0.5, 2, 2), DetectionMetrics(map50, map50 / 2)


def _evaluation(tmp_path: Path) -> Evaluation:
    classifier, detector = _metrics(0.8, 0.6)
    data = EvalSet(
        folder=tmp_path,
        split="val",
        image_ids=("a", "b", "c", "d"),
        labels=np.array([0, 1, 0, 1]),
        classifier_canvases=np.zeros((4, 1, 8, 8), np.uint8),
        detector_canvases=np.zeros((4, 1, 8, 8), np.uint8),
        placements=(),
        ground_truth=tuple(ImageBoxes.empty() for _ in range(4)),
        fingerprint="data-1",
    )
    settings = EvalSettings(
        threshold=0.5, class_names=("A",), member_tensors=("m0",), batch_size=2, map_conf=0.001, iou=0.65
    )
    run = ClassifierRun(np.array([0.1, 0.9, 0.2, 0.8]), np.array([[0.1, 0.9, 0.2, 0.8]]), np.zeros((4, 2, 2)))
    return Evaluation(data, settings, run, data.ground_truth, classifier, detector)


def _role(role: str, precision: str, delta: float, flips: int = 0) -> RoleVerdict:
    """A verdict whose interval is the delta ± 0.4 points."""
    gate = ACCURACY_GATES[precision]
    gate_pt = gate.auroc_pt if role == "classifier" else gate.map50_pt
    verdict = task_verdict(delta, delta - 0.4, delta + 0.4, gate_pt)
    task = DeltaInterval(
        "auroc" if role == "classifier" else "map50",
        0.8,
        0.8 + delta / 100,
        delta,
        delta - 0.4,
        delta + 0.4,
        gate_pt,
        0.95,
        1000,
        verdict,
    )
    return RoleVerdict(
        role,
        precision,
        4,
        task,
        classifier=ClassifierFidelity(4, 0.5, 0.01 * flips, 0.005 * flips, flips, 0) if role == "classifier" else None,
        detector=DetectionFidelity(4, 0.5, 3, 3, 3, 0.9, 0.95, ()) if role == "detector" else None,
        verdict=verdict,
    )


def _variant(name: str, delta_auroc: float, delta_map: float, flips: int) -> Variant:
    classifier, detector = _metrics(0.8 + delta_auroc / 100, 0.6 + delta_map / 100)
    precision = name.split("-")[0]
    graphs = (
        GraphFile("classifier", name, Path(f"classifier.{name}.onnx"), ""),
        GraphFile("detector", name, Path(f"detector.{name}.onnx"), ""),
    )
    return Variant(
        variant=name,
        graphs=graphs,
        how=f"measured {name}",
        classifier=ClassifierComparison(classifier, _role("classifier", precision, delta_auroc, flips)),
        detector=DetectorComparison(detector, _role("detector", precision, delta_map), delta_map / 2),
        sensitivity={f"classifier {name}": {"kept_fp32": []}} if name.startswith("int8") else {},
    )


def test_report_rows_are_built_once_from_the_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    row = pipeline.accuracy_row

    def counting_row(variant: str, *args: typing.Any) -> typing.Any:
        built.append(variant)
        return row(variant, *args)

    monkeypatch.setattr(pipeline, "accuracy_row", counting_row)
    measured = [_variant("fp16", -0.1, 0.2, 0), _variant("int8-trt", -2.0, -0.5, 3), _variant("int8-ort", 0.5, -2.0, 1)]
    unmeasured = Variant("fp16", measured[0].graphs, "no data")
    parity = Parity(4, 1e-6, 1e-6, 1e-4, 1e-5)
    report = pipeline.build_accuracy_report(_evaluation(tmp_path), [*measured, unmeasured], parity, "data-1")
    assert report is not None and built == ["fp16", "int8-trt", "int8-ort"]
    # fp16: −0.1 ± 0.4 pt straddles its −0.3 gate (inconclusive); int8: losses whose whole interval is past the gate.
    assert [(r.target, r.how, r.verdict, r.holds) for r in report.variants] == [
        ("any", "measured fp16", "inconclusive", None),
        ("tensorrt", "measured int8-trt", "fail", False),
        ("onnxruntime", "measured int8-ort", "fail", False),
    ]
    assert report.eval_data["same_data_as_training"] and report.parity == parity.to_dict()
    assert list(report.sensitivity) == ["classifier int8-trt", "classifier int8-ort"]
    # The manifest's accuracy is a view of the same rows: every number in it is the report's.
    summary, full = report.summary(), report.to_dict()
    for item in full["variants"]:
        assert summary["variants"][item["variant"]] == {k: item[k] for k in summary["variants"][item["variant"]]}
    assert summary["gates_hold"] is full["gates_hold"] is False
    assert pipeline.build_accuracy_report(None, measured, parity, "") is None


def test_bundle_manifest_accuracy_matches_the_report(exported_bundle: tuple[Path, object]) -> None:
    folder, _ = exported_bundle
    report = json.loads((folder / "accuracy_report.json").read_text())
    accuracy = load_manifest(folder).accuracy
    assert accuracy["gates_hold"] == report["gates_hold"] and accuracy["eval_images"] == report["eval_data"]["images"]
    assert accuracy["classifier_fp32_auroc"] == report["classifier_fp32"]["auroc"]
    assert list(accuracy["variants"]) == [row["variant"] for row in report["variants"]]
    for row in report["variants"]:
        assert accuracy["variants"][row["variant"]] == {k: row[k] for k in accuracy["variants"][row["variant"]]}


def test_cli_defaults_are_the_config_defaults() -> None:
    command = export_cli.export
    ctx = click.Context(command)
    fields = {f.name for f in dataclasses.fields(ExportConfig)}
    options = [p for p in command.params if isinstance(p, click.Option) and p.name in fields]
    assert {p.name for p in options} == {
        "precisions",
        "calib_data",
        "eval_data",
        "calib_images",
        "calib_method",
        "eval_limit",
    }
    for option in options:
        assert option.get_default(ctx) == field_default(ExportConfig, str(option.name)), option.name
    assert export_cli.PRECISION_CHOICES == PRECISIONS
    assert typing.get_args(precision.CalibrationMethodName) == export_cli.CALIBRATION_CHOICES
    # The options offer exactly the runtime's Literal values, which the export package spells the same.
    by_name = {str(option.name): option for option in options}
    assert list(by_name["precisions"].type.choices) == list(literal_values(Precision)) == list(PRECISIONS)  # type: ignore[attr-defined]
    assert list(by_name["calib_method"].type.choices) == list(literal_values(CalibrationMethod))  # type: ignore[attr-defined]
    assert literal_values(CalibrationMethod) == literal_values(precision.CalibrationMethodName)
    with pytest.raises(TypeError, match="no default"):
        field_default(ExportConfig, "checkpoints")


def test_config_refuses_unknown_precisions_and_imports_light(tmp_path: Path) -> None:
    with pytest.raises(SpineEdgeError, match="unknown precision"):
        ExportConfig(tmp_path, tmp_path, precisions=("fp32", "fp8"))
    code = (
        "import sys, spine_edge.export.config\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'numpy')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_graph_whose_tensors_have_no_role_is_refused(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    path = write_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    with pytest.raises(SpineEdgeError, match="TENSOR_ROLES_BY_NAME"):
        model_entry_of(tmp_path, GraphFile("detector", "fp16", path, ""))
