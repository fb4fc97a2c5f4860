"""The PyTorch eager peer: the same checkpoints, TTA and images, run the way training runs them.

- Classifier: ``training.models.DERNetEnsemble`` built from ``ensemble.json`` and the member
  checkpoints by export's own loader (:func:`export.classifier_graph.build_ensemble`): the module
  validation measured and export traced, so TTA, ensemble weights and CAM are identical. It is fed
  the same letterboxed uint8 canvases as the ONNX graph, one image per call.
- Detector: ``ultralytics.YOLO(detector.pt).predict`` on the decoded image, with the bundle's input
  size and thresholds: ultralytics' own letterbox, model and NMS, the way a user of the checkpoint
  would run it. Its ``speed["inference"]`` separates the model from pre/post-processing.

torch, timm and ultralytics are imported inside :func:`run_torch_baseline` only; without them the
benchmark reports the baseline as skipped. Both peers use the same number of CPU threads as ONNX
Runtime, so every ratio compares libraries, not thread counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.benchmarks.latency import LatencyStats, cycle_to, summarize_latency
from spine_edge.bundle import Manifest
from spine_edge.errors import SpineEdgeError
from spine_edge.preprocess import letterbox
from spine_edge.support import import_optional, package_versions

DETECTOR_CHECKPOINT = "detector.pt"
#: Distributions of the peers, whose versions the baseline records ("" where not installed).
PEER_PACKAGES: tuple[str, ...] = ("torch", "timm", "ultralytics")


@dataclass(frozen=True)
class BaselineTiming:
    """PyTorch eager timings on the benchmark's images (batch 1, CPU).

    Attributes:
        checkpoints: Folder the checkpoints came from.
        classifier: Per-image time of the TTA ensemble module (ms).
        detector_inference: ultralytics' model-only time per image (``speed["inference"]``, ms).
        detector_predict: Wall time of ``YOLO.predict`` per image: its letterbox, model, NMS (ms).
        probs: Ensemble probability by index into the images given (each image timed at least once).
        threads: torch intra-op threads.
        versions: torch, timm and ultralytics versions.
    """

    checkpoints: Path
    classifier: LatencyStats
    detector_inference: LatencyStats
    detector_predict: LatencyStats
    probs: dict[int, float]
    threads: int
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (probabilities left out)."""
        return {
            "checkpoints": str(self.checkpoints),
            "classifier": self.classifier.to_dict(),
            "detector_inference": self.detector_inference.to_dict(),
            "detector_predict": self.detector_predict.to_dict(),
            "threads": self.threads,
            "versions": dict(self.versions),
        }


def baseline_checkpoints(override: Path | None) -> Path | None:
    """The checkpoint folder of the baseline: the one given explicitly (``--checkpoints``), else None.

    Never the folder a bundle's manifest records: loading ``detector.pt`` goes through ultralytics,
    whose loader unpickles (``weights_only=False``: the file holds the model object, not only
    tensors), and unpickling runs whatever code the file names. A bundle is data copied between
    machines; an edited manifest must not be able to choose a file that is then executed. So the
    baseline is opt-in, from a folder the person running ``bench`` names.
    """
    return None if override is None else Path(override)


def _import_peers() -> tuple[Any, Any, Any]:
    """torch, export's ensemble loader and ultralytics' YOLO, configured to stay offline."""
    purpose = "The PyTorch baseline"
    torch = import_optional("torch", "train", purpose)
    classifier_graph = import_optional("spine_edge.export.classifier_graph", "train", purpose)
    import_optional("spine_edge.training.detector", "train", purpose).configure_ultralytics()
    yolo_cls = import_optional("ultralytics", "train", purpose).YOLO
    return torch, (classifier_graph.read_ensemble_spec, classifier_graph.build_ensemble), yolo_cls


def run_torch_baseline(
    checkpoints: Path,
    manifest: Manifest,
    images: Sequence[np.ndarray],
    runs: int,
    warmup: int,
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> BaselineTiming:
    """Time the PyTorch eager classifier ensemble and ultralytics' predict on decoded images.

    The classifier checkpoints load with ``torch.load(weights_only=True)`` (export's loader); the
    detector through ultralytics, which unpickles it: pass only a folder you trust (see
    :func:`baseline_checkpoints`).

    Args:
        checkpoints: Folder with ``ensemble.json``, ``classifier_<arch>.pt`` and ``detector.pt``.
        manifest: The bundle's manifest (input sizes, thresholds).
        images: Decoded uint8 ``[H, W]`` images (cycled to ``warmup + runs``).
        runs: Timed images per model.
        warmup: Untimed images per model first.
        threads: torch intra-op threads.
        progress: Called with 1 after each image of each model.

    Raises:
        MissingDependencyError: torch, timm or ultralytics is not installed.
        SpineEdgeError: Missing or unreadable checkpoints, or an input size that differs from the bundle's.
    """
    torch, (read_ensemble_spec, build_ensemble), yolo_cls = _import_peers()
    checkpoints = Path(checkpoints)
    spec = read_ensemble_spec(checkpoints)
    size = manifest.classifier.input_size
    if spec.input_size != size:
        raise SpineEdgeError(
            f"{spec.path}: the ensemble takes {spec.input_size} px but the bundle's classifier takes {size} px; "
            "pass the checkpoints this bundle was exported from (--checkpoints CKPT)"
        )
    detector_path = checkpoints / DETECTOR_CHECKPOINT
    if not detector_path.is_file():
        raise SpineEdgeError(
            f"{detector_path}: not found; pass the checkpoints this bundle was exported from (--checkpoints CKPT)"
        )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ensemble = build_ensemble(spec)
        order = cycle_to(list(images), warmup + runs)
        canvases = [letterbox(image, size, manifest.classifier.pad_value)[0] for image in order]
        classifier_ms: list[float] = []
        probs: dict[int, float] = {}
        with torch.inference_mode():
            for i, canvas in enumerate(canvases):
                start = time.perf_counter()
                prob, _ = ensemble(torch.from_numpy(canvas[None, None]))
                elapsed = (time.perf_counter() - start) * 1e3
                if i >= warmup:
                    classifier_ms.append(elapsed)
                    probs.setdefault(i % len(images), float(prob[0]))
                if progress:
                    progress(1)
        del ensemble
        detector = yolo_cls(str(detector_path), task="detect")
        info = manifest.detector
        options = {
            "imgsz": info.input_size,
            "conf": info.conf_threshold,
            "iou": info.iou_threshold,
            "max_det": info.max_det,
            "device": "cpu",
            "verbose": False,
        }
        inference_ms, predict_ms = [], []
        for i, image in enumerate(order):
            start = time.perf_counter()
            result = detector.predict(image, **options)[0]
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                predict_ms.append(elapsed)
                inference_ms.append(float(result.speed["inference"]))
            if progress:
                progress(1)
    finally:
        torch.set_num_threads(previous_threads)
    return BaselineTiming(
        checkpoints=checkpoints,
        classifier=summarize_latency(classifier_ms),
        detector_inference=summarize_latency(inference_ms),
        detector_predict=summarize_latency(predict_ms),
        probs=probs,
        threads=threads,
        versions=package_versions(PEER_PACKAGES, missing=""),
    )
