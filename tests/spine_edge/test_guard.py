"""The input guard: header rules, image rules on generated non-radiographs, the learned-score rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from spine_edge.benchmarks.guard_eval import (
    colour_photo,
    evaluate_rules,
    rules_report,
    write_non_radiographs,
)
from spine_edge.guard import (
    REFUSAL_CODES,
    GuardConfig,
    GuardDecision,
    HeaderFacts,
    check_header,
    check_image,
    check_ood,
    measure_image,
    read_header,
)
from tests.spine_edge.dicom_factory import write_test_dicom
from tests.spine_edge.radiograph_factory import radiograph_pixels

#: Height and width of a radiograph-like test film (350 x 280 mm at 0.5 mm).
FILM = (700, 560)


def test_mr_dicom_from_pydicom_is_refused_by_modality() -> None:
    path = get_testdata_file("MR_small.dcm")
    facts = read_header(path)
    assert facts is not None and facts.modality == "MR"
    decision = check_header(facts)
    assert decision.refusal is not None and decision.refusal.code == "modality"
    assert "MR image" in decision.refusal.reason and "CR, DX" in decision.refusal.reason


@pytest.mark.parametrize(
    ("facts", "refused", "flagged"),
    [
        (HeaderFacts(), False, False),  # VinDr files: no tags at all
        (HeaderFacts(modality="DX", body_part="LSPINE"), False, False),
        (HeaderFacts(modality="CR", body_part="CHEST"), False, True),  # flagged, judged
        (HeaderFacts(modality="OT"), False, False),  # unspecific: the image rules decide
        (HeaderFacts(modality="CT"), True, False),
        (HeaderFacts(modality="US"), True, False),
        (HeaderFacts(modality="XYZ"), True, False),
        (HeaderFacts(sop_class=str(pydicom.uid.CTImageStorage)), True, False),  # no Modality, SOP class says CT
    ],
)
def test_header_rules(facts: HeaderFacts, refused: bool, flagged: bool) -> None:
    decision = check_header(facts)
    assert decision.refused is refused
    assert bool(decision.flags) is flagged
    if flagged:
        assert decision.flags[0].code == "body_part" and "CHEST" in decision.flags[0].reason


def test_header_is_read_without_pixels_and_missing_tags_are_fine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bare = write_test_dicom(tmp_path / "bare.dicom", radiograph_pixels(FILM, rng=rng))
    facts = read_header(bare)
    assert facts is not None
    assert not check_header(facts).refused
    assert read_header(tmp_path / "missing.dcm") is None
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert read_header(tmp_path / "photo.png") is None


def test_radiograph_like_images_pass_the_image_rules() -> None:
    rng = np.random.default_rng(1)
    image = radiograph_pixels(FILM, rng=rng, dtype=np.uint8)
    assert check_image(image) == GuardDecision()
    # Stored as RGB (three equal channels), with a red arrow burnt in: still a radiograph.
    colour = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    cv2.arrowedLine(colour, (20, 20), (150, 120), (0, 0, 255), 6)
    assert not check_image(image, colour).refused
    # A stitched whole-spine study (about 2.8:1) and a reduced-resolution decode of a large film pass.
    assert not check_image(radiograph_pixels((1400, 500), rng=rng, dtype=np.uint8)).refused
    assert not check_image(image, source_shape=(2800, 2240), pixel_spacing=(0.14, 0.14)).refused


def test_size_aspect_and_colour_refusals_carry_the_numbers() -> None:
    rng = np.random.default_rng(2)
    small = check_image(radiograph_pixels((100, 80), rng=rng, dtype=np.uint8)).refusal
    assert small is not None and small.code == "size" and "80 x 100 px" in small.reason
    strip = check_image(radiograph_pixels((200, 1000), rng=rng, dtype=np.uint8)).refusal
    assert strip is not None and strip.code == "aspect_ratio" and "5.0" in strip.reason
    tiny_field = check_image(radiograph_pixels(FILM, rng=rng, dtype=np.uint8), pixel_spacing=(0.05, 0.05)).refusal
    assert tiny_field is not None and tiny_field.code == "size" and "35 mm" in tiny_field.reason
    photo = colour_photo(rng)
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    refusal = check_image(gray, photo).refusal
    assert refusal is not None and refusal.code == "colour" and "%" in refusal.reason
    # The rule is measured on the colour image: the same picture already made gray is not "colour".
    assert check_image(gray).refusal is None or check_image(gray).refusal.code != "colour"  # type: ignore[union-attr]


def test_generated_non_radiographs_are_refused_by_the_rules_or_left_to_the_learned_score(tmp_path: Path) -> None:
    files = write_non_radiographs(tmp_path / "non", seed=0)
    outcomes = {o.path.name: o for o in evaluate_rules([p for paths in files.values() for p in paths])}
    assert all(o.error is None for o in outcomes.values())
    expected = {"colour_photo": "colour", "mri_dicom": "modality", "document": "document", "screenshot": "document",
                "screenshot_dark": "document", "blank": "blank", "noise": "noise"}  # fmt: skip
    for kind, code in expected.items():
        for path in files[kind]:
            refusal = outcomes[path.name].decision.refusal
            assert refusal is not None and refusal.code == code, (path.name, refusal)
            assert refusal.reason and refusal.code in REFUSAL_CODES
    # Gray natural textures and gray MRI-like JPEGs look like radiographs to simple rules; they are
    # what the in-distribution score of the classifier graph is for.
    for kind in ("gray_texture", "mri_slice"):
        assert all(not outcomes[p.name].decision.refused for p in files[kind])
    report = rules_report(list(outcomes.values()))
    assert report.total == len(outcomes) and report.by_code["colour"] == 3


def test_measures_are_reported() -> None:
    measures = measure_image(np.zeros((300, 200), np.uint8))
    record = measures.to_dict()
    assert record["height"] == 300 and record["contrast"] == 0 and record["colour_fraction"] is None


def test_ood_rule_refuses_or_flags() -> None:
    assert check_ood(0.9, 1.4) == GuardDecision()
    assert check_ood(5.0, None) == GuardDecision()  # bundle exported before the score existed
    refused = check_ood(5.0, 1.4)
    assert (
        refused.refusal is not None
        and refused.refusal.code == "out_of_distribution"
        and "score 5, limit 1.4" in refused.refusal.reason
    )
    # Three significant digits: a score just above a small limit reads as above it, not "0.1, limit 0.1".
    close = check_ood(0.131, 0.102).refusal
    assert close is not None and "score 0.131, limit 0.102" in close.reason
    flagged = check_ood(5.0, 1.4, policy="flag")
    assert not flagged.refused and flagged.flags[0].code == "out_of_distribution"
    assert check_ood(float("nan"), 1.4).refused


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_aspect"):
        GuardConfig(max_aspect=0.5)
    assert GuardDecision(flags=()).then(check_ood(5.0, 1.0)).refused


# ------------------------------------------------------------------------------ in the cascade

OOD_LIMIT = 0.5


def _bundle_with_ood(folder: Path) -> Path:
    """The tiny bundle with an ``ood_score`` output (the mean brightness of the canvas) and a threshold."""
    import dataclasses

    import onnx
    from onnx import TensorProto, helper

    from spine_edge.bundle import OodInfo, load_manifest, write_manifest
    from tests.spine_edge.bundle_factory import _entry_for, make_bundle

    make_bundle(folder, classifier_size=64, cam_grid=8)
    manifest = load_manifest(folder, verify=False)
    entry = next(e for e in manifest.models if e.role == "classifier")
    path = folder / entry.file
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("ReduceMean", ["x"], ["ood_score"], axes=[1, 2, 3], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))
    onnx.save(model, path)
    models = tuple(_entry_for("classifier", path, "onnx", None) if e is entry else e for e in manifest.models)
    ood = OodInfo(threshold=OOD_LIMIT, percentile=99.0, n_val=10)
    write_manifest(folder, dataclasses.replace(manifest, models=models,
                                               classifier=dataclasses.replace(manifest.classifier, ood=ood)))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle_with_ood(tmp_path_factory.mktemp("ood_bundle"))


def _bright_texture(rng: np.random.Generator) -> np.ndarray:
    """Passes every rule, but is brighter on average than the tiny bundle's in-distribution limit."""
    return np.clip(radiograph_pixels(FILM, rng=rng, dtype=np.uint8).astype(np.int16) + 150, 0, 255).astype(np.uint8)


def test_cascade_refuses_cheapest_first_and_records_the_score(ood_bundle: Path, tmp_path: Path) -> None:
    from spine_edge.cascade import Cascade

    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    files = write_non_radiographs(folder, seed=1)
    good, bright = folder / "good.png", folder / "bright.png"
    cv2.imwrite(str(good), radiograph_pixels(FILM, rng=rng, dtype=np.uint8))
    cv2.imwrite(str(bright), _bright_texture(rng))
    mr = Path(get_testdata_file("MR_small.dcm"))
    inputs = [good, bright, mr, files["colour_photo"][0], files["document"][0], files["noise"][0]]
    with Cascade.from_bundle(ood_bundle, precision="fp32", backend="onnxruntime", provider="cpu") as cascade:
        results = {Path(r.source).name: r for r in cascade.predict_many(inputs)}
        flagged = Cascade.from_bundle(ood_bundle, backend="onnxruntime", provider="cpu", ood="flag")
        with flagged:
            judged = flagged.predict(bright)
    assert results["good.png"].status == "ok" and results["good.png"].ood_score is not None
    assert results["good.png"].ood_score <= OOD_LIMIT
    codes = {name: r.refusal.code for name, r in results.items() if r.refusal is not None}
    assert codes == {"bright.png": "out_of_distribution", "MR_small.dcm": "modality", files["colour_photo"][0].name: "colour",
                     files["document"][0].name: "document", files["noise"][0].name: "noise"}  # fmt: skip
    # Refused before decoding: no image, no score, no latency of the model.
    assert results["MR_small.dcm"].image_size is None and results["MR_small.dcm"].ood_score is None
    record = results["bright.png"].to_dict()
    assert record["status"] == "refused" and record["probability"] is None and record["detections"] == []
    assert record["refusal"]["code"] == "out_of_distribution" and record["ood_score"] > OOD_LIMIT
    assert judged.status == "ok" and judged.probability is not None
    assert [f.code for f in judged.flags] == ["out_of_distribution"]


def test_infer_counts_refusals_apart_with_their_exit_code(ood_bundle: Path, tmp_path: Path) -> None:
    import csv

    from click.testing import CliRunner

    from spine_edge.cli import EXIT_SOME_REFUSED, main

    folder = tmp_path / "kiosk"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), radiograph_pixels(FILM, rng=np.random.default_rng(6), dtype=np.uint8))
    cv2.imwrite(str(folder / "cat.jpg"), colour_photo(np.random.default_rng(7)))
    out = tmp_path / "out"
    args = ["-q", "infer", str(folder), "--bundle", str(ood_bundle), "-o", str(out), "--backend", "onnxruntime"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_SOME_REFUSED, result.output
    assert "1 ok" in result.output and "0 failed" in result.output and "1 refused" in result.output
    with (out / "results.csv").open() as f:
        rows = {Path(r["source"]).name: r for r in csv.DictReader(f)}
    assert rows["cat.jpg"]["status"] == "refused" and rows["cat.jpg"]["refusal_code"] == "colour"
    assert rows["good.png"]["ood_score"] != "" and rows["good.png"]["refusal_code"] == ""


def test_flat_rendered_screens_are_refused_and_radiograph_borders_and_labels_are_not() -> None:
    rng = np.random.default_rng(5)
    image = radiograph_pixels(FILM, rng=rng, dtype=np.uint8)
    assert measure_image(image).flat_fraction < 0.01
    # A real film's exact-black collimation border (a third of the image) and white burnt-in text.
    film = image.copy()
    film[:, : FILM[1] // 3] = 0
    cv2.putText(film, "L  R  PA 2019", (250, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, 255, 4)
    assert measure_image(film).flat_fraction < 0.05
    assert not check_image(film).refused
    # A dark-theme window: filled panels of exact levels, light text.
    shot = np.full((800, 1280), 30, np.uint8)
    cv2.rectangle(shot, (20, 60), (1260, 780), 45, cv2.FILLED)
    cv2.putText(shot, "patient referral lumbar", (40, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 220, 1, cv2.LINE_AA)
    measured = measure_image(shot)
    assert measured.flat_fraction > 0.6
    refusal = check_image(shot).refusal
    assert refusal is not None and refusal.code == "document" and "screenshot" in refusal.reason
    assert check_image(shot, config=GuardConfig(max_flat_fraction=1.0)).refusal is None
    with pytest.raises(ValueError, match="max_flat_fraction"):
        GuardConfig(max_flat_fraction=1.5)
