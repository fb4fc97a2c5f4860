"""Settings flow once: one default per setting, one spelling per choice, one cascade constructor."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click
import pytest

from spine_edge.backends import PrecisionChoice
from spine_edge.bundle import BUNDLE_ENV, PRECISIONS, Precision
from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.cli.infer import infer
from spine_edge.config import field_default, literal_values
from spine_edge.infer import InferConfig
from tests.spine_edge.bundle_factory import make_bundle


@dataclasses.dataclass(frozen=True)
class _Example:
    required: int
    plain: int = 3
    made: tuple[str, ...] = dataclasses.field(default_factory=lambda: ("a",))


def test_field_default() -> None:
    assert field_default(_Example, "plain") == 3
    assert field_default(_Example, "made") == ("a",)
    with pytest.raises(TypeError, match="no default"):
        field_default(_Example, "required")
    with pytest.raises(TypeError, match="no field 'nope'"):
        field_default(_Example, "nope")
    with pytest.raises(TypeError, match="not a dataclass"):
        field_default(int, "real")


def test_literal_values() -> None:
    assert literal_values(Precision) == PRECISIONS == ("fp32", "fp16", "int8")
    assert literal_values(PrecisionChoice) == ("auto", "bf16", *PRECISIONS)  # bf16: OpenVINO on the FP32 graph
    with pytest.raises(TypeError, match="not a Literal"):
        literal_values(int)
    with pytest.raises(TypeError, match="non-string"):
        literal_values(typing.Literal[1, 2])


def test_infer_options_take_the_config_defaults() -> None:
    options = {p.name: p for p in infer.params if isinstance(p, click.Option)}
    # option name -> (config class, field): the CLI's --workers is the cascade's read_workers.
    fields = {
        "out": (InferConfig, "out"),
        "resume": (InferConfig, "resume"),
        "resume_any": (InferConfig, "resume_any"),
        "overlays": (InferConfig, "overlays"),
        "picture_format": (InferConfig, "picture_format"),
        "dicom_out": (InferConfig, "dicom_out"),
        "bundle": (CascadeConfig, "bundle"),
        "precision": (CascadeConfig, "precision"),
        "backend": (CascadeConfig, "backend"),
        "provider": (CascadeConfig, "provider"),
        "batch_size": (CascadeConfig, "batch_size"),
        "force_detector": (CascadeConfig, "force_detector"),
        "workers": (CascadeConfig, "read_workers"),
        "guard": (CascadeConfig, "guard"),
        "ood": (CascadeConfig, "ood"),
        "full_resolution": (CascadeConfig, "full_resolution"),
        "device": (CascadeConfig, "device"),
    }
    assert set(options) - {"help"} == set(fields)
    for name, (cls, field) in fields.items():
        assert options[name].default == field_default(cls, field), name
    assert list(options["precision"].type.choices) == list(literal_values(PrecisionChoice))


def test_the_cli_builds_the_nested_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[InferConfig] = []

    def fake_run(config: InferConfig, progress: bool) -> None:
        seen.append(config)
        raise KeyboardInterrupt  # stop the command right after it built the config

    monkeypatch.setattr("spine_edge.cli.infer.run_folder", fake_run)
    args = [str(tmp_path), "--workers", "3", "--no-overlays", "--precision", "int8", "--bundle", str(tmp_path / "b")]
    with pytest.raises(SystemExit):
        infer.main(args, standalone_mode=False)
    cascade = CascadeConfig(bundle=tmp_path / "b", precision="int8", read_workers=3)
    assert seen == [InferConfig(tmp_path, overlays=False, cascade=cascade)]


def test_the_bundle_default_is_resolved_in_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_ENV, raising=False)
    assert CascadeConfig().bundle is None and CascadeConfig().bundle_dir == Path("runs/bundle")
    monkeypatch.setenv(BUNDLE_ENV, str(tmp_path))
    assert CascadeConfig().bundle_dir == tmp_path == InferConfig(Path("x")).cascade.bundle_dir
    assert CascadeConfig(bundle=Path("elsewhere")).bundle_dir == Path("elsewhere")


def test_from_bundle_is_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    monkeypatch.setenv(BUNDLE_ENV, str(bundle))
    with Cascade.from_bundle(backend="onnxruntime", batch_size=2) as cascade:
        assert cascade.config == CascadeConfig(backend="onnxruntime", batch_size=2)
    with Cascade.from_bundle(str(bundle), read_workers=1) as cascade:
        assert cascade.config == CascadeConfig(bundle=bundle, read_workers=1)
    with pytest.raises(TypeError, match="workers"):
        Cascade.from_bundle(bundle, workers=2)  # the old InferConfig spelling is not a cascade setting
