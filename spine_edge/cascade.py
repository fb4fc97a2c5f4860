"""The two-stage cascade: classifier on every image, detector only where the gate opens.

``read → letterbox (classifier size) → classifier (TTA + ensemble + CAM in one graph) → gate at τ
→ letterbox (detector size, pad 114) → detector → decode + NMS → boxes in original pixels``.

The input guard (:mod:`spine_edge.guard`) runs cheapest first: the DICOM header rules before any
pixel is decoded, the image rules on the decoded image (its colour samples included), and the
in-distribution score, an output of the classifier graph, before the gate. An input it refuses gets
a ``refused`` result with the reason and never reaches the gate or the detector.

The Python API (a kiosk embeds it) and ``spine-edge infer`` share this one code path.

Reading and letterboxing run in a small thread pool, a bounded number of images ahead of the
model, so decoding the next batch overlaps inference (ONNX Runtime and TensorRT release the GIL)
while memory stays flat. PNG decoding (OpenCV) releases the GIL, and so does JPEG 2000 where
:mod:`spine_edge.j2k` finds a libopenjp2 (OpenJPEG called through ctypes): JPEG 2000 files then
decode in parallel with each other and with the models. Without that library the reader falls back
to pydicom's decoder plugin, which holds the GIL for the whole decode, so reads take turns.

Images are decoded at the resolution the models use: the reader is asked for the largest model
input of the bundle as its target long side (:attr:`Cascade.decode_long_side`), so a JPEG 2000
radiograph is decoded at the smallest wavelet level whose long side still covers twice that
(``imageio.DECODE_COVER``: measured on real-size synthetic files, 7x faster than the full decode)
and every other format at full size. Boxes are mapped back to the
original pixels (letterbox, then :meth:`spine_edge.imageio.Radiograph.boxes_to_original`) and
``image_size`` stays the original size; ``decoded_size`` says which size ``image`` (and the
overlays drawn on it) has. :attr:`CascadeConfig.full_resolution` decodes every image at full size.

Memory of the read-ahead is bounded in bytes, not only in images: before decoding, each read asks
:func:`spine_edge.imageio.estimate_decode_bytes` what its decode will hold at its peak (from the
headers the decoder follows) and waits until the reads in flight leave room for it within
:attr:`CascadeConfig.read_ahead_bytes`. A folder of small files that decode huge therefore takes
turns instead of decoding at once; the peak of the reads is that budget (one read alone may use
up to ``imageio.MAX_DECODE_BYTES``), plus the decoded 8-bit images waiting for the model
(``prefetch`` of them, each at most ``imageio.MAX_PIXELS`` bytes).

Model calls take one lock: a :class:`Cascade` may be shared by threads (e.g. a kiosk's worker and
a UI thread), which then take turns on the backends.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from spine_edge.backends import (
    Backend,
    BackendChoice,
    GraphTarget,
    ModelSelection,
    PrecisionChoice,
    create_backend,
    select_model,
)
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.bundle import Manifest, Role, default_bundle_path, graph_source, load_manifest
from spine_edge.errors import BackendError, BundleError, ImageReadError
from spine_edge.guard import (
    OOD_POLICIES,
    GuardConfig,
    GuardDecision,
    GuardFlag,
    OodPolicy,
    Refusal,
    check_header,
    check_image,
    check_ood,
    read_header,
)

# The reader's own 16-bit mapping, so an array handed in by a kiosk looks like the same image read
# from a 16-bit PNG (imageio keeps it private; see the report to make it public).
from spine_edge.imageio import DecodeBudget, Radiograph, gray_to_uint8
from spine_edge.postprocess import decode_yolo
from spine_edge.preprocess import Letterbox, letterbox
from spine_edge.results import CascadeResult, Detection, StageLatency

if TYPE_CHECKING:
    # typing.Self is 3.11+; this project supports 3.10, and the annotation is never evaluated at run time.
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: What ``predict`` accepts: a file path, or a 2-D uint8/uint16 grayscale image (bone bright).
Source = str | os.PathLike[str] | np.ndarray

#: ``source`` recorded for in-memory images.
ARRAY_SOURCE = "<array>"


@dataclass(frozen=True)
class CascadeConfig:
    """How to build and run a :class:`Cascade`.

    Every setting has its one default here: ``Cascade.from_bundle`` and the ``spine-edge infer`` options
    take theirs from these fields.

    Attributes:
        bundle: The bundle folder; None for the default location (:attr:`bundle_dir`).
        precision: ``fp32``, ``fp16``, ``int8`` or ``auto`` (see :mod:`spine_edge.backends`).
        backend: ``onnxruntime``, ``tensorrt`` or ``auto``.
        provider: ONNX Runtime provider (``cpu``, ``cuda``, ``tensorrt``), None for automatic.
        batch_size: Images per model call (capped by each graph's maximum batch).
        force_detector: Run the detector on every image, whatever the gate says (evaluation).
        heatmaps: Keep the classifier's class-activation map in results.
        read_workers: Threads that read and letterbox images ahead of the model.
        threads: ONNX Runtime intra-op threads (None: the cores available).
        read_ahead_bytes: Most bytes the reads in flight may hold together at their decode peak
            (1 GiB: two radiograph-sized reads at the reader's per-image limit); see the module docstring.
        guard: Run the input guard's header and image rules (:mod:`spine_edge.guard`).
        guard_rules: Their limits.
        ood: What an in-distribution score above the bundle's threshold does: ``refuse`` the image or
            judge it with a ``flag``.
        graph_target: On ONNX Runtime, load the graphs written for this target instead of the
            provider's own (None): ``tensorrt`` runs the TensorRT Q/DQ graphs, e.g. on the CPU to
            measure their accuracy before they meet a GPU.
        full_resolution: Decode every image at its full size, not at the smallest JPEG 2000
            resolution level that covers the largest model input (see the module docstring).
        device: CUDA device index for TensorRT and ONNX Runtime's GPU providers.
    """

    bundle: Path | None = None
    precision: PrecisionChoice = "auto"
    backend: BackendChoice = "auto"
    provider: ProviderChoice | None = None
    batch_size: int = 4
    force_detector: bool = False
    heatmaps: bool = True
    read_workers: int = 2
    threads: int | None = None
    read_ahead_bytes: int = 1 << 30
    guard: bool = True
    guard_rules: GuardConfig = field(default_factory=GuardConfig)
    ood: OodPolicy = "refuse"
    graph_target: GraphTarget | None = None
    full_resolution: bool = False
    device: int = 0

    def __post_init__(self) -> None:
        if self.ood not in OOD_POLICIES:
            raise ValueError(f"ood must be one of {', '.join(OOD_POLICIES)}, got {self.ood!r}")
        if self.read_ahead_bytes < 1:
            raise ValueError(f"read_ahead_bytes must be positive, got {self.read_ahead_bytes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.read_workers < 1:
            raise ValueError(f"read_workers must be at least 1, got {self.read_workers}")
        if self.device < 0:
            raise ValueError(f"device must be a CUDA device index (0 or more), got {self.device}")

    @property
    def bundle_dir(self) -> Path:
        """The bundle folder that runs: :attr:`bundle`, or ``$SPINE_EDGE_BUNDLE`` / ``runs/bundle`` when None.

        The only place the default location is resolved, so the cascade, its log lines and its error
        messages all name the same folder.
        """
        return Path(self.bundle) if self.bundle is not None else default_bundle_path()


class _Stamp(TypedDict):
    """The fields every result of one cascade shares, ok or error."""

    threshold: float
    bundle_id: str
    precision: str
    backend: str


@dataclass(frozen=True)
class _Prepared:
    """One input after reading and classifier letterboxing (or the reason it failed)."""

    source: str
    read_ms: float
    preprocess_ms: float = 0.0
    image: np.ndarray | None = None
    canvas: np.ndarray | None = None
    letterbox: Letterbox | None = None
    error: str | None = None
    refusal: Refusal | None = None
    flags: tuple[GuardFlag, ...] = ()
    # Files only, colour samples dropped: the original size and the map from ``image`` pixels to it.
    radiograph: Radiograph | None = None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """(height, width) of the original pixels the boxes are reported in; None when nothing was read."""
        if self.radiograph is not None:
            return self.radiograph.source_shape
        return None if self.image is None else (int(self.image.shape[0]), int(self.image.shape[1]))

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """``[K, 4]`` boxes from ``image`` pixels to original pixels (an array input is its own original)."""
        return boxes if self.radiograph is None else self.radiograph.boxes_to_original(boxes)


@dataclass(frozen=True)
class _Graph:
    """A backend with the manifest tensors the cascade feeds and reads."""

    backend: Backend
    selection: ModelSelection
    input_name: str
    size: int
    pad_value: int
    batch: int  # images per call: the configured batch capped by the graph's maximum


def _graph(backend: Backend, selection: ModelSelection, size: int, pad_value: int, batch: int) -> _Graph:
    """Check a loaded graph against the manifest and cap the batch at what it accepts."""
    specs = backend.input_specs()
    role = selection.entry.role
    if len(specs) != 1:
        raise BundleError(
            f"the {role} graph has inputs {sorted(specs)}, expected one image input; re-export the bundle"
        )
    name, spec = next(iter(specs.items()))
    if len(spec.shape) != 4 or any(isinstance(d, int) and d != size for d in spec.shape[2:]):
        raise BundleError(
            f"the {role} graph takes {spec.shape}, the manifest says [N, 1, {size}, {size}]; re-export the bundle"
        )
    cap = backend.max_batch
    return _Graph(backend, selection, name, size, pad_value, min(batch, cap) if cap else batch)


def _array_image(array: np.ndarray) -> np.ndarray:
    if array.ndim != 2 or array.size == 0 or array.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(
            ARRAY_SOURCE,
            f"expected a 2-D uint8 or uint16 grayscale image, got {array.dtype} with shape {array.shape}",
            "pass the radiograph as one grayscale channel, bone bright",
        )
    return gray_to_uint8(array)


def _prepare(
    source: Source, size: int, pad_value: int, budget: DecodeBudget, rules: GuardConfig | None, long_side: int | None
) -> _Prepared:
    """Read one input, run the guard's rules and letterbox it; never raises for a bad input.

    Args:
        source: A path or an in-memory image.
        size: The classifier's input side.
        pad_value: Its letterbox padding.
        budget: The read-ahead's byte budget.
        rules: The guard's header and image rules; None runs none.
        long_side: The long side to decode for (:attr:`Cascade.decode_long_side`); None for full size.
    """
    name = ARRAY_SOURCE if isinstance(source, np.ndarray) else str(source)
    start = time.perf_counter()
    decision = GuardDecision()
    kept: Radiograph | None = None
    try:
        if isinstance(source, np.ndarray):
            image = _array_image(source)
            if rules is not None:
                decision = check_image(image, config=rules)
        else:
            if rules is not None:
                decision = check_header(read_header(source))
                if decision.refused:  # refused from the header alone: nothing is decoded
                    ms = (time.perf_counter() - start) * 1e3
                    return _Prepared(name, ms, refusal=decision.refusal, flags=decision.flags)
            radiograph = budget.read(Path(source), long_side)  # the header parsed once
            image = radiograph.image
            kept = replace(radiograph, colour=None)  # the colour samples only serve the guard, just below
            if rules is not None:
                decision = decision.then(
                    check_image(image, radiograph.colour, radiograph.source_shape, radiograph.pixel_spacing, rules)
                )
    except ImageReadError as exc:
        reason = exc.reason + (f" ({exc.hint})" if exc.hint else "")
        return _Prepared(name, (time.perf_counter() - start) * 1e3, error=reason)
    except Exception as exc:  # a decoder's own bug must cost one record, not the whole run
        log.exception("%s: unexpected error while reading", name)
        return _Prepared(name, (time.perf_counter() - start) * 1e3, error=f"unexpected {type(exc).__name__}: {exc}")
    read_done = time.perf_counter()
    if decision.refused:
        return _Prepared(
            name,
            (read_done - start) * 1e3,
            image=image,
            refusal=decision.refusal,
            flags=decision.flags,
            radiograph=kept,
        )
    canvas, placement = letterbox(image, size, pad_value)
    return _Prepared(
        name,
        (read_done - start) * 1e3,
        (time.perf_counter() - read_done) * 1e3,
        image=image,
        canvas=canvas,
        letterbox=placement,
        flags=decision.flags,
        radiograph=kept,
    )


class Cascade:
    """Classifier → gate → detector over a bundle, on ONNX Runtime or TensorRT.

    Build it with :meth:`from_config` (or :meth:`from_bundle`, its keyword form); it holds both graphs
    loaded until :meth:`close` (or the end of a ``with`` block).

    Example:
        >>> with Cascade.from_bundle("runs/bundle", precision="fp32") as cascade:  # doctest: +SKIP
        ...     result = cascade.predict("study/image.dicom")
        ...     result.decision, [d.class_name for d in result.detections]
        (True, ['Osteophytes'])
    """

    def __init__(self, config: CascadeConfig, manifest: Manifest, classifier: _Graph, detector: _Graph) -> None:
        self.config = config
        self.manifest = manifest
        self._classifier = classifier
        self._detector = detector
        self._lock = threading.Lock()
        self._budget = DecodeBudget(config.read_ahead_bytes)  # shared by every thread using this cascade
        self._closed = False
        self._prob_name = classifier.selection.entry.output("probability").name
        self._cam_name = classifier.selection.entry.output("cam").name
        self._raw_name = detector.selection.entry.output("yolo_raw").name
        # Bundles exported before the in-distribution score (or without training images) have no such
        # output: their records carry no score and the learned rule is off.
        self._ood_name = next((o.name for o in classifier.selection.entry.outputs if o.role == "ood_score"), None)
        self._ood_threshold = (
            manifest.classifier.ood.threshold_for(graph_source(classifier.selection.entry))
            if manifest.classifier.ood is not None
            else None
        )
        self._rules = config.guard_rules if config.guard else None
        channels = next(s.shape[1] for s in detector.selection.entry.outputs if s.name == self._raw_name)
        if isinstance(channels, int) and channels != 4 + len(manifest.detector.class_names):
            raise BundleError(
                f"the detector outputs {channels} channels, the manifest names {len(manifest.detector.class_names)} "
                "classes (expects 4 + classes); re-export the bundle"
            )
        precisions = {classifier.selection.precision, detector.selection.precision}
        self.precision = (
            precisions.pop()
            if len(precisions) == 1
            else f"classifier={classifier.selection.precision},detector={detector.selection.precision}"
        )
        backends = {classifier.backend.describe(), detector.backend.describe()}
        self.backend = (
            backends.pop()
            if len(backends) == 1
            else f"classifier={classifier.backend.describe()},detector={detector.backend.describe()}"
        )

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, **settings: Any) -> Cascade:
        """Load a bundle's classifier and detector: :meth:`from_config` with ``CascadeConfig(path, **settings)``.

        Args:
            path: The bundle folder; None for ``$SPINE_EDGE_BUNDLE`` or ``runs/bundle``.
            **settings: Any other :class:`CascadeConfig` field (``precision``, ``backend``, ``batch_size``...).

        Raises:
            TypeError: A setting that is not a :class:`CascadeConfig` field.
            BundleError, BackendError, MissingDependencyError: As :meth:`from_config`.
        """
        return cls.from_config(CascadeConfig(bundle=None if path is None else Path(path), **settings))

    @classmethod
    def from_config(cls, config: CascadeConfig) -> Cascade:
        """Load the bundle's classifier and detector as ``config`` says.

        Only the two files that will run are hashed, not the whole bundle.

        Raises:
            BundleError: Missing/corrupt bundle, or no file for the requested precision/backend.
            BackendError: The inference library cannot load or run the graph here.
            MissingDependencyError: The chosen library is not installed.
        """
        bundle = config.bundle_dir
        manifest = load_manifest(bundle, verify=False)
        backends: list[Backend] = []
        graphs: list[_Graph] = []
        plan: tuple[tuple[Role, int, int], ...] = (
            ("classifier", manifest.classifier.input_size, manifest.classifier.pad_value),
            ("detector", manifest.detector.input_size, manifest.detector.pad_value),
        )
        try:
            for role, size, pad in plan:
                selection = select_model(
                    manifest, role, config.precision, config.backend, config.provider, config.graph_target
                )
                backends.append(
                    create_backend(bundle, manifest, selection, threads=config.threads, device=config.device)
                )
                graphs.append(_graph(backends[-1].activate(), selection, size, pad, config.batch_size))
            return cls(config, manifest, graphs[0], graphs[1])
        except BaseException:
            for backend in backends:
                backend.deactivate()
            raise

    @property
    def decode_long_side(self) -> int | None:
        """The long side images are decoded for: the largest model input, or None (full size) with ``full_resolution``.

        Both graphs are fed from this one decode (the detector letterboxes the same image), so it must
        cover the larger of the two inputs.
        """
        if self.config.full_resolution:
            return None
        return max(self._classifier.size, self._detector.size)

    @property
    def threshold(self) -> float:
        """The gate τ: an image is positive when its probability is at least this."""
        return self.manifest.classifier.threshold

    def close(self) -> None:
        """Release both graphs (idempotent)."""
        with self._lock:
            self._closed = True
            self._classifier.backend.deactivate()
            self._detector.backend.deactivate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warmup(self) -> None:
        """Run each graph once at batch 1 and at the full batch, so the first real image is not slow."""
        for graph in (self._classifier, self._detector):
            for n in sorted({1, graph.batch}):
                blank = np.full((n, 1, graph.size, graph.size), graph.pad_value, np.uint8)
                with self._lock:
                    self._require_open()
                    graph.backend.infer({graph.input_name: blank})

    def predict(self, source: Source) -> CascadeResult:
        """Run the cascade on one image (path, or 2-D uint8/uint16 array). Never raises for a bad image.

        Returns:
            The result; ``status == "error"`` with the reason when the image could not be read.
        """
        read = _prepare(
            source, self._classifier.size, self._classifier.pad_value, self._budget, self._rules, self.decode_long_side
        )
        return self._run_batch([read])[0]

    def predict_many(self, sources: Iterable[Source], prefetch: int | None = None) -> Iterator[CascadeResult]:
        """Run the cascade on many images, in batches, yielding results in input order.

        Args:
            sources: Paths or arrays; consumed lazily.
            prefetch: Images read ahead of the model (default: two batches). Bounds memory.

        Yields:
            One result per source, errors included.
        """
        batch = self._classifier.batch
        ahead = max(batch, prefetch if prefetch is not None else 2 * batch)
        size, pad, long_side = self._classifier.size, self._classifier.pad_value, self.decode_long_side
        pool = ThreadPoolExecutor(max_workers=self.config.read_workers, thread_name_prefix="spine-edge-read")
        pending: deque[Future[_Prepared]] = deque()
        remaining = iter(sources)
        done = object()

        def top_up() -> None:
            while len(pending) < ahead:
                source = next(remaining, done)
                if source is done:
                    return
                pending.append(pool.submit(_prepare, source, size, pad, self._budget, self._rules, long_side))  # type: ignore[arg-type]

        try:
            top_up()
            while pending:
                ready = [pending.popleft().result() for _ in range(min(batch, len(pending)))]
                # Refill before running the model, so the next reads overlap this batch's inference.
                top_up()
                yield from self._run_batch(ready)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _require_open(self) -> None:
        if self._closed:
            raise BackendError("this Cascade is closed: create a new one with Cascade.from_bundle()")

    def _infer_chunks(self, graph: _Graph, canvases: list[np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Run a graph over canvases in chunks of its batch; returns stacked outputs and milliseconds."""
        parts: list[dict[str, np.ndarray]] = []
        with self._lock:
            self._require_open()
            start = time.perf_counter()  # after the lock: another thread's turn is not this batch's latency
            for i in range(0, len(canvases), graph.batch):
                chunk = np.stack(canvases[i : i + graph.batch])[:, None]
                parts.append(graph.backend.infer({graph.input_name: chunk}))
        elapsed = (time.perf_counter() - start) * 1e3
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, elapsed

    def _detect(
        self, ok: list[_Prepared], gated: list[int]
    ) -> tuple[dict[int, tuple[Detection, ...]], float, float, float]:
        """Detector over ``ok[i] for i in gated``: detections by index, and preprocess/detector/postprocess ms."""
        if not gated:
            return {}, 0.0, 0.0, 0.0
        graph, info = self._detector, self.manifest.detector
        start = time.perf_counter()
        placed = [letterbox(ok[i].image, graph.size, graph.pad_value) for i in gated]  # type: ignore[arg-type]
        pre_ms = (time.perf_counter() - start) * 1e3
        outputs, det_ms = self._infer_chunks(graph, [canvas for canvas, _ in placed])
        start = time.perf_counter()
        decoded = decode_yolo(outputs[self._raw_name], info.conf_threshold, info.iou_threshold, info.max_det)
        found: dict[int, tuple[Detection, ...]] = {}
        for i, (_, placement), dets in zip(gated, placed, decoded, strict=True):
            boxes = ok[i].boxes_to_original(placement.boxes_to_source(dets.boxes))
            found[i] = tuple(
                Detection(int(c), info.class_names[c], float(s), tuple(float(v) for v in box))  # type: ignore[arg-type]
                for box, s, c in zip(boxes, dets.scores, dets.class_ids, strict=True)
            )
        return found, pre_ms, det_ms, (time.perf_counter() - start) * 1e3

    def _run_batch(self, items: list[_Prepared]) -> list[CascadeResult]:
        base: _Stamp = {
            "threshold": self.threshold,
            "bundle_id": self.manifest.bundle_id,
            "precision": self.precision,
            "backend": self.backend,
        }
        ok = [p for p in items if p.error is None and p.refusal is None]
        outcome: dict[int, CascadeResult] = {}
        if ok:
            outputs, cls_ms = self._infer_chunks(self._classifier, [p.canvas for p in ok])  # type: ignore[misc]
            probs = outputs[self._prob_name].astype(np.float64)
            cams = outputs[self._cam_name] if self.config.heatmaps else None
            scores = outputs[self._ood_name].astype(np.float64) if self._ood_name is not None else None
            finite = np.isfinite(probs)
            learned = (
                [check_ood(float(s), self._ood_threshold, self.config.ood) for s in scores]
                if scores is not None
                else [GuardDecision()] * len(ok)
            )
            gated = [
                i
                for i, prob in enumerate(probs)
                if finite[i] and not learned[i].refused and (self.config.force_detector or prob >= self.threshold)
            ]
            detections, det_pre_ms, det_ms, post_ms = self._detect(ok, gated)
            for i, item in enumerate(ok):
                if not finite[i]:
                    continue  # reported as an error below
                ran = i in detections
                latency = StageLatency(
                    read=item.read_ms,
                    preprocess=item.preprocess_ms + (det_pre_ms / len(gated) if ran else 0.0),
                    classifier=cls_ms / len(ok),
                    detector=det_ms / len(gated) if ran else None,
                    postprocess=post_ms / len(gated) if ran else 0.0,
                )
                assert item.image is not None
                score = None if scores is None else float(scores[i])
                if learned[i].refused:
                    outcome[id(item)] = CascadeResult(
                        source=item.source,
                        status="refused",
                        refusal=learned[i].refusal,
                        flags=item.flags,
                        ood_score=score,
                        image_size=item.original_size,
                        latency_ms=latency,
                        **base,
                    )
                    continue
                outcome[id(item)] = CascadeResult(
                    source=item.source,
                    status="ok",
                    flags=item.flags + learned[i].flags,
                    ood_score=score,
                    probability=float(probs[i]),
                    decision=bool(probs[i] >= self.threshold),
                    detector_ran=ran,
                    detections=detections.get(i, ()),
                    image_size=item.original_size,
                    decoded_size=(int(item.image.shape[0]), int(item.image.shape[1])),
                    latency_ms=latency,
                    image=item.image,
                    cam=None if cams is None else cams[i],
                    letterbox=item.letterbox,
                    **base,
                )
        return [
            outcome[id(item)]
            if id(item) in outcome
            else self._refused(item, base)
            if item.refusal
            else self._error(item, base)
            for item in items
        ]

    def _refused(self, item: _Prepared, base: _Stamp) -> CascadeResult:
        """The result of an input the header or image rules refused (the model never saw it)."""
        return CascadeResult(
            source=item.source,
            status="refused",
            refusal=item.refusal,
            flags=item.flags,
            image_size=item.original_size,
            latency_ms=StageLatency(read=item.read_ms, preprocess=item.preprocess_ms),
            **base,
        )

    def _error(self, item: _Prepared, base: _Stamp) -> CascadeResult:
        reason = item.error or (
            f"the classifier returned a non-finite probability for this image; the {self.precision} model misbehaves "
            "on it: compare with --precision fp32"
        )
        return CascadeResult(
            source=item.source, status="error", error=reason, latency_ms=StageLatency(read=item.read_ms), **base
        )
