"""What an export starts from: the checkpoints of ``spine-edge train`` and the prepared data it uses.

:func:`resolve_data` settles which prepared caches are read; :func:`check_sources` cross-checks the
checkpoint files once into a frozen :class:`ExportSources`, which also describes them for the
manifest (model settings, provenance).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_edge.bundle import ClassifierInfo, DetectorInfo, EnsembleMember, OodInfo
from spine_edge.constants import CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE
from spine_edge.errors import SpineEdgeError
from spine_edge.export.classifier_graph import EnsembleSpec
from spine_edge.export.config import ExportConfig
from spine_edge.export.detector_graph import DetectorSource
from spine_edge.support import package_versions

#: Packages whose versions the manifest records: what made the graphs.
EXPORT_PACKAGES = ("torch", "timm", "ultralytics", "onnx", "onnxruntime", "onnxslim")


def recorded_prepared(checkpoints: Path) -> Path | None:
    """The prepared cache the checkpoints record (``"prepared"`` in ensemble.json or detector.json), if it exists."""
    for name in ("ensemble.json", "detector.json"):
        path = Path(checkpoints) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("prepared")
            if value and Path(value).is_dir():
                return Path(value)
    return None


@dataclass(frozen=True)
class DataPaths:
    """The prepared caches an export reads.

    Attributes:
        eval_data: Whose split the accuracy report uses (None: no report).
        calib_data: Whose train PNGs calibrate INT8 (None: no INT8).
    """

    eval_data: Path | None
    calib_data: Path | None


def resolve_data(config: ExportConfig) -> DataPaths:
    """The evaluation and calibration caches: as given, else the one the checkpoints record.

    Raises:
        SpineEdgeError: INT8 asked for without calibration or evaluation images.
    """
    eval_data = config.eval_data or recorded_prepared(config.checkpoints)
    calib_data = config.calib_data or eval_data
    if "int8" in config.precisions and (calib_data is None or eval_data is None):
        raise SpineEdgeError(
            f"{config.checkpoints}: INT8 export needs calibration and evaluation images, and the checkpoints do not "
            "record a prepared cache: pass --calib-data/--eval-data PREPARED (the folder of `spine-edge data prepare`)"
        )
    return DataPaths(eval_data=eval_data, calib_data=calib_data)


@dataclass(frozen=True)
class ExportSources:
    """The checkpoints, read and cross-checked.

    Attributes:
        checkpoints: The checkpoint folder.
        spec: ``ensemble.json`` parsed.
        detector_meta: ``detector.json``.
        detector_source: What ``detector.pt`` says about the detector.
        detector_size: Detector graph input side.
    """

    checkpoints: Path
    spec: EnsembleSpec
    detector_meta: dict[str, Any]
    detector_source: DetectorSource
    detector_size: int

    @property
    def conf(self) -> float:
        """Detector confidence threshold of the recipe."""
        return float(self.detector_meta.get("recipe", {}).get("conf", 0.25))

    @property
    def iou(self) -> float:
        """Detector NMS IoU of the recipe."""
        return float(self.detector_meta.get("recipe", {}).get("iou", 0.65))

    @property
    def max_det(self) -> int:
        """Detections kept per image at inference."""
        return int(self.detector_meta.get("recipe", {}).get("max_det", 100))

    @property
    def trained_on(self) -> str:
        """Data fingerprint the checkpoints were trained on ("" if not recorded)."""
        return str(self.spec.raw.get("data_fingerprint") or self.detector_meta.get("data_fingerprint", ""))

    def classifier_info(self, cam_shape: tuple[int, int], ood: OodInfo | None = None) -> ClassifierInfo:
        """The manifest's ``classifier`` section (``ood``: the in-distribution threshold, if fitted)."""
        return ClassifierInfo(
            input_size=self.spec.input_size,
            members=tuple(EnsembleMember(m.name, m.arch, m.weight) for m in self.spec.members),
            tta_views=self.spec.tta_views,
            threshold=self.spec.threshold,
            cam_shape=cam_shape,
            resize="letterbox",
            pad_value=CLASSIFIER_PAD_VALUE,
            ood=ood,
        )

    def detector_info(self) -> DetectorInfo:
        """The manifest's ``detector`` section."""
        return DetectorInfo(
            input_size=self.detector_size,
            class_names=self.detector_source.class_names,
            conf_threshold=self.conf,
            iou_threshold=self.iou,
            max_det=self.max_det,
            pad_value=DETECTOR_PAD_VALUE,
            output_layout="yolo_raw",
        )

    def provenance(self) -> dict[str, Any]:
        """The manifest's ``source``: checkpoint files, their training data and metrics, package versions."""
        from spine_edge.training.checkpoints import load_classifier_checkpoint

        members = self.spec.members
        metas = {m.name: load_classifier_checkpoint(m.checkpoint).meta for m in members}
        return {
            "checkpoints": str(self.checkpoints.resolve()),
            "classifiers": {name: str(m.checkpoint.resolve()) for name, m in zip(metas, members, strict=True)},
            "ensemble": str(self.spec.path.resolve()),
            "detector": str((self.checkpoints / "detector.pt").resolve()),
            "data_fingerprint": {
                **{name: meta.data_fingerprint for name, meta in metas.items()},
                "detector": self.detector_meta.get("data_fingerprint", ""),
            },
            "val_metrics": {
                "ensemble": self.spec.metrics,
                **{name: meta.val_metrics for name, meta in metas.items()},
                "detector": self.detector_meta.get("val_metrics", {}),
            },
            "versions": package_versions(EXPORT_PACKAGES, missing=""),
        }


def check_sources(
    config: ExportConfig, spec: EnsembleSpec, detector_meta: dict[str, Any], detector_source: DetectorSource
) -> ExportSources:
    """Cross-check what the checkpoint files say and settle the detector's input side.

    Args:
        config: The export (checkpoint folder, detector input size).
        spec: ``ensemble.json`` (:func:`~spine_edge.export.classifier_graph.read_ensemble_spec`).
        detector_meta: ``detector.json`` (:func:`~spine_edge.export.detector_graph.read_detector_json`).
        detector_source: What ``detector.pt`` says (from ``build_detector_module``).

    Raises:
        SpineEdgeError: A ``detector.json`` from another run than ``detector.pt``.
    """
    checkpoints = Path(config.checkpoints)
    recorded = tuple(detector_meta.get("class_names", detector_source.class_names))
    if recorded != detector_source.class_names:
        raise SpineEdgeError(
            f"{checkpoints}: detector.json lists classes {list(recorded)} but detector.pt has "
            f"{list(detector_source.class_names)}; the two files come from different runs: re-run spine-edge train detector"
        )
    return ExportSources(
        checkpoints=checkpoints,
        spec=spec,
        detector_meta=detector_meta,
        detector_source=detector_source,
        detector_size=int(config.detector_input_size or detector_meta.get("imgsz", 640)),
    )
