"""``spine-edge bench`` end to end on tiny real bundles: reports, saved predictions, gates and exit codes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import roc_auc_score

from spine_edge.benchmarks.config import BenchConfig
from spine_edge.benchmarks.run import run_bench
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import EXIT_GATE_FAILED, EXIT_OK, EXIT_SETUP, main

FAST = ["--runs", "3", "--warmup", "1", "--batch-sizes", "1,2", "--threads", "1", "--no-baseline"]


def _bench(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["-q", "bench", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def good_run(good_bundle: Path, toy_vindr: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("bench_out")
    result = _bench(
        "--bundle",
        good_bundle,
        "--data",
        toy_vindr,
        *FAST,
        "--json",
        out / "report.json",
        "--plots",
        out / "plots",
        "--save-predictions",
        out / "predictions",
    )
    return result, out


def test_writes_json_plots_predictions_and_prints_the_table(good_run: tuple[Result, Path]) -> None:
    result, out = good_run
    assert result.exit_code == EXIT_OK, result.output
    assert "| Precision | Backend | Input (cls/det) | AUROC | mAP@0.5 det |" in result.stdout
    for label in ("fp32", "fp16", "int8"):
        assert f"| {label} | onnxruntime/CPUExecutionProvider | 64/64 |" in result.stdout
    assert "Result: PASSED" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and [p["label"] for p in report["precisions"]] == ["fp32", "fp16", "int8"]
    fp32 = report["precisions"][0]
    assert fp32["latency"]["end_to_end"]["n"] == 3
    assert [t["batch_size"] for t in fp32["throughput"]] == [1, 2]
    assert {m["role"] for m in fp32["models"]} == {"classifier", "detector"}
    assert fp32["resources"]["peak_rss_mb"] > 0
    assert report["environment"]["backend"] == "onnxruntime" and report["environment"]["threads"] == 1
    assert {g["name"] for g in report["gates"]} == {
        "fp16 ΔAUROC vs fp32",
        "fp16 ΔmAP@0.5 (detector) vs fp32",
        "int8 ΔAUROC vs fp32",
        "int8 ΔmAP@0.5 (detector) vs fp32",
        "fp16 guard decisions vs fp32 (34 inputs)",  # 12 test images and 22 generated non-radiographs
        "int8 guard decisions vs fp32 (34 inputs)",
    }
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["latency.png", "pr_fp16.png", "pr_fp32.png", "pr_int8.png", "roc.png"]
    assert all((out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)


def test_reported_map_and_auroc_are_what_pycocotools_and_sklearn_compute_from_the_files(
    good_run: tuple[Result, Path],
) -> None:
    _, out = good_run
    report = json.loads((out / "report.json").read_text())
    gt_file = out / "predictions" / "ground_truth.json"
    for precision in report["precisions"]:
        label, accuracy = precision["label"], precision["accuracy"]
        for kind in ("detector", "cascade"):
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(str(gt_file))
                results = out / "predictions" / f"predictions_{label}_{kind}.json"
                evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results)), "bbox")
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            assert accuracy[kind]["map50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
            assert accuracy[kind]["map50_95"] == pytest.approx(evaluator.stats[0], abs=1e-12)
        images = json.loads((out / "predictions" / f"classification_{label}.json").read_text())["images"]
        auroc = roc_auc_score([i["abnormal"] for i in images], [i["probability"] for i in images])
        assert accuracy["classification"]["auroc"] == pytest.approx(auroc, abs=1e-12)
        assert 0 < accuracy["detector"]["map50"] < 1 and 0.5 < auroc < 1


def test_a_broken_int8_classifier_fails_its_gate_with_exit_4(broken_bundle: Path, toy_vindr: Path) -> None:
    result = _bench("--bundle", broken_bundle, "--data", toy_vindr, *FAST, "--precision", "int8")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("gate failed:")]
    assert len(failed) == 1
    assert failed[0].startswith("gate failed: int8 ΔAUROC vs fp32: FAIL: ")
    assert "pt [" in failed[0] and "95% CI" in failed[0]  # the paired bootstrap interval of the verdict
    assert "FAIL (ΔAUROC vs fp32)" in result.stdout and "Result: FAILED (1 gate(s))" in result.stdout
    # fp32 ran for accuracy only: it is the reference row, without latency.
    assert "| fp32 | onnxruntime/CPUExecutionProvider | 64/64 |" in result.stdout


def test_latency_budget_decides_the_exit_code(good_bundle: Path, toy_vindr: Path) -> None:
    common = ["--bundle", good_bundle, "--data", toy_vindr, *FAST, "--precision", "fp32"]
    tight = _bench(*common, "--budget-ms", "0.001", "--stage-budget", "classifier=100000")
    assert tight.exit_code == EXIT_GATE_FAILED, tight.output
    assert "gate failed: fp32 end-to-end p95:" in tight.stderr and "(limit ≤ 0.001 ms) FAILED by" in tight.stderr
    assert "fp32 classifier p95" not in tight.stderr  # the generous stage budget held
    loose = _bench(*common, "--budget-ms", "100000")
    assert loose.exit_code == EXIT_OK, loose.output


def test_setup_problems_exit_3_with_one_line(good_bundle: Path, tmp_path: Path, toy_vindr: Path) -> None:
    missing = _bench("--bundle", tmp_path / "nowhere", *FAST)
    assert missing.exit_code == EXIT_SETUP
    assert "no manifest.json here" in missing.stderr
    bundle = tmp_path / "fp32-only"
    from tests.spine_edge.bundle_factory import make_bundle

    make_bundle(bundle)
    no_int8 = _bench("--bundle", bundle, "--precision", "int8", *FAST)
    assert no_int8.exit_code == EXIT_SETUP
    assert "no onnxruntime files for precision int8" in no_int8.stderr and "it has: fp32" in no_int8.stderr
    usage = _bench("--bundle", good_bundle, "--save-predictions", tmp_path / "p", *FAST)
    assert usage.exit_code == 2 and "needs --data" in usage.stderr


def test_without_data_it_times_synthetic_radiographs_at_real_sizes(good_bundle: Path) -> None:
    report = run_bench(
        BenchConfig(
            CascadeConfig(good_bundle, threads=1),
            precisions=("fp32",),
            batch_sizes=(1,),
            runs=2,
            warmup=0,
            baseline=False,
            synthetic_images=1,
            progress=False,
        )
    )
    assert report.data["source"] == "synthetic" and report.labels is None
    assert any("no --data: latency only" in note for note in report.notes)
    fp32 = report.precision("fp32")
    assert fp32 is not None and fp32.accuracy is None and fp32.latency is not None
    assert fp32.latency.end_to_end.n == 2
    # A 1485 x 1172 JPEG 2000 decode is real work, far above the toy graphs' time.
    assert fp32.latency.stages["read"].p50 > 10 * fp32.latency.stages["classifier"].p50
    assert report.gates == () and report.passed
