"""Writing the bundle: ONNX files, ``manifest.json`` and the accuracy report, each atomically.

Every file goes through a temporary file in the target folder and a rename, so a reader (or a
crash) never sees half a file; the manifest is written last, so it only ever names files that
are complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spine_edge.bundle import (
    SCHEMA_VERSION,
    ClassifierInfo,
    DetectorInfo,
    Manifest,
    ModelEntry,
    TensorRole,
    TensorSpec,
    sha256_file,
)
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.metrics import ACCURACY_GATES, ClassificationMetrics, DetectionMetrics
from spine_edge.support import json_safe

if TYPE_CHECKING:
    import onnx
    import torch

#: Opset of every exported graph: TensorRT 10 and ONNX Runtime >= 1.14 both support it fully.
OPSET = 17
REPORT_JSON = "accuracy_report.json"
REPORT_MARKDOWN = "accuracy_report.md"
#: Tensor names of the exporter's graphs (export.classifier_graph, export.detector_graph) and the
#: role each plays, written into the manifest so the runtime never guesses by rank.
TENSOR_ROLES_BY_NAME: Mapping[str, TensorRole] = {
    "image": "image",
    "prob": "probability",
    "cam": "cam",
    "yolo_raw": "yolo_raw",
}


def write_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Check an ONNX model with the full checker (shape inference included) and write it atomically.

    Raises:
        onnx.checker.ValidationError: The graph is invalid; nothing is written.
    """
    import onnx

    onnx.checker.check_model(model, full_check=True)
    return write_bytes_atomic(path, model.SerializeToString())


def trace_to_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> Path:
    """Export a module with torch's TorchScript-based exporter at opset 17, simplify it, check it, write it.

    The legacy exporter (``dynamo=False``) is used because it keeps each module's scope in the node
    names (``/members.0/backbone/...``), which quantisation and FP16 conversion use to choose layers,
    and it handles ``grid_sample`` at opset 17 directly.

    Returns:
        ``path``.
    """
    import onnx
    import onnxslim
    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see above), and the tracer's notes on Python
        # bools concern spatial sizes, which are fixed in these graphs (only the batch is dynamic).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            do_constant_folding=True,
        )
    model = onnxslim.slim(onnx.load_from_string(buffer.getvalue()))
    return write_onnx(model, path)


def tensor_specs(
    path: Path, roles: Mapping[str, TensorRole] | None = None
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of an ONNX file (dynamic axes as their names).

    Args:
        path: The ONNX file.
        roles: Role of each tensor by name (default :data:`TENSOR_ROLES_BY_NAME`, the names the
            exporter's graphs use); a tensor absent from it gets no role.
    """
    roles = TENSOR_ROLES_BY_NAME if roles is None else roles
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        return TensorSpec(name=value.name, shape=dims, dtype=dtype, role=roles.get(value.name))

    initializers = {i.name for i in graph.initializer}
    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    return inputs, tuple(spec(v) for v in graph.output)


def bundle_id(fp32_files: Sequence[Path]) -> str:
    """Short content id of a bundle: the first 12 hex digits of sha256 over its FP32 files' digests."""
    digest = hashlib.sha256()
    for path in fp32_files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:12]


def model_entry(
    bundle: Path,
    path: Path,
    role: str,
    precision: str,
    target: str = "any",
    notes: str = "",
) -> ModelEntry:
    """The manifest entry of a written ONNX file: hash and tensor specs read from the file itself."""
    inputs, outputs = tensor_specs(path)
    return ModelEntry(
        role=role,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        format="onnx",
        file=path.relative_to(bundle).as_posix(),
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        target=target,
        notes=notes,
    )


@dataclass(frozen=True)
class PrecisionAccuracy:
    """Accuracy of one lower-precision variant against FP32 on the same images.

    Attributes:
        variant: ``fp16``, ``int8-ort`` or ``int8-trt``.
        precision: ``fp16`` or ``int8`` (selects the gate).
        target: ``any``, ``onnxruntime`` or ``tensorrt``.
        classifier: Classifier metrics at τ.
        delta_auroc_pt: AUROC minus FP32's, in points.
        flips: Gate decisions that differ from FP32's.
        max_abs_dprob: Largest probability difference from FP32.
        detector: Detector metrics.
        delta_map50_pt: mAP@0.5 minus FP32's, in points.
        delta_map50_95_pt: mAP@0.5:0.95 minus FP32's, in points.
        auroc_gate_holds: ``|ΔAUROC|`` within the gate (None: not measurable, e.g. one class only).
        map50_gate_holds: ``|ΔmAP@0.5|`` within the gate (None: not measurable).
        how: How the numbers were obtained (e.g. FP16 emulation on ONNX Runtime CPU).
    """

    variant: str
    precision: str
    target: str
    classifier: ClassificationMetrics | None
    delta_auroc_pt: float
    flips: int
    max_abs_dprob: float
    detector: DetectionMetrics | None
    delta_map50_pt: float
    delta_map50_95_pt: float
    auroc_gate_holds: bool | None
    map50_gate_holds: bool | None
    how: str = ""

    @property
    def holds(self) -> bool | None:
        """Both gates hold (None if neither could be measured)."""
        verdicts = [v for v in (self.auroc_gate_holds, self.map50_gate_holds) if v is not None]
        return all(verdicts) if verdicts else None


@dataclass(frozen=True)
class AccuracyReport:
    """The export-time accuracy report (``accuracy_report.json`` / ``.md``).

    Attributes:
        eval_data: Where the evaluation images came from (folder, split, count, fingerprint).
        threshold: Gate threshold τ.
        classifier_fp32: FP32 classifier metrics (the reference).
        detector_fp32: FP32 detector metrics (the reference).
        variants: One row per lower-precision graph.
        parity: FP32 graph vs PyTorch (max abs differences), per role.
        sensitivity: Per-member / per-group INT8 measurements and what was kept in FP32, per graph.
        detector_eval: How detections were produced for mAP (conf, IoU, max_det).
    """

    eval_data: dict[str, Any]
    threshold: float
    classifier_fp32: ClassificationMetrics
    detector_fp32: DetectionMetrics
    variants: tuple[PrecisionAccuracy, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    detector_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def gates_hold(self) -> bool | None:
        """Every variant's gates hold (None when nothing was measurable)."""
        verdicts = [v.holds for v in self.variants if v.holds is not None]
        return all(verdicts) if verdicts else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes null)."""
        return json_safe(
            {
                "reference": "fp32",
                "eval_data": self.eval_data,
                "threshold": self.threshold,
                "gates": {name: asdict(gate) for name, gate in ACCURACY_GATES.items()},
                "gates_hold": self.gates_hold,
                "classifier_fp32": self.classifier_fp32.to_dict(),
                "detector_fp32": self.detector_fp32.to_dict(),
                "variants": [asdict(v) | {"holds": v.holds} for v in self.variants],
                "parity": self.parity,
                "sensitivity": self.sensitivity,
                "detector_eval": self.detector_eval,
            }
        )

    def summary(self) -> dict[str, Any]:
        """The short form stored in the manifest's ``accuracy``."""
        return json_safe(
            {
                "reference": "fp32",
                "eval_images": self.eval_data.get("images"),
                "classifier_fp32_auroc": self.classifier_fp32.auroc,
                "detector_fp32_map50": self.detector_fp32.map50,
                "gates_hold": self.gates_hold,
                "variants": {
                    v.variant: {
                        "delta_auroc_pt": v.delta_auroc_pt,
                        "flips": v.flips,
                        "delta_map50_pt": v.delta_map50_pt,
                        "delta_map50_95_pt": v.delta_map50_95_pt,
                        "holds": v.holds,
                    }
                    for v in self.variants
                },
                "report": "accuracy_report.json",
            }
        )

    def to_markdown(self) -> str:
        """A human-readable table of the report."""
        c, d = self.classifier_fp32, self.detector_fp32
        lines = [
            "# Export accuracy report",
            "",
            f"Evaluation: {self.eval_data.get('images')} images of `{self.eval_data.get('folder')}` "
            f"(split {self.eval_data.get('split')}), gate threshold τ = {self.threshold:.4f}. "
            f"Deltas are against FP32, in percentage points.",
            "",
            "| variant | AUROC | ΔAUROC | sens@τ | spec@τ | flips | mAP@0.5 | ΔmAP@0.5 | mAP@.5:.95 | Δ | gates |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| fp32 | {_pct(c.auroc)} | – | {_pct(c.sensitivity)} | {_pct(c.specificity)} | – | "
            f"{_pct(d.map50)} | – | {_pct(d.map50_95)} | – | reference |",
        ]
        for v in self.variants:
            vc, vd = v.classifier, v.detector
            gate = ACCURACY_GATES[v.precision]
            verdict = {True: "hold", False: "FAIL", None: "n/a"}[v.holds]
            lines.append(
                f"| {v.variant} | {_pct(vc.auroc if vc else math.nan)} | {_signed(v.delta_auroc_pt)} | "
                f"{_pct(vc.sensitivity if vc else math.nan)} | {_pct(vc.specificity if vc else math.nan)} | "
                f"{v.flips} | {_pct(vd.map50 if vd else math.nan)} | {_signed(v.delta_map50_pt)} | "
                f"{_pct(vd.map50_95 if vd else math.nan)} | {_signed(v.delta_map50_95_pt)} | "
                f"{verdict} (≤{gate.auroc_pt:g} / ≤{gate.map50_pt:g}) |"
            )
        lines += ["", "Gates (DESIGN.md): FP16 |ΔAUROC| ≤ 0.3, |ΔmAP@0.5| ≤ 0.5; INT8 ≤ 1.0 / ≤ 1.5 points.", ""]
        for v in self.variants:
            if v.how:
                lines.append(f"- {v.variant}: {v.how}")
        for graph, record in self.sensitivity.items():
            kept = record.get("kept_fp32") or ["nothing beyond preprocessing and output tail"]
            lines.append(f"- {graph}: kept in FP32: {', '.join(kept)}")
        return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _signed(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.2f}"


def write_accuracy_report(bundle: Path, report: AccuracyReport) -> tuple[Path, Path]:
    """Write ``accuracy_report.json`` and ``accuracy_report.md`` atomically; returns both paths."""
    json_path = write_text_atomic(bundle / REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n")
    md_path = write_text_atomic(bundle / REPORT_MARKDOWN, report.to_markdown())
    return json_path, md_path


def build_manifest(
    models: Sequence[ModelEntry],
    classifier: ClassifierInfo,
    detector: DetectorInfo,
    fp32_files: Sequence[Path],
    calibration: Mapping[str, Any],
    accuracy: Mapping[str, Any],
    source: Mapping[str, Any],
) -> Manifest:
    """Assemble the manifest of a freshly exported bundle."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=bundle_id(fp32_files),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        class_names=detector.class_names,
        classifier=classifier,
        detector=detector,
        models=tuple(models),
        calibration=json_safe(dict(calibration)),
        accuracy=json_safe(dict(accuracy)),
        source=json_safe(dict(source)),
    )
