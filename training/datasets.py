"""Classification data from the prepared cache: the index, letterboxed uint8 images, augmentation.

Images are letterboxed with :func:`spine_edge.preprocess.letterbox` (pad 0) into uint8 canvases,
the exact input the exported graph receives; augmentation acts on those uint8 canvases and the
float conversion happens in the model's :class:`~training.models.GrayToModelInput`. Canvases are
decoded once per input size and kept in memory (384² bytes per image at the paper's size).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from spine_edge.constants import CLASSIFIER_PAD_VALUE
from spine_edge.errors import DatasetError, ImageReadError
from spine_edge.preprocess import letterbox
from spine_edge.training.profiles import ClassifierRecipe

PREPARE_HINT = "run spine-edge data prepare VINDR_ROOT PREPARED first"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassificationItem:
    """One row of ``classification.csv``.

    Attributes:
        image_id: VinDr image id.
        study_id: Study it belongs to.
        path: Absolute path of the cached PNG.
        label: 1 abnormal, 0 normal.
    """

    image_id: str
    study_id: str
    path: Path
    label: int


@dataclass(frozen=True)
class PreparedData:
    """The prepared cache's index.

    Attributes:
        root: The cache folder.
        fingerprint: ``prepare.json``'s data fingerprint, recorded in every checkpoint.
        long_side: Long side of the cached PNGs.
        splits: Items per split name (``train``, ``val``, ``test``).
    """

    root: Path
    fingerprint: str
    long_side: int
    splits: dict[str, tuple[ClassificationItem, ...]]

    def split(self, name: str) -> tuple[ClassificationItem, ...]:
        """The items of one split.

        Raises:
            DatasetError: The split is empty.
        """
        items = self.splits.get(name, ())
        if not items:
            raise DatasetError(
                f"{self.root / 'classification.csv'}: no {name!r} images; {PREPARE_HINT} with enough images"
            )
        return items


def read_prepared(prepared: Path) -> PreparedData:
    """Read ``prepare.json`` and ``classification.csv`` of a prepared cache.

    Raises:
        DatasetError: A file is missing, unparsable, from an interrupted prepare, or a row is malformed.
    """
    root = Path(prepared).resolve()
    info_path = root / "prepare.json"
    try:
        info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{info_path}: not found, so {root} is not a prepared cache; {PREPARE_HINT}") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{info_path}: unreadable ({exc}); {PREPARE_HINT} again") from exc
    if info.get("complete") is False:
        raise DatasetError(
            f"{info_path}: the prepare run was interrupted; run spine-edge data prepare again to finish it"
        )
    if not info.get("fingerprint"):
        raise DatasetError(f"{info_path}: has no fingerprint; {PREPARE_HINT} again")

    index_path = root / "classification.csv"
    splits: dict[str, list[ClassificationItem]] = {name: [] for name in SPLITS}
    try:
        with index_path.open(newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    split, label = row["split"], int(row["abnormal"])
                    item = ClassificationItem(row["image_id"], row["study_id"], root / row["path"], label)
                except (KeyError, TypeError, ValueError) as exc:
                    raise DatasetError(
                        f"{index_path}:{line}: malformed row ({exc!r}); expected image_id,study_id,split,abnormal,path"
                    ) from exc
                if split not in splits or label not in (0, 1):
                    raise DatasetError(
                        f"{index_path}:{line}: split {split!r} / abnormal {label!r} not in {SPLITS} / (0, 1)"
                    )
                splits[split].append(item)
    except FileNotFoundError:
        raise DatasetError(f"{index_path}: not found; {PREPARE_HINT}") from None
    return PreparedData(
        root=root,
        fingerprint=str(info["fingerprint"]),
        long_side=int(info.get("long_side", 0)),
        splits={name: tuple(items) for name, items in splits.items()},
    )


def load_canvas(path: Path, size: int) -> np.ndarray:
    """A cached PNG as the ``[size, size]`` uint8 letterbox canvas the graph receives.

    Raises:
        ImageReadError: The file is missing or not a decodable image.
    """
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ImageReadError(path, "missing or not a decodable PNG", "run spine-edge data prepare again on this cache")
    canvas, _ = letterbox(image, size, CLASSIFIER_PAD_VALUE)
    return canvas


def load_canvases(items: tuple[ClassificationItem, ...], size: int) -> np.ndarray:
    """All items' canvases as one uint8 array ``[N, size, size]`` (decoded in threads)."""
    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        return np.stack(list(pool.map(lambda item: load_canvas(item.path, size), items)))


class GrayAugment:
    """The paper's augmentation on a uint8 gray canvas of side ``size``, in OpenCV.

    HorizontalFlip(p), Rotation(±deg, black fill like the letterbox border), ColorJitter on
    brightness and contrast (the only jitters that mean anything for gray; torchvision's
    definitions: scale by b, then blend with the mean by c) and GaussianBlur with probability
    ``blur_p``. The blur's σ scales with the canvas (up to 1 px at 128, 3 px at 384), so it removes
    the same anatomy-relative detail at every progressive size. OpenCV on uint8 costs well under a
    millisecond per 128-px image where torchvision.transforms.v2 on tensors measured about 15 ms on
    this 2-core machine, as much as the training step itself. Random draws come from torch's
    generator, whose state a resumed run restores.

    Args:
        recipe: Supplies hflip_p, rotation_deg, color_jitter and blur_p.
        size: Canvas side.
    """

    def __init__(self, recipe: ClassifierRecipe, size: int) -> None:
        self.hflip_p = recipe.hflip_p
        self.rotation_deg = recipe.rotation_deg
        self.jitter = recipe.color_jitter
        self.blur_p = recipe.blur_p
        self.size = size
        self.sigma_max = max(0.2, size / 128)
        self.kernel = 2 * math.ceil(2 * self.sigma_max) + 1

    def __call__(self, image: np.ndarray) -> np.ndarray:
        flip, angle, bright, contrast, blur, sigma = torch.rand(6, dtype=torch.float64).tolist()
        if flip < self.hflip_p:
            image = cv2.flip(image, 1)
        degrees = (2 * angle - 1) * self.rotation_deg
        if degrees:
            centre = ((self.size - 1) / 2, (self.size - 1) / 2)
            matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
            image = cv2.warpAffine(
                image,
                matrix,
                (self.size, self.size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=CLASSIFIER_PAD_VALUE,
            )
        if self.jitter:
            b = 1 + (2 * bright - 1) * self.jitter
            c = 1 + (2 * contrast - 1) * self.jitter
            mean = b * float(image.mean())
            lut = np.clip(np.arange(256) * (b * c) + (1 - c) * mean, 0, 255).round().astype(np.uint8)
            image = cv2.LUT(image, lut)
        if blur < self.blur_p:
            s = 0.1 + sigma * (self.sigma_max - 0.1)
            image = cv2.GaussianBlur(image, (self.kernel, self.kernel), s)
        return image


class ClassificationDataset(Dataset):
    """Letterboxed uint8 images ``[1, S, S]`` and float labels, optionally augmented.

    Args:
        items: The split's rows.
        size: Canvas side.
        transform: Augmentation of a uint8 ``[S, S]`` array, or None.
    """

    def __init__(
        self,
        items: tuple[ClassificationItem, ...],
        size: int,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.items = items
        self.size = size
        self.canvases = load_canvases(items, size)
        self.labels = torch.tensor([item.label for item in items], dtype=torch.float32)
        self.transform = transform

    @property
    def images(self) -> torch.Tensor:
        """All canvases, un-augmented, as uint8 ``[N, 1, S, S]`` (shares memory)."""
        return torch.from_numpy(self.canvases).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.canvases[index]
        if self.transform is not None:
            image = np.ascontiguousarray(self.transform(image))
        return torch.from_numpy(image).unsqueeze(0), self.labels[index]
