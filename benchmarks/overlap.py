"""Does decoding overlap the models? Decode alone, models alone, and the pipeline, on the same files.

The cascade reads images in worker threads a bounded number ahead of the models
(:meth:`spine_edge.cascade.Cascade.predict_many`), and JPEG 2000 decoding releases the GIL
(:mod:`spine_edge.j2k`), so the end-to-end rate should approach the slower of the two stages, not
the rate of doing one after the other (issue 14). Three passes over the same files, with the same
cascade settings:

1. **decode**: what the read-ahead does per image (:func:`~spine_edge.imageio.read_image` at the
   cascade's decode long side, then the classifier letterbox) on ``read_workers`` threads;
2. **models**: ``predict_many`` on the images already decoded (arrays: no file is read), so only the
   models, the letterbox and the gate's detector calls remain;
3. **end to end**: ``predict_many`` on the files.

:attr:`OverlapResult.ratio` is the end-to-end rate over ``min(decode, models)``: 1.0 is full
overlap; :attr:`OverlapResult.serial_ratio` is what no overlap at all would give
(``1 / (1/decode + 1/models)`` over the same minimum).

"The slower stage" assumes each stage has cores of its own. When both share them (the default: the
readers and the models' threads on every core), the cores bound the pipeline too: each pass's CPU
time (the process's, all threads) gives the core-seconds an image costs in each stage, and
``cores / (decode + models core-seconds per image)`` is the most the cores can deliver
(:attr:`OverlapResult.cores_rate`). :attr:`OverlapResult.bound_ratio` compares the pipeline with the
tighter of the two bounds. Threads that spin while they wait (ONNX Runtime's and OpenVINO's pools do,
briefly) count as CPU time, so the cores' bound is a conservative one.

Run alone:
    python -m spine_edge.benchmarks.overlap demo/vindr/test_images --bundle runs/bundle
    # the stages on separate cores (one model thread, one reader) on a 2-core box:
    python -m spine_edge.benchmarks.overlap FOLDER --threads 1 --read-workers 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spine_edge.backends.onnxruntime import available_cores, cpu_model_name
from spine_edge.cascade import Cascade, CascadeConfig
from spine_edge.errors import ImageReadError
from spine_edge.imageio import find_images, read_image
from spine_edge.preprocess import letterbox

#: Files timed per pass by default: enough batches for a steady rate, few enough for the bench.
DEFAULT_IMAGES = 48
#: Below this ratio the notes say that the stages did not overlap as they should.
OVERLAP_WARN = 0.8


@dataclass(frozen=True)
class OverlapResult:
    """The three rates on the same files, and how close the pipeline comes to the slower stage.

    Attributes:
        machine: The CPU (and cores) it ran on.
        batch_size: Images per model call.
        read_workers: Reader threads of the pipeline (and of the decode pass).
        images: Files timed in each pass.
        decode_seconds: Wall time of the decode pass.
        models_seconds: Wall time of the models pass (decoded images in memory).
        e2e_seconds: Wall time of the end-to-end pass.
        cores: Cores this process may use.
        decode_cpu_seconds: CPU time (all threads) of the decode pass; None where not measured.
        models_cpu_seconds: CPU time of the models pass.
        e2e_cpu_seconds: CPU time of the end-to-end pass.
    """

    machine: str
    batch_size: int
    read_workers: int
    images: int
    decode_seconds: float
    models_seconds: float
    e2e_seconds: float
    cores: int = 1
    decode_cpu_seconds: float | None = None
    models_cpu_seconds: float | None = None
    e2e_cpu_seconds: float | None = None

    @staticmethod
    def _rate(images: int, seconds: float) -> float:
        return images / seconds if seconds > 0 else math.nan

    @property
    def decode_rate(self) -> float:
        """Images per second of decoding alone."""
        return self._rate(self.images, self.decode_seconds)

    @property
    def models_rate(self) -> float:
        """Images per second of the models alone."""
        return self._rate(self.images, self.models_seconds)

    @property
    def e2e_rate(self) -> float:
        """Images per second of the pipeline."""
        return self._rate(self.images, self.e2e_seconds)

    @property
    def bound_rate(self) -> float:
        """The slower stage's rate: what full overlap reaches."""
        return min(self.decode_rate, self.models_rate)

    @property
    def serial_rate(self) -> float:
        """The rate with no overlap at all: each image decoded, then run."""
        return 1.0 / (1.0 / self.decode_rate + 1.0 / self.models_rate)

    @property
    def ratio(self) -> float:
        """End-to-end rate over the slower stage's: 1.0 is full overlap."""
        return self.e2e_rate / self.bound_rate

    @property
    def serial_ratio(self) -> float:
        """What :attr:`ratio` would be without overlap (the stages' sum)."""
        return self.serial_rate / self.bound_rate

    @property
    def core_ms_per_image(self) -> dict[str, float] | None:
        """CPU milliseconds (all threads) one image cost in each pass; None where not measured."""
        passes = {
            "decode": self.decode_cpu_seconds,
            "models": self.models_cpu_seconds,
            "end_to_end": self.e2e_cpu_seconds,
        }
        if self.images == 0 or any(v is None for v in passes.values()):
            return None
        return {name: float(v) / self.images * 1e3 for name, v in passes.items() if v is not None}

    @property
    def cores_rate(self) -> float | None:
        """What the cores allow when both stages share them: cores over the core-seconds of one image in both."""
        cost = self.core_ms_per_image
        per_image_s = None if cost is None else (cost["decode"] + cost["models"]) / 1e3
        return self.cores / per_image_s if per_image_s else None

    @property
    def bound_ratio(self) -> float:
        """End-to-end rate over the tighter of the slower stage and the cores' bound."""
        cores = self.cores_rate
        return self.e2e_rate / (self.bound_rate if cores is None else min(self.bound_rate, cores))

    @property
    def bottleneck(self) -> str:
        """``decode`` or ``models``: the slower stage."""
        return "decode" if self.decode_rate < self.models_rate else "models"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "machine": self.machine,
            "batch_size": self.batch_size,
            "read_workers": self.read_workers,
            "images": self.images,
            "decode_images_per_second": round(self.decode_rate, 2),
            "models_images_per_second": round(self.models_rate, 2),
            "e2e_images_per_second": round(self.e2e_rate, 2),
            "bottleneck": self.bottleneck,
            "e2e_over_slower_stage": round(self.ratio, 3),
            "serial_over_slower_stage": round(self.serial_ratio, 3),
            "cores": self.cores,
            "core_ms_per_image": None
            if self.core_ms_per_image is None
            else {name: round(ms, 1) for name, ms in self.core_ms_per_image.items()},
            "cores_images_per_second": None if self.cores_rate is None else round(self.cores_rate, 2),
            "e2e_over_bound": round(self.bound_ratio, 3),
        }

    def notes(self) -> list[str]:
        """One line for the report, and a warning when the pipeline is closer to the sum than to the slower stage."""
        lines = [
            f"overlap ({self.machine}, batch {self.batch_size}, {self.read_workers} read workers, {self.images} images): "
            f"decode {self.decode_rate:.1f}, models {self.models_rate:.1f}, end to end {self.e2e_rate:.1f} images/s = "
            f"{self.ratio:.2f} of the slower stage ({self.bottleneck}); one after the other would give "
            f"{self.serial_ratio:.2f}"
        ]
        cores, cost = self.cores_rate, self.core_ms_per_image
        if cores is not None and cost is not None:
            lines.append(
                f"overlap: the stages cost {cost['decode']:.0f} (decode) + {cost['models']:.0f} (models) core-ms "
                f"per image, so {self.cores} shared "
                f"cores allow at most {cores:.1f} images/s; end to end reached {self.bound_ratio:.2f} of the tighter "
                "bound"
            )
        if self.bound_ratio < OVERLAP_WARN:
            lines.append(
                f"overlap: end to end reached only {self.bound_ratio:.2f} of what the slower stage and the cores allow "
                f"(below {OVERLAP_WARN}): the pipeline waits somewhere (compare --read-workers and --threads)"
            )
        return lines


def _decode_one(path: Path, long_side: int | None, size: int, pad: int) -> bool:
    try:
        letterbox(read_image(path, long_side).image, size, pad)
    except ImageReadError:
        return False
    return True


def _decode_pass(
    paths: Sequence[Path], long_side: int | None, size: int, pad: int, workers: int
) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of the process) of decoding ``paths`` on ``workers`` threads."""
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="overlap-read") as pool:
        list(pool.map(lambda p: _decode_one(p, long_side, size, pad), paths))
    return time.perf_counter() - start, time.process_time() - cpu


def _predict_pass(cascade: Cascade, sources: Sequence[Path | np.ndarray]) -> tuple[float, float]:
    """Wall and CPU seconds of the cascade over ``sources``."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in cascade.predict_many(sources):
        pass
    return time.perf_counter() - start, time.process_time() - cpu


def machine_name() -> str:
    """The CPU model and the cores this process may use."""
    return f"{cpu_model_name()}, {available_cores()} cores"


def measure_overlap(settings: CascadeConfig, paths: Sequence[Path], images: int = DEFAULT_IMAGES) -> OverlapResult:
    """Time decode alone, models alone and the pipeline over the same files.

    Args:
        settings: The cascade to run (the bench's reference); the guard's rules are switched off so
            that the three passes do the same work.
        paths: Image files; the first ``images`` that the reader can read are timed.
        images: Files per pass.

    Returns:
        The three wall times and their ratios.

    Raises:
        BundleError, BackendError, MissingDependencyError: The cascade cannot run here.
        ValueError: None of the files can be read.
    """
    settings = replace(settings, guard=False, heatmaps=False)
    with Cascade.from_config(settings) as cascade:
        long_side = cascade.decode_long_side
        chosen: list[Path] = []
        decoded: list[np.ndarray] = []
        for path in paths:
            if len(chosen) == images:
                break
            try:
                decoded.append(read_image(path, long_side).image)
            except ImageReadError:
                continue
            chosen.append(Path(path))
        if not chosen:
            raise ValueError("overlap: none of the files can be read")
        size, pad = cascade.manifest.classifier.input_size, cascade.manifest.classifier.pad_value
        cascade.warmup()
        _predict_pass(cascade, chosen[: settings.batch_size])  # one batch to settle the backends
        decode_s, decode_cpu = _decode_pass(chosen, long_side, size, pad, settings.read_workers)
        models_s, models_cpu = _predict_pass(cascade, decoded)
        e2e_s, e2e_cpu = _predict_pass(cascade, chosen)
    return OverlapResult(
        machine=machine_name(),
        batch_size=settings.batch_size,
        read_workers=settings.read_workers,
        images=len(chosen),
        decode_seconds=decode_s,
        models_seconds=models_s,
        e2e_seconds=e2e_s,
        cores=available_cores(),
        decode_cpu_seconds=decode_cpu,
        models_cpu_seconds=models_cpu,
        e2e_cpu_seconds=e2e_cpu,
    )


def main(argv: list[str] | None = None) -> int:
    """Print the overlap of a bundle's pipeline over the images under a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder [default: $SPINE_EDGE_BUNDLE or runs/bundle]"
    )
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--read-workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="model threads [default: every core]; fewer than the cores leaves the rest to the readers",
    )
    args = parser.parse_args(argv)
    paths = find_images(args.folder)
    if not paths:
        print(f"no images under {args.folder}", file=sys.stderr)
        return 2
    settings = CascadeConfig(
        bundle=args.bundle,
        precision=args.precision,
        batch_size=args.batch_size,
        read_workers=args.read_workers,
        threads=args.threads,
    )
    result = measure_overlap(settings, paths, args.images)
    for line in result.notes():
        print(line)
    print(result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
