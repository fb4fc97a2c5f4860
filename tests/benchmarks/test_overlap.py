"""The overlap measurement's arithmetic: rates, the slower stage, and the ratios (no timings)."""

from __future__ import annotations

import math

import pytest

from spine_edge.benchmarks.overlap import OVERLAP_WARN, OverlapResult


def _result(decode_s: float, models_s: float, e2e_s: float, images: int = 40) -> OverlapResult:
    return OverlapResult("Test CPU, 2 cores", 4, 2, images, decode_s, models_s, e2e_s)


def test_full_overlap_reaches_the_slower_stage() -> None:
    result = _result(decode_s=4.0, models_s=2.0, e2e_s=4.0)  # decode 10/s, models 20/s
    assert (result.decode_rate, result.models_rate, result.e2e_rate) == (10.0, 20.0, 10.0)
    assert result.bottleneck == "decode" and result.bound_rate == 10.0
    assert result.ratio == pytest.approx(1.0)
    # One after the other: 1 / (1/10 + 1/20) = 6.67 images/s, two thirds of the slower stage.
    assert result.serial_rate == pytest.approx(20 / 3) and result.serial_ratio == pytest.approx(2 / 3)
    assert len(result.notes()) == 1 and "1.00 of the slower stage (decode)" in result.notes()[0]


def test_no_overlap_is_the_sum_and_is_flagged() -> None:
    result = _result(decode_s=2.0, models_s=4.0, e2e_s=6.0)
    assert result.bottleneck == "models"
    assert result.ratio == pytest.approx(result.serial_ratio) and result.ratio < OVERLAP_WARN
    notes = result.notes()
    assert len(notes) == 2 and "the pipeline waits somewhere" in notes[1]


def test_shared_cores_bound_the_pipeline_by_the_work_of_both_stages() -> None:
    # 40 images: decode 2 s of CPU on 1 core each (50 core-ms/img), models 4 s wall on 2 cores (200 core-ms/img).
    result = OverlapResult("Test CPU, 2 cores", 4, 2, 40, decode_seconds=1.0, models_seconds=4.0, e2e_seconds=5.0,
                           cores=2, decode_cpu_seconds=2.0, models_cpu_seconds=8.0, e2e_cpu_seconds=10.0)  # fmt: skip
    assert result.bound_rate == 10.0 and result.ratio == pytest.approx(0.8)  # 8 images/s of the slower 10
    assert result.cores_rate == pytest.approx(8.0)  # 2 cores / 250 core-ms per image
    assert result.bound_ratio == pytest.approx(1.0)  # the cores, not the overlap, set the pace
    notes = result.notes()
    assert len(notes) == 2 and "50 (decode) + 200 (models) core-ms per image" in notes[1]
    record = result.to_dict()
    assert record["core_ms_per_image"] == {"decode": 50.0, "models": 200.0, "end_to_end": 250.0}
    assert record["cores_images_per_second"] == 8.0 and record["e2e_over_bound"] == 1.0
    assert _result(4.0, 2.0, 5.0).cores_rate is None  # not measured: the slower stage alone bounds it


def test_record_is_plain_and_names_the_machine() -> None:
    record = _result(decode_s=4.0, models_s=2.0, e2e_s=5.0).to_dict()
    assert record["machine"] == "Test CPU, 2 cores" and record["images"] == 40
    assert record["e2e_over_slower_stage"] == 0.8 and record["serial_over_slower_stage"] == pytest.approx(0.667)
    assert record["decode_images_per_second"] == 10.0 and record["bottleneck"] == "decode"


def test_a_zero_time_gives_nan_rates_not_an_error() -> None:
    assert math.isnan(_result(0.0, 1.0, 1.0).decode_rate)
