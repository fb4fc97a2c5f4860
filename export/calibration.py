"""INT8 calibration: which images, read how, and the activation ranges of each FP32 graph.

The images are chosen once (:func:`~spine_edge.export.precision.select_calibration_images`: a few
hundred train images by default, every class present, rare ones first) and read through the
runtime's own reader and letterbox for both graphs; :func:`calibrate_graphs`
returns the ranges and the summary the manifest records, as one frozen :class:`CalibrationSet`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_edge.constants import CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.export import precision as prec
from spine_edge.export.classifier_graph import INPUT_NAME

log = logging.getLogger(__name__)

READER = "spine_edge.imageio.read_image → spine_edge.preprocess.letterbox → uint8 [1, 1, S, S]"
QUANTISER = "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights)"


@dataclass(frozen=True)
class CalibrationSet:
    """Activation ranges of both FP32 graphs over the same calibration images.

    Attributes:
        images: The calibration images.
        source: Folder they were chosen from (the prepared cache's ``images``).
        method: ``minmax`` or ``percentile``.
        classifier: Ranges of the classifier graph.
        detector: Ranges of the detector graph.
        classes: Images containing each class (``normal``: images without a box), by class name.
    """

    images: tuple[Path, ...]
    source: Path
    method: prec.CalibrationMethodName
    classifier: prec.CalibrationResult
    detector: prec.CalibrationResult
    classes: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """What the manifest's ``calibration`` records."""
        return {
            "count": len(self.images),
            "source": str(self.source.resolve()),
            "splits": sorted({p.parent.name for p in self.images}),
            "method": self.method,
            "classes": dict(self.classes),
            "reader": READER,
            "quantiser": QUANTISER,
            "classifier": self.classifier.to_dict(),
            "detector": self.detector.to_dict(),
        }


def calibrate_graph(
    fp32_path: Path,
    images: tuple[Path, ...],
    size: int,
    pad_value: int,
    ranges: Path,
    method: prec.CalibrationMethodName,
) -> prec.CalibrationResult:
    """Collect one FP32 graph's activation ranges over the images, letterboxed to ``size`` with ``pad_value``."""
    reader = prec.CalibrationImages(images, INPUT_NAME, size, pad_value)
    result = prec.calibrate(fp32_path, reader, ranges, method)
    log.info("export: calibrated %s on %d images in %.1f s", fp32_path.name, result.images, result.seconds)
    return result


def calibrate_graphs(
    classifier: Path,
    classifier_size: int,
    detector: Path,
    detector_size: int,
    calib_data: Path,
    count: int,
    method: prec.CalibrationMethodName,
    workdir: Path,
    class_names: Sequence[str],
) -> CalibrationSet:
    """Choose ``count`` calibration images from a prepared cache and calibrate both FP32 graphs on them.

    Args:
        classifier: The FP32 classifier graph.
        classifier_size: Its input side.
        detector: The FP32 detector graph.
        detector_size: Its input side.
        calib_data: Prepared cache (its train split; val only when it has no train images).
        count: Number of images (all of the train split when it has fewer).
        method: ``minmax`` or ``percentile``.
        workdir: Folder for the ranges files (temporary: only the Q/DQ graphs need them).
        class_names: Detector class names, for the per-class counts of the summary.

    Raises:
        DatasetError: The cache has no images.
    """
    images = prec.select_calibration_images(calib_data, count)
    counts = prec.class_counts(calib_data, images)
    classes = {("normal" if c == prec.NORMAL else class_names[c]): n for c, n in counts.items()}
    missing = [name for name in class_names if name not in classes]
    if missing:
        log.warning("export: no calibration image contains %s: their activation ranges are never seen", missing)
    return CalibrationSet(
        images=images,
        source=Path(calib_data) / "images",
        method=method,
        classifier=calibrate_graph(
            classifier, images, classifier_size, CLASSIFIER_PAD_VALUE, workdir / "classifier.ranges.json", method
        ),
        detector=calibrate_graph(
            detector, images, detector_size, DETECTOR_PAD_VALUE, workdir / "detector.ranges.json", method
        ),
        classes=classes,
    )
