from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spine_edge.bundle import (
    BUNDLE_ENV,
    DIGEST_NAME,
    SCHEMA_VERSION,
    BuildInfo,
    ClassifierInfo,
    DetectorInfo,
    EnsembleMember,
    Manifest,
    ModelEntry,
    ParitySetFile,
    Provenance,
    TensorSpec,
    default_bundle_path,
    load_manifest,
    manifest_from_dict,
    parity_file,
    sha256_file,
    verify_parity_set,
    write_manifest,
)
from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import BundleError
from tests.spine_edge.bundle_factory import make_bundle


def _manifest(folder: Path) -> Manifest:
    model = folder / "classifier.fp32.onnx"
    model.write_bytes(b"not really onnx, but hashed")
    entry = ModelEntry(
        role="classifier",
        precision="fp32",
        format="onnx",
        file=model.name,
        sha256=sha256_file(model),
        inputs=(TensorSpec("image", ("batch", 1, 64, 64), "uint8"),),
        outputs=(TensorSpec("prob", ("batch",), "float32"),),
        build=BuildInfo(
            builder="onnxruntime", builder_version="1.0", device="cpu", source="x.onnx", build_flags=("a",)
        ),
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id="abc123",
        created="2026-11-27T00:00:00Z",
        class_names=CLASS_NAMES,
        classifier=ClassifierInfo(
            input_size=64,
            members=(EnsembleMember("resnet18", "resnet18", 1.0),),
            tta_views=("identity",),
            threshold=0.5,
            cam_shape=(2, 2),
        ),
        detector=DetectorInfo(input_size=64, class_names=CLASS_NAMES, conf_threshold=0.25, iou_threshold=0.65),
        models=(entry,),
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    assert load_manifest(tmp_path) == manifest
    assert manifest.find("classifier", "fp32", "onnx") is not None
    assert manifest.find("detector", "fp32", "onnx") is None
    assert manifest.precisions("classifier") == ("fp32",)


def test_altered_model_file_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "classifier.fp32.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"sha256 .* does not match"):
        load_manifest(tmp_path)


def _rewrite(folder: Path, text: str | bytes) -> None:
    """Replace manifest.json as a hand edit would, dropping the digest (a bundle from before digests)."""
    path = folder / "manifest.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    (folder / DIGEST_NAME).unlink(missing_ok=True)


def test_missing_model_and_wrong_schema_are_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    _rewrite(tmp_path, json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99"):
        load_manifest(tmp_path)
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_manifest(tmp_path / "nowhere")


def test_default_bundle_path_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_ENV, raising=False)
    assert default_bundle_path() == Path("runs/bundle")
    monkeypatch.setenv(BUNDLE_ENV, "/opt/kiosk/bundle")
    assert default_bundle_path() == Path("/opt/kiosk/bundle")


@pytest.mark.parametrize(("field", "value"), [("precision", "fp8"), ("format", "coreml"), ("role", "segmenter")])
def test_a_value_outside_the_schema_literals_is_refused(tmp_path: Path, field: str, value: str) -> None:
    data = _manifest(tmp_path).to_dict()
    data["models"][0][field] = value
    with pytest.raises(BundleError, match=f"{value!r} is not one of"):
        manifest_from_dict(data)


def test_provenance_is_the_typed_view_of_source(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert manifest.provenance == Provenance(checkpoints=None)
    recorded = dataclasses.replace(manifest, source={"checkpoints": "/work/ckpt", "versions": {"torch": "2.14"}})
    assert recorded.provenance.checkpoints == Path("/work/ckpt")
    write_manifest(tmp_path, recorded)
    assert load_manifest(tmp_path).source["versions"] == {"torch": "2.14"}  # the rest stays recorded data


def test_manifest_digest_is_written_and_an_edited_manifest_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    digest = (tmp_path / DIGEST_NAME).read_text()
    assert digest.endswith("  manifest.json\n") and digest.split()[0] == sha256_file(tmp_path / "manifest.json")
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text().replace('"threshold": 0.5', '"threshold": 0.05'))
    with pytest.raises(BundleError, match=r"does not match manifest\.sha256 .* changed after spine-edge wrote it"):
        load_manifest(tmp_path)
    (tmp_path / DIGEST_NAME).unlink()  # an older bundle without a digest: fields are still validated
    assert load_manifest(tmp_path).classifier.threshold == 0.05


def _set(data: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[keys[-1]] = value


@pytest.mark.parametrize(
    ("dotted", "value", "phrase"),
    [
        ("classifier.threshold", math.nan, "classifier.threshold is nan, expected a finite number in [0, 1]"),
        ("classifier.threshold", 1.5, "classifier.threshold is 1.5"),
        ("classifier.threshold", "0.5", "classifier.threshold is '0.5'"),
        ("detector.conf_threshold", -1, "detector.conf_threshold is -1, expected a finite number in (0, 1]"),
        ("detector.conf_threshold", 0, "detector.conf_threshold is 0"),
        ("detector.iou_threshold", 1.01, "detector.iou_threshold is 1.01"),
        ("detector.max_det", 100000, "detector.max_det is 100000, expected an integer from 1 to 1000"),
        ("detector.max_det", True, "detector.max_det is True"),
        ("detector.input_size", 0, "detector.input_size is 0"),
        ("classifier.input_size", 10**6, "classifier.input_size is 1000000"),
        ("classifier.cam_shape", [2], "classifier.cam_shape is [2]"),
        ("classifier.members", [], "classifier.members is [], expected a list of at least 1"),
        ("classifier.members.0.weight", math.inf, "classifier.members[0].weight is inf"),
        ("models.0.file", "../x.onnx", "models[0].file is '../x.onnx': a model file must be a path inside the bundle"),
        ("models.0.file", "/etc/passwd", "models[0].file is '/etc/passwd'"),
        ("models.0.file", "C:/models/x.onnx", "models[0].file is 'C:/models/x.onnx'"),
        ("models.0.file", "sub/../../x.onnx", "models[0].file is 'sub/../../x.onnx'"),
        ("models.0.sha256", "abc", "models[0].sha256 is 'abc', expected 64 lowercase hex digits"),
        ("models.0.inputs.0.shape", [1, -3], "models[0].inputs[0].shape is [1, -3]"),
        ("models.0.build.source", "../elsewhere.onnx", "models[0].build.source is '../elsewhere.onnx'"),
        ("models.0.build.min_batch", 8, "expected min <= opt <= max"),
        ("detector.surprise", 1, "detector has unknown field(s) ['surprise']"),
        ("bundle_id", "", "bundle_id is '', expected a non-empty string"),
        ("calibration", [], "calibration is list [], expected a JSON object"),
        ("parity_sets.0.sha256", "abc", "parity_sets[0].sha256 is 'abc', expected 64 lowercase hex digits"),
        ("parity_sets.0.file", "../p.npz", "parity_sets[0].file is '../p.npz'"),
        ("parity_sets.0.role", "segmenter", "parity_sets[0].role"),
        ("parity_sets.0.size", -1, "parity_sets[0].size is -1"),
    ],
)
def test_every_manifest_field_is_validated_and_named(tmp_path: Path, dotted: str, value: object, phrase: str) -> None:
    parity = ParitySetFile("classifier", parity_file("classifier"), "0" * 64, 10)
    data = json.loads(json.dumps(dataclasses.replace(_manifest(tmp_path), parity_sets=(parity,)).to_dict()))
    _set(data, dotted, value)
    _rewrite(tmp_path, json.dumps(data))
    with pytest.raises(BundleError) as caught:
        load_manifest(tmp_path)
    assert phrase in str(caught.value) and "re-export the bundle" in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"[]", "the top level is list [], expected a JSON object"),
        (b"\xff\xfe{not utf-8", "not UTF-8 text"),
        (b'{"schema_version": 2, ', "cannot be parsed as JSON"),
        (b'"just a string"', "the top level is str"),
    ],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path: Path, content: bytes, phrase: str) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    _rewrite(tmp_path, content)
    with pytest.raises(BundleError, match=re.escape(phrase)):
        load_manifest(tmp_path)


def test_a_model_file_linked_to_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = _manifest(bundle)
    outside = tmp_path / "outside.onnx"
    (bundle / "classifier.fp32.onnx").rename(outside)
    (bundle / "classifier.fp32.onnx").symlink_to(outside)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="leads outside the bundle folder"):
        load_manifest(bundle, verify=False)


def test_nan_is_never_written_into_a_manifest(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, dataclasses.replace(manifest, accuracy={"delta": math.nan}))
    text = (tmp_path / "manifest.json").read_text()
    assert "NaN" not in text and json.loads(text)["accuracy"] == {"delta": None}


def test_cli_gives_exit_3_naming_the_field(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    data["detector"]["conf_threshold"] = -1
    _rewrite(bundle, json.dumps(data))
    folder = tmp_path / "in"
    folder.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from spine_edge.cli import main; main()",
            "-q",
            "infer",
            str(folder),
            "--bundle",
            str(bundle),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr
    assert "detector.conf_threshold is -1" in run.stderr and "Traceback" not in run.stderr


def _with_parity_set(folder: Path) -> tuple[Manifest, Path]:
    path = folder / parity_file("classifier")
    path.parent.mkdir()
    path.write_bytes(b"stored canvases")
    record = ParitySetFile("classifier", parity_file("classifier"), sha256_file(path), path.stat().st_size)
    manifest = dataclasses.replace(_manifest(folder), parity_sets=(record,))
    write_manifest(folder, manifest)
    return manifest, path


def test_the_parity_set_round_trips_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    manifest, path = _with_parity_set(tmp_path)
    assert load_manifest(tmp_path) == manifest
    verify_parity_set(tmp_path, manifest, "classifier")
    path.write_bytes(b"stored canvasez")  # same size, other bytes: the sha256 tells
    with pytest.raises(BundleError) as caught:
        verify_parity_set(tmp_path, manifest, "classifier")
    message = str(caught.value)
    assert str(path) in message and "does not match the manifest" in message and "re-export the bundle" in message
    path.write_bytes(b"swapped for a longer file")
    with pytest.raises(BundleError, match=r"classifier\.npz: 25 bytes does not match the manifest \(15 bytes\)"):
        verify_parity_set(tmp_path, manifest, "classifier")
    path.unlink()
    with pytest.raises(BundleError, match="listed in the manifest but missing"):
        verify_parity_set(tmp_path, manifest, "classifier")


def test_a_parity_set_the_manifest_does_not_record_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, _ = _with_parity_set(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["parity_sets"]  # a manifest written before parity sets were recorded
    _rewrite(tmp_path, json.dumps(data))
    old = load_manifest(tmp_path)
    assert old.parity_sets == () and old == dataclasses.replace(manifest, parity_sets=())
    with caplog.at_level("WARNING"):
        verify_parity_set(tmp_path, old, "classifier")
    assert "not recorded in manifest.json" in caplog.text and "unverified" in caplog.text
