"""The per-layer INT8 search: fewer layers in FP32 than the old member fallback, inside the gates, counted from the graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from spine_edge.constants import CLASS_NAMES
from spine_edge.export import precision as prec
from spine_edge.export.classifier_graph import member_scope
from spine_edge.export.evaluation import EvalSettings, Evaluation, evaluate_fp32, member_prob_tensors, read_eval_set
from spine_edge.export.sensitivity import _first_passing, search_classifier_int8, search_detector_int8, weighted_layers
from spine_edge.metrics import ACCURACY_GATES
from spine_edge.verdict import BootstrapSettings
from tests.export.conftest import EXPORT_MEMBERS, EXPORT_SIZE, ExportedGraphs


@pytest.mark.parametrize("count, first", [(1, 1), (7, 1), (7, 3), (7, 7), (8, 5), (5, 5)])
def test_first_passing_finds_the_smallest_k(count: int, first: int) -> None:
    tried: list[int] = []

    def passes(k: int) -> bool:
        tried.append(k)
        return k >= first

    assert _first_passing(count, passes) == first
    assert len(tried) == len(set(tried))  # no evaluation is repeated


def test_first_passing_says_when_nothing_passes() -> None:
    assert _first_passing(6, lambda k: False) is None


@pytest.fixture(scope="module")
def evaluation(export_graphs: ExportedGraphs, export_prepared: Path) -> Evaluation:
    data = read_eval_set(export_prepared, "val", EXPORT_SIZE, EXPORT_SIZE)
    settings = EvalSettings(
        threshold=0.5,
        class_names=tuple(CLASS_NAMES),
        member_tensors=member_prob_tensors(onnx.load(str(export_graphs.classifier)), len(EXPORT_MEMBERS)),
        batch_size=8,
        map_conf=0.001,
        iou=0.65,
        agreement_conf=0.25,
        bootstrap=BootstrapSettings(n_boot=200),
    )
    return evaluate_fp32(export_graphs.classifier, export_graphs.detector, data, settings)


@pytest.fixture(scope="module")
def calibrations(export_graphs: ExportedGraphs, export_prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sensitivity")
    paths = prec.select_calibration_images(export_prepared, 6)
    out = {"images": paths, "folder": folder}
    for role, fp32, pad in (("classifier", export_graphs.classifier, 0), ("detector", export_graphs.detector, 114)):
        reader = prec.CalibrationImages(paths, "image", EXPORT_SIZE, pad)
        out[role] = prec.calibrate(fp32, reader, folder / f"{role}.json")
    return out


def _canvases(paths: tuple[Path, ...], pad: int) -> np.ndarray:
    return np.stack([prec.load_canvas(p, EXPORT_SIZE, pad) for p in paths[:4]])[:, None]


def _gates(monkeypatch: pytest.MonkeyPatch, max_abs_dprob: float) -> None:
    """INT8 gates that only |Δprob| can break (the random tiny members' AUROC and flips are noise)."""
    gate = ACCURACY_GATES["int8"]
    fidelity = dataclasses.replace(gate.fidelity, max_abs_dprob=max_abs_dprob, max_flip_fraction=1.0)
    monkeypatch.setitem(ACCURACY_GATES, "int8", dataclasses.replace(gate, auroc_pt=100.0, fidelity=fidelity))


def test_per_layer_search_keeps_fewer_layers_than_the_member_fallback(
    export_graphs: ExportedGraphs, evaluation: Evaluation, calibrations: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = onnx.load(str(export_graphs.classifier))
    body = prec.fp16_body(fp32)
    folder: Path = calibrations["folder"]
    images = _canvases(calibrations["images"], 0)
    _gates(monkeypatch, 1.0)
    relaxed, quantised = search_classifier_int8(
        export_graphs.classifier, folder / "all.onnx", calibrations["classifier"], "onnxruntime", evaluation, images
    )
    assert relaxed.kept_fp32 == () and len(relaxed.steps) == 1 and relaxed.coverage.int8_share > 0.9
    # A gate just under what all-INT8 reaches forces the search to keep something in FP32.
    worst = quantised.max_abs_dprob
    _gates(monkeypatch, 0.8 * worst)
    search, comparison = search_classifier_int8(
        export_graphs.classifier, folder / "tight.onnx", calibrations["classifier"], "onnxruntime", evaluation, images
    )
    assert search.kept_fp32 and comparison.verdict.within_gates, [s.summary for s in search.steps]
    assert comparison.max_abs_dprob <= 0.8 * worst
    # The member fallback kept at least the later half of a member's convolutions in FP32.
    later_halves = []
    for index in range(len(EXPORT_MEMBERS)):
        convs = [n for n in weighted_layers(fp32, body) if n.startswith(member_scope(index))]
        later_halves.append(len(convs) - len(convs) // 2)
    assert len(search.kept_fp32) < min(later_halves), (search.kept_fp32, later_halves)
    # What the search kept in FP32 is what ONNX Runtime runs in float, besides the heads after the body.
    tail = set(search.coverage.float_layers) - set(search.kept_fp32)
    assert set(search.kept_fp32) <= set(search.coverage.float_layers) and not tail & body, tail & body
    assert search.coverage.int8_share > 0.5
    record = search.record()
    assert record["kept_fp32"] == list(search.kept_fp32) and record["layers"][0]["error"] <= record["quantised_error"]
    assert record["int8_coverage"]["float_layers"] == list(search.coverage.float_layers)


def test_search_keeps_nothing_in_float_when_no_layer_can_help(
    export_graphs: ExportedGraphs, evaluation: Evaluation, calibrations: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gates(monkeypatch, -1.0)  # no graph, not even FP32, meets a negative |Δprob| limit
    search, comparison = search_classifier_int8(
        export_graphs.classifier,
        calibrations["folder"] / "never.onnx",
        calibrations["classifier"],
        "onnxruntime",
        evaluation,
        _canvases(calibrations["images"], 0),
    )
    assert search.kept_fp32 == () and comparison.verdict.verdict == "fail"
    assert search.steps[-1].kept_fp32 == search.candidates  # it did try every layer in float


def test_detector_search_writes_a_covered_graph(
    export_graphs: ExportedGraphs, evaluation: Evaluation, calibrations: dict
) -> None:
    folder: Path = calibrations["folder"]
    search, comparison = search_detector_int8(
        export_graphs.detector,
        folder / "det.onnx",
        calibrations["detector"],
        "onnxruntime",
        evaluation,
        _canvases(calibrations["images"], 114),
    )
    assert search.path.is_file() and search.candidates > 10
    assert comparison.verdict.verdict in ("hold", "inconclusive", "fail")
    # Random weights: nothing above the deployed confidence agrees, whatever stays in float, so nothing does.
    assert comparison.verdict.within_gates or not search.kept_fp32
    assert search.coverage.int8_share > 0.5
