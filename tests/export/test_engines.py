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
from spine_edge.backends.onnxruntime import cpu_model_name
from spine_edge.bundle import load_manifest, sha256_file, write_manifest
from spine_edge.cli import EXIT_SETUP, main
from spine_edge.errors import BundleError, MissingDependencyError
from spine_edge.export.engines import BatchRange, BuildConfig, build_engines, plan_builds
from tests.export.conftest import SIZE, write_bundle

# openvino=False: these tests pin ONNX Runtime's own CPU build; the OpenVINO race is tested in test_backend_openvino.
CPU = BuildConfig(target="onnxruntime-cpu", threads=1, openvino=False)
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
        assert (entry.build.min_batch, entry.build.opt_batch, entry.build.max_batch) == (
            batch.min,
            batch.opt,
            batch.max,
        )
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
    write_manifest(bundle, first.with_models((*(e for e in first.models if e is not current), stale)))

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
    write_manifest(
        bundle,
        manifest.with_models(
            tuple(replace(e, sha256=sha256_file(broken)) if e.file == broken.name else e for e in manifest.models)
        ),
    )
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
    assert [(j.role, j.precision) for j in jobs] == [
        ("classifier", "fp32"),
        ("classifier", "int8"),
        ("detector", "fp32"),
    ]
    assert [(s.role, s.precision) for s in skipped] == [("classifier", "fp16"), ("detector", "fp16")]
    assert "re-export the bundle with FP16 graphs" in skipped[0].reason
    # Explicit precisions: INT8 for the detector was never exported.
    jobs, skipped = plan_builds(manifest, "tensorrt", ("int8",), fp16_flag=True)
    assert [(j.role, j.precision) for j in jobs] == [("classifier", "int8")]
    assert [(s.role, s.precision) for s in skipped] == [("detector", "int8")]
    assert "no int8 ONNX graph" in skipped[0].reason


def test_planning_skips_graphs_meant_for_the_other_target(tmp_path: Path) -> None:
    graphs = (
        ("classifier", "fp32", "any", "c32.onnx"),
        ("classifier", "fp16", "any", "c16.onnx"),
        ("classifier", "int8", "tensorrt", "c8.onnx"),
    )
    manifest = write_bundle(tmp_path / "b", graphs)
    jobs, skipped = plan_builds(manifest, "onnxruntime-cpu", ("fp16", "int8"))
    assert [(j.precision, j.source.file) for j in jobs] == [("fp16", "c16.onnx")]
    assert [s.precision for s in skipped] == ["int8"] and "meant for tensorrt only" in skipped[0].reason
    # With an FP16 graph, TensorRT builds FP16 from it (strong typing), even where the flag exists.
    jobs, _ = plan_builds(manifest, "tensorrt", fp16_flag=True)
    assert [(j.precision, j.source.file, j.typing) for j in jobs] == [
        ("fp32", "c32.onnx", "graph"),
        ("fp16", "c16.onnx", "graph"),
        ("int8", "c8.onnx", "graph"),
    ]


def test_nothing_to_build_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    write_bundle(folder, (("classifier", "int8", "tensorrt", "c8.onnx"),))
    with pytest.raises(engines.EngineBuildError, match=r"nothing to build for onnxruntime-cpu.*meant for tensorrt"):
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
    with pytest.raises(MissingDependencyError, match=r"pip install 'spine-edge\[gpu-cu12\]'"):
        build_engines(bundle, BuildConfig(target="tensorrt"))


def test_engines_module_imports_neither_torch_nor_onnx() -> None:
    code = (
        "import sys, spine_edge.export.engines, spine_edge.cli.build; "
        "print(sorted(m for m in ('torch', 'onnx', 'tensorrt', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.skipif(HAS_TENSORRT, reason="auto picks TensorRT where it is installed")
def test_cli_builds_with_the_default_bundle_and_explains_the_path(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    result = CliRunner().invoke(
        main, ["build-engines", str(bundle), "--target", "onnxruntime-cpu", "--precision", "int8", "--threads", "1"]
    )
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
    assert len(lines) == 1 and "'tensorrt'" in lines[0] and "spine-edge[gpu-cu12]" in lines[0]
    assert json.loads((bundle / "manifest.json").read_text()) == before


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_tensorrt_plans_deserialise_with_the_right_io(tmp_path: Path) -> None:
    import tensorrt as trt

    from spine_edge.backends.cuda import load_cuda

    folder = tmp_path / "b"
    graphs = (
        ("classifier", "fp32", "any", "c32.onnx"),
        ("classifier", "fp16", "any", "c16.onnx"),
        ("classifier", "int8", "tensorrt", "c8.onnx"),
    )
    write_bundle(folder, graphs)
    # These stand-in graphs carry no tensor roles, so the parity check (tested below) is off here.
    report = build_engines(folder, BuildConfig(target="tensorrt", workspace_mib=256, parity=False))
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
    build_engines(folder, BuildConfig(target="tensorrt", precisions=("fp32",), workspace_mib=256, parity=False))
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
    report = build_engines(
        folder, BuildConfig(target="tensorrt", precisions=("fp16",), workspace_mib=256, parity=False)
    )
    assert report.ok and [m.precision for m in report.built] == ["fp16"]
    entry = load_manifest(folder).find("classifier", "fp16", "tensorrt")
    assert entry is not None and entry.build is not None and "fp16-flag" in entry.build.build_flags


# ---------------------------------------------------------------------------------------------
# Caches and parity (CPU: the plan's place is taken by ONNX Runtime or a fake runner)


def test_stale_ort_tensorrt_caches_are_cleared(tmp_path: Path) -> None:
    from spine_edge.backends.onnxruntime import ORT_TENSORRT_CACHE, ort_tensorrt_cache_dir
    from tests.spine_edge.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    current = ort_tensorrt_cache_dir(bundle, manifest.models[0])
    root = bundle / ORT_TENSORRT_CACHE
    for folder in (current, root / "0123456789abcdef", root / "timing"):
        folder.mkdir(parents=True)
        (folder / "x.engine").write_bytes(b"engine")
    (root / "TensorrtExecutionProvider_TRTKernel_graph_main_123.engine").write_bytes(b"name-keyed, old layout")
    removed = engines.clear_stale_caches(bundle, manifest)
    assert sorted(p.name for p in removed) == [
        "0123456789abcdef",
        "TensorrtExecutionProvider_TRTKernel_graph_main_123.engine",
    ]
    assert sorted(p.name for p in root.iterdir()) == sorted([current.name, "timing"])
    assert engines.clear_stale_caches(tmp_path / "no-bundle-here", manifest) == ()


def test_build_clears_stale_caches(bundle: Path) -> None:
    stale = bundle / "cache" / "ort-tensorrt" / "ffffffffffffffff"
    stale.mkdir(parents=True)
    build_engines(bundle, CPU)
    assert not stale.exists()


def test_parity_set_round_trip_and_synthetic_fallback(tmp_path: Path) -> None:
    spec = engines.TensorSpec("image", ("batch", 1, 8, 8), "uint8", "image")
    synthetic = engines.load_parity_set(tmp_path, "classifier", spec)
    assert synthetic.source == "synthetic" and synthetic.canvases.shape == (engines.SYNTHETIC_CANVASES, 1, 8, 8)
    assert synthetic.canvases.dtype == np.uint8 and synthetic.canvases.std() > 10
    np.testing.assert_array_equal(synthetic.canvases, engines.load_parity_set(tmp_path, "classifier", spec).canvases)
    canvases = synthetic.canvases[:3]
    path = engines.write_parity_set(tmp_path, "classifier", canvases, {"prob": np.array([0.1, 0.2, 0.3], np.float32)})
    assert path == tmp_path / "parity" / "classifier.npz"
    stored = engines.load_parity_set(tmp_path, "classifier", spec)
    assert stored.source == "bundle" and list(stored.reference) == ["prob"]
    np.testing.assert_array_equal(stored.canvases, canvases)
    with pytest.raises(BundleError, match="do not fit input"):
        engines.load_parity_set(tmp_path, "classifier", replace(spec, shape=("batch", 1, 16, 16)))
    with pytest.raises(ValueError, match="rows for 3 canvases"):
        engines.write_parity_set(tmp_path, "detector", canvases, {"yolo_raw": np.zeros((2, 11, 4), np.float32)})
    assert engines.take_batch(canvases, 5).shape[0] == 5


def test_a_recorded_parity_set_is_verified_and_a_tampered_one_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spine_edge.export.bundle_writer import parity_set_files
    from tests.spine_edge.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    spec = manifest.find("classifier", "fp32", "onnx").inputs[0]  # type: ignore[union-attr]
    canvases = np.random.default_rng(3).integers(0, 256, (4, *spec.shape[1:]), dtype=np.uint8)  # type: ignore[call-overload]
    path = engines.write_parity_set(bundle, "classifier", canvases)
    with caplog.at_level("WARNING"):  # a bundle exported before parity sets were recorded
        assert engines.load_parity_set(bundle, "classifier", spec).source == "bundle"
    assert "not recorded in manifest.json" in caplog.text
    records = parity_set_files(bundle)
    assert [(r.role, r.file, r.size) for r in records] == [("classifier", "parity/classifier.npz", path.stat().st_size)]
    write_manifest(bundle, replace(manifest, parity_sets=records))
    recorded = load_manifest(bundle)
    stored = engines.load_parity_set(bundle, "classifier", spec)
    np.testing.assert_array_equal(stored.canvases, canvases)
    assert engines.load_parity_set(bundle, "classifier", spec, recorded).source == "bundle"

    engines.write_parity_set(bundle, "classifier", 255 - canvases)  # swapped: same size, other canvases
    for given in (None, recorded):
        with pytest.raises(BundleError) as caught:
            engines.load_parity_set(bundle, "classifier", spec, given)
        message = str(caught.value)
        assert str(path) in message and "does not match the manifest" in message and "re-export the bundle" in message
    path.unlink()
    with pytest.raises(BundleError, match="listed in the manifest but missing"):
        engines.load_parity_set(bundle, "classifier", spec)
    detector = manifest.find("detector", "fp32", "onnx").inputs[0]  # type: ignore[union-attr]
    assert engines.load_parity_set(bundle, "detector", detector).source == "synthetic"


def _built(entry: engines.ModelEntry, precision: str, low: int, high: int) -> engines.ModelEntry:
    build = engines.BuildInfo(
        builder="tensorrt",
        builder_version="10",
        device="gpu",
        source=entry.file,
        min_batch=low,
        opt_batch=low,
        max_batch=high,
    )
    return replace(entry, precision=precision, format="tensorrt", build=build)  # type: ignore[arg-type]


def test_parity_check_passes_the_same_graph_and_refuses_a_broken_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from spine_edge.backends.onnxruntime import OnnxRuntimeBackend
    from tests.spine_edge.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path)
    manifest = load_manifest(bundle)
    for role in ("classifier", "detector"):
        source = manifest.find(role, "fp32", "onnx")
        assert source is not None
        entry = _built(source, "fp16", 1, 3)
        parity = engines.load_parity_set(bundle, role, entry.inputs[0])
        reference = engines.reference_outputs(bundle, manifest, role, parity.canvases)
        with OnnxRuntimeBackend(bundle / source.file, provider="cpu") as same:
            result = engines.check_parity(same, manifest, entry, parity, reference)
        assert result.passed and result.batches == (1, 3), result.violations
        record = result.to_record()
        json.dumps(record, allow_nan=False)
        assert record["passed"] and record["canvases"] == "synthetic" and record["gates"]["max_abs_dprob"] == 0.05

    entry = _built(manifest.find("classifier", "fp32", "onnx"), "fp16", 2, 2)  # type: ignore[arg-type]
    parity = engines.load_parity_set(bundle, "classifier", entry.inputs[0])
    reference = engines.reference_outputs(bundle, manifest, "classifier", parity.canvases)

    def broken(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(feeds["image"])
        return {"prob": 1 - reference["prob"][:n], "cam": reference["cam"][:n]}

    result = engines.check_parity(SimpleNamespace(infer=broken), manifest, entry, parity, reference)
    assert not result.passed and result.batches == (2,)
    assert result.violations[0].startswith("batch 2: max |Δprob|")


@pytest.mark.gpu
def test_tensorrt_build_proves_each_plan_against_onnxruntime(tmp_path: Path) -> None:
    from tests.spine_edge.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path)
    canvases = np.random.default_rng(5).integers(0, 256, (6, 1, 64, 64), dtype=np.uint8)
    canvases[:3, :, 8:24, 8:24] = 250  # some abnormal images, some boxes
    engines.write_parity_set(bundle, "classifier", canvases)
    report = build_engines(bundle, BuildConfig(target="tensorrt", workspace_mib=256))
    assert report.ok, report.failed
    plans = [e for e in load_manifest(bundle).models if e.format == "tensorrt"]
    assert plans and {e.role for e in plans} == {"classifier", "detector"}
    for entry in plans:
        assert entry.build is not None
        parity = entry.build.parity
        assert parity["passed"] and parity["batches"] == sorted({entry.build.min_batch, entry.build.max_batch})
        assert parity["canvases"] == ("bundle" if entry.role == "classifier" else "synthetic")


def test_parity_summary_is_one_line() -> None:
    record = {
        "passed": True,
        "batches": [1, 8],
        "canvases": "bundle",
        "classifier": [{"max_abs_dprob": 0.0012, "flips": 0}, {"max_abs_dprob": 0.003, "flips": 1}],
    }
    assert engines.parity_summary(record) == "parity ok at batch 1/8 (bundle canvases), max |Δprob| 0.003, 1 flips"
    detector = {"passed": False, "batches": [1], "canvases": "synthetic", "detector": [{"ap": 0.5}]}
    assert engines.parity_summary(detector) == "parity FAILED at batch 1 (synthetic canvases), box AP 0.500 vs FP32"
    assert engines.parity_summary({}) == ""


def test_qdq_body_precision_is_reported(tmp_path: Path) -> None:
    import onnx

    from spine_edge.export.opcheck import qdq_body
    from tests.export.conftest import tiny_classifier

    int8, fp16 = tmp_path / "c8.onnx", tmp_path / "c16.onnx"
    onnx.save(tiny_classifier("int8"), str(int8))
    onnx.save(tiny_classifier("fp16"), str(fp16))
    body = qdq_body(int8)
    assert body.qdq_nodes >= 2 and body.float32_ops > 0 and body.float16_ops == 0 and body.fp32_body
    assert "quantise the FP16 graph" in body.note()
    plain = qdq_body(fp16)
    assert plain.qdq_nodes == 0 and plain.float16_ops > plain.float32_ops and plain.note() == ""
