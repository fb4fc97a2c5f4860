from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from spine_edge.bundle import (
    BUNDLE_ENV,
    SCHEMA_VERSION,
    BuildInfo,
    ClassifierInfo,
    DetectorInfo,
    EnsembleMember,
    Manifest,
    ModelEntry,
    Provenance,
    TensorSpec,
    default_bundle_path,
    load_manifest,
    manifest_from_dict,
    sha256_file,
    write_manifest,
)
from spine_edge.constants import CLASS_NAMES
from spine_edge.errors import BundleError


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


def test_missing_model_and_wrong_schema_are_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99"):
        load_manifest(tmp_path)
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_manifest(tmp_path / "nowhere")


def test_default_bundle_path_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_ENV, raising=False)
    assert default_bundle_path() == Path("runs/bundle")
    monkeypatch.setenv(BUNDLE_ENV, "/opt/kiosk/bundle")
    assert default_bundle_path() == Path("/opt/kiosk/bundle")


@pytest.mark.parametrize(("field", "value"), [("precision", "fp8"), ("format", "openvino"), ("role", "segmenter")])
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
