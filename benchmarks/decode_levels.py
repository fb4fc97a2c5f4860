"""Time JPEG 2000 decoding per resolution level, and two decoding threads against one.

For each JPEG 2000 DICOM file given (e.g. the test split that ``spine-edge data synth --scale 1.0``
writes, 1 400-2 900 px like VinDr-SpineXR): the median time of pydicom's full decode
(pylibjpeg-openjpeg, what the reader used before), of :func:`spine_edge.j2k.decode` at every level
the codestream has (each one checked to decode to the expected shape), and of
:func:`~spine_edge.imageio.read_image` with and without ``--target``. Then the same decodes of all
files run once on one thread and once on ``--threads`` threads: with the GIL released the threaded
wall time approaches the serial one divided by the cores.

Run:
    python -m spine_edge.benchmarks.decode_levels data/test_images --target 640 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import pixel_array

from spine_edge import j2k
from spine_edge.imageio import find_images, read_image


def _best_ms(call: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` runs: other work on a shared machine only ever adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def _python_progress_during(call: Callable[[], object]) -> tuple[float, float]:
    """Loop iterations per second another Python thread makes while ``call`` runs, and alone.

    A decoder that holds the GIL stops the other thread (close to 0 per second) whatever the
    machine's load; one that releases it lets the thread run at close to its own speed.
    """
    done = threading.Event()
    counts = [0]

    def spin() -> None:
        while not done.is_set():
            counts[0] += 1

    start = time.perf_counter()
    spin_for = threading.Timer(0.3, done.set)
    spin_for.start()
    spin()
    alone = counts[0] / (time.perf_counter() - start)
    done.clear()
    counts[0] = 0
    worker = threading.Thread(target=spin)
    start = time.perf_counter()
    worker.start()
    call()
    elapsed = time.perf_counter() - start
    done.set()
    worker.join()
    return counts[0] / elapsed, alone


def _wall(calls: list[Callable[[], object]], threads: int) -> float:
    start = time.perf_counter()
    if threads == 1:
        for call in calls:
            call()
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda call: call(), calls))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Print the per-level table and the thread scaling for the JPEG 2000 files under a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--target", type=int, default=640, help="target_long_side for read_image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not j2k.decoder_available():
        print("no libopenjp2 found: spine_edge.j2k cannot decode here", file=sys.stderr)
        return 3
    print(f"OpenJPEG {j2k.decoder_version()}, load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    streams: list[tuple[Path, pydicom.FileDataset, bytes, j2k.CodestreamInfo]] = []
    for path in find_images(args.folder):
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            streams.append((path, ds, frame, j2k.parse_codestream(frame)))
    if not streams:
        print(f"no JPEG 2000 DICOM files under {args.folder}", file=sys.stderr)
        return 2
    print("\nfile | size | pydicom full ms | j2k level: ms (shape) ... | read_image full / target ms (level)")
    speedups = []
    for path, ds, frame, info in streams:
        pydicom_ms = _best_ms(partial(pixel_array, ds), args.repeats)
        levels = []
        for level in range(info.levels + 1):
            decoded = j2k.decode(frame, level, np.uint16)
            if decoded.shape != info.reduced_shape(level):
                levels.append(f"L{level}: WRONG SHAPE {decoded.shape}")
                continue
            ms = _best_ms(partial(j2k.decode, frame, level, np.uint16), args.repeats)
            levels.append(f"L{level}: {ms:.0f} ({decoded.shape[0]}x{decoded.shape[1]})")
        full_ms = _best_ms(partial(read_image, path), args.repeats)
        target_ms = _best_ms(partial(read_image, path, args.target), args.repeats)
        chosen = read_image(path, args.target).level
        speedups.append(full_ms / target_ms)
        print(f"{path.name[:12]} | {info.rows}x{info.columns} | {pydicom_ms:.0f} | {' '.join(levels)} | "
              f"{full_ms:.0f} / {target_ms:.0f} (L{chosen}, {full_ms / target_ms:.1f}x)")  # fmt: skip
    print(
        f"read_image speed-up at target {args.target}: median {statistics.median(speedups):.1f}x (best of {args.repeats} runs each)"
    )
    print(f"\nthreads (each file decoded twice per run, {len(streams) * 2} decodes), load {os.getloadavg()}")
    workloads: dict[str, list[Callable[[], object]]] = {
        "pydicom full (pylibjpeg-openjpeg)": [partial(pixel_array, ds) for _, ds, _, _ in streams],
        "j2k full": [partial(j2k.decode, frame, 0) for _, _, frame, _ in streams],
        f"read_image target {args.target}": [partial(read_image, path, args.target) for path, *_ in streams],
    }
    largest = max(streams, key=lambda item: item[3].rows * item[3].columns)
    for label, call in (("pydicom", partial(pixel_array, largest[1])), ("j2k", partial(j2k.decode, largest[2], 0))):
        during, alone = _python_progress_during(call)
        print(f"GIL: another Python thread ran at {during / alone:.0%} of its own speed during a {label} full decode")
    for label, calls in workloads.items():
        one = min(_wall(calls * 2, 1) for _ in range(args.repeats))
        many = min(_wall(calls * 2, args.threads) for _ in range(args.repeats))
        print(f"{label}: 1 thread {one:.2f} s, {args.threads} threads {many:.2f} s ({one / many:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
