from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from spine_edge.cascade import ARRAY_SOURCE, Cascade
from spine_edge.errors import BackendError, BundleError
from tests.spine_edge.bundle_factory import DET_CENTER, DET_GAIN, PROB_CENTER, PROB_GAIN, make_bundle
from tests.spine_edge.dicom_factory import write_test_dicom


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


BRIGHT_PROB = _sigmoid(PROB_GAIN * (1.0 - PROB_CENTER))  # one region at full brightness
BRIGHT_SCORE = _sigmoid(DET_GAIN * (1.0 - DET_CENTER))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def cascade(bundle: Path) -> Cascade:
    with Cascade.from_bundle(
        bundle, precision="fp32", backend="onnxruntime", provider="cpu", batch_size=4, guard=False
    ) as c:
        yield c


def _wide_image() -> np.ndarray:
    """128 x 256: letterboxed into 64 x 64 at scale 1/4 with 16 rows of padding above and below.

    The bright block (rows 0-63, columns 128-191) lands exactly on detector cell (row 1, column 2)
    of the 4 x 4 grid: canvas x 32-48, y 16-32. That cell's box is centred at (40, 24) with side
    16 * (0.5 + 1.0) = 24 -> canvas (28, 12, 52, 36) -> original ((28 - 0) * 4, (12 - 16) * 4 clipped to
    0, 52 * 4, (36 - 16) * 4) = (112, 0, 208, 80).
    """
    image = np.zeros((128, 256), np.uint8)
    image[0:64, 128:192] = 255
    return image


def test_positive_image_boxes_come_back_in_original_pixels(cascade: Cascade, bundle: Path) -> None:
    result = cascade.predict(_wide_image())
    assert result.ok and result.source == ARRAY_SOURCE
    assert result.probability == pytest.approx(BRIGHT_PROB, rel=1e-5)
    assert result.decision is True and result.threshold == 0.5 and result.detector_ran
    assert len(result.detections) == 1
    det = result.detections[0]
    assert (det.class_id, det.class_name) == (0, "Osteophytes")
    assert det.score == pytest.approx(BRIGHT_SCORE, rel=1e-5)
    assert det.box == pytest.approx((112.0, 0.0, 208.0, 80.0), abs=1e-3)
    assert result.image_size == (128, 256)
    assert result.bundle_id == cascade.manifest.bundle_id and result.precision == "fp32"
    assert result.backend == "onnxruntime/CPUExecutionProvider"
    latency = result.latency_ms
    assert latency.classifier > 0 and latency.detector is not None and latency.detector > 0
    assert latency.total == pytest.approx(
        latency.read + latency.preprocess + latency.classifier + latency.detector + latency.postprocess
    )
    heatmap = result.heatmap_image()
    assert heatmap is not None and heatmap.shape == (128, 256)
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 0 <= y < 64 and 128 <= x < 192  # the CAM peaks on the bright block
    record = result.to_dict()
    assert record["detections"] == [
        {"class_id": 0, "class_name": "Osteophytes", "score": round(BRIGHT_SCORE, 6), "box": [112.0, 0.0, 208.0, 80.0]}
    ]
    assert record["latency_ms"]["detector"] == round(latency.detector, 3) and record["image_size"] == [128, 256]


def test_negative_image_skips_the_detector(cascade: Cascade) -> None:
    result = cascade.predict(np.full((90, 70), 40, np.uint8))
    assert result.probability == pytest.approx(_sigmoid(PROB_GAIN * (40 / 255 - PROB_CENTER)), rel=1e-4)
    assert result.decision is False and not result.detector_ran
    assert result.detections == () and result.latency_ms.detector is None


def test_gate_decides_whether_the_detector_runs(tmp_path: Path) -> None:
    # tau above what the bright image scores: the detector, which would find the block, must not run.
    strict = make_bundle(tmp_path / "strict", threshold=0.999)
    with Cascade.from_bundle(strict, backend="onnxruntime", provider="cpu", guard=False) as gated:
        result = gated.predict(_wide_image())
    assert result.probability == pytest.approx(BRIGHT_PROB, rel=1e-5) and result.probability < 0.999
    assert result.decision is False and not result.detector_ran and result.detections == ()
    with Cascade.from_bundle(strict, backend="onnxruntime", provider="cpu", force_detector=True, guard=False) as forced:
        result = forced.predict(_wide_image())
    assert result.decision is False and result.detector_ran
    assert [d.box for d in result.detections] == [pytest.approx((112.0, 0.0, 208.0, 80.0), abs=1e-3)]


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (64 + 8 * i, 96), dtype=np.uint8)
        if i % 3 == 0:
            image[8:40, 16 + 4 * i % 48 : 48 + 4 * i % 48] = 250
        out.append(image)
    return out


def test_predict_many_matches_predict_and_keeps_order(cascade: Cascade, tmp_path: Path) -> None:
    images = _images(9)
    sources: list[object] = [*images[:4], np.zeros((5, 5, 3), np.float32), tmp_path / "missing.png", *images[4:]]
    results = list(cascade.predict_many(sources))  # type: ignore[arg-type]
    assert [r.status for r in results] == ["ok"] * 4 + ["error"] * 2 + ["ok"] * 5
    assert "2-D uint8 or uint16" in (results[4].error or "")
    assert results[5].source == str(tmp_path / "missing.png") and "does not exist" in (results[5].error or "")
    singles = [cascade.predict(image) for image in images]
    batched = results[:4] + results[6:]
    assert [r.probability for r in batched] == pytest.approx([s.probability for s in singles], rel=1e-6)
    assert [r.detections for r in batched] == [s.detections for s in singles]
    assert sum(r.decision for r in batched) == 3


def test_uint16_and_dicom_inputs(cascade: Cascade, tmp_path: Path) -> None:
    # Scale 0.4 with 13 rows of padding: rows 8-88 / columns 80-160 cover detector cells (1-2, 2-3) fully.
    pixels = np.full((96, 160), 200, np.uint16)
    pixels[8:88, 80:160] = 3800
    from_array = cascade.predict(pixels)
    assert from_array.ok and from_array.decision and from_array.detections
    path = write_test_dicom(
        tmp_path / "study" / "1.2.840.99", pixels, window=(2000, 4000), transfer_syntax="jpeg2000-lossless"
    )
    from_file = cascade.predict(path)
    assert from_file.ok and from_file.source == str(path) and from_file.image_size == (96, 160)
    assert from_file.decision and {d.class_name for d in from_file.detections} == {"Osteophytes"}
    assert len(from_file.detections) == 4
    assert all(d.box[0] < 160 and d.box[2] > 80 and d.box[1] < 88 and d.box[3] > 8 for d in from_file.detections)


def test_threads_share_one_cascade(cascade: Cascade) -> None:
    images = _images(6)
    expected = [cascade.predict(image).probability for image in images]
    got: dict[int, list[float | None]] = {}

    def work(k: int) -> None:
        got[k] = [cascade.predict(image).probability for image in images]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[k] == pytest.approx(expected, rel=1e-6) for k in range(4))


def test_heatmaps_off_and_warmup(bundle: Path) -> None:
    with Cascade.from_bundle(bundle, backend="onnxruntime", heatmaps=False, batch_size=2, guard=False) as c:
        c.warmup()
        result = c.predict(_wide_image())
    assert result.decision and result.cam is None and result.heatmap_image() is None
    with pytest.raises(BackendError, match="closed"):
        c.predict(_wide_image())


def test_non_finite_probability_is_an_error_record(tmp_path: Path) -> None:
    with Cascade.from_bundle(make_bundle(tmp_path, nan_on_black=True), backend="onnxruntime", guard=False) as c:
        black, bright = list(c.predict_many([np.zeros((64, 64), np.uint8), _wide_image()]))
    assert black.status == "error" and "non-finite probability" in (black.error or "") and not black.detector_ran
    assert bright.ok and bright.probability == pytest.approx(BRIGHT_PROB, rel=1e-5) and bright.detections


def test_missing_bundle_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Cascade.from_bundle(tmp_path)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_memory_stays_flat_over_a_long_run(cascade: Cascade) -> None:
    rng = np.random.default_rng(11)
    base = rng.integers(0, 255, (96, 80), dtype=np.uint8)

    def stream(n: int) -> Iterator[np.ndarray]:
        for i in range(n):
            yield np.roll(base, i, axis=1)

    positives = 0
    for i, result in enumerate(cascade.predict_many(stream(1000))):
        positives += bool(result.decision)
        if i == 199:
            warm = _rss_kib()
    growth_mib = (_rss_kib() - warm) / 1024
    assert positives > 0
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB over 800 images"


def test_the_device_setting_reaches_the_backends(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    from click.testing import CliRunner

    import spine_edge.cascade
    from spine_edge.cascade import CascadeConfig
    from spine_edge.cli import main

    devices: list[int] = []
    real = spine_edge.cascade.create_backend

    def spy(*args: object, device: int = 0, **kwargs: object) -> object:
        devices.append(device)
        return real(*args, device=device, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spine_edge.cascade, "create_backend", spy)
    with Cascade.from_bundle(bundle, precision="fp32", backend="onnxruntime", provider="cpu", device=2):
        pass
    assert devices == [2, 2]  # classifier and detector
    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64), 40, np.uint8))
    model = ["--precision", "fp32", "--backend", "onnxruntime", "--provider", "cpu", "--no-guard"]
    run = CliRunner().invoke(main, ["-q", "infer", str(tmp_path), "--bundle", str(bundle), *model, "--device", "1"])
    assert run.exit_code == 0, run.output
    assert devices[2:] == [1, 1]
    with pytest.raises(ValueError, match="device"):
        CascadeConfig(device=-1)
