"""bench's guard phase report: refused test radiographs are counted over every test image and named."""

from __future__ import annotations

import json

from spine_edge.benchmarks.guard_eval import GuardBench
from spine_edge.explain import PointingScore
from spine_edge.guard import GuardReport


def test_refused_test_images_are_reported_with_code_and_reason() -> None:
    refused = (
        ("demo/vindr/test_images/a.dicom", "out_of_distribution", "unlike the spine radiographs (score 1.6)"),
        ("demo/vindr/test_images/b.dicom", "document", "looks like a screenshot"),
    )
    bench = GuardBench(
        reference="fp32",
        test_split=GuardReport(100, 2, {"document": 1, "out_of_distribution": 1}),
        non_radiographs={"screenshot_dark": GuardReport(2, 2, {"document": 2})},
        disagreements={"fp16": 0},
        pointing=PointingScore("cam", 4, 1, 0.25),
        seconds=1.0,
        test_refusals=refused,
        test_errors=1,
    )
    record = json.loads(json.dumps(bench.to_dict()))["test_split_false_refusals"]
    assert record["total"] == 100 and record["refused"] == 2 and record["errors"] == 1
    assert record["refused_images"][0] == {"source": refused[0][0], "code": refused[0][1], "reason": refused[0][2]}
    notes = bench.notes()
    assert notes[0].startswith("guard (fp32): 2/100 test radiographs refused (2.0%")
    assert "1 test image(s) could not be read" in notes[0]
    assert "a.dicom: out_of_distribution (unlike the spine radiographs (score 1.6))" in notes[1]
    assert "None" not in " ".join(notes)


def test_guard_decisions_that_change_with_the_precision_are_a_gate() -> None:
    bench = GuardBench(
        reference="fp32",
        test_split=GuardReport(100, 0, {}),
        non_radiographs={"photo": GuardReport(22, 22, {"colour_photograph": 22})},
        disagreements={"int8": 7, "fp16": 1, "bf16": 2, "int8-ort": 6},
        pointing=PointingScore("cam", 4, 1, 0.25),
        seconds=1.0,
        compared=122,
    )
    gates = {g.precision: g for g in bench.gates()}
    # INT8 may change floor(5 % of 122) = 6 decisions, FP16 and BF16 floor(1 %) -> at least one.
    assert (gates["int8"].limit, gates["int8"].passed) == (6.0, False)
    assert gates["int8-ort"].passed is True and gates["fp16"].passed is True and gates["bf16"].passed is False
    assert (
        gates["int8"].message()
        == "int8 guard decisions vs fp32 (122 inputs): 7 inputs (limit ≤ 6 inputs) FAILED by 1 inputs"
    )
    assert GuardBench(**{**bench.__dict__, "compared": 0}).gates() == []  # nothing compared: no gate
