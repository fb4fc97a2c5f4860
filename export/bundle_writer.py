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
    ROLES,
    SCHEMA_VERSION,
    ClassifierInfo,
    DetectorInfo,
    Manifest,
    ModelEntry,
    ParitySetFile,
    TensorRole,
    TensorSpec,
    parity_file,
    sha256_file,
)
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.metrics import ACCURACY_GATES, ClassificationMetrics, DetectionMetrics
from spine_edge.support import json_safe
from spine_edge.verdict import RoleVerdict, Verdict, combine

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
    "ood_score": "ood_score",
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
    from torch.jit._trace import TracerWarning  # where it is defined: torch.jit does not re-export it to mypy

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see above), and the tracer's notes on Python
        # bools concern spatial sizes, which are fixed in these graphs (only the batch is dynamic).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # the stubs say str | PathLike, but a BytesIO is supported
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


#: How a verdict maps onto the ``holds`` flag older readers of the report use (inconclusive: unknown).
_HOLDS: dict[str, bool | None] = {"hold": True, "fail": False, "inconclusive": None}


@dataclass(frozen=True)
class PrecisionAccuracy:
    """Accuracy of one lower-precision variant against FP32 on the same images, and its verdict.

    Attributes:
        variant: ``fp16``, ``int8-ort`` or ``int8-trt``.
        precision: ``fp16`` or ``int8`` (selects the gates).
        target: ``any``, ``onnxruntime`` or ``tensorrt``.
        classifier: Classifier metrics at τ.
        detector: Detector metrics.
        classifier_verdict: Probability fidelity, CAM correlation, ΔAUROC with its interval, verdict.
        detector_verdict: Box agreement with FP32, ΔmAP@0.5 with its interval, verdict.
        delta_map50_95_pt: mAP@0.5:0.95 minus FP32's, in points (reported, not gated).
        int8_coverage: Per role, the share of conv/matmul FLOPs running in INT8 kernels and the layers
            left in float (:class:`spine_edge.export.coverage.Int8Coverage`); empty for FP16.
        how: How the numbers were obtained (e.g. FP16 emulation on ONNX Runtime CPU).
    """

    variant: str
    precision: str
    target: str
    classifier: ClassificationMetrics | None
    detector: DetectionMetrics | None
    classifier_verdict: RoleVerdict
    detector_verdict: RoleVerdict
    delta_map50_95_pt: float
    int8_coverage: dict[str, Any] = field(default_factory=dict)
    how: str = ""

    @property
    def verdict(self) -> Verdict:
        """Both roles' verdicts combined (:func:`spine_edge.verdict.combine`)."""
        return combine((self.classifier_verdict.verdict, self.detector_verdict.verdict))

    @property
    def holds(self) -> bool | None:
        """True on ``hold``, False on ``fail``, None on ``inconclusive``."""
        return _HOLDS[self.verdict]

    @property
    def delta_auroc_pt(self) -> float:
        """AUROC minus FP32's, in points."""
        return self.classifier_verdict.task.delta_pt

    @property
    def delta_map50_pt(self) -> float:
        """Detector mAP@0.5 minus FP32's, in points."""
        return self.detector_verdict.task.delta_pt

    @property
    def flips(self) -> int:
        """Gate decisions that differ from FP32's."""
        fidelity = self.classifier_verdict.classifier
        return 0 if fidelity is None else fidelity.flips

    def summary(self) -> dict[str, Any]:
        """The row's short form (the manifest's ``accuracy.variants`` entry; every key is also in :meth:`to_dict`)."""
        cls, det = self.classifier_verdict.task, self.detector_verdict.task
        return {
            "verdict": self.verdict,
            "holds": self.holds,
            "delta_auroc_pt": self.delta_auroc_pt,
            "delta_auroc_ci_pt": [cls.low_pt, cls.high_pt],
            "flips": self.flips,
            "delta_map50_pt": self.delta_map50_pt,
            "delta_map50_ci_pt": [det.low_pt, det.high_pt],
            "delta_map50_95_pt": self.delta_map50_95_pt,
            "int8_flop_share": {role: c.get("int8_flop_share") for role, c in self.int8_coverage.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The report's full row."""
        return {
            "variant": self.variant,
            "precision": self.precision,
            "target": self.target,
            "how": self.how,
            **self.summary(),
            "classifier": None if self.classifier is None else self.classifier.to_dict(),
            "detector": None if self.detector is None else self.detector.to_dict(),
            "classifier_verdict": self.classifier_verdict.to_dict(),
            "detector_verdict": self.detector_verdict.to_dict(),
            "int8_coverage": self.int8_coverage,
        }


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
        sensitivity: The INT8 layer search of each graph: per-layer sensitivities, steps, layers kept float.
        detector_eval: How detections were produced for mAP (conf, IoU, max_det).
        bootstrap: How the verdict's intervals were drawn (resamples, level, seed).
    """

    eval_data: dict[str, Any]
    threshold: float
    classifier_fp32: ClassificationMetrics
    detector_fp32: DetectionMetrics
    variants: tuple[PrecisionAccuracy, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    detector_eval: dict[str, Any] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        """Every variant's verdict combined (``inconclusive`` without variants)."""
        return combine(v.verdict for v in self.variants)

    @property
    def gates_hold(self) -> bool | None:
        """False when a variant fails, True when every one holds, None otherwise (inconclusive, or none measured).

        ``spine-edge export`` exits 4 only on False.
        """
        return _HOLDS[self.verdict] if self.variants else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes null)."""
        return json_safe(
            {
                "reference": "fp32",
                "eval_data": self.eval_data,
                "threshold": self.threshold,
                "gates": {name: asdict(gate) for name, gate in ACCURACY_GATES.items()},
                "bootstrap": self.bootstrap,
                "verdict": self.verdict,
                "gates_hold": self.gates_hold,
                "classifier_fp32": self.classifier_fp32.to_dict(),
                "detector_fp32": self.detector_fp32.to_dict(),
                "variants": [v.to_dict() for v in self.variants],
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
                "verdict": self.verdict,
                "gates_hold": self.gates_hold,
                "variants": {v.variant: v.summary() for v in self.variants},
                "int8_coverage": {v.variant: v.int8_coverage for v in self.variants if v.int8_coverage},
                "report": "accuracy_report.json",
            }
        )

    def to_markdown(self) -> str:
        """A human-readable table of the report: metrics, intervals, fidelity, verdicts, INT8 coverage."""
        c, d = self.classifier_fp32, self.detector_fp32
        level = self.bootstrap.get("level", 0.95)
        lines = [
            "# Export accuracy report",
            "",
            f"Evaluation: {self.eval_data.get('images')} images of `{self.eval_data.get('folder')}` "
            f"(split {self.eval_data.get('split')}), gate threshold τ = {self.threshold:.4f}. Deltas are against "
            f"FP32, in percentage points, with {level:.0%} paired bootstrap intervals "
            f"({self.bootstrap.get('n_boot', '?')} resamples of the same images for both precisions).",
            "",
            "| variant | AUROC | ΔAUROC [CI] | flips | max/mean \\|Δp\\| | CAM r | mAP@0.5 | ΔmAP@0.5 [CI] "
            "| box agreement AP | INT8 FLOPs cls / det | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| fp32 | {_pct(c.auroc)} | – | – | – | – | {_pct(d.map50)} | – | – | – | reference |",
        ]
        for v in self.variants:
            cv, dv = v.classifier_verdict, v.detector_verdict
            fid, agree = cv.classifier, dv.detector
            dprob = f"{fid.max_abs_dprob:.3g} / {fid.mean_abs_dprob:.3g}" if fid else "–"
            cam = "–" if cv.cam_correlation is None or math.isnan(cv.cam_correlation) else f"{cv.cam_correlation:.3f}"
            share = " / ".join(_share(v.int8_coverage.get(role)) for role in ("classifier", "detector"))
            lines.append(
                f"| {v.variant} | {_pct(v.classifier.auroc if v.classifier else math.nan)} | {_interval(cv)} | "
                f"{v.flips} | {dprob} | {cam} | {_pct(v.detector.map50 if v.detector else math.nan)} | "
                f"{_interval(dv)} | {agree.ap if agree else math.nan:.3f} | {share if v.int8_coverage else '–'} | "
                f"**{v.verdict}** (cls {cv.verdict}, det {dv.verdict}) |"
            )
        gates = "; ".join(
            f"{name.upper()}: ΔAUROC ≥ −{g.auroc_pt:g}, ΔmAP@0.5 ≥ −{g.map50_pt:g} pt, "
            f"max |Δp| ≤ {g.fidelity.max_abs_dprob:g}, flips ≤ {g.fidelity.max_flip_fraction:.0%} (one image at "
            f"least), box agreement AP ≥ {g.fidelity.min_box_ap:g}"
            for name, g in ACCURACY_GATES.items()
        )
        lines += [
            "",
            f"Gates (spine_edge.metrics.ACCURACY_GATES): {gates}. Verdict: `fail` if a fidelity gate breaks or the "
            "whole interval lies below −gate; `hold` if the interval's lower end is at or above −gate; otherwise "
            "`inconclusive` (too few images to tell). A gain never fails.",
            "",
        ]
        for v in self.variants:
            if v.how:
                lines.append(f"- {v.variant}: {v.how}")
            for verdict in (v.classifier_verdict, v.detector_verdict):
                for text in (*verdict.failures, *verdict.notes):
                    lines.append(f"  - {verdict.role}: {text}")
            for role, coverage in v.int8_coverage.items():
                floats = coverage.get("float_layers") or []
                rule = (
                    "by TensorRT's Q/DQ fusion rule"
                    if coverage.get("rule") == "tensorrt"
                    else "after ONNX Runtime's optimisation"
                )
                lines.append(
                    f"  - {role}: {_share(coverage)} of conv/matmul FLOPs run in INT8 kernels {rule}; "
                    f"{len(floats)} layer(s) in float"
                    + (f": {', '.join(floats[:8])}" if floats else "")
                    + (" …" if len(floats) > 8 else "")
                )
        for graph, record in self.sensitivity.items():
            kept = record.get("kept_fp32") or []
            lines.append(
                f"- {graph}: layer search kept {len(kept)} of {record.get('candidates', '?')} weighted layers in FP32"
                + (f" ({', '.join(kept[:8])}{' …' if len(kept) > 8 else ''})" if kept else "")
            )
        return "\n".join(lines) + "\n"


def _interval(verdict: RoleVerdict) -> str:
    task = verdict.task
    if not task.measurable:
        return "–"
    return f"{task.delta_pt:+.2f} [{task.low_pt:+.2f}, {task.high_pt:+.2f}]"


def _share(coverage: Mapping[str, Any] | None) -> str:
    if not coverage or coverage.get("int8_flop_share") is None:
        return "–"
    return f"{100 * float(coverage['int8_flop_share']):.1f} %"


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def write_accuracy_report(bundle: Path, report: AccuracyReport) -> tuple[Path, Path]:
    """Write ``accuracy_report.json`` and ``accuracy_report.md`` atomically; returns both paths."""
    json_path = write_text_atomic(bundle / REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n")
    md_path = write_text_atomic(bundle / REPORT_MARKDOWN, report.to_markdown())
    return json_path, md_path


def parity_set_files(bundle: Path) -> tuple[ParitySetFile, ...]:
    """The manifest's records (sha256, size) of the parity sets the bundle holds, in role order."""
    records = []
    for role in ROLES:
        path = bundle / parity_file(role)
        if path.is_file():
            records.append(ParitySetFile(role, parity_file(role), sha256_file(path), path.stat().st_size))
    return tuple(records)


def build_manifest(
    models: Sequence[ModelEntry],
    classifier: ClassifierInfo,
    detector: DetectorInfo,
    fp32_files: Sequence[Path],
    calibration: Mapping[str, Any],
    accuracy: Mapping[str, Any],
    source: Mapping[str, Any],
    parity_sets: Sequence[ParitySetFile] = (),
) -> Manifest:
    """Assemble the manifest of a freshly exported bundle (``parity_sets``: see :func:`parity_set_files`)."""
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
        parity_sets=tuple(parity_sets),
    )
