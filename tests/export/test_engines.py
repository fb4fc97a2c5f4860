from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import spine_edge.export.engines as engines
from spine_edge.export.engines import BatchRange, BuildConfig, build_engines, plan_builds
from spine_edge.backends.onnxruntime import cpu_model_name
from spine_edge.bundle import load_manifest, sha256_file, write_manifest
from spine_edge.cli import EXIT_SETUP, main
from spine_edge.errors import BundleError, MissingDependencyError
from tests.export.conftest import SIZE, write_bundle

CPU = BuildConfig(target="onnxruntime-cpu", threads=1)
HAS_TENSORRT = engines._tensorrt_or_none() is not None


def _run(path: Path, feeds: dict[str, np.ndarray], optimise: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimise:  # the reference: the graph exactly as exported
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_cpu_build_records_verified_optimised_models(bundle: Path) -> None:
    report = build_engines(bundle, CPU)
    assert report.target == "onnxruntime-cpu" and report.ok and report.skipped == ()
    assert report.builder_version == ort.__version__ and report.device == cpu_model_name()
    # The ORT-targeted INT8 graph is used; the TensorRT-only symmetric one is not.
    assert [(m.role, m.precision, m.source) for m in report.built] == [
        ("classifier", "fp32", "classifier.fp32.onnx"),
        ("classifier", "int8", "classifier.int8.ort.onnx"),
        ("detector", "fp32", "detector.fp32.onnx"),
    ]
    manifest = load_manifest(bundle)  # verifies every sha256, the new files' included
    optimised = [e for e in manifest.models if e.format == "onnx-optimized"]
    assert len(optimised) == 3 and len(manifest.models) == 7
    for entry, built in zip(optimised, report.built):
        path = bundle / entry.file
        assert entry.file == built.file and entry.file.startswith("cpu/") and entry.file.endswith(".opt.onnx")
        assert entry.sha256 == sha256_file(path) and built.size_bytes == path.stat().st_size
        assert entry.target == "onnxruntime"
        source = manifest.find(entry.role, entry.precision, "onnx", target="onnxruntime")
        assert source is not None and entry.build is not None
        assert (entry.inputs, entry.outputs) == (source.inputs, source.outputs)
        assert entry.build.builder == "onnxruntime" and entry.build.builder_version == ort.__version__
        assert entry.build.device == cpu_model_name() and entry.build.source == source.file
        assert entry.build.threads == 1 and "graph_optimization_level=ORT_ENABLE_ALL" in entry.build.build_flags
        batch = CPU.batch_for(entry.role)
        assert (entry.build.min_batch, entry.build.opt_batch, entry.build.max_batch) == (batch.min, batch.opt, batch.max)
        assert path.stat().st_mode & 0o444 == 0o444


def test_optimised_model_gives_the_source_graphs_outputs(bundle: Path) -> None:
    build_engines(bundle, CPU)
    manifest = load_manifest(bundle)
    rng = np.random.default_rng(7)
    for entry in (e for e in manifest.models if e.format == "onnx-optimized"):
        assert entry.build is not None
        feeds = {entry.inputs[0].name: rng.integers(0, 256, size=(5, 1, SIZE, SIZE), dtype=np.uint8)}
        reference = _run(bundle / entry.build.source, feeds, optimise=False)
        prepared = _run(bundle / entry.file, feeds, optimise=True)
        assert reference.shape == (5, 1)
        assert float(reference.std()) > 1e-4  # distinct inputs give distinct outputs: the check has teeth
        np.testing.assert_allclose(prepared, reference, atol=1e-5, rtol=0)


def test_rebuild_replaces_entries_and_removes_their_old_files(bundle: Path) -> None:
    build_engines(bundle, CPU)
    first = load_manifest(bundle)
    # Pretend the detector's current entry is a stale one from an earlier build (another ORT, say).
    current = first.find("detector", "fp32", "onnx-optimized")
    assert current is not None
    stale_path = bundle / "cpu" / "detector.fp32.000000000000.opt.onnx"
    stale_path.write_bytes(b"an older optimised graph")
    stale = replace(current, file="cpu/detector.fp32.000000000000.opt.onnx", sha256=sha256_file(stale_path))
    (bundle / current.file).unlink()
    write_manifest(bundle, first.with_models(tuple(e for e in first.models if e is not current) + (stale,)))

    build_engines(bundle, CPU)
    second = load_manifest(bundle)
    keys = [(e.role, e.precision, e.format, e.target) for e in second.models]
    assert len(keys) == len(set(keys)) == 7
    assert not stale_path.exists()
    assert sorted(p.name for p in (bundle / "cpu").iterdir()) == sorted(
        Path(e.file).name for e in second.models if e.format == "onnx-optimized"
    )


def test_interrupted_build_leaves_the_old_manifest_valid(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (bundle / "manifest.json").read_text()

    def crash(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engines, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        build_engines(bundle, CPU)
    assert (bundle / "manifest.json").read_text() == before
    assert len(load_manifest(bundle).models) == 4
    assert list((bundle / "cpu").iterdir()) == []


def test_a_failing_model_keeps_the_others(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    broken = bundle / "detector.fp32.onnx"
    broken.write_bytes(b"\x08\x01not an onnx graph")
    write_manifest(bundle, manifest.with_models(tuple(
        replace(e, sha256=sha256_file(broken)) if e.file == broken.name else e for e in manifest.models
    )))
    report = build_engines(bundle, CPU)
    assert not report.ok
    assert [(f.role, f.precision) for f in report.failed] == [("detector", "fp32")]
    assert "detector.fp32.onnx: ONNX Runtime" in report.failed[0].message
    assert [m.role for m in report.built] == ["classifier", "classifier"]
    assert load_manifest(bundle).find("detector", "fp32", "onnx-optimized") is None


def test_altered_source_graph_is_refused(bundle: Path) -> None:
    path = bundle / "classifier.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"classifier\.fp32\.onnx: sha256 .* does not match"):
        build_engines(bundle, CPU)
    assert not (bundle / "cpu").exists()


def test_tensorrt_planning_follows_graph_precision_and_targets(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    jobs, skipped = plan_builds(manifest, "tensorrt", fp16_flag=True)
    assert [(j.role, j.precision, j.source.file, j.typing) for j in jobs] == [
        ("classifier", "fp32", "classifier.fp32.onnx", "graph"),
        ("classifier", "fp16", "classifier.fp32.onnx", "fp16-flag"),
        ("classifier", "int8", "classifier.int8.trt.onnx", "graph"),
        ("detector", "fp32", "detector.fp32.onnx", "graph"),
        ("detector", "fp16", "detector.fp32.onnx", "fp16-flag"),
    ]
    assert skipped == ()

    # TensorRT 11: no FP16 flag, so FP16 needs an FP16 graph, and the default says why there is none.
    jobs, skipped = plan_builds(manifest, "tensorrt", fp16_flag=False)
    assert [(j.role, j.precision) for j in jobs] == [("classifier", "fp32"), ("classifier", "int8"), ("detector", "fp32")]
    assert [(s.role, s.precision) for s in skipped] == [("classifier", "fp16"), ("detector", "fp16")]
    assert "re-export the bundle with FP16 graphs" in skipped[0].reason
    # Explicit precisions: INT8 for the detector was never exported.
    jobs, skipped = plan_builds(manifest, "tensorrt", ("int8",), fp16_flag=True)
    assert [(j.role, j.precision) for j in jobs] == [("classifier", "int8")]
    assert [(s.role, s.precision) for s in skipped] == [("detector", "int8")]
    assert "no int8 ONNX graph" in skipped[0].reason


def test_planning_skips_graphs_meant_for_the_other_target(tmp_path: Path) -> None:
    graphs = (("classifier", "fp32", "any", "c32.onnx"), ("classifier", "fp16", "any", "c16.onnx"),
              ("classifier", "int8", "tensorrt", "c8.onnx"))
    manifest = write_bundle(tmp_path / "b", graphs)
    jobs, skipped = plan_builds(manifest, "onnxruntime-cpu", ("fp16", "int8"))
    assert [(j.precision, j.source.file) for j in jobs] == [("fp16", "c16.onnx")]
    assert [s.precision for s in skipped] == ["int8"] and "meant for tensorrt only" in skipped[0].reason
    # With an FP16 graph, TensorRT builds FP16 from it (strong typing), even where the flag exists.
    jobs, _ = plan_builds(manifest, "tensorrt", fp16_flag=True)
    assert [(j.precision, j.source.file, j.typing) for j in jobs] == [
        ("fp32", "c32.onnx", "graph"), ("fp16", "c16.onnx", "graph"), ("int8", "c8.onnx", "graph")]


def test_nothing_to_build_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    write_bundle(folder, (("classifier", "int8", "tensorrt", "c8.onnx"),))
    with pytest.raises(engines.EngineBuildError, match="nothing to build for onnxruntime-cpu.*meant for tensorrt"):
        build_engines(folder, CPU)


def test_batch_range_is_validated_and_capped() -> None:
    assert BatchRange(1, 4, 8).capped(2) == BatchRange(1, 2, 2)
    assert BatchRange(1, 1, 4).capped(16) == BatchRange(1, 1, 16)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchRange(1, 8, 4)
    with pytest.raises(ValueError, match="unknown precision"):
        BuildConfig(precisions=("bf16",))  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message on a box without TensorRT")
def test_tensorrt_target_without_tensorrt_names_the_extra(bundle: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'spine-edge\[gpu\]'"):
        build_engines(bundle, BuildConfig(target="tensorrt"))


def test_engines_module_imports_neither_torch_nor_onnx() -> None:
    code = ("import sys, export.engines, spine_edge.cli.build; "
            "print(sorted(m for m in ('torch', 'onnx', 'tensorrt', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.skipif(HAS_TENSORRT, reason="auto picks TensorRT where it is installed")
def test_cli_builds_with_the_default_bundle_and_explains_the_path(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINE_EDGE_BUNDLE", str(bundle))
    result = CliRunner().invoke(main, ["build-engines", "--threads", "1", "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "TensorRT not installed: prepared ONNX Runtime CPU models" in result.output
    manifest = load_manifest(bundle)
    for entry in (e for e in manifest.models if e.format == "onnx-optimized"):
        assert entry.file in result.output
        assert entry.build is not None and entry.build.max_batch == 2 and entry.build.opt_batch <= 2
    assert "manifest updated" in result.output


def test_cli_precision_filter(bundle: Path) -> None:
    result = CliRunner().invoke(main, ["build-engines", str(bundle), "--target", "onnxruntime-cpu",
                                       "--precision", "int8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    built = [e for e in load_manifest(bundle).models if e.format == "onnx-optimized"]
    assert [(e.role, e.precision) for e in built] == [("classifier", "int8")]
    assert "skipped detector int8" in result.output


def test_cli_missing_bundle_exits_with_setup_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build-engines", str(tmp_path / "nowhere")])
    assert result.exit_code == EXIT_SETUP
    assert "no manifest.json" in result.output and "spine-edge export" in result.output


def test_cli_corrupt_bundle_exits_with_setup_code(bundle: Path) -> None:
    (bundle / "detector.fp32.onnx").write_bytes(b"replaced")
    result = CliRunner().invoke(main, ["build-engines", str(bundle), "--target", "onnxruntime-cpu"])
    assert result.exit_code == EXIT_SETUP
    assert "detector.fp32.onnx: sha256" in result.output


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message on a box without TensorRT")
def test_cli_tensorrt_requested_but_missing(bundle: Path) -> None:
    before = json.loads((bundle / "manifest.json").read_text())
    result = CliRunner().invoke(main, ["build-engines", str(bundle), "--target", "tensorrt"])
    assert result.exit_code == EXIT_SETUP
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and "'tensorrt'" in lines[0] and "spine-edge[gpu]" in lines[0]
    assert json.loads((bundle / "manifest.json").read_text()) == before


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_tensorrt_plans_deserialise_with_the_right_io(tmp_path: Path) -> None:
    import tensorrt as trt

    from spine_edge.backends.cuda import load_cuda

    folder = tmp_path / "b"
    graphs = (("classifier", "fp32", "any", "c32.onnx"), ("classifier", "fp16", "any", "c16.onnx"),
              ("classifier", "int8", "tensorrt", "c8.onnx"))
    write_bundle(folder, graphs)
    report = build_engines(folder, BuildConfig(target="tensorrt", workspace_mib=256))
    assert report.ok, report.failed
    assert [m.precision for m in report.built] == ["fp32", "fp16", "int8"]
    gpu = load_cuda().device_info(0)
    manifest = load_manifest(folder)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    for entry in (e for e in manifest.models if e.format == "tensorrt"):
        assert entry.build is not None
        assert entry.build.builder_version == trt.__version__ and entry.build.device == gpu.name
        assert entry.build.compute_capability == gpu.compute_capability
        assert "strongly-typed" in entry.build.build_flags
        engine = runtime.deserialize_cuda_engine((folder / entry.file).read_bytes())
        assert engine is not None, entry.file
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert sorted(names) == ["image", "prob"]
        assert engine.get_tensor_mode("image") == trt.TensorIOMode.INPUT
        assert engine.get_tensor_dtype("image") == trt.DataType.UINT8
        assert engine.get_tensor_dtype("prob") == trt.DataType.FLOAT
        shapes = [tuple(s) for s in engine.get_tensor_profile_shape("image", 0)]
        assert shapes == [(1, 1, SIZE, SIZE), (4, 1, SIZE, SIZE), (8, 1, SIZE, SIZE)]
    cache = folder / report.timing_cache
    assert cache.is_file() and cache.stat().st_size > 0
    # A second build reuses the persisted cache and replaces, not duplicates, the plans.
    build_engines(folder, BuildConfig(target="tensorrt", precisions=("fp32",), workspace_mib=256))
    plans = [e for e in load_manifest(folder).models if e.format == "tensorrt"]
    assert sorted(e.precision for e in plans) == ["fp16", "fp32", "int8"]
    assert len(list((folder / "trt").glob("*.plan"))) == 3


@pytest.mark.gpu
def test_tensorrt_fp16_from_fp32_graph_where_the_builder_has_the_flag(tmp_path: Path) -> None:
    import tensorrt as trt

    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip("TensorRT 11 builds FP16 only from FP16 graphs")
    folder = tmp_path / "b"
    write_bundle(folder, (("classifier", "fp32", "any", "c32.onnx"),))
    report = build_engines(folder, BuildConfig(target="tensorrt", precisions=("fp16",), workspace_mib=256))
    assert report.ok and [m.precision for m in report.built] == ["fp16"]
    entry = load_manifest(folder).find("classifier", "fp16", "tensorrt")
    assert entry is not None and entry.build is not None and "fp16-flag" in entry.build.build_flags
