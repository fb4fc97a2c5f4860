"""The detector graph: a stock ultralytics YOLO11 checkpoint → one plain ONNX file.

Input ``image`` uint8 ``[N, 1, S, S]`` (the runtime's letterbox, pad 114) → float /255 → three equal
channels (what ultralytics feeds a grayscale PNG it reads as BGR) → YOLO11 → ``yolo_raw``
``[N, 4 + C, A]``: boxes as ``xywh`` in input pixels and per-class sigmoid scores, decoded and
NMS'ed in numpy by ``spine_edge.postprocess``. No metadata header and no in-graph NMS, so
trtexec, Triton and ONNX Runtime all load the file as is.
"""

from __future__ import annotations

import json
import re
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from spine_edge.errors import SpineEdgeError
from spine_edge.export.bundle_writer import trace_to_onnx

if TYPE_CHECKING:
    from ultralytics.nn.tasks import DetectionModel

INPUT_NAME = "image"
OUTPUT_NAME = "yolo_raw"


@dataclass(frozen=True)
class DetectorSource:
    """What the checkpoint says about the detector.

    Attributes:
        class_names: Class names in output order.
        in_channels: Channels the network was trained with (3 for gray PNGs read as BGR).
        stride: Largest stride; the input side must be a multiple of it.
    """

    class_names: tuple[str, ...]
    in_channels: int
    stride: int


class DetectorExportModule(nn.Module):
    """uint8 gray ``[N, 1, S, S]`` → ``[N, 4 + C, A]`` around an ultralytics DetectionModel in export mode."""

    def __init__(self, model: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.model = model
        self.in_channels = in_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / 255.0
        if self.in_channels == 3:
            x = torch.cat([x, x, x], dim=1)
        return self.model(x)


def load_detector(checkpoint: Path) -> tuple[DetectionModel, DetectorSource]:
    """Load an ultralytics checkpoint as an FP32 eval-mode DetectionModel.

    Raises:
        SpineEdgeError: The file is missing or is not an ultralytics detection checkpoint.
    """
    if not checkpoint.is_file():
        raise SpineEdgeError(f"{checkpoint}: detector checkpoint not found; train one with `spine-edge train detector`")
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    try:
        model, _ = load_checkpoint(str(checkpoint))
    except Exception as exc:  # ultralytics raises TypeError/KeyError/RuntimeError for foreign files
        raise SpineEdgeError(
            f"{checkpoint}: not a loadable ultralytics checkpoint ({exc}); export needs the detector.pt that "
            "`spine-edge train` wrote"
        ) from exc
    if not isinstance(model, DetectionModel):
        raise SpineEdgeError(f"{checkpoint}: holds a {type(model).__name__}, not a YOLO detection model")
    names = model.names
    class_names = tuple(names[i] for i in sorted(names)) if isinstance(names, dict) else tuple(names)
    # The model YAML dict is set at runtime by ultralytics' _initialize_yolo_model, which mypy cannot see,
    # so nn.Module.__getattr__ types it Tensor | Module.
    config = cast(dict[str, Any], model.yaml)
    source = DetectorSource(
        class_names=class_names,
        in_channels=int(config.get("channels", 3)),
        stride=int(max(model.stride.tolist())),
    )
    return model, source


def prepare_for_export(model: DetectionModel) -> nn.Module:
    """A copy configured the way ultralytics' own ONNX exporter configures it (8.4.190, ``Exporter.__call__``).

    Conv+BN fused, Detect head in export mode returning only the decoded tensor, boxes as ``xywh``,
    anchors traced as constants (``dynamic=False``: only the batch is dynamic, and anchors depend on the
    spatial size alone), ``C2f`` blocks using ``forward_split`` (a Split node instead of chunk+cat).
    """
    from ultralytics.nn.modules import C2f, Detect

    model = deepcopy(model).float().eval()
    for p in model.parameters():
        p.requires_grad = False
    model = model.fuse(verbose=False)
    for m in model.modules():
        if isinstance(m, Detect):
            m.dynamic = False
            m.export = True
            m.format = "onnx"  # type: ignore[assignment]  # ultralytics declares `format = None` unannotated; it holds the export format name
            m.xyxy = False
            m.shape = None
        elif isinstance(m, C2f):
            m.forward = m.forward_split  # type: ignore[method-assign]  # ultralytics' own exporter swaps the method per instance
    return model


def build_detector_module(checkpoint: Path) -> tuple[DetectorExportModule, DetectorSource]:
    """The eval-mode module the detector graph is traced from, and what the checkpoint says about it.

    Raises:
        SpineEdgeError: Unreadable checkpoint.
    """
    model, source = load_detector(checkpoint)
    return DetectorExportModule(prepare_for_export(model), source.in_channels).eval(), source


def export_detector_graph(module: DetectorExportModule, source: DetectorSource, out: Path, input_size: int) -> Path:
    """Write the FP32 detector graph.

    Args:
        module: From :func:`build_detector_module`.
        source: Its checkpoint facts (stride).
        out: ONNX file to write.
        input_size: Side of the square letterboxed input (a multiple of the model stride).

    Returns:
        ``out``.

    Raises:
        SpineEdgeError: An input size the model cannot take.

    Example:
        >>> module, source = build_detector_module(Path("ckpt/detector.pt"))  # doctest: +SKIP
        >>> export_detector_graph(module, source, Path("bundle/detector.fp32.onnx"), 640)  # doctest: +SKIP
    """
    if input_size % source.stride:
        raise SpineEdgeError(
            f"detector input size {input_size} is not a multiple of the model stride {source.stride}; "
            f"use e.g. {max(1, round(input_size / source.stride)) * source.stride}"
        )
    example = torch.zeros((1, 1, input_size, input_size), dtype=torch.uint8)
    return trace_to_onnx(
        module,
        example,
        out,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )


def run_detector_module(module: DetectorExportModule, images: np.ndarray) -> np.ndarray:
    """The PyTorch reference output ``[N, 4 + C, A]`` of uint8 ``[N, 1, S, S]`` images."""
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def detect_scope(model: Any) -> str:
    """ONNX node-name prefix of the Detect head: the ``/model/model.<k>/`` scope with the largest ``k``.

    Raises:
        SpineEdgeError: The graph was not written by :func:`export_detector_graph`.
    """
    indices = [int(m.group(1)) for n in model.graph.node if (m := re.match(r"/model/model\.(\d+)/", n.name))]
    if not indices:
        raise SpineEdgeError(
            "detector graph has no /model/model.<k>/ node scopes: it was not written by spine-edge export"
        )
    return f"/model/model.{max(indices)}/"


def head_output_nodes(model: Any) -> set[str]:
    """Nodes of the Detect head's output layers: the final 1x1 convs of the box and class branches and
    everything after them inside the head (reshapes, concat, DFL, decode).

    Args:
        model: The ONNX detector graph.
    """
    scope = detect_scope(model)
    final_conv = re.compile(re.escape(scope) + r"cv[23]\.\d+/cv[23]\.\d+\.2/")
    branch = re.compile(re.escape(scope) + r"cv[23]\.\d+/")
    return {
        node.name
        for node in model.graph.node
        if node.name.startswith(scope) and (final_conv.match(node.name) or not branch.match(node.name))
    }


def read_detector_json(path: Path) -> dict[str, Any]:
    """``detector.json`` next to the checkpoint (arch, imgsz, class names, recipe with conf/iou).

    Raises:
        SpineEdgeError: Missing or unparsable file.
    """
    if not path.is_file():
        raise SpineEdgeError(f"{path}: not found; it is written with detector.pt by `spine-edge train detector`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpineEdgeError(f"{path}: not valid JSON ({exc}); retrain the detector or restore the file") from exc
