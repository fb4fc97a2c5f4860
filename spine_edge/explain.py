"""Explanations of the triage, and how well they point at the lesions.

Two methods, both through the bundle's fused classifier graph on whichever backend runs it:

* **CAM**: the class-activation map the graph already outputs (``Σ_k w_k A_k`` of the last feature
  map, TTA identity view, ensemble-weighted), upsampled smoothly (bicubic) to the image.
* **LIME** (Ribeiro et al. 2016), as the DERNet paper audits its classifier: the letterboxed image is
  cut into superpixels (scikit-image SLIC on the image content, padding excluded); random subsets of
  superpixels are hidden (replaced by their own mean, LIME's default "hide colour"); every perturbed
  canvas goes through the same graph in batches; a ridge regression (scikit-learn), weighted by an
  exponential kernel on the cosine distance to the unperturbed image, maps "which superpixels were
  present" to the probability. Its coefficients are the superpixels' weights. A small implementation
  here instead of the ``lime`` package: that package runs its own per-image classifier function
  and segmentation defaults; here the batches, the padding mask and the seeds are ours.

**Pointing game** (Zhang et al. 2016): on abnormal images with known lesion boxes, a hit is when the
centre of the explanation's hottest region (CAM: the hottest cell; LIME: the top superpixel) lies
inside a ground-truth box. The random baseline is the expected hit rate of a region chosen uniformly
at random among the same regions (cells or superpixels), computed exactly, not sampled.

scikit-image and scikit-learn are the ``explain`` extra; CAM needs neither.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from tqdm import tqdm

from spine_edge.backends import Backend, BackendChoice, PrecisionChoice, open_backend
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.bundle import Manifest, default_bundle_path, load_manifest
from spine_edge.errors import ImageReadError
from spine_edge.imageio import read_image
from spine_edge.io_utils import write_bytes_atomic
from spine_edge.overlay import draw_explanation
from spine_edge.preprocess import Letterbox, letterbox
from spine_edge.support import import_optional
from spine_edge.vindr import ImageRecord, read_vindr

Method = Literal["lime", "cam"]
METHODS: tuple[Method, ...] = ("lime", "cam")
#: Called after each batch of perturbations with (done, total).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LimeConfig:
    """How LIME perturbs and fits.

    Attributes:
        samples: Perturbed images per explanation (the first is the unperturbed image).
        segments: Superpixels SLIC aims for on the image content.
        compactness: SLIC compactness (gray images: small values follow edges, large ones give squares).
        kernel_width: Width of LIME's exponential kernel on the cosine distance (LIME's image default 0.25).
        ridge_alpha: Ridge regularisation (LIME's default 1).
        top: Superpixels outlined in the picture.
        batch_size: Perturbed images per graph call (capped by the graph's maximum batch).
        seed: Random seed of the perturbations.
    """

    samples: int = 300
    segments: int = 40
    compactness: float = 0.1
    kernel_width: float = 0.25
    ridge_alpha: float = 1.0
    top: int = 5
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 10:
            raise ValueError(f"LIME needs at least 10 samples to fit anything, got {self.samples}")
        if self.segments < 2:
            raise ValueError(f"segments must be at least 2, got {self.segments}")
        if self.batch_size < 1 or self.top < 1:
            raise ValueError("batch_size and top must be at least 1")


@dataclass(frozen=True)
class Region:
    """One explained region (a superpixel, or a CAM cell) in original image pixels.

    Attributes:
        index: Superpixel label / cell index (row-major).
        weight: LIME coefficient, or the CAM value.
        centroid: ``(x, y)`` centre of mass.
        box: ``(x1, y1, x2, y2)`` bounding box.
        area: Pixels covered.
    """

    index: int
    weight: float
    centroid: tuple[float, float]
    box: tuple[float, float, float, float]
    area: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded."""
        return {
            "index": self.index,
            "weight": round(self.weight, 6),
            "centroid": [round(v, 1) for v in self.centroid],
            "box": [round(v, 1) for v in self.box],
            "area": round(self.area, 1),
        }


@dataclass(frozen=True, eq=False)
class Explanation:
    """What one method says about one image.

    Attributes:
        source: The input.
        method: ``lime`` or ``cam``.
        probability: The ensemble probability of the unperturbed image.
        regions: Every region with its weight, hottest first.
        heatmap: float32 ``[H, W]`` map over the original image (CAM upsampled; LIME weights painted
            on their superpixels).
        labels: int32 ``[H, W]`` region index of each original pixel (-1: none), for outlines.
        seconds: Wall time of the explanation.
        details: Method-specific numbers (LIME: samples, intercept, weighted R², kernel width).
    """

    source: str
    method: Method
    probability: float
    regions: tuple[Region, ...]
    heatmap: np.ndarray
    labels: np.ndarray
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def hottest(self) -> Region:
        """The region with the largest weight."""
        return self.regions[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON record: regions with weights, hottest first."""
        return {
            "source": self.source,
            "method": self.method,
            "probability": round(self.probability, 6),
            "seconds": round(self.seconds, 3),
            **self.details,
            "regions": [r.to_dict() for r in self.regions],
        }


class ClassifierRunner:
    """The bundle's classifier graph fed in batches of canvases (an active backend from :func:`open_backend`).

    Args:
        backend: Active classifier backend.
        manifest: Its bundle's manifest (input size, pad value, output names).
        batch_size: Images per call, capped by the graph's maximum batch.
    """

    def __init__(self, backend: Backend, manifest: Manifest, batch_size: int = 16) -> None:
        entry = next(e for e in manifest.models if e.role == "classifier")
        self._backend = backend
        self._input = next(iter(backend.input_specs()))
        self._prob = entry.output("probability").name
        self._cam = entry.output("cam").name
        cap = backend.max_batch
        self.batch = min(batch_size, cap) if cap else batch_size
        self.size = manifest.classifier.input_size
        self.pad_value = manifest.classifier.pad_value

    def run(self, canvases: np.ndarray, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(prob [N], cam [N, h, w])`` of uint8 canvases ``[N, S, S]``."""
        probs, cams = [], []
        for start in range(0, len(canvases), self.batch):
            chunk = np.ascontiguousarray(canvases[start : start + self.batch][:, None])
            out = self._backend.infer({self._input: chunk})
            probs.append(np.asarray(out[self._prob], np.float64).reshape(-1))
            cams.append(np.asarray(out[self._cam], np.float32))
            if progress is not None:
                progress(min(start + self.batch, len(canvases)), len(canvases))
        return np.concatenate(probs), np.concatenate(cams)

    def canvas(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """The letterboxed canvas of a uint8 gray image, as the cascade makes it."""
        return letterbox(image, self.size, self.pad_value)


def upsample_cam(cam: np.ndarray, placement: Letterbox) -> np.ndarray:
    """A canvas-aligned CAM resized smoothly (bicubic, clipped to [0, 1]) to the original image."""
    canvas = cv2.resize(np.asarray(cam, np.float32), (placement.size, placement.size), interpolation=cv2.INTER_CUBIC)
    h, w = placement.src_shape
    nh, nw = max(1, round(h * placement.scale)), max(1, round(w * placement.scale))
    crop = canvas[placement.pad_y : placement.pad_y + nh, placement.pad_x : placement.pad_x + nw]
    out: np.ndarray = np.clip(cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    return out


def _canvas_labels_to_source(labels: np.ndarray, placement: Letterbox) -> np.ndarray:
    h, w = placement.src_shape
    nh, nw = max(1, round(h * placement.scale)), max(1, round(w * placement.scale))
    crop = labels[placement.pad_y : placement.pad_y + nh, placement.pad_x : placement.pad_x + nw]
    out: np.ndarray = cv2.resize(crop.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    return out


def _regions(labels: np.ndarray, weights: np.ndarray) -> tuple[Region, ...]:
    """Regions of a label map (original pixels), sorted by weight, largest first."""
    out = []
    for index, weight in enumerate(weights):
        ys, xs = np.nonzero(labels == index)
        if ys.size == 0:
            continue  # a superpixel smaller than one original pixel after resizing
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out.append(Region(index, float(weight), (float(xs.mean() + 0.5), float(ys.mean() + 0.5)), box, float(ys.size)))
    return tuple(sorted(out, key=lambda r: -r.weight))


def cam_cells(cam: np.ndarray, placement: Letterbox) -> tuple[np.ndarray, tuple[Region, ...]]:
    """The CAM's cells as regions of the original image: label map and regions, hottest first."""
    h, w = cam.shape
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    canvas = cv2.resize(grid, (placement.size, placement.size), interpolation=cv2.INTER_NEAREST)
    labels = _canvas_labels_to_source(canvas, placement)
    return labels, _regions(labels, cam.reshape(-1))


def explain_cam(runner: ClassifierRunner, image: np.ndarray, source: str = "<array>") -> Explanation:
    """The CAM explanation of one uint8 gray image (one graph call)."""
    start = time.perf_counter()
    canvas, placement = runner.canvas(image)
    probs, cams = runner.run(canvas[None])
    labels, regions = cam_cells(cams[0], placement)
    return Explanation(
        source=source,
        method="cam",
        probability=float(probs[0]),
        regions=regions,
        heatmap=upsample_cam(cams[0], placement),
        labels=labels,
        seconds=time.perf_counter() - start,
        details={"cam_shape": list(cams[0].shape)},
    )


def superpixels(canvas: np.ndarray, placement: Letterbox, config: LimeConfig) -> np.ndarray:
    """SLIC superpixels of the image content of a canvas: int32 ``[S, S]`` labels ``0..K-1``, padding -1."""
    segmentation = import_optional("skimage.segmentation", "explain", "LIME superpixels (spine-edge explain)")
    mask = np.zeros(canvas.shape, bool)
    h, w = placement.src_shape
    nh, nw = max(1, round(h * placement.scale)), max(1, round(w * placement.scale))
    mask[placement.pad_y : placement.pad_y + nh, placement.pad_x : placement.pad_x + nw] = True
    labels = segmentation.slic(
        canvas.astype(np.float64) / 255.0, n_segments=config.segments, compactness=config.compactness,
        channel_axis=None, mask=mask, start_label=1, enforce_connectivity=True,
    )  # fmt: skip
    # Renumber 0..K-1 (SLIC may skip labels), padding -1.
    present = np.unique(labels[mask])
    lookup = np.full(int(labels.max()) + 1, -1, np.int32)
    lookup[present] = np.arange(present.size, dtype=np.int32)
    out: np.ndarray = np.where(mask, lookup[labels], -1).astype(np.int32)
    return out


def perturb(canvas: np.ndarray, labels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Canvases with the superpixels where ``present`` is False replaced by their own mean.

    Args:
        canvas: uint8 ``[S, S]``.
        labels: From :func:`superpixels`.
        present: bool ``[N, K]``.

    Returns:
        uint8 ``[N, S, S]``; padding is never changed.
    """
    k = present.shape[1]
    inside = labels >= 0
    sums = np.bincount(labels[inside], weights=canvas[inside], minlength=k)
    counts = np.maximum(np.bincount(labels[inside], minlength=k), 1)
    means = np.round(sums / counts).astype(np.uint8)
    hidden = np.where(inside, means[np.maximum(labels, 0)], canvas)
    keep = np.where(inside[None], present[:, np.maximum(labels, 0)], True)
    out: np.ndarray = np.where(keep, canvas[None], hidden[None])
    return out


def estimate_lime_seconds(runner: ClassifierRunner, config: LimeConfig, images: int = 1) -> float:
    """Seconds LIME will take for ``images`` images, from one timed batch on this backend."""
    blank = np.full((runner.batch, runner.size, runner.size), runner.pad_value, np.uint8)
    runner.run(blank)  # the first call of a session pays for allocation; time the second
    start = time.perf_counter()
    runner.run(blank)
    per_batch = time.perf_counter() - start
    return images * math.ceil(config.samples / runner.batch) * per_batch


def explain_lime(
    runner: ClassifierRunner,
    image: np.ndarray,
    config: LimeConfig | None = None,
    source: str = "<array>",
    progress: Progress | None = None,
) -> Explanation:
    """LIME weights of the superpixels of one uint8 gray image.

    Args:
        runner: The classifier graph.
        image: uint8 ``[H, W]`` radiograph, as read.
        config: Sampling and fit settings.
        source: Recorded in the explanation.
        progress: Called after each batch of perturbations.

    Returns:
        The explanation; ``details`` has the samples, the intercept and the kernel-weighted R² of the
        fit (how far the linear surrogate can be trusted).

    Example:
        >>> with open_backend(bundle, manifest, "classifier", "fp32") as backend:  # doctest: +SKIP
        ...     lime = explain_lime(ClassifierRunner(backend, manifest), read_image(path).image)
        ...     lime.hottest.box
    """
    linear_model = import_optional("sklearn.linear_model", "explain", "LIME's ridge regression (spine-edge explain)")
    config = config or LimeConfig()
    start = time.perf_counter()
    canvas, placement = runner.canvas(image)
    labels = superpixels(canvas, placement, config)
    k = int(labels.max()) + 1
    rng = np.random.default_rng(config.seed)
    present = rng.random((config.samples, k)) < 0.5
    present[0] = True  # LIME's first sample is the image itself
    probs, _ = runner.run(perturb(canvas, labels, present), progress)
    # Cosine distance of each on/off vector to all-on, through LIME's exponential kernel.
    on = present.astype(np.float64)
    cosine = on.sum(axis=1) / (np.sqrt(np.maximum(on.sum(axis=1), 1e-12)) * math.sqrt(k))
    kernel = np.sqrt(np.exp(-((1 - cosine) ** 2) / config.kernel_width**2))
    ridge = linear_model.Ridge(alpha=config.ridge_alpha, fit_intercept=True)
    ridge.fit(on, probs, sample_weight=kernel)
    weights = np.asarray(ridge.coef_, np.float64)
    source_labels = _canvas_labels_to_source(labels, placement)
    heatmap = np.where(source_labels >= 0, weights[np.maximum(source_labels, 0)], 0.0).astype(np.float32)
    return Explanation(
        source=source,
        method="lime",
        probability=float(probs[0]),
        regions=_regions(source_labels, weights),
        heatmap=heatmap,
        labels=source_labels,
        seconds=time.perf_counter() - start,
        details={
            "samples": config.samples,
            "superpixels": k,
            "intercept": round(float(ridge.intercept_), 6),
            "r2": round(float(ridge.score(on, probs, sample_weight=kernel)), 4),
            "kernel_width": config.kernel_width,
            "seed": config.seed,
        },
    )


def _inside(point: tuple[float, float], boxes: Sequence[tuple[float, float, float, float]]) -> bool:
    x, y = point
    return any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes)


@dataclass(frozen=True)
class PointingScore:
    """Pointing-game result of one method over abnormal images with boxes.

    Attributes:
        method: ``cam`` or ``lime``.
        images: Abnormal images with at least one box that were scored.
        hits: Images whose hottest region's centre is inside a box.
        random_baseline: Expected hit rate of a region chosen uniformly at random among the same regions.
    """

    method: str
    images: int
    hits: int
    random_baseline: float

    @property
    def score(self) -> float:
        """Hit rate (nan for no images)."""
        return self.hits / self.images if self.images else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"method": self.method, "images": self.images, "hits": self.hits,
                "score": round(self.score, 4) if self.images else None,
                "random_baseline": round(self.random_baseline, 4) if self.images else None}  # fmt: skip


def pointing_game(
    method: str, explanations: Sequence[Explanation], boxes: Sequence[Sequence[tuple[float, float, float, float]]]
) -> PointingScore:
    """Score explanations against ground-truth boxes (original pixels), one box list per explanation.

    Images without boxes are skipped (nothing to point at).
    """
    hits, chance, images = 0, 0.0, 0
    for explanation, truth in zip(explanations, boxes, strict=True):
        if not truth or not explanation.regions:
            continue
        images += 1
        hits += _inside(explanation.hottest.centroid, truth)
        chance += float(np.mean([_inside(r.centroid, truth) for r in explanation.regions]))
    return PointingScore(method, images, hits, chance / images if images else float("nan"))


def write_explanation(explanation: Explanation, image: np.ndarray, out_dir: str | Path, stem: str,
                      top: int = 5, boxes: Sequence[tuple[float, float, float, float]] = ()) -> tuple[Path, Path]:  # fmt: skip
    """Write ``STEM.METHOD.png`` (picture) and ``STEM.METHOD.json`` (weights) into ``out_dir``.

    Returns:
        The PNG and JSON paths.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    picture = draw_explanation(image, explanation, top=top, boxes=boxes)
    png = folder / f"{stem}.{explanation.method}.png"
    ok, encoded = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"OpenCV could not encode the picture for {png}")
    write_bytes_atomic(png, encoded.tobytes())
    record = explanation.to_dict() | {"picture": png.name, "top": [r.index for r in explanation.regions[:top]]}
    json_path = folder / f"{stem}.{explanation.method}.json"
    write_bytes_atomic(json_path, (json.dumps(record, indent=1) + "\n").encode())
    return png, json_path


@dataclass(frozen=True)
class ExplainConfig:
    """What ``spine-edge explain`` runs.

    Attributes:
        bundle: The bundle folder; None for ``$SPINE_EDGE_BUNDLE`` or ``runs/bundle``.
        precision: Classifier precision (``fp32``, ``fp16``, ``int8``, ``auto``).
        backend: ``onnxruntime``, ``tensorrt`` or ``auto``.
        provider: ONNX Runtime provider, None for automatic.
        method: ``lime`` or ``cam``.
        lime: LIME settings (also used by the evaluation's LIME part).
        progress: Show progress bars on stderr.
    """

    bundle: Path | None = None
    precision: PrecisionChoice = "auto"
    backend: BackendChoice = "auto"
    provider: ProviderChoice | None = None
    method: Method = "lime"
    lime: LimeConfig = field(default_factory=LimeConfig)
    progress: bool = True

    @property
    def bundle_dir(self) -> Path:
        """The bundle that runs (the default location resolved)."""
        return Path(self.bundle) if self.bundle is not None else default_bundle_path()


@contextmanager
def open_classifier(config: ExplainConfig) -> Iterator[ClassifierRunner]:
    """The bundle's classifier graph as :class:`ClassifierRunner`, on the backend the cascade would pick.

    Raises:
        BundleError, BackendError, MissingDependencyError: As ``Cascade.from_config``.
    """
    bundle = config.bundle_dir
    manifest = load_manifest(bundle, verify=False)
    with open_backend(bundle, manifest, "classifier", config.precision, config.backend, config.provider) as backend:
        yield ClassifierRunner(backend, manifest, config.lime.batch_size)


def _bar(total: int, unit: str, enabled: bool, desc: str) -> Any:
    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, desc=desc, leave=False)


def explain_image(runner: ClassifierRunner, image: np.ndarray, config: ExplainConfig, source: str) -> Explanation:
    """One image's explanation by ``config.method`` (LIME with a progress bar of its perturbations)."""
    if config.method == "cam":
        return explain_cam(runner, image, source)
    with _bar(config.lime.samples, "img", config.progress, Path(source).name) as bar:
        return explain_lime(runner, image, config.lime, source, lambda done, total: bar.update(done - bar.n))


@dataclass(frozen=True)
class ExplainOutcome:
    """What :func:`run_explain` did for one input.

    Attributes:
        source: The input.
        picture: The PNG written, or None on failure.
        record: The JSON written, or None on failure.
        error: Why the input could not be explained, or None.
        hottest: The hottest region, or None on failure.
    """

    source: str
    picture: Path | None = None
    record: Path | None = None
    error: str | None = None
    hottest: Region | None = None


def run_explain(
    paths: Sequence[Path], out: Path, config: ExplainConfig, announce: Callable[[str], None] | None = None
) -> list[ExplainOutcome]:
    """Explain every image and write ``OUT/<stem>.<method>.png`` and ``.json`` for each.

    Args:
        paths: Image files (DICOM, PNG, JPEG, TIFF).
        out: Output folder.
        config: Method and bundle.
        announce: Receives one line before work starts (the time estimate, for LIME).

    Returns:
        One outcome per input; unreadable files are reported, not raised.
    """
    outcomes = []
    with open_classifier(config) as runner:
        if config.method == "lime" and announce is not None:
            seconds = estimate_lime_seconds(runner, config.lime, len(paths))
            announce(
                f"LIME: {config.lime.samples} perturbations x {len(paths)} image(s) in batches of {runner.batch}: "
                f"about {seconds:.0f} s on {config.precision} (estimated from one timed batch)"
            )
        for path in paths:
            try:
                # Full resolution: the picture and the regions' boxes are in the original pixels.
                image = read_image(path).image
            except ImageReadError as exc:
                outcomes.append(ExplainOutcome(str(path), error=str(exc)))
                continue
            explanation = explain_image(runner, image, config, str(path))
            png, record = write_explanation(explanation, image, out, path.stem, config.lime.top)
            outcomes.append(ExplainOutcome(str(path), png, record, hottest=explanation.hottest))
    return outcomes


def _truth_boxes(record: ImageRecord, scale: float) -> list[tuple[float, float, float, float]]:
    return [(b.xmin * scale, b.ymin * scale, b.xmax * scale, b.ymax * scale) for b in record.boxes]


@dataclass(frozen=True)
class PointingReport:
    """``explain --eval``: pointing-game scores on a VinDr-layout test split.

    Attributes:
        root: The dataset folder.
        scores: One score per method evaluated.
        sampled: How the images were chosen (e.g. "first 20 abnormal images by id").
        seconds: Wall time.
    """

    root: str
    scores: tuple[PointingScore, ...]
    sampled: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"root": self.root, "sampled": self.sampled, "seconds": round(self.seconds, 1),
                "scores": [s.to_dict() for s in self.scores]}  # fmt: skip


def evaluate_pointing(
    root: Path, config: ExplainConfig, max_images: int | None = 20, methods: Sequence[Method] = METHODS
) -> PointingReport:
    """Pointing game of each method on the abnormal test images that have boxes.

    The images are the first ``max_images`` abnormal images with boxes in image-id order (a fixed,
    reproducible sample; None for all). Boxes are scaled like the image when the reader decodes a
    reduced resolution.

    Raises:
        DatasetError: ``root`` is not a VinDr-layout folder.
    """
    start = time.perf_counter()
    records = [r for r in read_vindr(root).test if r.abnormal and r.boxes]
    chosen = records if max_images is None else records[:max_images]
    explanations: dict[Method, list[Explanation]] = {m: [] for m in methods}
    truths: list[list[tuple[float, float, float, float]]] = []
    with open_classifier(config) as runner, _bar(len(chosen), "img", config.progress, "pointing game") as bar:
        for record in chosen:
            try:
                radiograph = read_image(record.path, target_long_side=runner.size)
            except ImageReadError:
                bar.update(1)
                continue  # the dataset check reports unreadable files; the game scores what it can
            truths.append(_truth_boxes(record, radiograph.scale))
            for method in methods:
                single = replace(config, method=method, progress=False)
                explanations[method].append(explain_image(runner, radiograph.image, single, str(record.path)))
            bar.update(1)
    scores = tuple(pointing_game(m, explanations[m], truths) for m in methods)
    sampled = f"all {len(chosen)}" if max_images is None else f"first {len(chosen)} of {len(records)}"
    return PointingReport(str(root), scores, f"{sampled} abnormal test images with boxes, by image id",
                          time.perf_counter() - start)  # fmt: skip
