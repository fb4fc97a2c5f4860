"""What a benchmark run measures (:class:`BenchConfig`) and where each precision runs (:class:`BenchPlan`).

The cascade's own settings (bundle, backend, provider, threads, read workers, ...) are one
:class:`~spine_edge.cascade.CascadeConfig` inside :class:`BenchConfig`, so ``spine-edge infer`` and
``spine-edge bench`` build their cascades from the same settings; each measurement varies only
precision and batch size (with :func:`dataclasses.replace`).

Example:
    >>> config = BenchConfig(CascadeConfig(Path("runs/bundle"), threads=1), precisions=("fp32",), runs=5)
    >>> config.cascade.bundle_dir, config.batch_sizes
    (PosixPath('runs/bundle'), (1, 4, 8))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from spine_edge.backends import GraphTarget, select_model
from spine_edge.backends.onnxruntime import ProviderChoice
from spine_edge.benchmarks.latency import END_TO_END, STAGES
from spine_edge.bundle import Manifest
from spine_edge.cascade import CascadeConfig
from spine_edge.errors import BundleError, SpineEdgeError

#: The precision every other is compared with.
REFERENCE: Final = "fp32"
#: Precisions bench measures, in report order: those a bundle holds files for, and ``bf16`` (the FP32
#: graph computed in BF16 by OpenVINO) on a CPU that has BF16 units (AVX-512 BF16 or AMX).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
#: Why ``bf16`` cannot be benched here, for the error of a request that names it.
BF16_WHERE = "bf16 runs on OpenVINO on a CPU with AVX-512 BF16 or AMX: use --backend openvino on such a CPU"
#: Label of the TensorRT INT8 Q/DQ graphs when bench also evaluates them on ONNX Runtime (export's variant name).
TENSORRT_INT8 = "int8-trt"
#: Label of ONNX Runtime's own INT8 graphs on ONNX Runtime, on a box whose ``int8`` runs on OpenVINO:
#: there ``int8`` is the TensorRT Q/DQ graph as OpenVINO runs it (FP32 body, OpenVINO's INT8 kernels),
#: the execution its latency row measures, so the row's accuracy and latency are of the same thing.
ONNXRUNTIME_INT8 = "int8-ort"
#: Stages a per-stage budget may name.
BUDGET_STAGES: tuple[str, ...] = (*STAGES, END_TO_END)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how hard.

    Attributes:
        cascade: How every cascade of the run is built: bundle (None: ``$SPINE_EDGE_BUNDLE`` or
            ``runs/bundle``), backend (``auto``, ``onnxruntime``, ``tensorrt``), ONNX Runtime
            provider, intra-op threads (None: the cores available, also for torch), read workers,
            heatmaps. Its ``precision`` and ``batch_size`` are replaced by each measurement's
            (``precisions``, ``batch_sizes``); the accuracy phase also forces the detector and
            drops heatmaps.
        data: VinDr-layout folder whose TEST split measures accuracy; None: latency only, on
            synthetic images.
        precisions: Precisions to benchmark (empty: every one the bundle has for the backend).
            With ``data``, FP32 always runs as the accuracy reference.
        batch_sizes: Batch sizes of the throughput and isolated-model measurements.
        runs: Timed images per latency measurement.
        warmup: Untimed images before each.
        max_images: Evaluate at most this many test images (the first by image id).
        baseline: Run the PyTorch eager peer where torch is installed.
        checkpoints: Checkpoint folder of the baseline; the baseline runs only when it is given (never
            from the folder a manifest records: see ``baseline_torch.baseline_checkpoints``).
        budget_ms: Budget on each precision's end-to-end p95 latency (ms), or None.
        stage_budgets: ``(stage, ms)`` budgets on per-stage p95 latencies.
        save_predictions: Folder for COCO/probability JSON of every precision, or None.
        synthetic_images: Synthetic radiographs used without ``data``.
        progress: Progress bars on stderr.
    """

    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    data: Path | None = None
    precisions: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    runs: int = 20
    warmup: int = 3
    max_images: int | None = None
    baseline: bool = True
    checkpoints: Path | None = None
    budget_ms: float | None = None
    stage_budgets: tuple[tuple[str, float], ...] = ()
    save_predictions: Path | None = None
    synthetic_images: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.runs >= 1, f"runs must be at least 1, got {self.runs}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (min(self.batch_sizes, default=0) >= 1, f"batch sizes must be >= 1, got {self.batch_sizes}"),
            (self.max_images is None or self.max_images >= 1, f"max_images must be >= 1, got {self.max_images}"),
            (self.synthetic_images >= 1, f"synthetic_images must be >= 1, got {self.synthetic_images}"),
            (set(self.precisions) <= set(PRECISIONS), f"unknown precision in {self.precisions}"),
            (all(s in BUDGET_STAGES for s, _ in self.stage_budgets), f"stage budgets name one of {BUDGET_STAGES}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class BenchPlan:
    """What runs where.

    Attributes:
        backend: The library every benchmarked precision runs on (``onnxruntime`` or ``tensorrt``).
        latency: Precisions whose latency is measured.
        accuracy: ``(label, backend, provider)`` of each cascade of the accuracy phase, reference first;
            a label is a precision, run as its latency row runs it; or ``int8-trt`` for the TensorRT
            INT8 graphs on ONNX Runtime (as export judges them), or ``int8-ort`` for ONNX Runtime's own
            INT8 graphs where ``int8`` runs on OpenVINO (:func:`accuracy_cascade`).
    """

    backend: str
    latency: tuple[str, ...]
    accuracy: tuple[tuple[str, str, ProviderChoice | None], ...]


def openvino_bf16() -> bool:
    """Whether OpenVINO is installed here and this CPU computes BF16 (what ``--precision bf16`` needs)."""
    try:
        from spine_edge.backends.openvino import computes_natively, device_capabilities, import_openvino

        return computes_natively("bf16", device_capabilities(import_openvino().Core()))
    except (SpineEdgeError, RuntimeError):  # not installed, or no CPU device to ask
        return False


def _available(manifest: Manifest, backend: str) -> tuple[str, ...]:
    """Precisions with a file for both the classifier and the detector on ``backend`` (and BF16 where it runs)."""
    fmt = "tensorrt" if backend == "tensorrt" else "onnx"
    classifier = set(manifest.precisions("classifier", fmt))  # type: ignore[arg-type]
    both: set[str] = set(classifier & set(manifest.precisions("detector", fmt)))  # type: ignore[arg-type]
    if backend == "openvino" and "fp32" in both and openvino_bf16():
        both.add("bf16")  # the FP32 graphs with OpenVINO's BF16 hint
    return tuple(p for p in PRECISIONS if p in both)


def plan_precisions(manifest: Manifest, config: BenchConfig) -> BenchPlan:
    """Resolve the backend and the precisions to run.

    Raises:
        BundleError: A requested precision has no file for both roles on the chosen backend.
    """
    cascade = config.cascade
    backend = select_model(manifest, "classifier", "auto", cascade.backend, cascade.provider).backend
    available = _available(manifest, backend)
    wanted = config.precisions or available
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BundleError(
            f"{cascade.bundle_dir}: no {backend} files for precision {', '.join(missing)} (for both classifier and "
            f"detector, it has: {', '.join(available) or 'none'}); choose --precision among those"
            + (", or build plans with `spine-edge build-engines`" if backend == "tensorrt" else "")
            + (f" ({BF16_WHERE})" if "bf16" in missing else "")
        )
    accuracy: list[tuple[str, str, ProviderChoice | None]] = []
    if config.data is not None:
        if REFERENCE in available:
            accuracy.append((REFERENCE, backend, cascade.provider))
        elif REFERENCE in _available(manifest, "onnxruntime"):
            accuracy.append((REFERENCE, "onnxruntime", "cpu"))  # the FP32 ONNX graph is the reference anywhere
        else:
            raise BundleError(f"{cascade.bundle_dir}: no FP32 graphs to compare with; re-export the bundle")
        # Every precision's accuracy is measured as its latency row runs it (same backend, same graphs),
        # so a summary row never pairs one execution's speed with another's accuracy. OpenVINO has no
        # FP16 on a CPU: FP16's accuracy is measured on ONNX Runtime (it has no OpenVINO latency row).
        accuracy += [
            (p, "onnxruntime", "cpu") if not runs_on(backend, p) else (p, backend, cascade.provider)
            for p in wanted
            if p != REFERENCE
        ]
        if "int8" in wanted and backend == "openvino" and _has_onnxruntime_int8(manifest):
            # On OpenVINO, int8 is the TensorRT Q/DQ graph (the one graph both run); ONNX Runtime's own
            # INT8 graph, what int8 runs on a box without OpenVINO, gets a row of its own.
            accuracy.append((ONNXRUNTIME_INT8, "onnxruntime", "cpu"))
        if (
            "int8" in wanted
            and backend in ("onnxruntime", "openvino")
            and _has_tensorrt_int8(manifest, cascade.provider)
        ):
            # The TensorRT Q/DQ graphs run on a CPU too: their accuracy is measured on the test split
            # here, before a GPU box ever builds an engine from them, through ONNX Runtime as export
            # judges them (so both tools judge the same execution).
            if backend == "openvino":
                accuracy.append((TENSORRT_INT8, "onnxruntime", "cpu"))
            else:
                accuracy.append((TENSORRT_INT8, backend, cascade.provider))
    return BenchPlan(backend, tuple(p for p in wanted if runs_on(backend, p)), tuple(accuracy))


def runs_on(backend: str, precision: str) -> bool:
    """Whether a backend runs a bundle precision at all (OpenVINO on a CPU: not FP16)."""
    return backend != "openvino" or precision != "fp16"


def _has_tensorrt_int8(manifest: Manifest, provider: ProviderChoice | None) -> bool:
    """Whether the bundle has TensorRT INT8 graphs for both roles that ONNX Runtime would not load by itself here."""
    own = select_model(manifest, "classifier", "int8", "onnxruntime", provider).entry.target
    both = all(
        manifest.find(role, "int8", "onnx", target="tensorrt") is not None for role in ("classifier", "detector")
    )
    return both and own != "tensorrt"


def _has_onnxruntime_int8(manifest: Manifest) -> bool:
    """Whether the bundle has ONNX Runtime's own INT8 graphs for both roles."""
    return all(
        manifest.find(role, "int8", "onnx", target="onnxruntime") is not None for role in ("classifier", "detector")
    )


def label_precision(label: str) -> str:
    """The precision whose gates judge a bench label (``int8-trt`` and ``int8-ort`` → ``int8``)."""
    return label.split("-")[0]


def accuracy_cascade(label: str) -> tuple[str, GraphTarget | None]:
    """The precision and graph target a label of :attr:`BenchPlan.accuracy` runs.

    ``int8-trt`` → int8 from the TensorRT graphs; ``int8-ort`` → int8 from ONNX Runtime's own (its
    backend in the plan is ONNX Runtime, which loads its own graph unasked); a precision → itself.
    """
    if label == TENSORRT_INT8:
        return "int8", "tensorrt"
    return ("int8", None) if label == ONNXRUNTIME_INT8 else (label, None)
