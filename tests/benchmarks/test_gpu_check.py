"""The GPU check's CPU-side parts: arguments, report writing, the no-GPU path, loud failures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import spine_edge.benchmarks.gpu_check as gpu_check
from spine_edge.backends.onnxruntime import OnnxRuntimeBackend
from spine_edge.benchmarks.gpu_check import (
    EXIT_FAILED,
    EXIT_NO_GPU,
    GpuCheckConfig,
    GpuCheckReport,
    GpuPresence,
    StepResult,
    latency_stats,
    parse_args,
    run_check,
    time_backend,
    write_report,
)
from spine_edge.bundle import load_manifest
from tests.spine_edge.bundle_factory import make_bundle

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
NO_GPU = GpuPresence(False, "test: none")


def test_arguments_become_a_config(tmp_path: Path) -> None:
    config = parse_args(
        [
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "1",
            "--precision",
            "fp16",
            "--precision",
            "int8",
            "--precision",
            "fp16",
            "--iterations",
            "5",
            "--skip-ort",
        ]
    )
    assert config == GpuCheckConfig(
        bundle=tmp_path, out=tmp_path / "o", device=1, precisions=("fp16", "int8"), iterations=5, skip_ort=True
    )
    assert parse_args([str(tmp_path)]).budget_s == 540.0
    assert parse_args([str(tmp_path)]).ort_providers == ("cuda", "tensorrt")
    assert parse_args([str(tmp_path), "--ort-provider", "tensorrt-rtx"]).ort_providers == ("tensorrt-rtx",)


@pytest.mark.parametrize("argv", [["--precision", "bf16"], ["--iterations", "0"], []])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(([str(tmp_path)] if argv else []) + argv)
    assert info.value.code == 2


def test_latency_summary() -> None:
    stats = latency_stats([10.0] * 19 + [30.0], batch=4)
    assert stats["p50_ms"] == 10.0 and stats["p95_ms"] == pytest.approx(11.0) and stats["runs"] == 20
    assert stats["images_per_s"] == 400.0
    with pytest.raises(ValueError):
        latency_stats([], 1)


def test_without_a_gpu_it_says_so_and_exits_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: NO_GPU)
    assert gpu_check.main([str(tmp_path / "missing-bundle"), "--out", str(tmp_path / "out")]) == EXIT_NO_GPU
    assert "no NVIDIA GPU on this box" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] is False and report["exit_code"] == EXIT_NO_GPU and report["steps"] == []
    assert "NO GPU" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_shell_wrapper_on_this_box(tmp_path: Path) -> None:
    if gpu_check.detect_gpu().present:
        pytest.skip("this box has an NVIDIA GPU")
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_NO_GPU, result.stderr
    assert (tmp_path / "o" / "gpu_check.json").is_file()


def test_a_failing_step_on_a_gpu_box_fails_the_run_loudly(tmp_path: Path) -> None:
    """On this CPU box, pretend a GPU is present: every step must fail (no TensorRT, no CUDA EP), none skip."""
    bundle = make_bundle(tmp_path / "b")
    config = GpuCheckConfig(bundle=bundle, out=tmp_path / "out", iterations=1, warmup=0)
    seen: list[int] = []
    report = run_check(config, gpu=GpuPresence(True, "test: pretend"), progress=lambda r: seen.append(len(r.steps)))
    assert seen == [1, 2, 3, 4, 5]  # the report is rewritten after every step
    assert [s.name for s in report.steps] == ["build", "tensorrt", "cascade", "ort-cuda", "ort-tensorrt"]
    assert all(s.status == "failed" for s in report.steps), report.steps
    assert "spine-edge[gpu-cu12]" in report.steps[0].detail
    assert report.exit_code() == EXIT_FAILED
    json_path, md_path = write_report(report, config.out)
    data = json.loads(json_path.read_text())
    assert data["ok"] is False and data["exit_code"] == 1 and len(data["steps"]) == 5
    assert "FAILED" in md_path.read_text()
    assert (config.out / "bundle" / "manifest.json").is_file()  # worked on a copy
    assert load_manifest(bundle).models == load_manifest(config.out / "bundle").models


def test_budget_spent_fails_the_remaining_steps() -> None:
    clock = gpu_check._Clock(budget_s=-1.0)
    result = gpu_check._step("tensorrt", clock, lambda: ("never", {}))
    assert result.status == "failed" and "budget" in result.detail


def test_one_model_row_with_parity_latency_and_report(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest = load_manifest(bundle)
    entry = manifest.find("classifier", "fp32", "onnx")
    assert entry is not None
    config = GpuCheckConfig(bundle=bundle, out=tmp_path / "out", iterations=3, warmup=1)
    row = gpu_check._measure(
        "ort-cpu",
        lambda: OnnxRuntimeBackend(bundle / entry.file, provider="cpu"),
        manifest,
        entry,
        bundle,
        (1, 2),
        config,
    )
    assert "error" not in row, row.get("error")
    assert row["parity"]["passed"] and [r["batch"] for r in row["latency"]] == [1, 2]
    assert row["provider"] == "onnxruntime/CPUExecutionProvider"
    step = StepResult("ort-cpu", "ok", 1.0, "1 graph", {"models": [row]})
    report = GpuCheckReport(
        config,
        GpuPresence(True, "test", ("Fake GPU",), "999.1"),
        "now",
        1.0,
        {"versions": {"numpy": np.__version__}},
        (step,),
    )
    markdown = report.to_markdown()
    assert "PASSED" in markdown and "| ort-cpu | classifier | fp32 | 2 |" in markdown
    json.dumps(report.to_dict(), allow_nan=False)


def test_timing_runs_the_backend(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    with OnnxRuntimeBackend(bundle / "classifier.fp32.onnx", provider="cpu") as backend:
        times = time_backend(backend, {"image": np.zeros((1, 1, 64, 64), np.uint8)}, warmup=1, iterations=4)
    assert len(times) == 4 and all(t > 0 for t in times)


def test_cascade_stage_latency_rows(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    rows = gpu_check.cascade_rows(bundle, ["fp32"], "onnxruntime", iterations=3)
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["images"] == 3
    assert set(rows[0]["stages"]) == set(gpu_check.CASCADE_STAGES)
    assert rows[0]["stages"]["detector"]["runs"] == 3  # forced on every image
    config = GpuCheckConfig(bundle=bundle, out=tmp_path / "out")
    step = StepResult("cascade", "ok", 1.0, "timed", {"cascade": rows})
    markdown = GpuCheckReport(config, GpuPresence(True, "test"), "now", 1.0, {}, (step,)).to_markdown()
    assert "| cascade precision | preprocess p50/p95 ms" in markdown and "| fp32 | " in markdown
