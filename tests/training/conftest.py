"""A tiny prepared cache in the CONTRACTS.md layout, written directly (no DICOM, no data prepare).

Normal images are a noisy vertical "spine" band on a dark background; abnormal images add one
bright square lesion beside it, which every backbone learns within an epoch or two. Image shapes
vary (portrait, landscape) so the letterbox padding is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from spine_edge.constants import CLASS_NAMES
from spine_edge.io_utils import write_image_atomic


def _draw(
    rng: np.random.Generator, height: int, width: int, abnormal: bool
) -> tuple[np.ndarray, tuple[float, ...] | None]:
    image = rng.normal(40, 8, (height, width))
    x0 = width // 2 - width // 8
    image[:, x0 : x0 + width // 4] += 70
    box = None
    if abnormal:
        side = max(4, min(height, width) // 6)
        cx = int(rng.integers(side, width - side))
        cy = int(rng.integers(side, height - side))
        image[cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2] = 235
        box = (cx / width, cy / height, side / width, side / height)
    return np.clip(image, 0, 255).astype(np.uint8), box


def write_prepared_cache(root: Path, counts: dict[str, int], long_side: int, seed: int = 0) -> Path:
    """Write ``counts[split]`` images per split (half abnormal) as a prepared cache; returns ``root``."""
    rng = np.random.default_rng(seed)
    rows = ["image_id,study_id,split,abnormal,path"]
    summary: dict[str, dict[str, int]] = {}
    for split, n in counts.items():
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            abnormal = i % 2 == 1
            landscape = i % 3 == 0
            h, w = (long_side * 3 // 4, long_side) if landscape else (long_side, long_side * 5 // 8)
            image, box = _draw(rng, h, w, abnormal)
            image_id = f"{split}{i:04d}"
            write_image_atomic(root / "images" / split / f"{image_id}.png", image)
            label = "" if box is None else "1 " + " ".join(f"{v:.6f}" for v in box) + "\n"
            (root / "labels" / split / f"{image_id}.txt").write_text(label)
            rows.append(f"{image_id},study_{split}{i // 2},{split},{int(abnormal)},images/{split}/{image_id}.png")
        summary[split] = {"images": n, "abnormal": n // 2, "normal": n - n // 2}
    (root / "classification.csv").write_text("\n".join(rows) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    (root / "dataset.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n{names}\n"
    )
    fingerprint = hashlib.sha256(json.dumps([counts, long_side, seed]).encode()).hexdigest()
    info = {
        "version": 1,
        "source": "tests/training/conftest.py",
        "long_side": long_side,
        "seed": seed,
        "val_fraction": 0.2,
        "class_names": list(CLASS_NAMES),
        "counts": summary,
        "fingerprint": fingerprint,
        "complete": True,
    }
    (root / "prepare.json").write_text(json.dumps(info, indent=2))
    return root


@pytest.fixture(scope="session")
def single_thread() -> Iterator[None]:
    """One torch thread for training tests: on the shared 2-core box, two spinning OpenMP threads
    made a tiny epoch about five times slower than one."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", threads)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train / 12 val / 4 test images, long side 96."""
    return write_prepared_cache(tmp_path_factory.mktemp("prepared"), {"train": 24, "val": 12, "test": 4}, long_side=96)
