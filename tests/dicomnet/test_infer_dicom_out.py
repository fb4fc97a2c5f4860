"""``spine-edge infer --dicom-out``: an SR and Secondary Captures next to the JSON results, per DICOM input.

The radiograph is a 280 x 240 JPEG 2000 DX with 0.5 mm pixels (so the input guard accepts it). The
tiny bundle's 64 px models make the cascade decode it at level 1 (140 x 120: twice the model input covered),
so the SCs also prove that a reduced decode still gives pictures on the source's pixel grid, with the
boxes where the SR puts them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from spine_edge.cli import main
from spine_edge.dicom_writer import DicomUIDs
from spine_edge.dicomnet.sr import read_sr_findings
from spine_edge.dicomnet.writer import HEATMAP_NAME, OVERLAY_NAME, SR_NAME
from spine_edge.imageio import read_image
from tests.service.conftest import write_bright_png
from tests.spine_edge.bundle_factory import make_bundle
from tests.spine_edge.radiograph_factory import radiograph_pixels, write_radiograph_dicom

MODEL = ["--precision", "fp32", "--backend", "onnxruntime", "--provider", "cpu"]
STUDY = "1.2.826.0.1.3680043.8.498.710"
UID = STUDY + ".1.1"
PATIENT = {"PatientID": "P-9", "PatientName": "Doe^Dana", "StudyDate": "20260103"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _radiograph(path: Path) -> Path:
    """A DX the tiny bundle calls abnormal, with a study and a patient."""
    uids = DicomUIDs(UID, STUDY, STUDY + ".1")
    return write_radiograph_dicom(path, radiograph_pixels((280, 240), abnormal=True), uids=uids, tags=PATIENT)


def _infer(folder: Path, out: Path, bundle: Path, dicom_out: Path) -> object:
    return CliRunner().invoke(
        main,
        ["-q", "infer", str(folder), "--bundle", str(bundle), *MODEL, "-o", str(out), "--dicom-out", str(dicom_out)],
    )


def test_a_dicom_input_gets_an_sr_and_scs_and_a_png_none(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _radiograph(folder / "a.dcm")
    write_bright_png(folder / "b.png")
    out, dicom_out = tmp_path / "out", tmp_path / "out" / "dicom"
    result = _infer(folder, out, bundle, dicom_out)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    records = {Path(r["source"]).name: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records["a.dcm"]["status"] == records["b.png"]["status"] == "ok"
    dicom = records["a.dcm"]
    assert dicom["decision"] is True and dicom["detections"]
    assert dicom["image_size"] == [280, 240] and dicom["decoded_size"] == [140, 120]  # decoded at level 1
    assert sorted(p.name for p in dicom_out.iterdir()) == [UID]  # the PNG has no study to file an SR under
    assert sorted(p.name for p in (dicom_out / UID).iterdir()) == sorted([SR_NAME, OVERLAY_NAME, HEATMAP_NAME])
    findings = read_sr_findings(pydicom.dcmread(dicom_out / UID / SR_NAME)).findings
    assert [list(f.box) for f in findings] == [pytest.approx(d["box"]) for d in dicom["detections"]]
    overlay = pydicom.dcmread(dicom_out / UID / OVERLAY_NAME)
    heatmap = pydicom.dcmread(dicom_out / UID / HEATMAP_NAME)
    assert (overlay.Rows, overlay.Columns) == (280, 240)  # the source's grid, not the 140 x 120 decode
    assert heatmap.Rows == 280 and heatmap.Columns > 240  # plus its colour bar
    # The box is drawn at full size where the SR puts it: its edge pixels carry the class colour.
    x1, y1, x2, _ = (round(v) for v in dicom["detections"][0]["box"])
    pixels = overlay.pixel_array
    row = pixels[min(max(y1, 0), 278) + 1]
    assert not np.array_equal(row[x1], row[x1 - 3] if x1 >= 3 else row[x2 + 3])
    # The upsampled image lies on the source's grid: the bright block (rows 0-139, columns 120-179) stays put.
    full = read_image(folder / "a.dcm").image
    for y, x in ((90, 150), (200, 50), (240, 200), (90, 60)):
        assert abs(int(pixels[y, x, 0]) - int(full[y, x])) <= 2, (y, x)


def test_a_missing_dicom_extra_fails_at_start(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _radiograph(folder / "a.dcm")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed: its import raises ImportError
    result = _infer(folder, tmp_path / "out", bundle, tmp_path / "dicom")
    assert result.exit_code == 3, result.output  # type: ignore[attr-defined]
    assert "spine-edge[dicom]" in result.output  # type: ignore[attr-defined]
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_record_whose_dicom_results_fail_is_logged_and_the_run_goes_on(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import spine_edge.infer
    from spine_edge.dicomnet.common import DicomNetError

    def broken(*args: object, **kwargs: object) -> None:
        raise DicomNetError("the source does not match the record")

    monkeypatch.setattr(spine_edge.infer, "write_dicom_results", broken)
    folder = tmp_path / "in"
    folder.mkdir()
    _radiograph(folder / "a.dcm")
    _radiograph(folder / "b.dcm")
    out = tmp_path / "out"
    result = _infer(folder, out, bundle, tmp_path / "dicom")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "DICOM results of 2 input(s) could not be written" in result.output  # type: ignore[attr-defined]
    assert caplog.text.count("no DICOM results written: the source does not match the record") == 2
