"""What an export is asked to do: :class:`ExportConfig`, the one place its defaults are written.

This module imports nothing beyond the standard library and the runtime's errors, so
``spine-edge export --help`` shows these defaults on a box without torch or onnx (the CLI reads
them with :func:`field_default` when click asks for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spine_edge.config import field_default as field_default  # re-exported for the export CLI
from spine_edge.errors import SpineEdgeError

if TYPE_CHECKING:
    from spine_edge.export.precision import CalibrationMethodName

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to measure it.

    Attributes:
        checkpoints: Folder with ``classifier_<arch>.pt``, ``ensemble.json``, ``detector.pt``,
            ``detector.json`` (as ``spine-edge train`` writes it).
        out: Bundle folder (created; files of the same names are replaced atomically).
        precisions: Any of ``fp32``, ``fp16``, ``int8`` (``fp32`` is always written: it is the
            reference and TensorRT's input).
        calib_data: Prepared cache whose train PNGs calibrate INT8 (default: ``eval_data``).
        eval_data: Prepared cache whose val split the accuracy report uses (default: the one the
            checkpoints record as ``prepared``).
        calib_images: Number of calibration images, from the train split (all of it when smaller),
            every class present. A few hundred, as INT8 detectors are calibrated in the field:
            activation maxima of a rare class are only seen if one of its images is there.
        calib_method: ``minmax`` (bounded memory, default) or ``percentile`` (99.999, chunked).
        eval_split: Split of ``eval_data`` to evaluate.
        eval_limit: Evaluate at most this many images (None: all, the default: the verdict's intervals
            narrow with the number of images).
        detector_input_size: Detector graph input side (default: ``imgsz`` of ``detector.json``).
        batch_size: Batch of the evaluation runs.
        map_conf: Confidence threshold of the mAP evaluation (0.001, as COCO/ultralytics val).
        parity_images: Images compared between PyTorch and the FP32 graphs.
        sensitivity_images: Calibration images on which the INT8 layer search measures each layer's
            effect on fidelity to FP32.

    Raises:
        SpineEdgeError: A precision outside :data:`PRECISIONS`.

    Example:
        >>> ExportConfig(Path("runs/ckpt"), Path("runs/bundle"), precisions=("fp32",)).calib_images
        300
    """

    checkpoints: Path
    out: Path
    precisions: tuple[str, ...] = PRECISIONS
    calib_data: Path | None = None
    eval_data: Path | None = None
    calib_images: int = 300
    calib_method: CalibrationMethodName = "minmax"
    eval_split: str = "val"
    eval_limit: int | None = None
    detector_input_size: int | None = None
    batch_size: int = 8
    map_conf: float = 0.001
    parity_images: int = 4
    sensitivity_images: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise SpineEdgeError(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISIONS)}")
