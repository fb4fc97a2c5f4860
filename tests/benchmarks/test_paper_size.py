"""The paper-size benchmark's CPU-side logic at tiny size: graph building, planning, floors, memory, report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spine_edge.benchmarks.latency import ModelTiming, summarize_latency
from spine_edge.benchmarks.paper_size import (
    GRAPH_FILES,
    RANDOM_WEIGHTS_NOTE,
    TIMING_PHASE,
    CpuFloors,
    GraphRun,
    PaperSizeConfig,
    PaperSizeReport,
    PeakMemory,
    StandInProfile,
    cpu_floors,
    format_paper_size,
    plan_runs,
    pooled_ceilings,
    pooled_decode,
    pooled_run,
    pooled_torch,
    run_paper_size,
    write_paper_size_json,
)

#: Two of timm's test models and YOLO11n, at 64 px with two TTA views: the code path of the paper profile in seconds.
TINY = StandInProfile(
    name="tiny-stand-in",
    members=(("test_resnet", 0.6), ("test_efficientnet", 0.4)),
    classifier_size=64,
    detector_model="yolo11n.yaml",
    detector_size=64,
    tta_views=("identity", "hflip"),
)


def test_paper_profile_is_what_the_issue_names() -> None:
    pytest.importorskip("torch")
    from spine_edge.training.profiles import PAPER

    profile = StandInProfile.from_profile(PAPER)
    assert [arch for arch, _ in profile.members] == ["densenet121", "tf_efficientnetv2_s", "resnet50"]
    assert (profile.classifier_size, profile.detector_model, profile.detector_size) == (384, "yolo11l.yaml", 640)
    assert len(profile.tta_views) == 5
    assert PaperSizeConfig(Path("w")).resolved_profile() == profile


def test_quick_preset_cuts_calibration_and_repeats() -> None:
    quick = PaperSizeConfig.quick_preset(Path("w"), threads=2)
    full = PaperSizeConfig(Path("w"))
    assert quick.calib_images < full.calib_images and quick.runs < full.runs and quick.batch_sizes == (1,)
    assert quick.threads == 2
    with pytest.raises(ValueError, match="batch sizes"):
        PaperSizeConfig(Path("w"), batch_sizes=())
    assert (full.rounds, full.runs_per_round) == (3, 4)
    assert PaperSizeConfig(Path("w"), runs=10, rounds=3).runs_per_round == 4  # rounded up: never fewer calls
    with pytest.raises(ValueError, match="rounds"):
        PaperSizeConfig(Path("w"), runs=2, rounds=3)


def test_rounds_pool_their_samples_and_keep_each_rounds_median() -> None:
    first = GraphRun("classifier", "openvino", "int8", "c.onnx", compile_s=5.0, cached_compile_s=0.5,
                     peak_rss_mb=800.0, load_average=1.0)  # fmt: skip
    later = GraphRun("classifier", "openvino", "int8", "c.onnx", peak_rss_mb=900.0, load_average=1.5)
    run = pooled_run([(first, {1: [100.0, 110.0], 4: [300.0]}), (later, {1: [200.0, 210.0], 4: [320.0]})])
    assert run.round_p50_ms == (105.0, 205.0)  # the drift between the rounds stays visible
    assert run.latency_ms == pytest.approx(155.0)  # the median of all four batch-1 calls
    assert run.at_batch(4) is not None and run.at_batch(4).per_image.p50 == pytest.approx(77.5)
    assert (run.compile_s, run.cached_compile_s, run.peak_rss_mb, run.load_average) == (5.0, 0.5, 900.0, 1.5)
    decode = pooled_decode([{"full": [300.0], "reduced": [70.0]}, {"full": [320.0], "reduced": [90.0]}], 640)
    assert decode["files"] == 1 and decode["reduced"]["p50"] == pytest.approx(80.0)
    eager = pooled_torch(
        [
            {"threads": 2, "allocator_pinned": True, "versions": {}, "classifier_probs": [0.5],
             "classifier_ms": [1000.0, 1100.0], "detector_ms": [300.0]},
            {"threads": 2, "allocator_pinned": True, "versions": {}, "classifier_probs": [0.6],
             "classifier_ms": [2000.0], "detector_ms": [310.0]},
        ]
    )  # fmt: skip
    assert eager["classifier"]["round_p50_ms"] == [1050.0, 2000.0] and eager["classifier"]["p50"] == 1100.0
    assert eager["classifier_probs"] == [0.5]


def test_ceilings_take_the_median_round_and_the_fastest_library() -> None:
    rounds = [
        {"onnxruntime": {"fp32": 180.0, "int8": 1600.0}, "torch": {"fp32": 250.0, "bf16": 1200.0}},
        {"onnxruntime": {"fp32": 190.0, "int8": 1000.0}, "torch": {"fp32": 270.0, "bf16": 1400.0}},
        {"onnxruntime": {"fp32": 200.0, "int8": 1700.0}, "torch": {"fp32": 260.0}},
    ]
    ceilings = pooled_ceilings(rounds, ("fp32", "int8", "bf16"))
    assert ceilings["measured"]["onnxruntime"] == {"fp32": 190.0, "int8": 1600.0}
    assert ceilings["measured"]["torch"]["bf16"] == pytest.approx(1300.0)  # two rounds measured it
    assert ceilings["best"] == {
        "fp32": {"gflops": 260.0, "library": "torch"},
        "int8": {"gflops": 1600.0, "library": "onnxruntime"},
        "bf16": {"gflops": 1300.0, "library": "torch"},
    }
    assert pooled_ceilings([], ("fp32",)) == {}


def test_ceiling_products_run_on_each_library(monkeypatch: pytest.MonkeyPatch) -> None:
    from spine_edge.benchmarks import ceiling

    monkeypatch.setattr(ceiling, "GEMM_SIZES", {"fp32": 64, "bf16": 64, "int8": 64})
    pytest.importorskip("onnx")
    rates = ceiling.onnxruntime_gemm(1, runs=2)
    assert set(rates) == {"fp32", "int8"} and all(r > 0 for r in rates.values())
    if importlib.util.find_spec("openvino") is not None:
        assert ceiling.openvino_gemm(1, ("fp32", "int8"), runs=2)["int8"] > 0
    if importlib.util.find_spec("torch") is not None:
        assert ceiling.torch_gemm(1, ("fp32",), runs=2)["fp32"] > 0


def test_plan_runs_one_int8_graph_for_openvino_and_tensorrt() -> None:
    assert plan_runs(openvino=False, bf16=True) == [
        ("onnxruntime", "fp32", "fp32"),
        ("onnxruntime", "int8", "int8-ort"),
    ]
    plan = plan_runs(openvino=True, bf16=True)
    assert ("openvino", "int8", "int8-trt") in plan and ("openvino", "bf16", "fp32") in plan
    assert ("openvino", "bf16", "fp32") not in plan_runs(openvino=True, bf16=False)


def test_cpu_floors_from_flags() -> None:
    sapphire = cpu_floors(
        cores=2, flags={"avx512f", "fma", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, mhz=2000
    )
    assert sapphire.gflops == {"fp32": 256.0, "bf16": 4096.0, "int8": 8192.0}
    assert sapphire.floor_ms(25.6, "fp32") == pytest.approx(100.0)
    zen3 = cpu_floors(cores=4, flags={"fma", "avx2"}, mhz=3000)
    assert zen3.gflops == {"fp32": 384.0, "int8": 1536.0}
    assert zen3.floor_ms(1.0, "bf16") is None  # no BF16 units: no floor, not a made-up one


def test_peak_memory_sees_a_child_and_survives_a_reset() -> None:
    with PeakMemory() as memory:
        block = np.ones(64 << 20, np.uint8)  # 64 MiB touched in this process
        Path("/proc/self/clear_refs").write_text("5")  # what the exporter's calibration does
        del block
        code = "import numpy, time; a = numpy.ones(96 << 20, numpy.uint8); time.sleep(0.6)"
        subprocess.run([sys.executable, "-c", code], check=True)
    assert memory.self_mb >= 64
    assert memory.children_mb >= 96
    assert memory.peak_mb == pytest.approx(memory.self_mb + memory.children_mb, abs=0.1)


def _timing(ms: float, batch: int = 1) -> ModelTiming:
    stats = summarize_latency([ms, ms * 1.1])
    return ModelTiming(batch, stats, stats)


def _report(torch: dict | None = None) -> PaperSizeReport:
    runs = tuple(
        GraphRun(
            role=role,
            library=lib,
            precision=prec,
            graph=f"{role}.onnx",
            compile_s=1.0,
            timings=(_timing(ms),),
            gflop_per_image=gflop,
            floor_ms=gflop / 256 * 1e3,
            peak_rss_mb=500.0,
        )
        for (lib, prec), scale in ((("onnxruntime", "fp32"), 1.0), (("openvino", "int8"), 0.25))
        for role, ms, gflop in (("classifier", 800.0 * scale, 60.0), ("detector", 260.0 * scale, 87.0))
    )
    return PaperSizeReport(
        note=RANDOM_WEIGHTS_NOTE,
        created="2026-12-01T00:00:00Z",
        profile=TINY,
        environment={"threads": 2, "load_before": "0.1", "load_after": "0.2"},
        floors=CpuFloors("Test CPU", 2, 2.0, ("avx512f",), {"fp32": 256.0}),
        flops={"classifier": {"gflops": 60.0}, "detector": {"gflops": 87.0}},
        phases={"export": {"seconds": 10.0, "peak_rss_mb": 3000.0}, "timing": {"seconds": 5.0, "peak_rss_mb": 1200.0}},
        build={},
        runs=runs,
        decode={"full": {"p50": 300.0}, "reduced": {"p50": 70.0}},
        torch=torch
        if torch is not None
        else {
            "classifier": {"p50": 1600.0, "min": 1500.0, "max": 1900.0, "spread_pct": 25.0},
            "detector": {"p50": 400.0, "spread_pct": 5.0},
            "threads": 2,
            "allocator_pinned": True,
            "max_abs_dprob_vs_ort": 1e-7,
        },
    )


def test_report_fields_cascade_and_table(tmp_path: Path) -> None:
    report = _report()
    rows = {(r["library"], r["precision"]): r for r in report.cascade()}
    ov = rows[("openvino", "int8")]
    assert ov["models_ms"] == pytest.approx(1.05 * (200 + 65))  # the median of (ms, 1.1 ms) per graph
    assert ov["end_to_end_ms"] == pytest.approx(ov["models_ms"] + 70.0)  # the reduced-resolution read stage
    assert ov["speedup_vs_torch_models"] == pytest.approx(2000 / ov["models_ms"])
    assert report.peak_rss_mb == 3000.0
    cls = report.run("classifier", "onnxruntime", "fp32")
    assert cls is not None and cls.gflops_per_s == pytest.approx(60.0 / 840.0 * 1e3)
    table = format_paper_size(report)
    assert "Random weights" in table and "not accuracy" in table
    assert "| classifier | openvino | int8 |" in table and "spread 25.0%" in table and "3000 MiB" in table
    data = json.loads(write_paper_size_json(report, tmp_path / "r.json").read_text())
    assert set(data) >= {
        "note",
        "environment",
        "floors",
        "flops",
        "phases",
        "runs",
        "decode",
        "torch",
        "cascade",
        "peak_rss_mb",
    }
    assert data["runs"][0]["timings"][0]["batch_size"] == 1
    assert "% of ceiling" in table and data["ceilings"] == {}  # none measured: the column stays empty
    measured = replace(report, ceilings={"best": {"fp32": {"gflops": 200.0, "library": "torch"}}})
    assert measured.ceiling_share(cls) == pytest.approx(60.0 / 840.0 * 1e3 / 200.0 * 100)
    assert "fp32 200 GFLOP/s (torch)" in format_paper_size(measured)
    assert "skipped (no torch)" in format_paper_size(_report(torch={"skipped": "no torch"}))


@pytest.mark.slow
def test_tiny_stand_in_runs_the_whole_path(tmp_path: Path) -> None:
    """Random checkpoints → export's graph functions → calibration → both INT8 graphs → timings and report."""
    pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    config = PaperSizeConfig.quick_preset(
        tmp_path, profile=TINY, calib_images=2, runs=2, decode_files=1, baseline=True, progress=False, threads=1
    )
    report = run_paper_size(config)
    for variant in GRAPH_FILES:
        for role in ("classifier", "detector"):
            assert (tmp_path / "graphs" / GRAPH_FILES[variant].format(role=role)).is_file()
    measured = {(r.role, r.library, r.precision) for r in report.runs if not r.error}
    assert {("classifier", "onnxruntime", "fp32"), ("detector", "onnxruntime", "int8")} <= measured
    assert all(r.gflop_per_image and r.gflop_per_image > 0 for r in report.runs)
    assert report.torch["max_abs_dprob_vs_ort"] < 1e-4  # the graph computes what the eager module computes
    assert report.decode["reduced"]["p50"] > 0 and report.peak_rss_mb > 0
    assert {"checkpoints + FP32 export", "calibration + INT8 graphs", TIMING_PHASE} <= set(report.phases)
    assert all(len(r.round_p50_ms) == config.rounds for r in report.runs if not r.error)
    assert "fp32" in report.ceilings["best"] and "Measured ceilings" in format_paper_size(report)
    again = run_paper_size(config)  # the second run reuses the graphs instead of exporting again
    assert again.environment["reused_graphs"] and "checkpoints + FP32 export" not in again.phases


def test_cli_bench_paper_size_builds_the_config_and_prints_the_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from spine_edge.benchmarks import paper_size
    from spine_edge.cli import main

    seen: list[PaperSizeConfig] = []

    def fake_run(config: PaperSizeConfig) -> PaperSizeReport:
        seen.append(config)
        return _report()

    monkeypatch.setattr(paper_size, "run_paper_size", fake_run)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--paper-size",
            str(tmp_path / "work"),
            "--quick",
            "--threads",
            "1",
            "--no-baseline",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Random weights" in result.output and json.loads(out.read_text())["note"] == RANDOM_WEIGHTS_NOTE
    config = seen[0]
    assert config.work == tmp_path / "work" and config.runs == 4 and config.threads == 1 and not config.baseline
    result = CliRunner().invoke(main, ["bench", "--paper-size", "--no-baseline"])
    assert result.exit_code == 0, result.output
    assert seen[1].work == Path("runs/paper-size") and seen[1].runs == PaperSizeConfig(Path("w")).runs


def _small_conv_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "c255"], ["x"]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 4, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_streaming_calibration_writes_the_ranges_onnxruntime_would(tmp_path: Path) -> None:
    from onnxruntime.quantization.calibrate import load_tensors_data

    from spine_edge.benchmarks.paper_size import calibrate_streaming, write_calibration_images
    from spine_edge.export import precision as prec

    graph = _small_conv_graph(tmp_path / "g.onnx")
    images = write_calibration_images(tmp_path / "calib", 3, long_side=40)
    reference = prec.calibrate(graph, prec.CalibrationImages(images, "image", 16, 0), tmp_path / "ref.json")
    streamed = calibrate_streaming(
        graph, prec.CalibrationImages(images, "image", 16, 0), tmp_path / "s.json", tensors_per_pass=2
    )  # several passes over the images
    want, got = load_tensors_data(reference.ranges), load_tensors_data(streamed.ranges)
    names = set(want.keys())  # TensorsData is not iterable itself
    assert set(got.keys()) == names and len(names) >= 5
    for name in names:
        np.testing.assert_allclose(got[name].range_value, want[name].range_value, rtol=1e-6)
    assert streamed.images == 3 and streamed.peak_rss_mb > 0
