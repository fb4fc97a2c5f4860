"""Latency statistics, stage bookkeeping, isolated model timing and memory readings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from spine_edge.backends.onnxruntime import OnnxRuntimeBackend
from spine_edge.benchmarks.latency import (
    ResourceMeter,
    cycle_to,
    stage_samples,
    summarize_latency,
    time_model,
)
from spine_edge.results import StageLatency
from tests.spine_edge.bundle_factory import make_bundle


def test_percentiles_of_one_to_hundred() -> None:
    stats = summarize_latency(np.arange(1, 101, dtype=float))
    # numpy's linear interpolation: rank (n - 1) * q between sorted samples.
    assert (stats.n, stats.mean, stats.min, stats.max) == (100, 50.5, 1.0, 100.0)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p95 == pytest.approx(95.05)
    assert stats.p99 == pytest.approx(99.01)


def test_percentiles_of_unsorted_samples_by_hand() -> None:
    # sorted: 2, 3, 5, 8, 40; p95 rank 0.95 * 4 = 3.8 → 8 + 0.8 * (40 - 8) = 33.6
    stats = summarize_latency([8.0, 2.0, 40.0, 5.0, 3.0])
    assert stats.p50 == 5.0
    assert stats.p95 == pytest.approx(33.6)
    assert stats.p99 == pytest.approx(8 + 0.96 * 32)
    assert stats.mean == pytest.approx(11.6)


def test_single_sample_and_bad_input() -> None:
    stats = summarize_latency([7.25])
    assert stats.p50 == stats.p95 == stats.p99 == stats.mean == 7.25
    with pytest.raises(ValueError, match="no latency samples"):
        summarize_latency([])
    with pytest.raises(ValueError, match="finite"):
        summarize_latency([1.0, math.nan])


def test_stage_samples_count_detector_stages_only_where_it_ran() -> None:
    gated = StageLatency(read=10.0, preprocess=1.0, classifier=5.0, detector=None, postprocess=0.0)
    ran = StageLatency(read=12.0, preprocess=2.0, classifier=6.0, detector=20.0, postprocess=0.5)
    samples = stage_samples([gated, ran, gated])
    assert samples["read"] == [10.0, 12.0, 10.0]
    assert samples["classifier"] == [5.0, 6.0, 5.0]
    assert samples["detector"] == [20.0]
    assert samples["postprocess"] == [0.5]


def test_cycle_to_repeats_in_order() -> None:
    assert cycle_to(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    with pytest.raises(ValueError):
        cycle_to([], 3)


def test_time_model_per_image_is_per_call_over_batch(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    canvases = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    with OnnxRuntimeBackend(bundle / "classifier.fp32.onnx", provider="cpu", threads=1) as backend:
        timing = time_model(backend, canvases, batch_size=4, runs=6, warmup=1)
    assert timing.batch_size == 4
    assert timing.per_call.n == timing.per_image.n == 6
    assert timing.per_image.p50 == pytest.approx(timing.per_call.p50 / 4)
    assert timing.per_image.max == pytest.approx(timing.per_call.max / 4)
    assert timing.images_per_second == pytest.approx(1e3 / timing.per_image.p50)


def test_resource_meter_sees_an_allocation_and_resets_between_measurements() -> None:
    with ResourceMeter(gpu=False) as big:
        block = np.ones(128 * 2**20, np.uint8)  # 128 MiB, every page touched
        block[::4096] = 2
    del block
    with ResourceMeter(gpu=False) as small:
        np.ones(2**20, np.uint8)
    assert big.resources is not None and small.resources is not None
    assert big.resources.gpu_peak_mb is None
    assert big.resources.peak_rss_mb >= 128
    if small.resources.rss_reset:  # Linux: the high-water mark restarts at the current RSS
        assert small.resources.peak_rss_mb < big.resources.peak_rss_mb - 64
    else:
        assert small.resources.peak_rss_mb >= big.resources.peak_rss_mb
