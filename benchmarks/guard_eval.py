"""How the input guard decides: false refusals on radiographs, refusals on generated non-radiographs.

:func:`write_non_radiographs` writes a folder of files a kiosk must refuse, generated (no downloads,
no licences), each kind drawn to look like the real thing at the level the guard's measures see:

* ``colour_photo``: a JPEG "photograph": a smooth coloured background (sky, grass, a wall) with a
  lit, textured coloured subject, like the cat and flower pictures users drop on the kiosk;
* ``gray_texture``: a gray natural-image-like texture (1/f spectrum, as photographs of bark, sand or
  fur have), PNG, in the radiographs' size range;
* ``mri_slice``: an axial brain-MRI-like slice (dark background, a bright skull ring, textured
  parenchyma, dark ventricles), saved as gray JPEG as users export them, and as an MR DICOM;
* ``document`` and ``screenshot``: a typed letter and a light application window, PNG;
  ``screenshot_dark``: a dark-mode window;
* ``blank`` (black, gray, near-constant) and ``noise`` (uniform, Gaussian) images.

:func:`evaluate_rules` runs the torch-free header and image rules on files, as the cascade does
before the model. :func:`evaluate_guard` is ``bench``'s guard phase: the guarded cascade of each
precision over the labelled test split (every refusal there is a false refusal) and over the
generated set, the decisions compared between precisions, and the CAM pointing game on the
abnormal test images. ``bench``'s accuracy and latency phases run without the guard (rules off, the
learned score only flagging), so they measure the models on every labelled image, and this phase
counts the false refusals over every test image, each named with its code and reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom.uid

from spine_edge.benchmarks.accuracy import TruthSet
from spine_edge.benchmarks.config import label_precision
from spine_edge.benchmarks.results import GateResult
from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.dicom_writer import build_radiograph_dataset, write_dicom
from spine_edge.errors import ImageReadError
from spine_edge.explain import Explanation, PointingScore, cam_cells, pointing_game
from spine_edge.guard import GuardConfig, GuardDecision, GuardReport, check_header, check_image, read_header
from spine_edge.imageio import read_image
from spine_edge.metrics import ACCURACY_GATES
from spine_edge.results import CascadeResult

#: Kinds :func:`write_non_radiographs` writes, in order.
NON_RADIOGRAPH_KINDS = (
    "colour_photo", "gray_texture", "mri_slice", "mri_dicom", "document", "screenshot", "screenshot_dark",
    "blank", "noise",
)  # fmt: skip


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, beta: float = 2.0) -> np.ndarray:
    """A random field with a 1/f^(beta/2) amplitude spectrum, scaled to [0, 1] (natural-image statistics)."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(h, w))
    field -= field.min()
    return field / max(float(field.max()), 1e-12)


def colour_photo(rng: np.random.Generator, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A BGR uint8 "photograph": coloured background and a lit, furry, coloured subject."""
    h, w = shape
    background = np.stack([_smooth_field(shape, rng, 3.0) for _ in range(3)], axis=2)
    hue = rng.uniform(0, 180)
    base = np.array(cv2.cvtColor(np.array([[[hue, 140, 200]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0], np.float64) / 255
    image = 0.35 * background + 0.65 * base
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.2, 0.35) * w
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    fur = _smooth_field(shape, rng, 1.2)
    subject = (
        np.array(cv2.cvtColor(np.array([[[(hue + 90) % 180, 180, 230]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]) / 255
    )
    light = np.clip(1.1 - 0.6 * (yy - cy + ry) / (2 * ry), 0.4, 1.1)[..., None]
    image[body] = (subject * light * (0.6 + 0.4 * fur[..., None]))[body]
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def gray_texture(rng: np.random.Generator, shape: tuple[int, int] = (900, 700)) -> np.ndarray:
    """A uint8 gray texture with natural-image (1/f) statistics."""
    return (255 * _smooth_field(shape, rng, 2.0)).astype(np.uint8)


def mri_slice(rng: np.random.Generator, side: int = 512) -> np.ndarray:
    """A uint8 axial brain-MRI-like slice."""
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    r = np.sqrt((yy / 0.42) ** 2 + (xx / 0.34) ** 2)
    texture = _smooth_field((side, side), rng, 1.6)
    image = np.zeros((side, side))
    image[r <= 1.0] = 0.85  # scalp and skull marrow: bright on T1
    brain = r <= 0.9
    image[brain] = 0.35 + 0.35 * texture[brain]
    ventricles = ((yy / 0.12) ** 2 + ((np.abs(xx) - 0.05) / 0.04) ** 2) <= 1
    image[ventricles] = 0.1
    image += rng.normal(0, 0.02, image.shape)
    return (255 * np.clip(image, 0, 1)).astype(np.uint8)


def _text_lines(canvas: np.ndarray, rng: np.random.Generator, left: int, top: int, right: int, bottom: int,
                colour: int, scale: float = 0.5) -> None:  # fmt: skip
    """Lines of words between ``left`` and ``bottom`` (clipped at ``right`` by the canvas, as wrapped text is)."""
    words = ("patient", "referral", "lumbar", "pain", "history", "the", "and", "of", "report", "clinic", "date")
    y = top
    while y < bottom:
        line = " ".join(rng.choice(words, size=int(rng.integers(4, 10))))
        cv2.putText(canvas, line, (left, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        y += int(28 * scale / 0.5)
        if rng.random() < 0.15:  # paragraph breaks
            y += 20


def document(rng: np.random.Generator, shape: tuple[int, int] = (1100, 850)) -> np.ndarray:
    """A uint8 typed letter on white paper (as scanned)."""
    page = np.full(shape, 250, np.uint8)
    _text_lines(page, rng, 70, 120, shape[1] - 70, shape[0] - 100, colour=20)
    return page


def screenshot(rng: np.random.Generator, dark: bool = False, shape: tuple[int, int] = (800, 1280)) -> np.ndarray:
    """A uint8 gray screenshot of an application window (light or dark mode)."""
    back, panel, bar, ink = (30, 45, 60, 220) if dark else (245, 255, 210, 30)
    shot = np.full(shape, back, np.uint8)
    cv2.rectangle(shot, (0, 0), (shape[1], 40), bar, cv2.FILLED)
    cv2.rectangle(shot, (20, 60), (300, shape[0] - 20), panel, cv2.FILLED)
    cv2.rectangle(shot, (320, 60), (shape[1] - 20, shape[0] - 20), panel, cv2.FILLED)
    _text_lines(shot, rng, 30, 90, 290, shape[0] - 40, colour=ink)
    _text_lines(shot, rng, 340, 100, shape[1] - 40, shape[0] - 60, colour=ink, scale=0.6)
    for i in range(4):
        cv2.rectangle(shot, (340 + 150 * i, shape[0] - 70), (460 + 150 * i, shape[0] - 40), bar, cv2.FILLED)
    return shot


def write_non_radiographs(folder: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    """Write the non-radiograph set, a few files per kind.

    Args:
        folder: Where to write (created).
        seed: Random seed: the same seed writes the same files.

    Returns:
        Paths by kind (:data:`NON_RADIOGRAPH_KINDS`).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {kind: [] for kind in NON_RADIOGRAPH_KINDS}

    def save(kind: str, name: str, image: np.ndarray, params: Sequence[int] = ()) -> None:
        path = out / f"{kind}_{name}"
        if not cv2.imwrite(str(path), image, list(params)):
            raise OSError(f"could not write {path}")
        files[kind].append(path)

    for i in range(3):
        save("colour_photo", f"{i}.jpg", colour_photo(rng), (cv2.IMWRITE_JPEG_QUALITY, 90))
        save("gray_texture", f"{i}.png", gray_texture(rng))
        save("mri_slice", f"{i}.jpg", mri_slice(rng), (cv2.IMWRITE_JPEG_QUALITY, 92))
    for i in range(2):
        mr = build_radiograph_dataset(
            mri_slice(rng).astype(np.uint16) * 16, sop_class=str(pydicom.uid.MRImageStorage), tags={"Modality": "MR"}
        )
        files["mri_dicom"].append(write_dicom(out / f"mri_dicom_{i}.dcm", mr))
        save("document", f"{i}.png", document(rng))
        save("screenshot", f"{i}.png", screenshot(rng))
        save("screenshot_dark", f"{i}.png", screenshot(rng, dark=True))
    save("blank", "black.png", np.zeros((1024, 800), np.uint8))
    save("blank", "gray.png", np.full((1024, 800), 128, np.uint8))
    save("blank", "flat_noise.png", np.clip(rng.normal(128, 1.0, (1024, 800)), 0, 255).astype(np.uint8))
    save("noise", "uniform.png", rng.integers(0, 256, (1024, 800), dtype=np.uint8))
    save("noise", "gaussian.png", np.clip(rng.normal(128, 40, (1024, 800)), 0, 255).astype(np.uint8))
    return files


@dataclass(frozen=True)
class RuleOutcome:
    """The header and image rules' decision on one file.

    Attributes:
        path: The file.
        decision: The combined decision (header first).
        error: The reader's reason when the file could not be read (no decision then).
    """

    path: Path
    decision: GuardDecision
    error: str | None = None


def evaluate_rules(paths: Sequence[Path], config: GuardConfig | None = None) -> list[RuleOutcome]:
    """Run the header rules, then (unless they refused) read and run the image rules, per file."""
    outcomes = []
    for path in paths:
        header = check_header(read_header(path))
        if header.refused:
            outcomes.append(RuleOutcome(path, header))
            continue
        try:
            radiograph = read_image(path)
        except ImageReadError as exc:  # an unreadable file is the reader's error, not a guard decision
            outcomes.append(RuleOutcome(path, header, error=str(exc)))
            continue
        image = check_image(
            radiograph.image, radiograph.colour, radiograph.source_shape, radiograph.pixel_spacing, config
        )
        outcomes.append(RuleOutcome(path, header.then(image)))
    return outcomes


def rules_report(outcomes: Sequence[RuleOutcome]) -> GuardReport:
    """Refusal counts of the files that could be read."""
    return GuardReport.of([o.decision for o in outcomes if o.error is None])


@dataclass(frozen=True)
class GuardBench:
    """``bench``'s guard phase: what the cascade refused, per precision, and the CAM pointing game.

    Attributes:
        reference: The precision whose decisions are the reference (``fp32``).
        test_split: Refusals on the labelled test split (false refusals: they are all radiographs), over
            every test image the reference could read.
        test_refusals: ``(source, code, reason)`` of each refused test image.
        test_errors: Test images the reference could not read (not in ``test_split``).
        non_radiographs: Refusals per kind of generated non-radiograph.
        disagreements: Per other precision, inputs (test split and non-radiographs) whose guard
            decision (refused or not) differs from the reference's.
        compared: Inputs whose decisions were compared (test split and non-radiographs).
        pointing: CAM pointing game of the reference on the abnormal test images with boxes.
        seconds: Wall time of the phase.
    """

    reference: str
    test_split: GuardReport
    non_radiographs: dict[str, GuardReport]
    disagreements: dict[str, int]
    pointing: PointingScore
    seconds: float
    test_refusals: tuple[tuple[str, str, str], ...] = ()
    test_errors: int = 0
    compared: int = 0

    def gates(self) -> list[GateResult]:
        """One gate per other precision: its guard may decide differently from the reference's on at most
        as many inputs as its accuracy gate lets gate decisions flip (``AccuracyGate.allowed_flips``).

        A lower precision whose in-distribution score drifts refuses radiographs FP32 accepts (or lets
        through what FP32 refuses): the radiographer then sees a different product, whatever its AUROC.
        """
        out = []
        for label, changed in self.disagreements.items():
            gate = ACCURACY_GATES.get(label_precision(label))
            if gate is None or not self.compared:
                continue
            limit = gate.allowed_flips(self.compared)
            name = f"{label} guard decisions vs {self.reference} ({self.compared} inputs)"
            out.append(GateResult(name, label, float(changed), float(limit), "inputs", changed <= limit))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (goes into the report's ``data["guard"]``)."""

        def counts(r: GuardReport) -> dict[str, Any]:
            return {"total": r.total, "refused": r.refused, "rate": round(r.rate, 4), "by_code": r.by_code}

        return {
            "reference": self.reference,
            "test_split_false_refusals": counts(self.test_split)
            | {
                "errors": self.test_errors,
                "refused_images": [
                    {"source": source, "code": code, "reason": reason} for source, code, reason in self.test_refusals
                ],
            },
            "non_radiographs": {kind: counts(r) for kind, r in self.non_radiographs.items()},
            "disagreements_vs_reference": self.disagreements,
            "cam_pointing_game": self.pointing.to_dict(),
            "seconds": round(self.seconds, 1),
        }

    def notes(self) -> list[str]:
        """One line each for the report's notes."""
        refused = sum(r.refused for r in self.non_radiographs.values())
        total = sum(r.total for r in self.non_radiographs.values())
        flips = ", ".join(f"{k} {v}" for k, v in self.disagreements.items()) or "no other precision"
        p = self.pointing
        named = "; ".join(f"{Path(source).name}: {code} ({reason})" for source, code, reason in self.test_refusals[:3])
        more = f" and {len(self.test_refusals) - 3} more" if len(self.test_refusals) > 3 else ""
        unread = f"; {self.test_errors} test image(s) could not be read" if self.test_errors else ""
        return [
            f"guard ({self.reference}): {self.test_split.refused}/{self.test_split.total} test radiographs refused "
            f"({self.test_split.rate:.1%}, target <= 2%; {self.test_split.by_code or 'none'}); generated "
            f"non-radiographs refused {refused}/{total}; decisions differing from {self.reference}: {flips}{unread}",
            *([f"guard ({self.reference}): refused test radiographs: {named}{more}"] if named else []),
            f"CAM pointing game ({self.reference}): {p.hits}/{p.images} = {p.score:.3f} abnormal test images with the "
            f"hottest cell inside a lesion box (random cell: {p.random_baseline:.3f})",
        ]


def _results(cascade: Cascade, paths: Sequence[Path]) -> list[CascadeResult]:
    return list(cascade.predict_many(paths))


def _decision(result: CascadeResult) -> GuardDecision:
    return GuardDecision(result.refusal, result.flags)


def evaluate_guard(
    settings: CascadeConfig, truth: TruthSet, precisions: Sequence[str], folder: Path, reference: str = "fp32"
) -> GuardBench:
    """Run the guarded cascade of each precision over the test split and generated non-radiographs.

    Args:
        settings: The bench's cascade settings (the guard is switched on here, heatmaps kept).
        truth: The labelled test split (all radiographs).
        precisions: Precisions to compare with ``reference`` (which is run first).
        folder: Where the non-radiographs are written.
        reference: The precision whose CAM is scored and whose decisions the others are compared with.

    Returns:
        The counts, the disagreements and the CAM pointing game.
    """
    start = time.perf_counter()
    files = write_non_radiographs(folder)
    others = [path for paths in files.values() for path in paths]
    decisions: dict[str, list[bool]] = {}
    base = replace(settings, guard=True, heatmaps=True, force_detector=False)
    test_results: list[CascadeResult] = []
    other_results: list[CascadeResult] = []
    for label in [reference, *(p for p in precisions if p != reference)]:
        with Cascade.from_config(replace(base, precision=label)) as cascade:  # type: ignore[arg-type]
            tests, rest = _results(cascade, truth.paths), _results(cascade, others)
        decisions[label] = [r.status == "refused" for r in (*tests, *rest)]
        if label == reference:
            test_results, other_results = tests, rest
    by_kind: dict[str, GuardReport] = {}
    index = {path: i for i, path in enumerate(others)}
    for kind, paths in files.items():
        by_kind[kind] = GuardReport.of([_decision(other_results[index[p]]) for p in paths])
    cams, boxes = [], []
    for i, result in enumerate(test_results):
        if not truth.labels[i] or result.cam is None or result.letterbox is None or not len(truth.boxes[i].boxes):
            continue
        # Boxes are in original pixels; the cascade's image may be a reduced-resolution decode.
        scale = result.letterbox.src_shape[1] / truth.sizes[i][0]
        labels, regions = cam_cells(result.cam, result.letterbox)
        cams.append(Explanation(result.source, "cam", float(result.probability or 0.0), regions,
                                np.zeros((1, 1), np.float32), labels, 0.0))  # fmt: skip
        boxes.append([tuple(float(v) * scale for v in box) for box in truth.boxes[i].boxes])
    reference_decisions = decisions[reference]
    read = [r for r in test_results if r.status != "error"]
    return GuardBench(
        reference=reference,
        test_split=GuardReport.of([_decision(r) for r in read]),
        test_refusals=tuple((r.source, r.refusal.code, r.refusal.reason) for r in read if r.refusal is not None),
        test_errors=len(test_results) - len(read),
        non_radiographs=by_kind,
        disagreements={
            label: int(sum(a != b for a, b in zip(d, reference_decisions, strict=True)))
            for label, d in decisions.items()
            if label != reference
        },
        pointing=pointing_game("cam", cams, boxes),  # type: ignore[arg-type]
        seconds=time.perf_counter() - start,
        compared=len(reference_decisions),
    )
