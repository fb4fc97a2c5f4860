"""The paper-size cascade benched without training it: random weights, the normal export path, this CPU.

What the clinic deploys is the ``paper`` profile (DenseNet-121 + EfficientNetV2-S + ResNet-50 at
384 px with the 5 TTA views fused into one graph, YOLO11-l at 640). Training it needs a GPU and
days; its *speed* does not depend on the weights. So :func:`run_paper_size`:

1. writes **random-weight checkpoints** in the format ``spine-edge train`` writes (timm
   ``pretrained=False`` members, an ``ensemble.json`` with the paper's weights and views, a YOLO11
   ``DetectionModel`` saved as ultralytics saves it), in a child process so torch's memory is
   returned when it ends;
2. exports them through the **normal export path** (``export.classifier_graph``,
   ``export.detector_graph``), calibrates each graph on synthetic radiographs and writes both INT8
   Q/DQ graphs (``tensorrt``: symmetric, the one OpenVINO runs; ``onnxruntime``: U8S8) with
   ``export.precision.quantize_graph``. Calibration streams its statistics
   (:func:`calibrate_streaming`: a group of tensors per pass, ONNX Runtime's ranges format), because
   ONNX Runtime's all-at-once calibrator peaked at 13.4 GB on the paper-size classifier here. The
   layer search of ``spine-edge export`` is skipped: it trades accuracy, which random weights cannot
   show, so the whole convolutional body is quantised;
3. **builds for the box**: compiles every graph once per library (ONNX Runtime session
   optimisation; OpenVINO compilation into a model cache keyed by the graph's sha256, then loaded
   again from the cache), and records both times;
4. **times** each graph alone per library and precision (``fp32``/``int8`` on ONNX Runtime;
   ``fp32``/``bf16``/``int8`` on OpenVINO where installed, BF16 only where the CPU has it), one
   session alive at a time, at batch 1 and the throughput batch, with FLOPs per image, achieved
   GFLOP/s, this CPU's nominal floors (:func:`cpu_floors`) and the **measured ceilings** of this box
   (large dense matrix products per library and precision, :mod:`spine_edge.benchmarks.ceiling`);
5. times **decoding** a real-size JPEG 2000 radiograph (full and reduced resolution) and adds it to
   the models for the end-to-end figure of an abnormal image (both models run);
6. runs **PyTorch eager** on the same modules, in a child process with the same thread count, glibc's
   allocator thresholds pinned (:func:`pin_allocator`) and warm-up runs, and reports its spread.

Steps 4-6 run in **interleaved rounds** (``PaperSizeConfig.rounds``): every graph, the read stage,
the ceilings and eager once per round, samples pooled, each round's median kept. A shared host whose
speed drifts over the minutes of a run then slows every row alike, so the ratios against eager and
between precisions stay those of one moment; the per-round medians show how much it drifted.

Peak memory is the true peak of this process and its children (resident-set high-water marks,
sampled, :class:`PeakMemory`), per phase. Random weights serve latency and INT8 speed, not accuracy:
the report says so, and no accuracy number is computed from them.

Example:
    >>> report = run_paper_size(PaperSizeConfig.quick_preset(Path("runs/paper-size")))  # doctest: +SKIP
    >>> print(format_paper_size(report))  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import gc
import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spine_edge.backends.base import Backend
from spine_edge.backends.onnxruntime import OnnxRuntimeBackend, available_cores, cpu_model_name
from spine_edge.benchmarks.flops import count_flops
from spine_edge.benchmarks.latency import ModelTiming, summarize_latency, time_model_calls, timing_of
from spine_edge.benchmarks.progress import progress_bar
from spine_edge.bundle import Role, sha256_file
from spine_edge.constants import CLASS_NAMES, CLASSIFIER_PAD_VALUE, DETECTOR_PAD_VALUE, PAPER_THRESHOLD
from spine_edge.errors import MissingDependencyError, SpineEdgeError
from spine_edge.io_utils import write_image_atomic, write_text_atomic
from spine_edge.support import import_optional, json_safe, package_versions

log = logging.getLogger(__name__)

#: What the report says about its numbers, first thing.
RANDOM_WEIGHTS_NOTE = (
    "Random weights: these numbers measure latency, memory and INT8/BF16 speed of the paper-size graphs, "
    "not accuracy. No AUROC or mAP is computed from them; the INT8 graphs quantise the whole convolutional "
    "body (export's accuracy-driven layer search needs trained weights)."
)
#: Distributions whose versions the report records.
VERSION_PACKAGES = ("onnxruntime", "openvino", "torch", "timm", "ultralytics", "onnx", "numpy")
#: Long side of the synthetic calibration PNGs (the paper profile's prepared cache, ``prepare_long_side``).
CALIBRATION_LONG_SIDE = 1024
#: How often :class:`PeakMemory` samples the high-water marks (s).
SAMPLE_INTERVAL_S = 0.2
#: The two INT8 graphs of each role and the target each is quantised for (``export.precision``).
INT8_VARIANTS: dict[str, Literal["tensorrt", "onnxruntime"]] = {"int8-trt": "tensorrt", "int8-ort": "onnxruntime"}
#: The phase that times the graphs, the read stage, PyTorch eager and the ceilings, round by round.
TIMING_PHASE = "timing (interleaved rounds)"
#: The two graphs of the cascade, in the order they are timed.
ROLES: tuple[Role, ...] = ("classifier", "detector")
#: Graph files per role and variant inside the work folder.
GRAPH_FILES: dict[str, str] = {
    "fp32": "{role}.fp32.onnx",
    "int8-trt": "{role}.int8.trt.onnx",
    "int8-ort": "{role}.int8.ort.onnx",
}


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StandInProfile:
    """The architectures a paper-size run builds (a tiny one for tests).

    Attributes:
        name: Profile name, recorded.
        members: ``(timm arch, ensemble weight)`` in ensemble order.
        classifier_size: Square classifier input side.
        detector_model: ultralytics model YAML (``yolo11l.yaml``).
        detector_size: Detector input side.
        tta_views: TTA view names fused into the classifier graph.
    """

    name: str
    members: tuple[tuple[str, float], ...]
    classifier_size: int
    detector_model: str
    detector_size: int
    tta_views: tuple[str, ...]

    @staticmethod
    def from_profile(profile: Any, tta_views: Sequence[str] | None = None) -> StandInProfile:
        """The architectures of a ``training.profiles.Profile`` with its default ensemble weights.

        Args:
            profile: E.g. ``training.profiles.PAPER``.
            tta_views: View names; default every view of ``spine_edge.tta.DEFAULT_VIEWS`` (the paper's 5).
        """
        from spine_edge.tta import DEFAULT_VIEWS

        sizes = {recipe.input_size for recipe in profile.classifiers}
        if len(sizes) != 1:
            raise ValueError(f"profile {profile.name!r}: members at several sizes {sorted(sizes)}; one graph needs one")
        weights = profile.default_weights
        return StandInProfile(
            name=profile.name,
            members=tuple((r.arch, float(w)) for r, w in zip(profile.classifiers, weights, strict=True)),
            classifier_size=sizes.pop(),
            detector_model=profile.detector.model,
            detector_size=profile.detector.imgsz,
            tta_views=tuple(tta_views) if tta_views is not None else tuple(v.name for v in DEFAULT_VIEWS),
        )


@dataclass(frozen=True)
class PaperSizeConfig:
    """What :func:`run_paper_size` builds and measures.

    Attributes:
        work: Folder for the checkpoints, graphs, calibration images and model caches (kept, so a
            second run reuses them: ``rebuild`` forces a fresh export).
        profile: The architectures; None means ``training.profiles.PAPER``.
        calib_images: Synthetic calibration images per graph.
        runs: Timed calls per graph, precision and batch size.
        warmup: Untimed calls first, in every round (each round opens its sessions again).
        rounds: The timing is interleaved: each round times every graph, PyTorch eager, the read stage
            and the arithmetic ceilings once, ``runs / rounds`` calls each, and the samples are pooled.
            A host whose speed drifts over the minutes of a run (a shared VM: the same graph took
            340 to 610 ms within one minute here) then slows every row alike, and the ratios stay fair.
        batch_sizes: Batch sizes per graph (1 is latency; larger ones are throughput).
        threads: Intra-op threads of every library (ONNX Runtime, OpenVINO, torch); None: the cores available.
        openvino: Also measure OpenVINO where it is installed.
        baseline: Also time PyTorch eager on the same modules.
        decode_files: Real-size JPEG 2000 DICOM files written and decoded for the read stage (0: skip).
        rebuild: Export again even when the work folder has graphs from an earlier run.
        progress: Progress bars and phase lines on stderr.
    """

    work: Path
    profile: StandInProfile | None = None
    calib_images: int = 32
    runs: int = 12
    warmup: int = 2
    rounds: int = 3
    batch_sizes: tuple[int, ...] = (1, 4)
    threads: int | None = None
    openvino: bool = True
    baseline: bool = True
    decode_files: int = 2
    rebuild: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if (
            self.calib_images < 1
            or self.runs < 1
            or self.warmup < 0
            or not 1 <= self.rounds <= self.runs
            or not self.batch_sizes
            or min(self.batch_sizes) < 1
        ):
            raise ValueError(
                f"need calib_images >= 1, runs >= 1, warmup >= 0, 1 <= rounds <= runs and batch sizes >= 1; got "
                f"{self.calib_images}, {self.runs}, {self.warmup}, {self.rounds}, {self.batch_sizes}"
            )

    @property
    def runs_per_round(self) -> int:
        """Timed calls per graph and batch size in each round (``runs`` split over the rounds, rounded up)."""
        return -(-self.runs // self.rounds)

    @staticmethod
    def quick_preset(work: Path, **changes: Any) -> PaperSizeConfig:
        """Fewer calibration images and repeats: a first look in a fraction of the time (``--quick``)."""
        quick = PaperSizeConfig(work=work, calib_images=4, runs=4, warmup=1, rounds=2, batch_sizes=(1,), decode_files=2)
        return replace(quick, **changes)

    def resolved_profile(self) -> StandInProfile:
        """``profile``, or the paper profile's architectures."""
        if self.profile is not None:
            return self.profile
        profiles = import_optional("spine_edge.training.profiles", "train", "The paper-size benchmark")
        return StandInProfile.from_profile(profiles.PAPER)


# ----------------------------------------------------------------------------------------- memory


def _status_kib(pid: int | str, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` and their descendants (Linux ``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                kids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


class PeakMemory:
    """True peak resident memory of a block: this process's high-water mark plus its children's.

    ``VmHWM`` of this process is reset at the start (so the peak is the block's own) and sampled in a
    thread, because code inside the block may reset it again (the exporter's calibration does, to
    report its own peak) and a reset would otherwise hide what came before. Children are sampled too:
    their ``VmHWM`` is gone once they exit, and ``ru_maxrss`` of children only covers waited-for ones.
    The peak is ``max(self) + max(children)``: an upper bound where both peak at once, exact here,
    where the parent waits while its child works.

    Attributes:
        peak_mb: The peak, set when the block ends.
        self_mb: This process's part.
        children_mb: The children's part (summed over children alive at once).
    """

    def __init__(self) -> None:
        self.peak_mb = self.self_mb = self.children_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034  (a plain class; Self needs typing_extensions on 3.10)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            log.debug("cannot reset VmHWM; the peak includes earlier phases")
        self._sample()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        own = max(_status_kib(me, "VmHWM"), _status_kib(me, "VmRSS")) / 1024
        kids = sum(_status_kib(kid, "VmHWM") for kid in _children(me)) / 1024
        self.self_mb = max(self.self_mb, own)
        self.children_mb = max(self.children_mb, kids)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak_mb = round(self.self_mb + self.children_mb, 1)


# ----------------------------------------------------------------------------------------- CPU floors


@dataclass(frozen=True)
class CpuFloors:
    """Arithmetic peaks of this CPU, from its flags, cores and nominal clock.

    Per core and cycle, assuming two 512-bit (or 256-bit) FMA ports as on Xeon server cores (client
    cores with one AVX-512 port reach half): FP32 FMA 64 FLOP (AVX-512) / 32 (AVX2); INT8 dot products
    256 ops (AVX-512 VNNI) / 128 (AVX-VNNI, or AVX2 without VNNI through pmaddubsw) ; BF16 128 FLOP
    (AVX-512 BF16); AMX tiles 1024 FLOP BF16 and 2048 ops INT8. Peaks are ``cores × clock × per-cycle``;
    a graph's floor is its FLOPs over the peak of the units its precision can use.

    Attributes:
        cpu: Model name.
        cores: Cores this process may use.
        ghz: Nominal clock (``cpu MHz`` of ``/proc/cpuinfo``; turbo and AVX-512 downclocking ignored).
        flags: The ISA flags that set the peaks.
        gflops: Peak GFLOP/s (GOP/s for INT8) per kind: ``fp32``, ``bf16``, ``int8``.
    """

    cpu: str
    cores: int
    ghz: float
    flags: tuple[str, ...]
    gflops: dict[str, float]

    def floor_ms(self, gflop: float, kind: str) -> float | None:
        """Milliseconds ``gflop`` takes at the ``kind`` peak (None where unknown)."""
        peak = self.gflops.get(kind)
        return None if not peak else gflop / peak * 1e3

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


#: Per-core, per-cycle operations by the best unit present, most capable first.
_PER_CYCLE: dict[str, tuple[tuple[str, int], ...]] = {
    "fp32": (("avx512f", 64), ("fma", 32), ("sse2", 8)),
    "bf16": (("amx_bf16", 1024), ("avx512_bf16", 128)),
    "int8": (("amx_int8", 2048), ("avx512_vnni", 256), ("avx_vnni", 128), ("avx2", 128)),
}


def _cpuinfo() -> tuple[set[str], float]:
    flags: set[str] = set()
    mhz = 0.0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "cpu MHz" and not mhz:
                    mhz = float(value)
    except (OSError, ValueError):
        pass
    return flags, mhz


def cpu_floors(cores: int | None = None, flags: set[str] | None = None, mhz: float | None = None) -> CpuFloors:
    """This CPU's peaks (arguments override what ``/proc/cpuinfo`` says, for tests and other boxes)."""
    found_flags, found_mhz = _cpuinfo()
    flags = found_flags if flags is None else flags
    ghz = (found_mhz if mhz is None else mhz) / 1e3
    cores = cores or available_cores()
    gflops: dict[str, float] = {}
    used: list[str] = []
    for kind, options in _PER_CYCLE.items():
        for flag, per_cycle in options:
            if flag in flags:
                gflops[kind] = round(cores * ghz * per_cycle, 1)
                used.append(flag)
                break
    return CpuFloors(cpu=cpu_model_name(), cores=cores, ghz=round(ghz, 3), flags=tuple(used), gflops=gflops)


# ----------------------------------------------------------------------------------------- children


def run_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh (spawned) process, its result returned (picklable).

    torch, timm and ultralytics stay out of this process: their memory is returned to the system when
    the child ends, so the library sessions measured afterwards start from a small process. A child
    that dies (killed for memory) raises ``BrokenProcessPool`` here instead of hanging, as a
    ``multiprocessing.Pool`` would while it replaces the worker.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def pin_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds, so repeated runs meet the same allocator state.

    glibc raises its mmap threshold each time a large block is freed (dynamic threshold): the first
    runs get fresh zeroed pages from ``mmap`` (page faults), later ones heap memory, and the eager
    baseline's time drifts by a quarter with it. Fixed thresholds switch that adjustment off. Returns
    False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold on 64-bit; a 1 GiB trim threshold keeps freed memory mapped.
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


# ----------------------------------------------------------------------------------------- graphs


def measure_batchnorm(model: Any, batch: Any) -> None:
    """Set every BatchNorm's running statistics to those of ``batch`` (one forward pass in train mode).

    A freshly initialised network's activations shrink layer by layer (ultralytics' YOLO11 most), down
    to denormal floats, which some CPU kernels run many times slower than normal ones: the benchmark
    would time the weights, not the graph. Statistics measured on radiograph-like images keep each
    layer's output at unit scale, as in a trained network.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch's statistics
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def write_random_checkpoints(folder: Path, profile: StandInProfile, seed: int = 0) -> Path:
    """Random-weight checkpoints in ``spine-edge train``'s format: members, ``ensemble.json``, ``detector.pt``.

    Weights are random; BatchNorm statistics are measured on synthetic radiographs
    (:func:`measure_batchnorm`).

    Args:
        folder: Checkpoint folder to write.
        profile: Architectures and sizes.
        seed: torch seed.

    Returns:
        ``folder``.
    """
    import torch

    from spine_edge.training.checkpoints import ClassifierMeta, classifier_checkpoint_path, save_classifier_checkpoint
    from spine_edge.training.detector import configure_ultralytics
    from spine_edge.training.ensemble import ENSEMBLE_FORMAT, ENSEMBLE_JSON
    from spine_edge.training.models import build_backbone, resolve_data_config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    members = []
    for arch, weight in profile.members:
        model = build_backbone(arch)  # timm pretrained=False: nothing is downloaded
        cfg = resolve_data_config(model, profile.classifier_size)
        gray = torch.from_numpy(_canvases("classifier", profile.classifier_size, count=2)).float() / 255
        mean, std = torch.tensor(cfg.mean).view(1, -1, 1, 1), torch.tensor(cfg.std).view(1, -1, 1, 1)
        measure_batchnorm(model, (gray.expand(-1, 3, -1, -1) - mean) / std)
        meta = ClassifierMeta(
            arch=arch,
            input_size=profile.classifier_size,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            in_chans=3,
            recipe={},
            data_fingerprint="random-weights",
            val_metrics={},
            tta_views=profile.tta_views,
            epoch=0,
            profile=profile.name,
        )
        path = save_classifier_checkpoint(classifier_checkpoint_path(folder, arch), model.state_dict(), meta)
        members.append({"name": arch, "arch": arch, "weight": weight, "checkpoint": path.name, "val_auroc": None})
        del model
    ensemble = {
        "format": ENSEMBLE_FORMAT,
        "members": members,
        "threshold": PAPER_THRESHOLD,
        "tta_views": list(profile.tta_views),
        "input_size": profile.classifier_size,
        "metrics": {},
        "search": {"note": "random weights: no search"},
    }
    write_text_atomic(folder / ENSEMBLE_JSON, json.dumps(ensemble, indent=2) + "\n")
    configure_ultralytics()  # offline, settings in spine-edge's config dir, before ultralytics is imported
    from ultralytics import __version__ as ultralytics_version
    from ultralytics.nn.tasks import DetectionModel

    detector = DetectionModel(profile.detector_model, nc=len(CLASS_NAMES), verbose=False)
    detector.names = dict(enumerate(CLASS_NAMES))
    gray = torch.from_numpy(_canvases("detector", profile.detector_size, count=2)).float() / 255
    measure_batchnorm(detector, gray.expand(-1, 3, -1, -1))  # gray PNGs reach ultralytics as 3 equal channels
    checkpoint = {
        "model": detector.half(),
        "ema": None,
        "train_args": {"imgsz": profile.detector_size, "task": "detect"},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "version": ultralytics_version,
    }
    torch.save(checkpoint, folder / "detector.pt")
    return folder


def export_graphs(checkpoints: Path, out: Path, profile: StandInProfile) -> dict[str, Any]:
    """Trace the checkpoints to the FP32 classifier and detector graphs with the exporter's functions.

    Returns:
        Seconds per graph and the graph files (``classifier``, ``detector``).
    """
    from spine_edge.export.classifier_graph import build_ensemble, export_classifier_graph, read_ensemble_spec
    from spine_edge.export.detector_graph import build_detector_module, export_detector_graph

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    spec = read_ensemble_spec(checkpoints)
    ensemble = build_ensemble(spec)
    classifier = export_classifier_graph(ensemble, out / GRAPH_FILES["fp32"].format(role="classifier"), spec.input_size)
    timings["classifier_s"] = round(time.perf_counter() - start, 1)
    del ensemble
    start = time.perf_counter()
    module, source = build_detector_module(checkpoints / "detector.pt")
    detector = export_detector_graph(
        module, source, out / GRAPH_FILES["fp32"].format(role="detector"), profile.detector_size
    )
    timings["detector_s"] = round(time.perf_counter() - start, 1)
    return {"seconds": timings, "classifier": str(classifier), "detector": str(detector)}


def _checkpoints_and_graphs(checkpoints: Path, out: Path, profile: StandInProfile) -> dict[str, Any]:
    """Child-process body: both steps, so torch is loaded once and released with the child."""
    start = time.perf_counter()
    write_random_checkpoints(checkpoints, profile)
    result = export_graphs(checkpoints, out, profile)
    result["seconds"]["checkpoints_s"] = round(time.perf_counter() - start - sum(result["seconds"].values()), 1)
    return result


def write_calibration_images(
    folder: Path, count: int, long_side: int = CALIBRATION_LONG_SIDE, seed: int = 0
) -> list[Path]:
    """``count`` synthetic radiograph PNGs (8-bit, portrait, spine-like) for calibration."""
    from spine_edge.benchmarks.synthetic import synthetic_pixels

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        rows, cols = long_side, long_side * 4 // 5
        pixels = synthetic_pixels(rows, cols, i, rng).astype(np.float32) / 16
        paths.append(write_image_atomic(folder / f"calib_{i:03d}.png", pixels.clip(0, 255).astype(np.uint8)))
    return paths


#: Tensors whose ranges one calibration pass collects (see :func:`calibrate_streaming`).
TENSORS_PER_PASS = 400


def calibrate_streaming(
    fp32_path: Path, reader: Any, ranges_path: Path, tensors_per_pass: int = TENSORS_PER_PASS
) -> Any:
    """MinMax activation ranges as ``export.precision.calibrate`` writes them, a group of tensors per pass.

    ONNX Runtime's calibrator puts a ReduceMin/ReduceMax pair on every float tensor of the graph at
    once and runs that in a session with the CPU arena: on the paper-size classifier (3 backbones × 5
    views at 384 px) it peaked at 13.4 GB for 4 images on this box. Here each pass adds the pairs for
    ``tensors_per_pass`` tensors only, runs every image through a session without the arena and
    keeps a running min and max per tensor, so memory is one pass's session; the time grows with the
    number of passes. The tensors and the ranges file are ONNX Runtime's own
    (``select_tensors_to_calibrate``, ``save_tensors_data``), so ``quantize_graph`` reads the result
    unchanged.

    Args:
        fp32_path: The FP32 graph.
        reader: An ``export.precision.CalibrationImages`` (``set_range``/``get_next``/``paths``).
        ranges_path: Where to write the ranges (JSON).
        tensors_per_pass: Tensors calibrated per pass.

    Returns:
        An ``export.precision.CalibrationResult``.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        MinMaxCalibrater,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    from spine_edge.export import precision as prec

    peak = PeakMemory()
    start = time.perf_counter()
    with peak, tempfile.TemporaryDirectory(prefix="spine-edge-calib-") as tmp:
        # Only for its tensor selection (after ONNX shape inference); its all-at-once graph is never built.
        selector = MinMaxCalibrater(fp32_path, augmented_model_path=str(Path(tmp) / "unused.onnx"))
        selected, value_infos = selector.select_tensors_to_calibrate(selector.model)
        tensors = sorted(selected)
        types = {name: value_infos[name].type.tensor_type.elem_type for name in tensors}
        model = selector.model
        del selector
        lowest: dict[str, np.ndarray] = {}
        highest: dict[str, np.ndarray] = {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        for first in range(0, len(tensors), tensors_per_pass):
            group = tensors[first : first + tensors_per_pass]
            augmented = onnx.ModelProto()
            augmented.CopyFrom(model)
            outputs = []
            for name in group:
                for op in ("ReduceMin", "ReduceMax"):
                    out = f"{name}__{op}"
                    augmented.graph.node.append(helper.make_node(op, [name], [out], keepdims=0, name=out))
                    augmented.graph.output.append(helper.make_tensor_value_info(out, types[name], []))
                    outputs.append(out)
            path = Path(tmp) / "augmented.onnx"
            onnx.save(augmented, str(path))
            del augmented
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            reader.rewind()
            while (feed := reader.get_next()) is not None:
                values = dict(zip(outputs, session.run(outputs, feed), strict=True))
                for name in group:
                    low, high = values[f"{name}__ReduceMin"], values[f"{name}__ReduceMax"]
                    lowest[name] = low if name not in lowest else np.minimum(lowest[name], low)
                    highest[name] = high if name not in highest else np.maximum(highest[name], high)
            del session
            gc.collect()
    ranges = TensorsData(
        CalibrationMethod.MinMax,
        # Shape [1] per tensor, as ONNX Runtime's calibrator stores them (its Reshape to [-1]).
        {name: TensorData(lowest=lowest[name].reshape(1), highest=highest[name].reshape(1)) for name in tensors},
    )
    save_tensors_data(ranges, ranges_path)
    return prec.CalibrationResult(
        ranges=ranges_path,
        method="minmax",
        images=len(reader),
        source=str(Path(reader.paths[0]).parent.parent.resolve()) if reader.paths else "",
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_mb=peak.peak_mb,
        baseline_rss_mb=0.0,
    )


def quantize_graphs(
    graphs: Mapping[Role, Path], sizes: Mapping[Role, int], images: Sequence[Path], out: Path, progress: bool
) -> dict[str, Any]:
    """Calibrate each FP32 graph (streaming MinMax) and write its two INT8 Q/DQ graphs.

    Returns:
        Per role: calibration summary (time, images, its own peak RSS) and quantisation seconds.
    """
    import onnx

    from spine_edge.export import precision as prec
    from spine_edge.export.bundle_writer import write_onnx

    pads = {"classifier": CLASSIFIER_PAD_VALUE, "detector": DETECTOR_PAD_VALUE}
    record: dict[str, Any] = {}
    for role, fp32 in graphs.items():
        _say(progress, f"calibrating the {role} on {len(images)} images")
        reader = prec.CalibrationImages(images, "image", sizes[role], pads[role])
        calibration = calibrate_streaming(fp32, reader, out / f"{role}.ranges.json")
        body = prec.fp16_body(onnx.load(str(fp32), load_external_data=False))
        start = time.perf_counter()
        for variant, target in INT8_VARIANTS.items():
            _say(progress, f"quantising the {role} for {target}")
            path = prec.quantize_graph(fp32, out / GRAPH_FILES[variant].format(role=role), calibration, target, body)
            if target == "tensorrt":  # what export writes for TensorRT: the same Q/DQ with an FP16 body
                write_onnx(prec.int8_fp16_body(onnx.load(str(path))), path)
            gc.collect()
        record[role] = {"calibration": calibration.to_dict(), "quantize_s": round(time.perf_counter() - start, 1)}
    return record


# ----------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class GraphRun:
    """One graph on one library at one precision.

    Attributes:
        role: ``classifier`` or ``detector``.
        library: ``onnxruntime`` or ``openvino``.
        precision: ``fp32``, ``bf16`` or ``int8``.
        graph: The ONNX file run.
        compile_s: First session creation / compilation (s).
        cached_compile_s: OpenVINO: loading the same graph again from its model cache (s); None for ONNX Runtime.
        timings: One :class:`ModelTiming` per batch size.
        gflop_per_image: FLOPs of the FP32 graph per image (GFLOP).
        floor_ms: FLOPs over the CPU's peak for the units this precision can use (ms per image).
        peak_rss_mb: Peak memory while this graph was compiled and timed (process and children).
        runtime_precisions: OpenVINO: executed layers per runtime precision (empty for ONNX Runtime).
        load_average: The highest 1-minute load average at the end of its rounds: on a shared box, how
            many other runnable processes competed with it for the cores.
        round_p50_ms: Median per-image time at batch 1 in each round: how much the box drifted.
        error: Why it did not run (empty when it ran).
    """

    role: str
    library: str
    precision: str
    graph: str
    compile_s: float | None = None
    cached_compile_s: float | None = None
    timings: tuple[ModelTiming, ...] = ()
    gflop_per_image: float | None = None
    floor_ms: float | None = None
    peak_rss_mb: float | None = None
    runtime_precisions: dict[str, int] = field(default_factory=dict)
    load_average: float | None = None
    round_p50_ms: tuple[float, ...] = ()
    error: str = ""

    def at_batch(self, batch: int) -> ModelTiming | None:
        """The timing at ``batch``, if measured."""
        return next((t for t in self.timings if t.batch_size == batch), None)

    @property
    def latency_ms(self) -> float | None:
        """Median per-image time at batch 1."""
        timing = self.at_batch(1)
        return None if timing is None else timing.per_image.p50

    @property
    def gflops_per_s(self) -> float | None:
        """Achieved GFLOP/s at batch 1 (FP32 graph's FLOPs over this run's median)."""
        ms = self.latency_ms
        return None if ms is None or self.gflop_per_image is None or ms <= 0 else self.gflop_per_image / ms * 1e3

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        data = {k: v for k, v in asdict(self).items() if k != "timings"}
        data["timings"] = [t.to_dict() for t in self.timings]
        data["latency_ms"] = self.latency_ms
        data["gflops_per_s"] = None if self.gflops_per_s is None else round(self.gflops_per_s, 1)
        return data


#: Which units a precision can use on a CPU, for its floor.
_FLOOR_KIND = {"fp32": "fp32", "bf16": "bf16", "int8": "int8"}


def plan_runs(openvino: bool, bf16: bool) -> list[tuple[str, str, str]]:
    """``(library, precision, graph variant)`` to measure, one library at a time.

    ONNX Runtime runs its own U8S8 graph as INT8 (the fast one on a CPU); OpenVINO runs the symmetric
    TensorRT graph, the one TensorRT builds, so one INT8 graph serves both. BF16 is the FP32 graph
    with OpenVINO's precision hint, where the CPU has BF16.
    """
    runs = [("onnxruntime", "fp32", "fp32"), ("onnxruntime", "int8", "int8-ort")]
    if openvino:
        runs += [("openvino", "fp32", "fp32"), ("openvino", "int8", "int8-trt")]
        if bf16:
            runs.insert(3, ("openvino", "bf16", "fp32"))
    return runs


def _open(library: str, precision: str, path: Path, threads: int, cache: Path) -> Backend:
    if library == "openvino":
        from spine_edge.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(
            path, precision="bf16" if precision == "bf16" else "fp32", threads=threads, cache_dir=cache
        )
    return OnnxRuntimeBackend(path, provider="cpu", threads=threads)


def _canvases(role: Role, size: int, count: int = 4) -> np.ndarray:
    """Letterboxed synthetic radiographs ``[count, 1, S, S]`` uint8 (what the cascade feeds each graph)."""
    from spine_edge.benchmarks.synthetic import synthetic_pixels
    from spine_edge.preprocess import letterbox

    rng = np.random.default_rng(1)
    pad = CLASSIFIER_PAD_VALUE if role == "classifier" else DETECTOR_PAD_VALUE
    images = [(synthetic_pixels(size * 2, size * 8 // 5, i, rng) // 16).astype(np.uint8) for i in range(count)]
    return np.stack([letterbox(image, size, pad)[0] for image in images])[:, None]


def time_graph(
    role: Role,
    library: str,
    precision: str,
    path: Path,
    canvases: np.ndarray,
    config: PaperSizeConfig,
    threads: int,
    cache: Path,
    fresh: bool,
) -> tuple[GraphRun, dict[int, list[float]]]:
    """One round of one graph: open it, then ``config.runs_per_round`` timed calls at each batch size.

    ``fresh`` (the first round) compiles from no cache and, for OpenVINO, loads the same graph again
    from its model cache, recording both times; later rounds open it from the cache. Returns the run
    (without timings) and the per-call milliseconds per batch size, for :func:`pooled_run`.
    """
    run = GraphRun(role=role, library=library, precision=precision, graph=path.name)
    if fresh:  # a cache left by an earlier run would make the first compilation a cache load
        shutil.rmtree(cache, ignore_errors=True)
    with PeakMemory() as memory:
        start = time.perf_counter()
        backend = _open(library, precision, path, threads, cache)
        with backend:
            compile_s = time.perf_counter() - start
            cached_s = None
            if fresh and library == "openvino":
                start = time.perf_counter()
                with _open(library, precision, path, threads, cache):
                    cached_s = time.perf_counter() - start
            samples = {
                b: time_model_calls(backend, canvases, b, config.runs_per_round, config.warmup)
                for b in config.batch_sizes
            }
            precisions = dict(getattr(backend, "runtime_precisions", {}))
    run = replace(
        run,
        compile_s=round(compile_s, 2) if fresh else None,
        cached_compile_s=None if cached_s is None else round(cached_s, 2),
        peak_rss_mb=memory.peak_mb,
        runtime_precisions=precisions,
        load_average=_load_1min(),
    )
    return run, samples


def pooled_run(rounds: Sequence[tuple[GraphRun, Mapping[int, Sequence[float]]]]) -> GraphRun:
    """One graph's rounds as one run: compile times and precisions of the first, every sample pooled.

    Peak memory and load average are the highest of any round; ``round_p50_ms`` keeps each round's
    batch-1 median, so the report shows the drift the pooling evened out.
    """
    first = rounds[0][0]
    batches = list(rounds[0][1])
    timings = tuple(timing_of(b, [ms for _, samples in rounds for ms in samples[b]]) for b in batches)
    per_round = tuple(round(float(np.median(samples[1])), 1) for _, samples in rounds if samples.get(1))
    peaks = [r.peak_rss_mb for r, _ in rounds if r.peak_rss_mb is not None]
    loads = [r.load_average for r, _ in rounds if r.load_average is not None]
    return replace(
        first,
        timings=timings,
        round_p50_ms=per_round,
        peak_rss_mb=max(peaks, default=None),
        load_average=max(loads, default=None),
    )


# ----------------------------------------------------------------------------------------- decode, torch


def decode_samples(folder: Path, count: int, target_long_side: int) -> dict[str, list[float]]:
    """One round of the read stage: each real-size JPEG 2000 DICOM file read at full and at reduced resolution (ms).

    The files are written the first time (the generator's real-size default).
    """
    from spine_edge.benchmarks.synthetic import write_synthetic_radiographs
    from spine_edge.imageio import read_image

    paths = (sorted(folder.glob("synthetic_*.dicom")) or write_synthetic_radiographs(folder, count))[:count]
    samples: dict[str, list[float]] = {}
    for name, target in (("full", None), ("reduced", target_long_side)):
        samples[name] = []
        for path in paths:
            start = time.perf_counter()
            read_image(path, target_long_side=target)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def pooled_decode(rounds: Sequence[Mapping[str, Sequence[float]]], target_long_side: int) -> dict[str, Any]:
    """The read stage over all rounds: full and reduced summaries, and the files per round."""
    record: dict[str, Any] = {"files": len(rounds[0]["full"]), "target_long_side": target_long_side}
    for name in ("full", "reduced"):
        record[name] = summarize_latency([ms for r in rounds for ms in r[name]]).to_dict()
    return record


def _spread(samples: Sequence[float]) -> dict[str, Any]:
    stats = summarize_latency(samples)
    return stats.to_dict() | {"spread_pct": round((stats.max - stats.min) / stats.p50 * 100, 1) if stats.p50 else None}


def torch_round(
    checkpoints: Path,
    profile: StandInProfile,
    threads: int,
    runs: int,
    warmup: int,
    eager: bool,
    gemm_precisions: tuple[str, ...],
) -> dict[str, Any]:
    """Child-process body of one round: PyTorch's matrix-product ceilings and, with ``eager``, the modules.

    The classifier is export's own ``DERNetEnsemble`` (TTA, ensemble, CAM); the detector the module the
    detector graph was traced from (model only, no NMS), each fed the same letterboxed canvases as the
    graphs, batch 1. Allocator thresholds are pinned first and ``warmup`` untimed calls run before the
    ``runs`` timed ones. Returns the raw milliseconds, for :func:`pooled_torch`.
    """
    pinned = pin_allocator()
    import torch

    from spine_edge.benchmarks.ceiling import torch_gemm
    from spine_edge.export.classifier_graph import build_ensemble, read_ensemble_spec
    from spine_edge.export.detector_graph import build_detector_module

    torch.set_num_threads(threads)
    record: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "allocator_pinned": pinned,
        "versions": package_versions(("torch", "timm", "ultralytics"), missing=""),
        "gemm": torch_gemm(threads, gemm_precisions),
    }
    if not eager:
        return record
    with torch.inference_mode():
        canvases = torch.from_numpy(_canvases("classifier", profile.classifier_size))
        ensemble = build_ensemble(read_ensemble_spec(checkpoints))
        record["classifier_ms"] = _time_torch(ensemble, canvases, runs, warmup)
        record["classifier_probs"] = [float(ensemble(canvases[i][None])[0][0]) for i in range(len(canvases))]
        del ensemble  # one model in memory at a time
        module, _ = build_detector_module(checkpoints / "detector.pt")
        record["detector_ms"] = _time_torch(
            module, torch.from_numpy(_canvases("detector", profile.detector_size)), runs, warmup
        )
    return record


def pooled_torch(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """PyTorch eager over all rounds: pooled spreads per module and each round's median."""
    first = rounds[0]
    record: dict[str, Any] = {k: first[k] for k in ("threads", "allocator_pinned", "versions")}
    record["classifier_probs"] = first["classifier_probs"]
    for module in ROLES:
        samples = [r[f"{module}_ms"] for r in rounds]
        record[module] = _spread([ms for s in samples for ms in s])
        record[module]["round_p50_ms"] = [round(float(np.median(s)), 1) for s in samples]
    return record


def _time_torch(module: Any, canvases: Any, runs: int, warmup: int) -> list[float]:
    """Milliseconds of ``runs`` batch-1 calls of ``module`` on ``canvases`` (cycled), after ``warmup`` calls."""
    for i in range(warmup):
        module(canvases[i % len(canvases)][None])
    samples = []
    for i in range(runs):
        feed = canvases[i % len(canvases)][None]
        start = time.perf_counter()
        module(feed)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


# ----------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class PaperSizeReport:
    """Everything :func:`run_paper_size` measured.

    Attributes:
        note: :data:`RANDOM_WEIGHTS_NOTE`.
        created: ISO-8601 UTC time.
        profile: The architectures measured.
        environment: CPU, threads, load average before and after, library versions.
        floors: This CPU's nominal peaks.
        ceilings: Measured ones: ``measured`` (per library and precision, the median of the rounds'
            large dense products, :mod:`spine_edge.benchmarks.ceiling`) and ``best`` (the fastest
            library per precision); empty when not measured.
        flops: GFLOP per image of each FP32 graph (and counted nodes).
        phases: Wall time and true peak memory per phase (s, MiB).
        build: Export, calibration and quantisation record.
        runs: One :class:`GraphRun` per role, library and precision.
        decode: Read-stage timing of real-size JPEG 2000 files.
        torch: PyTorch eager timings (empty when not run) and ``skipped`` with a reason.
        peak_rss_mb: Peak over all phases (process and children).
    """

    note: str
    created: str
    profile: StandInProfile
    environment: dict[str, Any]
    floors: CpuFloors
    flops: dict[str, Any]
    phases: dict[str, dict[str, float]]
    build: dict[str, Any]
    runs: tuple[GraphRun, ...]
    decode: dict[str, Any]
    torch: dict[str, Any]
    ceilings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_rss_mb(self) -> float:
        """The largest phase peak."""
        return max((p["peak_rss_mb"] for p in self.phases.values()), default=0.0)

    def ceiling_share(self, run: GraphRun) -> float | None:
        """Percent of the measured ceiling of its precision that a run's batch-1 GFLOP/s reaches."""
        best = self.ceilings.get("best", {}).get(_FLOOR_KIND[run.precision])
        rate = run.gflops_per_s
        return None if not best or rate is None else rate / best["gflops"] * 100

    def run(self, role: str, library: str, precision: str) -> GraphRun | None:
        """The run of one graph, library and precision, if measured."""
        return next((r for r in self.runs if (r.role, r.library, r.precision) == (role, library, precision)), None)

    def cascade(self) -> list[dict[str, Any]]:
        """Per library and precision: both models (an abnormal image runs both) and end to end with decode."""
        rows = []
        torch_ms = self._torch_models_ms()
        decode = self.decode.get("reduced") or self.decode.get("full") or {}
        read_ms = decode.get("p50")
        for library, precision in dict.fromkeys((r.library, r.precision) for r in self.runs):
            cls, det = self.run("classifier", library, precision), self.run("detector", library, precision)
            if cls is None or det is None or cls.latency_ms is None or det.latency_ms is None:
                continue
            models = cls.latency_ms + det.latency_ms
            rows.append(
                {
                    "library": library,
                    "precision": precision,
                    "classifier_ms": cls.latency_ms,
                    "detector_ms": det.latency_ms,
                    "models_ms": models,
                    "end_to_end_ms": None if read_ms is None else models + read_ms,
                    "speedup_vs_torch_models": None if not torch_ms else torch_ms / models,
                    "speedup_vs_torch_end_to_end": (
                        None if not torch_ms or read_ms is None else (torch_ms + read_ms) / (models + read_ms)
                    ),
                }
            )
        return rows

    def _torch_models_ms(self) -> float | None:
        if "classifier" not in self.torch:
            return None
        return float(self.torch["classifier"]["p50"] + self.torch["detector"]["p50"])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return json_safe(
            {
                "note": self.note,
                "created": self.created,
                "profile": asdict(self.profile),
                "environment": self.environment,
                "floors": self.floors.to_dict(),
                "ceilings": self.ceilings,
                "flops": self.flops,
                "phases": self.phases,
                "build": self.build,
                "runs": [r.to_dict() for r in self.runs],
                "decode": self.decode,
                "torch": self.torch,
                "cascade": self.cascade(),
                "peak_rss_mb": self.peak_rss_mb,
            }
        )


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rounds_text(medians: Sequence[float]) -> str:
    """Each round's median, ``2545/3308/2594``."""
    return "/".join(f"{ms:.0f}" for ms in medians)


def _by_round(stats: Mapping[str, Any]) -> str:
    rounds = stats.get("round_p50_ms") or []
    return f", by round {_rounds_text(rounds)}" if len(rounds) > 1 else ""


def format_paper_size(report: PaperSizeReport) -> str:
    """Markdown: the caveat, the per-graph table with floors, the cascade table, phases and memory."""
    env = report.environment
    lines = [
        f"# Paper-size cascade ({report.profile.name}), random weights",
        "",
        f"> {report.note}",
        "",
        f"CPU: {report.floors.cpu}, {report.floors.cores} cores at {report.floors.ghz} GHz nominal "
        f"({', '.join(report.floors.flags)}); threads {env.get('threads')}; load average before "
        f"{env.get('load_before')}, after {env.get('load_after')}.",
        "Nominal peaks (cores × clock × the units' operations per cycle): "
        + ", ".join(f"{k} {v:g} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in report.floors.gflops.items())
        + ".",
    ]
    best = report.ceilings.get("best", {})
    if best:
        lines.append(
            "Measured ceilings (the fastest library's large dense matrix product, this run): "
            + ", ".join(
                f"{k} {v['gflops']:g} G{'OP' if k == 'int8' else 'FLOP'}/s ({v['library']})" for k, v in best.items()
            )
            + "."
        )
    config = env.get("config", {})
    lines += [
        f"Timing: {config.get('rounds', 1)} interleaved round(s), each timing every graph, the eager modules, the "
        f"read stage and the ceilings once ({env.get('runs_per_round', '?')} calls "
        "per graph per round, samples pooled); 'p50 by round' shows how much the box drifted.",
        "",
        "| graph | library | precision | GFLOP/img | p50 ms (b1) | p50 by round | GFLOP/s | floor ms | % of peak | "
        "% of ceiling | img/s (largest batch) | compile s (cached) | peak MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report.runs:
        if run.error:
            lines.append(f"| {run.role} | {run.library} | {run.precision} | | failed: {run.error} |" + " |" * 9)
            continue
        largest = max(run.timings, key=lambda t: t.batch_size) if run.timings else None
        share = None if run.floor_ms is None or run.latency_ms is None else run.floor_ms / run.latency_ms * 100
        cached = "" if run.cached_compile_s is None else f" ({run.cached_compile_s:.2f})"
        lines.append(
            f"| {run.role} | {run.library} | {run.precision} | {_num(run.gflop_per_image, 2)} | "
            f"{_num(run.latency_ms)} | {_rounds_text(run.round_p50_ms) or '–'} | "
            f"{_num(run.gflops_per_s)} | {_num(run.floor_ms)} | {_num(share)} | {_num(report.ceiling_share(run))} | "
            f"{_num(largest.images_per_second if largest else None, 2)} (b{largest.batch_size if largest else '–'}) | "
            f"{_num(run.compile_s, 2)}{cached} | {_num(run.peak_rss_mb, 0)} | {_num(run.load_average, 2)} |"
        )
    decode = report.decode
    lines += [
        "",
        "Abnormal image (both models), batch 1, p50: models alone and with the read stage "
        f"(JPEG 2000 at real size, reduced-resolution decode p50 {_num((decode.get('reduced') or {}).get('p50'))} ms, "
        f"full {_num((decode.get('full') or {}).get('p50'))} ms).",
        "",
        "| library | precision | classifier ms | detector ms | models ms | end to end ms | × vs eager (models) | "
        "× vs eager (end to end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.cascade():
        lines.append(
            f"| {row['library']} | {row['precision']} | {_num(row['classifier_ms'])} | {_num(row['detector_ms'])} | "
            f"{_num(row['models_ms'])} | {_num(row['end_to_end_ms'])} | {_num(row['speedup_vs_torch_models'], 2)} | "
            f"{_num(row['speedup_vs_torch_end_to_end'], 2)} |"
        )
    if "classifier" in report.torch:
        t = report.torch
        lines += [
            "",
            f"PyTorch eager (threads {t['threads']}, allocator pinned: {t['allocator_pinned']}): classifier p50 "
            f"{t['classifier']['p50']:.1f} ms (min {t['classifier']['min']:.1f}, max {t['classifier']['max']:.1f}, "
            f"spread {t['classifier']['spread_pct']}%{_by_round(t['classifier'])}), detector p50 "
            f"{t['detector']['p50']:.1f} ms (spread {t['detector']['spread_pct']}%{_by_round(t['detector'])}); "
            "FP32 ONNX Runtime vs eager max |Δprob| "
            f"{t.get('max_abs_dprob_vs_ort', float('nan')):.1e}.",
        ]
    else:
        lines += ["", f"PyTorch eager: skipped ({report.torch.get('skipped', 'not run')})."]
    lines += ["", "| phase | seconds | peak MiB (process + children) |", "|---|---|---|"]
    lines += [f"| {name} | {p['seconds']:.1f} | {p['peak_rss_mb']:.0f} |" for name, p in report.phases.items()]
    lines += ["", f"Peak memory over the run: {report.peak_rss_mb:.0f} MiB."]
    return "\n".join(lines)


def write_paper_size_json(report: PaperSizeReport, path: Path) -> Path:
    """Write the report as strict JSON."""
    return write_text_atomic(path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------- driver


def _say(enabled: bool, message: str) -> None:
    if enabled:
        log.warning("paper-size: %s", message)  # warning: shown at the CLI's default log level, above the bars


@contextmanager
def _phase(phases: dict[str, dict[str, float]], name: str, progress: bool) -> Iterator[None]:
    _say(progress, f"{name} ...")
    start = time.perf_counter()
    with PeakMemory() as memory:
        yield
    phases[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": memory.peak_mb}
    _say(progress, f"{name}: {phases[name]['seconds']:.0f} s, peak {memory.peak_mb:.0f} MiB")


def _load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def _openvino_state(config: PaperSizeConfig) -> tuple[bool, bool, str]:
    """(use OpenVINO, CPU has BF16, why not)."""
    if not config.openvino:
        return False, False, "not asked for"
    try:
        from spine_edge.backends.openvino import computes_natively, device_capabilities, import_openvino

        capabilities = device_capabilities(import_openvino().Core())
    except SpineEdgeError as exc:  # not installed, or no CPU device: both mean "skip it", with the reason
        return False, False, str(exc)
    return True, computes_natively("bf16", capabilities), ""


def library_gemms(threads: int, precisions: Sequence[str], openvino: bool) -> dict[str, dict[str, float]]:
    """One round of this process's ceilings: ONNX Runtime's (and OpenVINO's) large dense products.

    A library that cannot run one is left out with a warning: the ceilings are context, and the
    graphs' timings must not be lost for them.
    """
    from spine_edge.benchmarks.ceiling import onnxruntime_gemm, openvino_gemm

    measured: dict[str, dict[str, float]] = {}
    calls: list[tuple[str, Callable[[], dict[str, float]]]] = [("onnxruntime", lambda: onnxruntime_gemm(threads))]
    if openvino:
        calls.append(("openvino", lambda: openvino_gemm(threads, precisions)))
    for library, call in calls:
        try:
            measured[library] = call()
        except (ImportError, RuntimeError) as exc:  # onnx missing, or a library refusing one product
            log.warning("paper-size: %s matrix-product ceiling not measured: %s", library, exc)
    return measured


def pooled_ceilings(rounds: Sequence[Mapping[str, Mapping[str, float]]], wanted: Sequence[str]) -> dict[str, Any]:
    """Median over rounds per library and precision, and the fastest library per wanted precision."""
    from spine_edge.benchmarks.ceiling import best_ceilings

    if not rounds:
        return {}
    measured: dict[str, dict[str, float]] = {}
    for library in dict.fromkeys(lib for r in rounds for lib in r):
        precisions = dict.fromkeys(p for r in rounds for p in r.get(library, {}))
        measured[library] = {
            p: round(float(np.median([r[library][p] for r in rounds if p in r.get(library, {})])), 1)
            for p in precisions
        }
    return {"measured": measured, "best": best_ceilings(measured, wanted), "rounds": len(rounds)}


def run_paper_size(config: PaperSizeConfig) -> PaperSizeReport:
    """Build the paper-size graphs with random weights and measure them on this box (module docstring).

    Raises:
        MissingDependencyError: torch/timm/ultralytics/onnx (the ``train`` extra) are needed to export.
    """
    # Looked up, not imported: torch runs in child processes only, so this one stays small.
    missing = [m for m in ("torch", "timm", "ultralytics", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(missing[0], "train", "The paper-size benchmark (it exports random-weight graphs)")
    profile = config.resolved_profile()
    threads = config.threads or available_cores()
    work = Path(config.work)
    graphs_dir, checkpoints = work / "graphs", work / "checkpoints"
    load_before = _load()
    phases: dict[str, dict[str, float]] = {}
    build: dict[str, Any] = {}
    fp32: dict[Role, Path] = {role: graphs_dir / GRAPH_FILES["fp32"].format(role=role) for role in ROLES}
    variants = [graphs_dir / GRAPH_FILES[v].format(role=r) for v in GRAPH_FILES for r in ROLES]
    reuse = not config.rebuild and all(p.is_file() for p in variants) and (work / "build.json").is_file()
    if reuse:
        _say(config.progress, f"reusing the graphs in {graphs_dir} (pass rebuild to export again)")
        build = json.loads((work / "build.json").read_text())
    else:
        with _phase(phases, "checkpoints + FP32 export", config.progress):
            build["export"] = run_in_child(_checkpoints_and_graphs, checkpoints, graphs_dir, profile)
        with _phase(phases, "calibration + INT8 graphs", config.progress):
            images = write_calibration_images(work / "calibration", config.calib_images)
            sizes: dict[Role, int] = {"classifier": profile.classifier_size, "detector": profile.detector_size}
            build["int8"] = quantize_graphs(fp32, sizes, images, graphs_dir, config.progress)
        write_text_atomic(work / "build.json", json.dumps(json_safe(build), indent=2) + "\n")
    flops: dict[str, Any] = {role: count_flops(path).to_dict() for role, path in fp32.items()}
    floors = cpu_floors(threads)
    use_openvino, bf16, openvino_note = _openvino_state(config)
    canvases = {
        role: _canvases(role, profile.classifier_size if role == "classifier" else profile.detector_size)
        for role in ROLES
    }
    plan = plan_runs(use_openvino, bf16)
    keys = [(role, library, precision, variant) for library, precision, variant in plan for role in ROLES]
    graph_rounds: dict[tuple[str, str, str, str], list[tuple[GraphRun, dict[int, list[float]]]]] = {k: [] for k in keys}
    failed: dict[tuple[str, str, str, str], GraphRun] = {}
    decode_rounds: list[dict[str, list[float]]] = []
    torch_rounds: list[dict[str, Any]] = []
    gemm_rounds: list[dict[str, dict[str, float]]] = []
    gemm_precisions = tuple(p for p in ("fp32", "bf16", "int8") if p in floors.gflops)
    target = max(profile.classifier_size, profile.detector_size)
    with (
        _phase(phases, TIMING_PHASE, config.progress),
        progress_bar(config.progress, config.rounds * len(keys), "graphs") as bar,
    ):
        for round_index in range(config.rounds):
            for key in keys:
                role, library, precision, variant = key
                if key in failed:
                    bar.update(1)
                    continue
                path = graphs_dir / GRAPH_FILES[variant].format(role=role)
                cache = work / "cache" / "openvino" / sha256_file(path)[:16]
                bar.set_description(f"round {round_index + 1}: {role} {library} {precision}")
                try:
                    graph_rounds[key].append(
                        time_graph(
                            role, library, precision, path, canvases[role], config, threads, cache, round_index == 0
                        )
                    )
                except SpineEdgeError as exc:  # one library failing on one graph must not lose the rest of the report
                    log.warning("paper-size: %s on %s %s failed: %s", path.name, library, precision, exc)
                    failed[key] = GraphRun(
                        role=role, library=library, precision=precision, graph=path.name, error=str(exc)[:300]
                    )
                gc.collect()
                bar.update(1)
            bar.set_description(f"round {round_index + 1}: read stage and ceilings")
            if config.decode_files:
                decode_rounds.append(decode_samples(work / "decode", config.decode_files, target))
            gemm_rounds.append(library_gemms(threads, gemm_precisions, use_openvino))
            if importlib.util.find_spec("torch") is not None:
                bar.set_description(f"round {round_index + 1}: PyTorch" + (" eager" if config.baseline else ""))
                child = run_in_child(
                    torch_round,
                    checkpoints,
                    profile,
                    threads,
                    config.runs_per_round,
                    config.warmup,
                    config.baseline,
                    tuple(p for p in gemm_precisions if p != "int8"),
                )
                gemm_rounds[-1]["torch"] = child.pop("gemm")
                torch_rounds.append(child)
    runs: list[GraphRun] = []
    for key in keys:
        role, _, precision, _ = key
        run = failed.get(key) or pooled_run(graph_rounds[key])
        gflop = flops[role]["gflops"]
        runs.append(
            replace(run, gflop_per_image=round(gflop, 3), floor_ms=floors.floor_ms(gflop, _FLOOR_KIND[precision]))
        )
    decode = pooled_decode(decode_rounds, target) if decode_rounds else {}
    torch_record: dict[str, Any] = {"skipped": "not asked for"}
    if config.baseline and torch_rounds:
        torch_record = pooled_torch(torch_rounds)
        with OnnxRuntimeBackend(fp32["classifier"], provider="cpu", threads=threads) as backend:
            ort_probs = backend.infer({"image": canvases["classifier"]})["prob"]
        torch_record["max_abs_dprob_vs_ort"] = float(
            np.abs(np.asarray(torch_record.pop("classifier_probs")) - ort_probs).max()
        )
    ceilings = pooled_ceilings(gemm_rounds, tuple(dict.fromkeys(_FLOOR_KIND[r.precision] for r in runs)))
    environment = {
        "cpu": cpu_model_name(),
        "threads": threads,
        "load_before": load_before,
        "load_after": _load(),
        "python": platform.python_version(),
        "versions": package_versions(VERSION_PACKAGES, missing=""),
        "openvino": "used" if use_openvino else f"skipped: {openvino_note}",
        "bf16": bf16,
        "reused_graphs": reuse,
        "config": json_safe(replace(config, profile=None)),
        "runs_per_round": config.runs_per_round,
    }
    return PaperSizeReport(
        note=RANDOM_WEIGHTS_NOTE,
        created=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        profile=profile,
        environment=environment,
        floors=floors,
        flops=flops,
        phases=phases,
        build=build,
        runs=tuple(runs),
        decode=decode,
        torch=torch_record,
        ceilings=ceilings,
    )
