"""INT8 calibration: which images, read how, and the activation ranges of each FP32 graph.

The images are chosen once (:func:`~spine_edge.export.precision.select_calibration_images`) and
read through the runtime's own reader and letterbox for both graphs; :func:`calibrate_graphs`
returns the ranges and the summary the manifest records, as one frozen :class:`CalibrationSet`.
"""

from __future__ import annotations

import logging
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
    """

    images: tuple[Path, ...]
    source: Path
    method: prec.CalibrationMethodName
    classifier: prec.CalibrationResult
    detector: prec.CalibrationResult

    def summary(self) -> dict[str, Any]:
        """What the manifest's ``calibration`` records."""
        return {
            "count": len(self.images),
            "source": str(self.source.resolve()),
            "splits": sorted({p.parent.name for p in self.images}),
            "method": self.method,
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
) -> CalibrationSet:
    """Choose ``count`` calibration images from a prepared cache and calibrate both FP32 graphs on them.

    Args:
        classifier: The FP32 classifier graph.
        classifier_size: Its input side.
        detector: The FP32 detector graph.
        detector_size: Its input side.
        calib_data: Prepared cache (train split first, val tops up).
        count: Number of images.
        method: ``minmax`` or ``percentile``.
        workdir: Folder for the ranges files (temporary: only the Q/DQ graphs need them).

    Raises:
        DatasetError: The cache has no images.
    """
    images = prec.select_calibration_images(calib_data, count)
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
    )
