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
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from spine_edge.errors import BundleError
from spine_edge.io_utils import write_text_atomic

#: 2: every tensor names its role (which output is the probability, the CAM, the raw detector head).
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"

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
#: What a graph tensor carries, so the runtime finds its outputs by meaning, not by rank or name.
#: ``image``: the uint8 [N, 1, S, S] input. ``probability``: the ensemble probability [N].
#: ``cam``: the class-activation map [N, H', W']. ``yolo_raw``: the detector head [N, 4 + C, A].
TensorRole = Literal["image", "probability", "cam", "yolo_raw"]
TENSOR_ROLES: tuple[TensorRole, ...] = get_args(TensorRole)
#: ``onnx``: exported graph (ONNX Runtime runs it; TensorRT builds from it). ``tensorrt``: a plan built
#: on the target box. ``onnx-optimized``: ONNX Runtime's optimised graph saved for this CPU/ORT version.
ModelFormat = Literal["onnx", "tensorrt", "onnx-optimized"]
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
class EnsembleMember:
    """One classifier of the DERNet ensemble with its weight."""

    name: str
    arch: str
    weight: float


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
    """

    input_size: int
    members: tuple[EnsembleMember, ...]
    tta_views: tuple[str, ...]
    threshold: float
    cam_shape: tuple[int, int]
    resize: str = "letterbox"
    pad_value: int = 0


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


def _known(value: Any, known: tuple[str, ...], what: str) -> Any:
    """``value`` if it is one of ``known``, so a parsed field really has its ``Literal`` type."""
    if value not in known:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(known)}")
    return value


def _spec(d: dict[str, Any]) -> TensorSpec:
    role = d.get("role")
    if role is not None:
        _known(role, TENSOR_ROLES, f"tensor {d.get('name')!r} has role")
    return TensorSpec(name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], role=role)


def _entry(d: dict[str, Any]) -> ModelEntry:
    build = d.get("build")
    return ModelEntry(
        role=_known(d["role"], ROLES, "model role"),
        precision=_known(d["precision"], PRECISIONS, f"{d['file']!r} has precision"),
        format=_known(d["format"], MODEL_FORMATS, f"{d['file']!r} has format"),
        file=d["file"],
        sha256=d["sha256"],
        inputs=tuple(_spec(s) for s in d["inputs"]),
        outputs=tuple(_spec(s) for s in d["outputs"]),
        target=d.get("target", "any"),
        build=None if build is None else BuildInfo(**{**build, "build_flags": tuple(build.get("build_flags", ()))}),
        notes=d.get("notes", ""),
    )


def manifest_from_dict(d: dict[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON.

    Raises:
        BundleError: Wrong schema version or a missing/invalid field.
    """
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {version!r} is not supported by this spine-edge (expects {SCHEMA_VERSION}): "
            "re-export the bundle with this version (spine-edge export) or install the matching spine-edge"
        )
    try:
        c = d["classifier"]
        classifier = ClassifierInfo(
            input_size=int(c["input_size"]),
            members=tuple(EnsembleMember(**m) for m in c["members"]),
            tta_views=tuple(c["tta_views"]),
            threshold=float(c["threshold"]),
            cam_shape=tuple(c["cam_shape"]),
            resize=c.get("resize", "letterbox"),
            pad_value=int(c.get("pad_value", 0)),
        )
        t = d["detector"]
        detector = DetectorInfo(**{**t, "class_names": tuple(t["class_names"])})
        return Manifest(
            schema_version=version,
            bundle_id=d["bundle_id"],
            created=d["created"],
            class_names=tuple(d["class_names"]),
            classifier=classifier,
            detector=detector,
            models=tuple(_entry(m) for m in d["models"]),
            calibration=d.get("calibration", {}),
            accuracy=d.get("accuracy", {}),
            source=d.get("source", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest.json is missing or has an invalid field ({exc!r}): re-export the bundle") from exc


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest.

    Args:
        bundle: The bundle folder.
        verify: Also check that every listed file exists and matches its sha256.

    Raises:
        BundleError: The folder, manifest or a model file is missing or does not match.

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
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot be parsed as JSON ({exc}); re-export the bundle") from exc
    manifest = manifest_from_dict(data)
    if verify:
        verify_files(folder, manifest)
    return manifest


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


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically and return its path."""
    path = Path(bundle) / MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path
