"""Read a folder of hostile inputs and report the peak memory against a stated budget.

A stress run for the reader (:mod:`spine_edge.imageio`), not a unit test: it writes about thirty
kinds of bad or expensive file (a tiny DICOM around a huge JPEG 2000 codestream, header/pixel
mismatches, a BigTIFF claiming gigapixels, 16-bit RGBA PNGs that are legal but expensive, JPEGs
with stray bytes, multi-page TIFF, GIF/BMP/WebP, truncated, empty and random files, ...), then
reads every one through :func:`~spine_edge.imageio.read_image`, first one at a time and then with
a thread pool the way the cascade's read-ahead does, its decodes held within one
:class:`~spine_edge.imageio.DecodeBudget`. For each phase it reports the peak resident memory
(VmHWM, reset between phases through ``/proc/self/clear_refs``) against ``--budget-mib``, and one
line per file: status, time, the estimate and the reason. Exit status 1 when a peak passes the
budget or a file expected to be refused was read.

Run:
    python -m spine_edge.benchmarks.stress_inputs /tmp/stress --workers 4 --budget-mib 1536
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames

from spine_edge.dicom_writer import build_radiograph_dataset, write_dicom
from spine_edge.errors import ImageReadError
from spine_edge.imageio import MAX_DECODE_BYTES, DecodeBudget, estimate_decode_bytes, read_image, scan_folder

DEFAULT_BUDGET_MIB = 1536
"""The stated peak for the whole process: 1.5 GiB, what an 8 GB kiosk can give the reader."""


@dataclass(frozen=True)
class Case:
    """One generated input.

    Attributes:
        name: File name inside the stress folder.
        expect: "ok" when the reader must read it, "refused" when it must refuse it.
        what: What is hostile about it.
    """

    name: str
    expect: str
    what: str


@dataclass(frozen=True)
class Outcome:
    """What reading one file gave."""

    name: str
    status: str
    seconds: float
    estimate: int | None
    reason: str


def _pixels(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    smooth = 1500 + 800 * np.sin(x / 37.0) * np.cos(y / 53.0)
    return (smooth + rng.normal(0, 20, (rows, cols))).clip(0, 4095).astype(np.uint16)


def _save(ds: pydicom.Dataset, path: Path) -> None:
    write_dicom(path, ds)


def _save_cut(ds: pydicom.Dataset, path: Path, keep: float) -> None:
    write_dicom(path, ds)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _j2k(pixels: np.ndarray) -> pydicom.Dataset:
    return build_radiograph_dataset(pixels, window=(2000, 4000), transfer_syntax="jpeg2000-lossless")


def _frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {ext} here")
    return buf.tobytes()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bigtiff(width: int, height: int, strip: bytes) -> bytes:
    out = bytearray(b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 16))
    entries = [(256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 16, 0),
               (277, 3, 1), (278, 16, height), (279, 16, len(strip))]  # fmt: skip
    data_at = 16 + 8 + 20 * len(entries) + 8
    out += struct.pack("<Q", len(entries))
    for tag, kind, value in entries:
        out += struct.pack("<HHQQ", tag, kind, 1, data_at if tag == 273 else value)
    return bytes(out + struct.pack("<Q", 0) + strip)


def generate(folder: Path, huge_side: int = 8000) -> list[Case]:
    """Write the hostile inputs into ``folder`` and say what each one is.

    Args:
        folder: Created if missing; existing files of the same names are replaced.
        huge_side: Side of the real, highly compressible JPEG 2000 codestream hidden in a tiny
            DICOM (8000: 64 MP, about 400 MB for a decoder that trusts it).

    Returns:
        The cases, in the order written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, expect: str, what: str, write: Callable[[Path], object]) -> None:
        write(folder / name)
        cases.append(Case(name, expect, what))

    small = _pixels(48, 64)
    real = _pixels(2000, 1500, seed=1)
    real_j2k = _j2k(real)
    add("ok_real_size_j2k.dcm", "ok", "a 2000 x 1500 12-bit JPEG 2000 radiograph", lambda p: _save(real_j2k, p))
    add("ok_native.dcm", "ok", "a small native DICOM", lambda p: _save(build_radiograph_dataset(small), p))
    add("ok_gray8.png", "ok", "an 8-bit PNG", lambda p: p.write_bytes(_encode((small % 256).astype(np.uint8), ".png")))
    flat = np.full((4000, 5000, 4), 30000, np.uint16)
    flat[::97] = 1000
    rgba = _encode(flat, ".png")
    for k in range(4):  # legal (20 MP) but each about 230 MB to decode: the read-ahead must budget them
        add(
            f"ok_rgba16_{k}.png",
            "ok",
            "a 20 MP 16-bit RGBA PNG (small file, large decode)",
            lambda p: p.write_bytes(rgba),
        )

    huge_stream = _j2k(np.zeros((huge_side, huge_side), np.uint16))
    tiny = _j2k(small)
    tiny.PixelData = huge_stream.PixelData
    add("j2k_huge_codestream_tiny_header.dcm", "refused", f"48 x 64 header around a {huge_side}^2 codestream",
        lambda p: _save(tiny, p))  # fmt: skip
    larger_header = _j2k(_pixels(96, 128))
    larger_header.PixelData = _j2k(small).PixelData
    add("j2k_header_larger_than_codestream.dcm", "refused", "96 x 128 header, 48 x 64 codestream",
        lambda p: _save(larger_header, p))  # fmt: skip
    swapped = _j2k(_pixels(64, 48))
    swapped.PixelData = _j2k(small).PixelData
    add("j2k_rows_columns_swapped.dcm", "refused", "64 x 48 header, 48 x 64 codestream", lambda p: _save(swapped, p))
    garbage = _j2k(small)
    garbage.PixelData = encapsulate([os.urandom(512)])
    add("j2k_unparsable_codestream.dcm", "refused", "random bytes as the codestream", lambda p: _save(garbage, p))
    cut_stream = _j2k(real)
    cut_stream.PixelData = encapsulate([_frame(real_j2k)[: len(_frame(real_j2k)) * 6 // 10]])
    add("j2k_damaged_codestream.dcm", "refused", "a whole fragment holding 60% of a codestream",
        lambda p: _save(cut_stream, p))  # fmt: skip
    add("j2k_truncated_file.dcm", "refused", "a JPEG 2000 DICOM cut at 60%", lambda p: _save_cut(real_j2k, p, 0.6))

    longer = build_radiograph_dataset(small)
    longer.PixelData = longer.PixelData + bytes(4096)
    add("native_longer_than_header.dcm", "refused", "native pixel data 4096 bytes too long", lambda p: _save(longer, p))
    add("native_truncated.dcm", "refused", "native DICOM cut inside its pixel data",
        lambda p: _save_cut(build_radiograph_dataset(small), p, 0.9))  # fmt: skip
    rgb = build_radiograph_dataset(np.dstack([small] * 3), photometric="RGB")
    rgb.PixelData = small.tobytes()
    add("native_rgb_header_gray_data.dcm", "refused", "RGB header, one sample of data", lambda p: _save(rgb, p))
    stripped = build_radiograph_dataset(small)
    del stripped.PixelData
    add("dicom_pixel_data_removed.dcm", "refused", "image header without Pixel Data", lambda p: _save(stripped, p))
    add("dicom_multiframe.dcm", "refused", "3 frames",
        lambda p: _save(build_radiograph_dataset(small, frames=3), p))  # fmt: skip
    claims = build_radiograph_dataset(small)
    claims.Rows, claims.Columns = 30_000, 30_000
    add("dicom_claims_30000.dcm", "refused", "Rows/Columns 30000", lambda p: _save(claims, p))

    add("bigtiff_claims_gigapixels.tif", "refused", "BigTIFF header claiming 100000 x 60000",
        lambda p: p.write_bytes(_bigtiff(100_000, 60_000, zlib.compress(bytes(1 << 20)))))  # fmt: skip
    gray8 = (_pixels(256, 256) % 256).astype(np.uint8)
    add("tiff_multipage.tif", "refused", "two pages",
        lambda p: cv2.imwritemulti(str(p), [gray8, gray8]))  # fmt: skip
    png = bytearray(_encode(gray8, ".png"))
    png[16:24] = struct.pack(">II", 30_000, 30_000)
    add("png_claims_30000.png", "refused", "IHDR claiming 30000 x 30000", lambda p: p.write_bytes(bytes(png)))
    plain_png = _encode(gray8, ".png")
    apng = plain_png[:33] + _png_chunk(b"acTL", struct.pack(">II", 8, 0)) + plain_png[33:]
    add("png_animated.png", "refused", "an APNG with 8 frames", lambda p: p.write_bytes(apng))
    add("png_truncated.png", "refused", "cut before IEND", lambda p: p.write_bytes(plain_png[: len(plain_png) // 2]))
    jpeg = _encode(gray8, ".jpg")
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    stray = bytearray(jpeg[:app0_end] + b"\x00" + jpeg[app0_end:])
    sof = stray.find(b"\xff\xc0")
    stray[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    add("jpeg_stray_byte_claims_60000.jpg", "refused", "stray byte before a SOF claiming 60000^2",
        lambda p: p.write_bytes(bytes(stray)))  # fmt: skip
    add("jpeg_no_frame_header.jpg", "refused", "SOS before any SOF",
        lambda p: p.write_bytes(b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + bytes(64) + b"\xff\xd9"))  # fmt: skip
    add("jpeg_truncated.jpg", "refused", "cut in the scan", lambda p: p.write_bytes(jpeg[: len(jpeg) // 2]))
    add("image.gif", "refused", "GIF", lambda p: p.write_bytes(b"GIF89a" + bytes(64)))
    add("image.bmp", "refused", "BMP", lambda p: p.write_bytes(_encode(gray8, ".bmp")))
    add("image.webp", "refused", "WebP", lambda p: p.write_bytes(_encode(gray8, ".webp")))
    add("bmp_named_png.png", "refused", "a BMP named .png", lambda p: p.write_bytes(_encode(gray8, ".bmp")))
    add("zero_bytes.dcm", "refused", "empty", lambda p: p.write_bytes(b""))
    add("random_bytes.dcm", "refused", "random bytes named .dcm", lambda p: p.write_bytes(os.urandom(65536)))
    add("random_bytes.png", "refused", "random bytes named .png", lambda p: p.write_bytes(os.urandom(65536)))
    add("text.dcm", "refused", "a text file named .dcm", lambda p: p.write_text("patient list\n" * 100))
    return cases


def _peak_rss_mib() -> float:
    """VmHWM: the process's peak resident memory since start or the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _read_one(path: Path, target: int | None, budget: DecodeBudget | None) -> Outcome:
    start = time.perf_counter()
    estimate: int | None = None
    try:
        estimate = estimate_decode_bytes(path, target)
        if budget is None:
            radiograph = read_image(path, target)
        else:
            with budget.reserve(estimate):
                radiograph = read_image(path, target)
        return Outcome(path.name, "ok", time.perf_counter() - start, estimate, f"{radiograph.image.shape}")
    except ImageReadError as exc:
        return Outcome(path.name, "refused", time.perf_counter() - start, estimate, exc.reason)


def _report(title: str, outcomes: list[Outcome], cases: dict[str, Case], peak: float, budget_mib: int) -> bool:
    print(f"\n## {title}: peak RSS {peak:.0f} MiB (budget {budget_mib} MiB)")
    wrong = []
    for o in outcomes:
        expect = cases[o.name].expect if o.name in cases else "?"
        flag = "" if expect in ("?", o.status) else "  <-- expected " + expect
        if flag:
            wrong.append(o.name)
        estimate = "-" if o.estimate is None else f"{o.estimate / 2**20:.1f}"
        print(f"{o.status:8} {o.seconds * 1000:7.0f} ms  est {estimate:>7} MiB  {o.name}: {o.reason[:150]}{flag}")
    return peak <= budget_mib and not wrong


def main(argv: list[str] | None = None) -> int:
    """Generate the inputs, read them serially and with a budgeted thread pool, report peaks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, default=4, help="read-ahead threads (default 4)")
    parser.add_argument("--budget-mib", type=int, default=DEFAULT_BUDGET_MIB, help="stated peak RSS for the process")
    parser.add_argument("--read-budget-mib", type=int, default=1024, help="DecodeBudget of the thread pool")
    parser.add_argument("--target", type=int, default=640, help="target_long_side (0: full resolution)")
    parser.add_argument("--huge-side", type=int, default=8000)
    parser.add_argument("--generate-only", action="store_true", help="write the inputs and stop")
    args = parser.parse_args(argv)
    target = args.target or None
    manifest = args.folder / "cases.json"
    if args.generate_only:
        manifest.write_text(json.dumps([asdict(c) for c in generate(args.folder, args.huge_side)], indent=1))
        return 0
    # Generating allocates far more than reading should (encoding the huge codestream): do it in a
    # child process so that this process's peak is the reader's alone.
    subprocess.run(
        [sys.executable, "-m", "spine_edge.benchmarks.stress_inputs", str(args.folder), "--generate-only",
         "--huge-side", str(args.huge_side)],
        check=True,
    )  # fmt: skip
    cases = {c["name"]: Case(**c) for c in json.loads(manifest.read_text())}
    scan = scan_folder(args.folder)
    print(f"{len(cases)} inputs in {args.folder}: {len(scan.images)} listed as images, "
          f"{len(scan.unsupported)} as not supported ({', '.join(p.name for p in scan.unsupported)}); "
          f"MAX_DECODE_BYTES {MAX_DECODE_BYTES // 2**20} MiB, target_long_side {target}")  # fmt: skip
    paths = [p for p in (*scan.images, *scan.unsupported) if p != manifest]
    print(f"RSS after imports: {_rss_mib():.0f} MiB (peak {_peak_rss_mib():.0f} MiB); peak reset: {_reset_peak()}")
    good = True
    serial = [_read_one(p, target, None) for p in paths]
    good &= _report("serial", serial, cases, _peak_rss_mib(), args.budget_mib)
    _reset_peak()
    budget = DecodeBudget(args.read_budget_mib * 2**20)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers, thread_name_prefix="stress-read") as pool:
        threaded = list(pool.map(lambda p: _read_one(p, target, budget), paths))
    wall = time.perf_counter() - start
    good &= _report(
        f"{args.workers} threads, DecodeBudget {args.read_budget_mib} MiB (peak reserved "
        f"{budget.peak_reserved / 2**20:.0f} MiB, wall {wall:.1f} s)",
        threaded, cases, _peak_rss_mib(), args.budget_mib,
    )  # fmt: skip
    print("\nverdict:", "within budget, every file as expected" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
