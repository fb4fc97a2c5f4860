"""The bundle: the contract between export (workstation) and runtime (target box).

A bundle is a folder holding ``manifest.json`` and the model files it names. The manifest records
everything the runtime needs to run a model exactly as it was validated (tensor names, shapes,
preprocessing, TTA views, ensemble weights, gate threshold, detector thresholds) and everything
needed to refuse a file that does not belong (sha256 of each file, schema version, and for
built files the builder version and device they were built for).

Only standard-library and numpy types appear here, so export, runtime and benchmarks share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, get_args

from spine_edge.errors import BundleError
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.support import json_safe

log = logging.getLogger(__name__)

#: 2: every tensor names its role (which output is the probability, the CAM, the raw detector head).
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: sha256 of manifest.json, written next to it by :func:`write_manifest` and checked by :func:`load_manifest`.
DIGEST_NAME = "manifest.sha256"

#: Bundle folder of the parity sets, ``<role>.npz`` each (see :class:`ParitySetFile`).
PARITY_DIR = "parity"

#: Where `spine-edge export` writes and every bundle-reading command looks by default.
DEFAULT_BUNDLE_DIR = Path("runs/bundle")
#: Environment variable that overrides the default bundle location.
BUNDLE_ENV = "SPINE_EDGE_BUNDLE"

#: The two models of the cascade. Defined here once; every other module imports these names.
Role = Literal["classifier", "detector"]
ROLES: tuple[Role, ...] = get_args(Role)
#: Numeric precisions a bundle can carry, in the order reports list them.
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
#: How export calibrates INT8 activation ranges (recorded in the manifest's ``calibration``).
CalibrationMethod = Literal["minmax", "percentile"]
#: What a graph tensor carries, so the runtime finds its outputs by meaning, not by rank or name.
#: ``image``: the uint8 [N, 1, S, S] input. ``probability``: the ensemble probability [N].
#: ``cam``: the class-activation map [N, H', W']. ``yolo_raw``: the detector head [N, 4 + C, A].
TensorRole = Literal["image", "probability", "cam", "yolo_raw", "ood_score"]
TENSOR_ROLES: tuple[TensorRole, ...] = get_args(TensorRole)
#: ``onnx``: exported graph (ONNX Runtime runs it; TensorRT builds from it). ``tensorrt``: a plan built
#: on the target box. ``onnx-optimized``: ONNX Runtime's optimised graph saved for this CPU/ORT version.
#: ``openvino``: an ONNX file OpenVINO was measured faster on, on this CPU (``build-engines``; same file and sha256).
ModelFormat = Literal["onnx", "tensorrt", "onnx-optimized", "openvino"]
MODEL_FORMATS: tuple[ModelFormat, ...] = get_args(ModelFormat)


def default_bundle_path() -> Path:
    """The bundle folder used when no ``--bundle`` is given: ``$SPINE_EDGE_BUNDLE`` or ``runs/bundle``."""
    env = os.environ.get(BUNDLE_ENV)
    return Path(env) if env else DEFAULT_BUNDLE_DIR


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or strings for dynamic axes), numpy dtype name and role of one graph tensor.

    ``role`` is None for tensors read from a loaded graph (a backend knows names, not meaning); the
    manifest's specs always carry it.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    role: TensorRole | None = None


@dataclass(frozen=True)
class BuildInfo:
    """How a target-specific model file was built; the runtime refuses one built for another box.

    Attributes:
        builder: ``tensorrt`` or ``onnxruntime``.
        builder_version: ``tensorrt.__version__`` or ``onnxruntime.__version__`` at build time.
        device: GPU name (TensorRT) or CPU model name (ONNX Runtime).
        compute_capability: ``"major.minor"`` of the GPU, empty for CPU builds.
        source: Bundle-relative path of the ONNX file it was built from.
        build_flags: Builder flags and settings, for the record.
        min_batch: Smallest batch of the optimisation profile.
        opt_batch: Batch the profile is tuned for.
        max_batch: Largest batch of the optimisation profile.
        timing_cache: Bundle-relative path of the persisted TensorRT timing cache, or empty.
        threads: Intra-op threads chosen for a CPU build (0 for GPU builds).
        parity: Recorded data, not read back: how the built file's outputs compared with ONNX Runtime
            FP32 on the parity canvases at the profile's min and max batch (``spine_edge.fidelity``
            results, the gates applied, the canvases' source); empty for CPU builds.
    """

    builder: str
    builder_version: str
    device: str
    source: str
    compute_capability: str = ""
    build_flags: tuple[str, ...] = ()
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    timing_cache: str = ""
    threads: int = 0
    parity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """One model file of the bundle.

    Attributes:
        role: ``classifier`` or ``detector``.
        precision: Numeric precision of the weights and compute.
        format: ``onnx`` (runs on ONNX Runtime; and is the TensorRT builder's input) or ``tensorrt``.
        file: Path relative to the bundle folder.
        sha256: Hex digest of the file.
        inputs: Input tensors.
        outputs: Output tensors.
        target: Who the file is meant for: ``any``, ``onnxruntime`` (e.g. U8S8 INT8, fast on CPU) or
            ``tensorrt`` (symmetric Q/DQ, as TensorRT requires).
        build: Build record, for files made by ``build-engines`` (``tensorrt``, ``onnx-optimized``).
        notes: Free text (e.g. which layers were kept in higher precision and why).
    """

    role: Role
    precision: Precision
    format: ModelFormat
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: str = "any"
    build: BuildInfo | None = None
    notes: str = ""

    def output(self, role: TensorRole) -> TensorSpec:
        """The output tensor with ``role``.

        Raises:
            BundleError: The manifest names no output with that role (a bundle from an older
                exporter, or a hand-edited manifest).
        """
        for spec in self.outputs:
            if spec.role == role:
                return spec
        raise BundleError(
            f"the {self.role} model {self.file} has no output with role {role!r} in manifest.json "
            f"(outputs: {[(s.name, s.role) for s in self.outputs]}); re-export the bundle with this spine-edge"
        )


@dataclass(frozen=True)
class ParitySetFile:
    """A stored parity set (``parity/<role>.npz``): the canvases every built plan of the role is checked on.

    ``build-engines`` trusts a plan because it reproduces ONNX Runtime FP32 on these canvases, so the
    file is hashed like a model file: a corrupted or swapped set would otherwise pass a broken plan.

    Attributes:
        role: The model role whose plans are checked on it.
        file: Path relative to the bundle folder.
        sha256: Hex digest of the file.
        size: Its size in bytes.
    """

    role: Role
    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class EnsembleMember:
    """One classifier of the DERNet ensemble with its weight."""

    name: str
    arch: str
    weight: float


@dataclass(frozen=True)
class OodInfo:
    """The in-distribution score the classifier graph outputs (``ood_score``), and its threshold.

    Attributes:
        threshold: Scores above this are out of distribution: the validation percentile below, estimated
            from a log-normal fit of the validation scores (never below their sample percentile).
        percentile: Validation percentile the threshold is.
        n_val: Validation images it was chosen on.
        method: How the score is computed (``mahalanobis-ledoit-wolf``: mean over members of the squared
            Mahalanobis distance per feature of the pooled backbone features).
        val_median: Median validation score (about 1 when validation resembles training).
        train_median: Median score of the training images the Gaussians were fitted on.
        per_graph: The threshold of each lower-precision classifier graph (file name), chosen by the
            same rule on that graph's own validation scores: quantised features move the score (the
            demo's INT8 graph by a median 0.029 against a limit of 0.10), so FP32's threshold would
            refuse radiographs FP32 accepts. :attr:`threshold` is the FP32 graph's.
    """

    threshold: float
    percentile: float
    n_val: int
    method: str = "mahalanobis-ledoit-wolf"
    val_median: float | None = None
    train_median: float | None = None
    per_graph: dict[str, float] = field(default_factory=dict)

    def threshold_for(self, graph: str) -> float:
        """The threshold of a classifier graph (its ONNX file name), FP32's for a graph without its own."""
        return self.per_graph.get(Path(graph).name, self.threshold)


@dataclass(frozen=True)
class ClassifierInfo:
    """How the fused classifier graph was built and how its output is used.

    Attributes:
        input_size: Side of the square uint8 grayscale input.
        resize: ``letterbox`` (aspect kept) or ``resize``.
        pad_value: Letterbox fill.
        members: Ensemble members and weights (already fused into the graph).
        tta_views: Names of the views fused into the graph (see ``spine_edge.tta``).
        threshold: Gate threshold τ on the ensemble probability.
        cam_shape: ``(H', W')`` of the class-activation map output.
        ood: The in-distribution score's threshold, None for bundles exported without it (before the
            score existed, or without training images at export): the runtime then has no learned rule.
    """

    input_size: int
    members: tuple[EnsembleMember, ...]
    tta_views: tuple[str, ...]
    threshold: float
    cam_shape: tuple[int, int]
    resize: str = "letterbox"
    pad_value: int = 0
    ood: OodInfo | None = None


@dataclass(frozen=True)
class DetectorInfo:
    """How the detector graph is fed and decoded.

    Attributes:
        input_size: Side of the square letterboxed input.
        class_names: Class names in output-channel order.
        conf_threshold: Minimum class score kept.
        iou_threshold: NMS IoU threshold.
        max_det: Maximum boxes per image.
        pad_value: Letterbox fill.
        output_layout: ``yolo_raw``: ``[N, 4 + C, A]`` with xywh in input pixels and class scores
            after sigmoid, decoded and NMS'ed in numpy by the runtime.
    """

    input_size: int
    class_names: tuple[str, ...]
    conf_threshold: float
    iou_threshold: float
    max_det: int = 100
    pad_value: int = 114
    output_layout: str = "yolo_raw"


@dataclass(frozen=True)
class Provenance:
    """The part of the manifest's ``source`` record that is read back; the rest stays recorded data.

    Attributes:
        checkpoints: The checkpoint folder the bundle was exported from (a workstation path, so it
            may not exist where the bundle runs), or None when the manifest does not record one.
    """

    checkpoints: Path | None = None

    @staticmethod
    def from_record(source: Mapping[str, Any]) -> Provenance:
        """Read it from a manifest's ``source`` dict (as ``spine-edge export`` writes it)."""
        checkpoints = source.get("checkpoints")
        return Provenance(checkpoints=Path(checkpoints) if isinstance(checkpoints, str) and checkpoints else None)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle.

    Attributes:
        schema_version: Format version; the runtime refuses others.
        bundle_id: Short content id (derived from the FP32 files' hashes).
        created: ISO-8601 UTC time of export.
        class_names: Lesion classes.
        classifier: Fused classifier description.
        detector: Detector description.
        models: Every model file.
        calibration: Summary of INT8 calibration data (count, source, method).
        accuracy: The export-time accuracy report (deltas against FP32).
        source: Checkpoint provenance (paths, data fingerprint, metrics); :attr:`provenance` is the
            typed view of what is read back from it.
        parity_sets: The stored parity sets with their sha256 and size; empty in bundles exported
            before they were recorded (their sets are then used unverified, with a warning).
    """

    schema_version: int
    bundle_id: str
    created: str
    class_names: tuple[str, ...]
    classifier: ClassifierInfo
    detector: DetectorInfo
    models: tuple[ModelEntry, ...]
    calibration: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    parity_sets: tuple[ParitySetFile, ...] = ()

    def find(self, role: Role, precision: Precision, fmt: ModelFormat, target: str | None = None) -> ModelEntry | None:
        """The entry for a role/precision/format (and target, if given), or None."""
        for entry in self.models:
            same = entry.role == role and entry.precision == precision and entry.format == fmt
            if same and (target is None or entry.target in (target, "any")):
                return entry
        return None

    @property
    def provenance(self) -> Provenance:
        """The typed view of :attr:`source` (where the bundle was exported from)."""
        return Provenance.from_record(self.source)

    def precisions(self, role: Role, fmt: ModelFormat | None = None) -> tuple[Precision, ...]:
        """Precisions available for a role, in the order fp32, fp16, int8."""
        have = {e.precision for e in self.models if e.role == role and (fmt is None or e.format == fmt)}
        return tuple(p for p in PRECISIONS if p in have)

    def with_models(self, models: tuple[ModelEntry, ...]) -> Manifest:
        """A copy with another model list (used when engines are added)."""
        return replace(self, models=models)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_MISSING: Any = object()
_FIX = "re-export the bundle with `spine-edge export` (or copy its original manifest.json again)"
#: Sane bounds for sizes read from a manifest: graph input sides, CAM sides, tensor dimensions.
_MIN_SIDE, _MAX_SIDE = 8, 8192
_MAX_DIM = 1 << 24
#: Most boxes per image a manifest may ask for (ultralytics' default is 300).
MAX_DETECTIONS = 1000
_HEX = frozenset("0123456789abcdef")


def _invalid(where: str, problem: str) -> BundleError:
    return BundleError(f"{MANIFEST_NAME}: {where} {problem}; {_FIX}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(where, f"is {type(value).__name__} {_short(value)}, expected a JSON object")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(d: dict[str, Any], key: str, where: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _MISSING:
        raise _invalid(f"{where}.{key}".lstrip("."), "is missing")
    return default


def _str(d: dict[str, Any], key: str, where: str, default: Any = _MISSING, empty: bool = True) -> str:
    value = _get(d, key, where, default)
    if not isinstance(value, str) or (not empty and not value):
        raise _invalid(
            f"{where}.{key}".lstrip("."), f"is {_short(value)}, expected {'a' if empty else 'a non-empty'} string"
        )
    return value


def _int(d: dict[str, Any], key: str, where: str, low: int, high: int, default: Any = _MISSING) -> int:
    value = _get(d, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{where}.{key}".lstrip("."), f"is {_short(value)}, expected an integer from {low} to {high}")
    return value


def _number(
    d: dict[str, Any], key: str, where: str, low: float, high: float, low_open: bool = False, default: Any = _MISSING
) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    value = _get(d, key, where, default)
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    above = number > low if low_open else number >= low
    if not (math.isfinite(number) and above and number <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(f"{where}.{key}".lstrip("."), f"is {_short(value)}, expected a finite number in {interval}")
    return number


def _list(d: dict[str, Any], key: str, where: str, default: Any = _MISSING, min_len: int = 0) -> list[Any]:
    value = _get(d, key, where, default)
    # Tuples too: Manifest.to_dict() output goes straight back in (tests, build-engines) without JSON.
    if not isinstance(value, (list, tuple)) or len(value) < min_len:
        need = f"a list of at least {min_len} item(s)" if min_len else "a list"
        raise _invalid(f"{where}.{key}".lstrip("."), f"is {_short(value)}, expected {need}")
    return list(value)


def _strings(d: dict[str, Any], key: str, where: str, default: Any = _MISSING, min_len: int = 0) -> tuple[str, ...]:
    items = _list(d, key, where, default, min_len)
    if not all(isinstance(item, str) and item for item in items):
        raise _invalid(f"{where}.{key}".lstrip("."), f"is {_short(items)}, expected non-empty strings")
    return tuple(items)


def _known(value: Any, known: tuple[str, ...], what: str) -> Any:
    """``value`` if it is one of ``known``, so a parsed field really has its ``Literal`` type."""
    if value not in known:
        raise _invalid(what, f"{value!r} is not one of {', '.join(known)}")
    return value


def _bundle_path(d: dict[str, Any], key: str, where: str, default: Any = _MISSING, empty: bool = False) -> str:
    """A path relative to the bundle folder that stays inside it: no absolute path, no ``..``, no drive."""
    value = _str(d, key, where, default, empty=empty)
    if not value:
        return value
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive or ".." in parts or "\0" in value:
        raise _invalid(
            f"{where}.{key}",
            f"is {value!r}: a model file must be a path inside the bundle folder (relative, without '..')",
        )
    return value


def _spec(d: Any, where: str) -> TensorSpec:
    d = _object(d, where)
    role = d.get("role")
    if role is not None:
        _known(role, TENSOR_ROLES, f"{where}.role")
    shape = _list(d, "shape", where)
    for dim in shape:
        named = isinstance(dim, str) and bool(dim)
        sized = isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim <= _MAX_DIM
        if not (named or sized):
            raise _invalid(f"{where}.shape", f"is {_short(shape)}, expected sizes (0 to {_MAX_DIM}) or axis names")
    return TensorSpec(
        name=_str(d, "name", where, empty=False),
        shape=tuple(shape),
        dtype=_str(d, "dtype", where, empty=False),
        role=role,
    )


def _build(d: Any, where: str) -> BuildInfo:
    d = _object(d, where)
    unknown = d.keys() - {f.name for f in fields(BuildInfo)}
    if unknown:
        raise _invalid(where, f"has unknown field(s) {sorted(unknown)}")
    build = BuildInfo(
        builder=_str(d, "builder", where, empty=False),
        builder_version=_str(d, "builder_version", where),
        device=_str(d, "device", where),
        source=_bundle_path(d, "source", where),
        compute_capability=_str(d, "compute_capability", where, ""),
        build_flags=_strings(d, "build_flags", where, []),
        min_batch=_int(d, "min_batch", where, 1, 4096, 1),
        opt_batch=_int(d, "opt_batch", where, 1, 4096, 1),
        max_batch=_int(d, "max_batch", where, 1, 4096, 1),
        timing_cache=_bundle_path(d, "timing_cache", where, "", empty=True),
        threads=_int(d, "threads", where, 0, 4096, 0),
        parity=_object(d.get("parity", {}), f"{where}.parity"),
    )
    if not build.min_batch <= build.opt_batch <= build.max_batch:
        raise _invalid(
            where,
            f"has batches min {build.min_batch}, opt {build.opt_batch}, max {build.max_batch}: "
            "expected min <= opt <= max",
        )
    return build


def _sha256(d: dict[str, Any], where: str) -> str:
    sha = _str(d, "sha256", where)
    if len(sha) != 64 or not set(sha) <= _HEX:
        raise _invalid(f"{where}.sha256", f"is {_short(sha)}, expected 64 lowercase hex digits")
    return sha


def _entry(d: Any, where: str) -> ModelEntry:
    d = _object(d, where)
    file = _bundle_path(d, "file", where)
    sha = _sha256(d, where)
    build = d.get("build")
    return ModelEntry(
        role=_known(d.get("role"), ROLES, f"{where}.role"),
        precision=_known(d.get("precision"), PRECISIONS, f"{where}.precision ({file!r})"),
        format=_known(d.get("format"), MODEL_FORMATS, f"{where}.format ({file!r})"),
        file=file,
        sha256=sha,
        inputs=tuple(_spec(s, f"{where}.inputs[{i}]") for i, s in enumerate(_list(d, "inputs", where, min_len=1))),
        outputs=tuple(_spec(s, f"{where}.outputs[{i}]") for i, s in enumerate(_list(d, "outputs", where, min_len=1))),
        target=_str(d, "target", where, "any", empty=False),
        build=None if build is None else _build(build, f"{where}.build"),
        notes=_str(d, "notes", where, ""),
    )


def _classifier(c: Any) -> ClassifierInfo:
    where = "classifier"
    c = _object(c, where)
    members = []
    for i, m in enumerate(_list(c, "members", where, min_len=1)):
        at = f"{where}.members[{i}]"
        m = _object(m, at)
        members.append(
            EnsembleMember(
                _str(m, "name", at, empty=False), _str(m, "arch", at, empty=False), _number(m, "weight", at, 0.0, 1e6)
            )
        )
    cam = _list(c, "cam_shape", where)
    if len(cam) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_SIDE for v in cam):
        raise _invalid(f"{where}.cam_shape", f"is {_short(cam)}, expected two sizes from 1 to {_MAX_SIDE}")
    return ClassifierInfo(
        input_size=_int(c, "input_size", where, _MIN_SIDE, _MAX_SIDE),
        members=tuple(members),
        tta_views=_strings(c, "tta_views", where, min_len=1),
        threshold=_number(c, "threshold", where, 0.0, 1.0),
        cam_shape=(cam[0], cam[1]),
        resize=_known(c.get("resize", "letterbox"), ("letterbox", "resize"), f"{where}.resize"),
        pad_value=_int(c, "pad_value", where, 0, 255, 0),
        ood=None if c.get("ood") is None else _ood(c["ood"], f"{where}.ood"),
    )


def _ood(o: Any, where: str) -> OodInfo:
    o = _object(o, where)
    medians = {}
    for key in ("val_median", "train_median"):
        medians[key] = None if o.get(key) is None else _number(o, key, where, 0.0, math.inf)
    graphs = _object(o.get("per_graph", {}), f"{where}.per_graph")
    return OodInfo(
        threshold=_number(o, "threshold", where, 0.0, math.inf),
        percentile=_number(o, "percentile", where, 0.0, 100.0, low_open=True),
        n_val=_int(o, "n_val", where, 1, 10**9),
        method=_str(o, "method", where, "mahalanobis-ledoit-wolf", empty=False),
        **medians,
        per_graph={name: _number(graphs, name, f"{where}.per_graph", 0.0, math.inf) for name in graphs},
    )


def _parity_set(d: Any, where: str) -> ParitySetFile:
    d = _object(d, where)
    return ParitySetFile(
        role=_known(d.get("role"), ROLES, f"{where}.role"),
        file=_bundle_path(d, "file", where),
        sha256=_sha256(d, where),
        size=_int(d, "size", where, 0, 2**63 - 1),
    )


def _detector(t: Any) -> DetectorInfo:
    where = "detector"
    t = _object(t, where)
    unknown = t.keys() - {f.name for f in fields(DetectorInfo)}
    if unknown:
        raise _invalid(where, f"has unknown field(s) {sorted(unknown)}")
    return DetectorInfo(
        input_size=_int(t, "input_size", where, _MIN_SIDE, _MAX_SIDE),
        class_names=_strings(t, "class_names", where, min_len=1),
        conf_threshold=_number(t, "conf_threshold", where, 0.0, 1.0, low_open=True),
        iou_threshold=_number(t, "iou_threshold", where, 0.0, 1.0, low_open=True),
        max_det=_int(t, "max_det", where, 1, MAX_DETECTIONS, 100),
        pad_value=_int(t, "pad_value", where, 0, 255, 114),
        output_layout=_known(t.get("output_layout", "yolo_raw"), ("yolo_raw",), f"{where}.output_layout"),
    )


def manifest_from_dict(d: Any) -> Manifest:
    """Build a Manifest from parsed JSON, validating every field the runtime reads.

    Types, ranges (thresholds finite and in range, sizes sane, ``max_det`` at most
    :data:`MAX_DETECTIONS`) and paths (model files, build sources and timing caches stay inside the
    bundle: relative, no ``..``) are checked; the recorded-only dicts (``calibration``,
    ``accuracy``, ``source``, ``build.parity``) only need to be objects.

    Raises:
        BundleError: Wrong schema version, or a missing/invalid field (named, with what was found).
    """
    d = _object(d, "the top level")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {version!r} is not supported by this spine-edge (expects {SCHEMA_VERSION}): "
            "re-export the bundle with this version (spine-edge export) or install the matching spine-edge"
        )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=_str(d, "bundle_id", "", empty=False),
        created=_str(d, "created", ""),
        class_names=_strings(d, "class_names", "", min_len=1),
        classifier=_classifier(_get(d, "classifier", "", _MISSING)),
        detector=_detector(_get(d, "detector", "", _MISSING)),
        models=tuple(_entry(m, f"models[{i}]") for i, m in enumerate(_list(d, "models", "", min_len=1))),
        calibration=_object(d.get("calibration", {}), "calibration"),
        accuracy=_object(d.get("accuracy", {}), "accuracy"),
        source=_object(d.get("source", {}), "source"),
        parity_sets=tuple(
            _parity_set(p, f"parity_sets[{i}]") for i, p in enumerate(_list(d, "parity_sets", "", default=[]))
        ),
    )


def manifest_digest_line(text: bytes) -> str:
    """The content of ``manifest.sha256`` for manifest bytes (``sha256sum`` format, so ``sha256sum -c`` checks it)."""
    return f"{hashlib.sha256(text).hexdigest()}  {MANIFEST_NAME}\n"


def _check_digest(folder: Path, raw: bytes) -> None:
    """Compare manifest.json with the digest written next to it; a bundle without one is accepted."""
    path = folder / DIGEST_NAME
    try:
        recorded = path.read_text(encoding="ascii").split()
    except FileNotFoundError:
        log.info(
            "%s: no %s (a bundle from an older spine-edge): the manifest's own integrity is not checked",
            folder,
            DIGEST_NAME,
        )
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read ({exc}); copy the bundle folder again") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if not recorded or recorded[0].lower() != actual:
        raise BundleError(
            f"{folder / MANIFEST_NAME}: sha256 {actual[:12]}… does not match {DIGEST_NAME} "
            f"({(recorded or ['nothing'])[0][:12]}…): the manifest was changed after spine-edge wrote it (an edit, "
            "tampering or an incomplete copy); copy the bundle folder again, or re-export it if the change was meant"
        )


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest.

    Checks, in order: manifest.json exists, matches ``manifest.sha256`` when the bundle has one,
    is UTF-8 JSON with every field valid (:func:`manifest_from_dict`), and every model file it
    names resolves (symbolic links followed) to a path inside the bundle folder.

    Args:
        bundle: The bundle folder.
        verify: Also check that every listed file exists and matches its sha256.

    Raises:
        BundleError: The folder, manifest or a model file is missing, invalid or does not match.

    Example:
        >>> manifest = load_manifest("runs/bundle")  # doctest: +SKIP
        >>> manifest.classifier.threshold  # doctest: +SKIP
        0.478
    """
    folder = Path(bundle)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{folder}: no {MANIFEST_NAME} here; pass the bundle folder (--bundle PATH, or the BUNDLE argument "
            f"of build-engines, or ${BUNDLE_ENV}) of a folder written by `spine-edge export`"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    _check_digest(folder, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc}); {_FIX}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: cannot be parsed as JSON ({exc}); {_FIX}") from exc
    manifest = manifest_from_dict(data)
    for entry in manifest.models:
        model_path(folder, entry)
    if verify:
        verify_files(folder, manifest)
    return manifest


def graph_source(entry: ModelEntry) -> str:
    """The bundle's ONNX graph behind an entry: its own file, or the file a built entry was built from."""
    return entry.build.source if entry.build is not None and entry.build.source else entry.file


def model_path(bundle: str | Path, entry: ModelEntry) -> Path:
    """The file of a model entry, checked to resolve inside the bundle folder (symbolic links followed).

    Raises:
        BundleError: The path leads outside the bundle.
    """
    folder = Path(bundle)
    path = folder / entry.file
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(
            f"{path}: leads outside the bundle folder ({path.resolve()}); a bundle's model files must be inside "
            "it: copy the bundle folder again with its files, not links to elsewhere"
        )
    return path


def verify_files(bundle: str | Path, manifest: Manifest, entries: tuple[ModelEntry, ...] | None = None) -> None:
    """Check that model files exist and match their recorded sha256.

    Raises:
        BundleError: Naming the first file that is missing or altered.
    """
    folder = Path(bundle)
    for entry in entries if entries is not None else manifest.models:
        path = folder / entry.file
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing; copy the whole bundle folder again")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest ({entry.sha256[:12]}…); the file is "
                "corrupt or was replaced: copy the bundle again, or rebuild engines with `spine-edge build-engines`"
            )


def parity_file(role: Role) -> str:
    """The bundle-relative path of a role's parity set."""
    return f"{PARITY_DIR}/{role}.npz"


def verify_parity_set(bundle: str | Path, manifest: Manifest, role: Role) -> None:
    """Check a role's stored parity set against the sha256 and size the manifest records for it.

    A bundle exported before parity sets were recorded has no entry: its set is used unverified,
    with a warning.

    Raises:
        BundleError: The set is recorded but missing, or its size or sha256 differs (naming the file).
    """
    folder = Path(bundle)
    entry = next((p for p in manifest.parity_sets if p.role == role), None)
    if entry is None:
        log.warning(
            "%s: the %s parity set is not recorded in %s (a bundle from an older spine-edge): it is used "
            "unverified; re-export the bundle (spine-edge export) to record its sha256",
            folder,
            role,
            MANIFEST_NAME,
        )
        return
    path = folder / entry.file
    if not path.is_file():
        raise BundleError(f"{path}: listed in the manifest but missing; copy the whole bundle folder again")
    size = path.stat().st_size
    digest = sha256_file(path) if size == entry.size else ""
    if digest != entry.sha256:
        found = f"sha256 {digest[:12]}…" if digest else f"{size} bytes"
        recorded = f"{entry.sha256[:12]}…" if digest else f"{entry.size} bytes"
        raise BundleError(
            f"{path}: {found} does not match the manifest ({recorded}); the {role} parity set is corrupt or "
            "was replaced, and built plans cannot be checked on it: re-export the bundle (spine-edge export), "
            "or copy the bundle folder again"
        )


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` and its digest ``manifest.sha256``, each atomically; returns the manifest's path.

    The digest lets :func:`load_manifest` tell a manifest changed after it was written (an edit, a
    partial copy) from the one export or build-engines wrote. It is not a signature: whoever can
    rewrite the manifest can rewrite the digest too, which is why every field is also validated.
    NaN and infinities are written as null (strict JSON), which validation then refuses where a
    number is required.
    """
    path = Path(bundle) / MANIFEST_NAME
    text = (json.dumps(json_safe(manifest.to_dict()), indent=2, allow_nan=False) + "\n").encode("utf-8")
    write_bytes_atomic(path, text)
    write_text_atomic(Path(bundle) / DIGEST_NAME, manifest_digest_line(text))
    return path
