"""The bench's decode parity step: reduced-resolution against full decode, computed and reported."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from spine_edge import j2k
from spine_edge.benchmarks.decode_parity import MIN_BOX_AP, DecodeParity, measure_decode_parity
from spine_edge.benchmarks.report import _decode_parity_table
from spine_edge.cascade import CascadeConfig
from spine_edge.fidelity import compare_classifier
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom

pytestmark = pytest.mark.skipif(not j2k.decoder_available(), reason="no libopenjp2 found for spine_edge.j2k")


def _plate(rows: int, columns: int, box: tuple[int, int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = 900 + 0.4 * xx + 0.3 * yy + 150 * np.sin(xx / 37.0) * np.cos(yy / 29.0)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 4095
    return np.clip(pixels, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> DecodeParity:
    bundle = make_bundle(tmp_path_factory.mktemp("bundle"), classifier_size=64, detector_size=320)
    folder = tmp_path_factory.mktemp("split")
    paths = [
        write_test_dicom(folder / "a.dcm", _plate(1400, 1100, (180, 330, 580, 720)), window=(2048, 4096),
                         transfer_syntax="jpeg2000-lossless"),
        write_test_dicom(folder / "b.dcm", _plate(1100, 1400, (700, 100, 1100, 500)), window=(2048, 4096),
                         transfer_syntax="jpeg2000-lossless"),
        folder / "c.png",  # PNG: no resolution levels, decoded at full size both ways
        folder / "missing.dcm",  # unreadable by both passes: left out and counted
    ]  # fmt: skip
    cv2.imwrite(str(paths[2]), (_plate(500, 400, (100, 100, 300, 300)) >> 4).astype(np.uint8))
    settings = CascadeConfig(bundle=bundle, precision="fp32", backend="onnxruntime", provider="cpu", threads=1)
    calls: list[int] = []
    result = measure_decode_parity(settings, paths, calls.append)
    assert len(calls) == 2 * len(paths) + 3  # one step per image and pass, and per readable image for the shift
    return result


def test_reduced_decode_agrees_with_the_full_decode(parity: DecodeParity) -> None:
    assert (parity.images, parity.failed, parity.long_side) == (3, 1, 320)
    assert parity.reduced_images == 2 and parity.factors == {2: 2, 1: 1}  # both JPEG 2000 files at level 1
    assert parity.full.decoded_sizes == ((1400, 1100), (1100, 1400), (500, 400))
    assert parity.reduced.decoded_sizes == ((700, 550), (550, 700), (500, 400))
    assert parity.classifier.flips == 0 and parity.classifier.max_abs_dprob < 1e-2
    assert parity.detection.ref_boxes > 0 and parity.detection.ap >= MIN_BOX_AP
    assert parity.meets_targets
    record = parity.to_dict()
    assert record["gate_flips"] == 0 and record["meets_targets"] is True and record["factors"] == {"1": 1, "2": 2}
    assert record["read_ms_full"] > 0 and record["read_ms_reduced"] > 0
    notes = parity.notes()
    assert notes[0].startswith("decode parity: 2 of 3 images decoded below full size for a 320 px long side")
    assert any("1 image(s) not ok in one of the passes" in n for n in notes) and not any("MISSED" in n for n in notes)
    # The left-out image is named with what each pass made of it, the reader's reason included.
    ((path, full, reduced),) = parity.left_out
    assert path.endswith("missing.dcm") and full == reduced == "error: file does not exist (check the path)"
    assert any(
        n.startswith("decode parity: left out ") and "missing.dcm" in n and "file does not exist" in n for n in notes
    )
    assert record["left_out"][0]["full"].startswith("error: file does not exist") and record["refusal_flips"] == 0
    assert sum(c["boxes_full"] for c in record["per_class"]) == record["boxes_full"]


def test_the_one_pixel_shift_gives_the_models_sensitivity_floor(parity: DecodeParity) -> None:
    shift_cls, shift_det = parity.shift_classifier, parity.shift_detection
    assert shift_cls is not None and shift_det is not None
    assert shift_cls.count == 3 and shift_det.ref_boxes == parity.detection.ref_boxes
    assert shift_cls.max_abs_dprob < 0.05 and shift_cls.flips == 0
    assert 0.9 < shift_det.mean_iou < 1.0  # moved a little, and mapped back to the unshifted pixels
    record = parity.to_dict()
    assert record["shift_baseline"]["box_ap"] == shift_det.ap
    assert record["within_shift_floor"] == (
        parity.classifier.max_abs_dprob <= shift_cls.max_abs_dprob and parity.detection.ap >= shift_det.ap
    )
    assert any(n.startswith("decode parity, for scale: the full decode shifted by one original pixel") for n in
               parity.notes())  # fmt: skip
    beyond = replace(parity, detection=replace(parity.detection, ap=shift_det.ap - 0.1))
    assert beyond.within_shift_floor is False and "is beyond that" in " ".join(beyond.notes())
    assert "own one-pixel sensitivity (above)" not in " ".join(beyond.notes())
    flipped = replace(parity, refusal_flips=1)  # misses the no-flip target while moving no more than the shift
    assert not flipped.meets_targets and flipped.within_shift_floor is True
    assert "the models, not the decode, set that floor" in " ".join(flipped.notes())
    unmeasured = replace(parity, shift_classifier=None, shift_detection=None)
    assert unmeasured.within_shift_floor is None and unmeasured.to_dict()["shift_baseline"] is None


def test_an_image_refused_by_one_pass_only_is_a_gate_flip(parity: DecodeParity) -> None:
    changed = replace(parity, refusal_flips=1)
    assert changed.gate_flips == parity.classifier.flips + 1 and not changed.meets_targets
    assert changed.to_dict()["gate_flips"] == changed.gate_flips


def test_outcome_words_each_status() -> None:
    from spine_edge.benchmarks.decode_parity import _outcome
    from spine_edge.guard import Refusal
    from spine_edge.results import CascadeResult

    stamp = {"threshold": 0.5, "bundle_id": "b", "precision": "fp32", "backend": "onnxruntime"}
    refused = CascadeResult(source="x", status="refused", refusal=Refusal("out_of_distribution", "unlike"), **stamp)  # type: ignore[arg-type]
    assert _outcome(refused) == "refused (out_of_distribution): unlike"
    assert _outcome(CascadeResult(source="x", status="error", error="cut", **stamp)) == "error: cut"  # type: ignore[arg-type]


def test_a_gate_flip_misses_the_targets_and_says_so(parity: DecodeParity) -> None:
    probs = parity.full.probs
    flipped = replace(parity, classifier=compare_classifier(probs, 1 - probs, parity.classifier.threshold))
    assert not flipped.meets_targets and flipped.to_dict()["meets_targets"] is False
    assert any("MISSED its targets" in n for n in flipped.notes())


def test_report_renders_the_parity_row(parity: DecodeParity) -> None:
    table = "\n".join(_decode_parity_table(SimpleNamespace(data={"decode_parity": parity.to_dict()})))  # type: ignore[arg-type]
    assert "Box AP vs full" in table and "| 2 / 3 | 320 |" in table and "| pass |" in table
    assert "Full decode shifted 1 px" in table and "flip(s), max |Δprob|" in table
    assert _decode_parity_table(SimpleNamespace(data={})) == []  # type: ignore[arg-type]


def test_shifted_images_stream_one_pixel_up_left_and_an_empty_array_for_a_missing_one() -> None:
    from spine_edge.benchmarks.decode_parity import _unshift, shifted_images
    from spine_edge.postprocess import Detections

    image = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)
    shifted, missing = list(shifted_images([image, None]))
    assert shifted.shape == image.shape and (shifted[:-1, :-1] == image[1:, 1:]).all()
    assert (shifted[-1, :-1] == image[-1, 1:]).all()  # the edge row repeated
    assert missing.size == 0
    moved = _unshift(Detections(np.array([[4, 5, 10, 12]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64)))
    assert moved.boxes.tolist() == [[5, 6, 11, 13]]
