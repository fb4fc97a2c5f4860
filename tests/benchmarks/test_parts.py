"""The benchmark's pieces on their own: CLI defaults from the dataclasses, the environment record, synthetic files."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.uid
import pytest
from click.testing import CliRunner

from spine_edge.benchmarks.config import BenchConfig
from spine_edge.benchmarks.environment import environment_record
from spine_edge.benchmarks.synthetic import REAL_SIZES, write_synthetic_radiographs
from spine_edge.cascade import CascadeConfig
from spine_edge.cli import main
from spine_edge.cli.bench import bench
from spine_edge.imageio import read_image


def test_cli_options_default_to_the_config_dataclasses() -> None:
    with bench.make_context("bench", []) as ctx:
        params = ctx.params
    defaults = BenchConfig()
    for name in (
        "data",
        "precisions",
        "batch_sizes",
        "runs",
        "warmup",
        "max_images",
        "baseline",
        "checkpoints",
        "budget_ms",
        "stage_budgets",
        "save_predictions",
    ):
        assert params[name] == getattr(defaults, name), name
    for name in ("bundle", "backend", "provider", "threads"):
        assert params[name] == getattr(defaults.cascade, name), name
    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "[default: 1,4,8]" in help_text and "[default: 20;" in help_text and "(dynamic)" not in help_text


def test_environment_record_names_the_threads_and_versions(tmp_path: Path) -> None:
    config = BenchConfig(CascadeConfig(tmp_path, provider="cpu", threads=3))
    record = environment_record(config, "onnxruntime", gpu=False)
    assert record["backend"] == "onnxruntime" and record["provider_requested"] == "cpu"
    assert record["threads"] == 3 and record["gpu"] is None
    assert {"python", "numpy", "spine-edge"} <= set(record["versions"])


def test_synthetic_radiographs_are_12_bit_jpeg2000_at_real_sizes(tmp_path: Path) -> None:
    calls = []
    [path] = write_synthetic_radiographs(tmp_path / "synth", 1, progress=calls.append)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert (header.Rows, header.Columns) == REAL_SIZES[0] and header.BitsStored == 12
    assert header.PhotometricInterpretation == "MONOCHROME2" and [float(v) for v in header.PixelSpacing] == [0.14] * 2
    image = read_image(path)
    assert image.image.shape == REAL_SIZES[0] and image.image.std() > 1 and calls == [1]


@pytest.mark.parametrize(
    "bad", [{"runs": 0}, {"batch_sizes": ()}, {"precisions": ("fp8",)}, {"stage_budgets": (("decode", 1.0),)}]
)
def test_bench_config_refuses_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**bad)  # type: ignore[arg-type]
