"""The three things stock ultralytics does not do for box-only data, as ultralytics subclasses.

1. **Focal loss** on the classification branch (:class:`FocalBCE`, :class:`FocalDetectionLoss`).
2. **Class-balanced image sampling** (:func:`image_sampling_weights`, used by
   :class:`SpineDetectionTrainer` through a ``WeightedRandomSampler``).
3. **Copy-paste of rare-class lesions** (:class:`LesionBank`, :func:`paste_lesions`,
   :class:`RareLesionPasteDataset`): ultralytics' own ``copy_paste`` needs segment polygons and
   does nothing on VinDr-SpineXR's boxes.

This module imports ultralytics at import time, and ultralytics fixes its settings (config dir,
offline mode) when it is first imported. Import it through
:func:`training.detector.import_yolo_extensions`, which prepares that environment first.

Checkpoints stay loadable without spine-edge: the model that ultralytics pickles is its own
``DetectionModel``; the focal criterion is attached to it at training time only and ultralytics
clears ``criterion`` before every save.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler
from ultralytics.data.build import InfiniteDataLoader, seed_worker
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import get_split_fraction
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, colorstr
from ultralytics.utils.instance import Instances
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.torch_utils import unwrap_model

from spine_edge.errors import SpineEdgeError

if TYPE_CHECKING:
    from ultralytics.nn.tasks import DetectionModel

#: A pasted lesion may cover at most this share of any box already in the image (or of itself):
#: measured against the smaller box rather than as IoU, so that a large paste cannot bury a
#: small existing lesion while keeping a low IoU.
PASTE_MAX_OVERLAP = 0.1
#: Random positions tried per pasted lesion before giving up on it.
PASTE_POSITION_TRIES = 20


# --------------------------------------------------------------------------------------------
# 1. Focal loss
# --------------------------------------------------------------------------------------------


class FocalBCE(nn.Module):
    """Element-wise focal binary cross-entropy on logits (Lin et al., 2017), for soft targets.

    ``loss = BCE(p, t) * α_t * (1 - p_t)^γ`` with ``p = sigmoid(logit)``,
    ``p_t = p·t + (1 - p)(1 - t)`` and ``α_t = α·t + (1 - α)(1 - t)``.

    Ultralytics' targets are IoU-aware soft scores (the task-aligned assigner puts the normalised
    alignment metric, not 1, at the assigned class). For a soft ``t`` both ``p_t`` and ``α_t`` are the
    linear interpolation between the negative case (``t = 0``: ``p_t = 1 - p``, ``α_t = 1 - α``) and
    the positive case (``t = 1``: ``p_t = p``, ``α_t = α``), as in ultralytics' own ``FocalLoss`` and
    the TensorFlow Addons implementation; for hard targets it is exactly RetinaNet's loss. With
    ``γ = 0, α = 0.5`` it is half the plain BCE.

    Args:
        gamma: Focusing parameter γ (≥ 0).
        alpha: Positive-class weight α in [0, 1].
    """

    def __init__(self, gamma: float, alpha: float) -> None:
        super().__init__()
        if gamma < 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal loss needs gamma >= 0 and 0 <= alpha <= 1, got gamma={gamma}, alpha={alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss, same shape as ``logits`` (no reduction)."""
        # float32 even under autocast: (1 - p_t)^γ underflows in half precision for confident anchors.
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = logits.sigmoid()
        p_t = p * target + (1.0 - p) * (1.0 - target)
        alpha_t = self.alpha * target + (1.0 - self.alpha) * (1.0 - target)
        return bce * alpha_t * (1.0 - p_t).pow(self.gamma)


class FocalDetectionLoss(v8DetectionLoss):
    """Ultralytics' detection loss with :class:`FocalBCE` in place of its classification BCE.

    Everything else (task-aligned assignment, CIoU box loss, DFL, the ``box``/``cls``/``dfl`` gains
    and the normalisation by the sum of target scores) is ultralytics' own.

    Args:
        model: The de-parallelised ``DetectionModel``, already on its device with ``args`` set.
        gamma: Focal γ.
        alpha: Focal α.
    """

    def __init__(self, model: nn.Module, gamma: float, alpha: float) -> None:
        super().__init__(model)
        # v8DetectionLoss's attribute is inferred as the BCEWithLogitsLoss it builds; it only calls it as
        # bce(logits, target) -> per-element loss, which FocalBCE provides.
        self.bce = FocalBCE(gamma, alpha)  # type: ignore[assignment]  # drop-in replacement, see above


# --------------------------------------------------------------------------------------------
# 2. Class-balanced sampling
# --------------------------------------------------------------------------------------------


def image_sampling_weights(image_classes: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-image sampling weights from ``1/sqrt(f_c)`` of the classes on each image.

    Definitions (the paper gives only "probability ∝ 1/√f_c"):

    * ``f_c`` is the share of lesion images (images with at least one box) that carry class ``c``,
      the same per-image frequency as the paper's dataset table (Osteophytes 82 %, Vertebral
      collapse 1.75 %).
    * A lesion image's weight is the **maximum** of ``1/sqrt(f_c)`` over the classes on it: an image
      with one rare lesion among common ones is drawn at the rare rate, which is the point.
    * A normal image (no boxes) gets the **smallest** lesion-image weight, i.e. it is drawn like an
      image of the most common class: normals stay plentiful as negatives without being favoured.

    With no boxes at all every weight is 1 (uniform sampling).

    Args:
        image_classes: One array of class ids per image (any shape; empty for a normal image).
        num_classes: Number of classes.

    Returns:
        float64 weights, one per image, all ≥ 1.
    """
    per_image = [np.unique(np.asarray(c, dtype=np.int64).ravel()) for c in image_classes]
    lesion_images = [c for c in per_image if c.size]
    weights = np.ones(len(per_image), dtype=np.float64)
    if not lesion_images:
        return weights
    images_with_class = np.zeros(num_classes, dtype=np.float64)
    for classes in lesion_images:
        images_with_class[classes] += 1.0
    frequency = images_with_class / len(lesion_images)
    class_weight = np.zeros(num_classes, dtype=np.float64)
    present = frequency > 0
    class_weight[present] = 1.0 / np.sqrt(frequency[present])
    lesion_weights = [class_weight[c].max() for c in lesion_images]
    normal_weight = min(lesion_weights)
    for i, classes in enumerate(per_image):
        weights[i] = class_weight[classes].max() if classes.size else normal_weight
    return weights


# --------------------------------------------------------------------------------------------
# 3. Copy-paste of rare-class lesions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionBank:
    """Rare-class lesion crops, already at training scale.

    Attributes:
        crops: ``[h, w, C]`` uint8 crops, scaled by the same factor ultralytics applies to their
            source image when it loads it at ``imgsz``, so a pasted lesion keeps its real size.
        classes: Class id of each crop.
    """

    crops: tuple[np.ndarray, ...]
    classes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.crops)

    def class_ids(self) -> tuple[int, ...]:
        """The distinct classes in the bank, sorted."""
        return tuple(sorted(set(self.classes)))


def build_lesion_bank(
    image_files: Sequence[str],
    labels: Sequence[dict[str, Any]],
    rare_class_ids: Sequence[int],
    imgsz: int,
    imread_flag: int,
) -> LesionBank:
    """Crop every box of a rare class out of the training images.

    Args:
        image_files: Image paths, aligned with ``labels``.
        labels: Ultralytics label dicts (``cls`` ``[n, 1]``, ``bboxes`` ``[n, 4]`` normalised xywh).
        rare_class_ids: Classes to collect.
        imgsz: Training size: crops are scaled as ultralytics scales their image (long side → imgsz).
        imread_flag: OpenCV read flag matching the dataset's channels.

    Returns:
        The bank (empty when no rare-class box exists).
    """
    wanted = {int(c) for c in rare_class_ids}
    crops: list[np.ndarray] = []
    classes: list[int] = []
    for path, label in zip(image_files, labels):
        cls = np.asarray(label["cls"]).reshape(-1).astype(int)
        rows = [i for i, c in enumerate(cls) if c in wanted]
        if not rows:
            continue
        image = cv2.imread(str(path), imread_flag)
        if image is None:
            raise SpineEdgeError(
                f"{path}: OpenCV could not read this training image (re-run `spine-edge data prepare`)"
            )
        if image.ndim == 2:
            image = image[..., None]
        h0, w0 = image.shape[:2]
        scale = imgsz / max(h0, w0)
        boxes = np.asarray(label["bboxes"], dtype=np.float64).reshape(-1, 4)
        for i in rows:
            cx, cy, bw, bh = boxes[i] * (w0, h0, w0, h0)
            x1, y1 = max(int(round(cx - bw / 2)), 0), max(int(round(cy - bh / 2)), 0)
            x2, y2 = min(int(round(cx + bw / 2)), w0), min(int(round(cy + bh / 2)), h0)
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            crop = image[y1:y2, x1:x2]
            if scale != 1.0:
                size = (max(int(round((x2 - x1) * scale)), 1), max(int(round((y2 - y1) * scale)), 1))
                crop = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
                if crop.ndim == 2:
                    crop = crop[..., None]
            crops.append(np.ascontiguousarray(crop))
            classes.append(int(cls[i]))
    return LesionBank(tuple(crops), tuple(classes))


_T = TypeVar("_T")


class PasteRandom(Protocol):
    """What :func:`paste_lesions` draws with: a ``random.Random`` or the ``random`` module itself."""

    def randint(self, a: int, b: int, /) -> int: ...

    def choice(self, seq: Sequence[_T], /) -> _T: ...


def _overlap_of_smaller(box: np.ndarray, others: np.ndarray) -> float:
    """Largest intersection of ``box`` with any of ``others`` (xyxy), over the smaller box's area."""
    if others.size == 0:
        return 0.0
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return float((ix * iy / np.maximum(np.minimum(area, areas), 1e-9)).max())


def paste_lesions(
    image: np.ndarray,
    boxes_xywhn: np.ndarray,
    bank: LesionBank,
    rng: PasteRandom,
    max_overlap: float = PASTE_MAX_OVERLAP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste 1–2 lesion crops at random free positions.

    A rare class is drawn uniformly from the bank's classes, then one of its crops, so the rarest
    class is not starved by the merely rare one. A position is free when the pasted box covers at
    most ``max_overlap`` of any existing box (measured on the smaller of the two) and does not touch
    a box pasted before it. Crops replace the pixels under them (no blending), so each pasted box
    holds exactly its crop.

    Args:
        image: ``[H, W, C]`` uint8 image; not modified.
        boxes_xywhn: ``[n, 4]`` existing boxes, normalised xywh.
        bank: Crops to paste from (non-empty).
        rng: Random source.
        max_overlap: See above.

    Returns:
        ``(image, classes [k], boxes [k, 4] normalised xywh)`` — a new image when ``k > 0``, else the
        input image; ``k`` is 0 when no crop found a free place.
    """
    h, w = image.shape[:2]
    existing = np.asarray(boxes_xywhn, dtype=np.float64).reshape(-1, 4) * (w, h, w, h)
    existing = np.concatenate([existing[:, :2] - existing[:, 2:] / 2, existing[:, :2] + existing[:, 2:] / 2], axis=1)
    pasted = np.zeros((0, 4), dtype=np.float64)
    by_class = {c: [i for i, k in enumerate(bank.classes) if k == c] for c in bank.class_ids()}
    out = image
    new_classes: list[int] = []
    new_boxes: list[list[float]] = []
    for _ in range(rng.randint(1, 2)):
        cls = rng.choice(list(by_class))
        crop = bank.crops[rng.choice(by_class[cls])]
        ch, cw = crop.shape[:2]
        if ch > h or cw > w:
            continue
        for _ in range(PASTE_POSITION_TRIES):
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = np.array([x, y, x + cw, y + ch], dtype=np.float64)
            if _overlap_of_smaller(box, existing) <= max_overlap and _overlap_of_smaller(box, pasted) == 0.0:
                break
        else:
            continue
        if out is image:
            out = image.copy()
        out[y : y + ch, x : x + cw] = crop.reshape(ch, cw, -1)
        pasted = np.concatenate([pasted, box[None]], axis=0)
        new_classes.append(cls)
        new_boxes.append([(x + cw / 2) / w, (y + ch / 2) / h, cw / w, ch / h])
    return out, np.asarray(new_classes, dtype=np.float32), np.asarray(new_boxes, dtype=np.float32).reshape(-1, 4)


class RareLesionPasteDataset(YOLODataset):
    """Ultralytics' training dataset plus copy-paste of rare-class lesions.

    The bank is built from the training set when the dataset is built. With probability
    ``paste_p`` per training sample, lesions are pasted into the sample's own image after it is
    loaded (resized to ``imgsz``) and before mosaic, affine and letterbox, so the pasted boxes go
    through the same geometry as the real ones. Mosaic's extra tiles are not pasted into, so ``p``
    is exactly the per-sample probability. Like ultralytics' own copy-paste, it stops for the
    ``close_mosaic`` epochs.

    Args:
        *args: Passed to ``YOLODataset``.
        rare_class_ids: Classes whose lesions are pasted.
        paste_p: Probability per training sample.
        **kwargs: Passed to ``YOLODataset``.
    """

    def __init__(self, *args: Any, rare_class_ids: Sequence[int], paste_p: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paste_p = float(paste_p)
        # A training set's imgsz is the trainer's int; a (h, w) pair is scaled to its long side, as
        # ultralytics' BaseDataset.load_image does.
        imgsz = self.imgsz if isinstance(self.imgsz, int) else max(self.imgsz)
        self.lesion_bank = (
            build_lesion_bank(self.im_files, self.labels, rare_class_ids, imgsz, self.cv2_flag)
            if self.augment and self.paste_p > 0
            else LesionBank((), ())
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = self.get_image_and_label(index)
        if self.augment and len(self.lesion_bank) and random.random() < self.paste_p:
            label = self.paste_into(label)
        return self.transforms(label)

    def paste_into(self, label: dict[str, Any]) -> dict[str, Any]:
        """Paste rare lesions into one loaded sample (image, ``cls`` and ``instances`` updated)."""
        instances: Instances = label["instances"]
        instances.convert_bbox("xywh")
        if not instances.normalized:
            h, w = label["img"].shape[:2]
            instances.normalize(w, h)
        # `random` (not a private generator): ultralytics re-seeds it per dataloader worker.
        image, classes, boxes = paste_lesions(label["img"], instances.bboxes, self.lesion_bank, random)
        if classes.size:
            empty_segments = np.zeros((0, instances.segments.shape[1], 2), dtype=np.float32)
            pasted = Instances(boxes, empty_segments, None, bbox_format="xywh", normalized=True)
            label["img"] = image
            label["cls"] = np.concatenate([np.asarray(label["cls"], np.float32).reshape(-1, 1), classes[:, None]])
            label["instances"] = Instances.concatenate([instances, pasted])
        return label

    def close_mosaic(self, hyp: Any) -> None:
        """Stop pasting with mosaic, as ultralytics stops its own copy-paste there."""
        self.paste_p = 0.0
        super().close_mosaic(hyp)


# --------------------------------------------------------------------------------------------
# The trainer that wires the three in
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorExtensions:
    """Settings of the three additions, passed to :class:`SpineDetectionTrainer`.

    Attributes:
        focal_gamma: Focal γ.
        focal_alpha: Focal α.
        balanced_sampling: Draw training images with :func:`image_sampling_weights`.
        copy_paste_p: Per-sample probability of pasting rare lesions (0 disables).
        rare_class_ids: Classes whose lesions are pasted.
        seed: Seed of the balanced sampler.
    """

    focal_gamma: float
    focal_alpha: float
    balanced_sampling: bool
    copy_paste_p: float
    rare_class_ids: tuple[int, ...]
    seed: int = 0


class SpineDetectionTrainer(DetectionTrainer):
    """Ultralytics' ``DetectionTrainer`` with focal loss, balanced sampling and rare-lesion paste.

    Single-device only: the balanced sampler replaces ultralytics' distributed sampler.

    Args:
        extensions: The three additions' settings.
        overrides: Ultralytics training arguments.
        _callbacks: Ultralytics callbacks.
    """

    def __init__(
        self, extensions: DetectorExtensions, overrides: dict[str, Any], _callbacks: dict | None = None
    ) -> None:
        self.extensions = extensions
        super().__init__(cfg=DEFAULT_CFG, overrides=overrides, _callbacks=_callbacks)
        if self.world_size > 1:
            raise SpineEdgeError(
                f"detector training runs on one device, got device={self.args.device!r}: pass a single GPU"
            )

    def _detection_model(self) -> DetectionModel:
        """The de-parallelised model being trained."""
        # BaseTrainer types self.model as the checkpoint path (str | Path) it starts as; setup_model() replaces it
        # with the DetectionModel (get_model) before any hook below runs.
        return cast("DetectionModel", unwrap_model(cast(nn.Module, self.model)))

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> YOLODataset:
        """The training set gets :class:`RareLesionPasteDataset`; validation stays stock."""
        if mode != "train":
            return super().build_dataset(img_path, mode, batch)
        args = self.args
        stride = max(int(self._detection_model().stride.max()), 32)
        # The same arguments ultralytics' build_yolo_dataset passes for a training set.
        return RareLesionPasteDataset(
            img_path=img_path,
            imgsz=args.imgsz,
            batch_size=batch,
            augment=True,
            hyp=args,
            rect=args.rect,
            cache=args.cache or None,
            single_cls=args.single_cls or False,
            stride=stride,
            pad=0.0,
            prefix=colorstr("train: "),
            task=args.task,
            classes=args.classes,
            data=self.data,
            fraction=get_split_fraction(args.fraction, "train"),
            rare_class_ids=self.extensions.rare_class_ids,
            paste_p=self.extensions.copy_paste_p,
        )

    def get_dataloader(
        self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"
    ) -> InfiniteDataLoader:
        """Training batches come from a ``WeightedRandomSampler`` when balanced sampling is on."""
        if mode != "train" or not self.extensions.balanced_sampling:
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        dataset = self.build_dataset(dataset_path, mode, batch_size)
        weights = image_sampling_weights([lb["cls"] for lb in dataset.labels], int(self.data["nc"]))
        generator = torch.Generator().manual_seed(self.extensions.seed)
        sampler = WeightedRandomSampler(
            weights.tolist(),  # the sampler makes its own float64 tensor of them
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
        batch = min(batch_size, len(dataset))
        batches = math.ceil(len(dataset) / batch)
        # As ultralytics' build_dataloader: no worker pool for a single batch.
        workers = min(os.cpu_count() or 1, self.args.workers, 0 if batches <= 1 else batches)
        return InfiniteDataLoader(
            dataset=dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            collate_fn=dataset.collate_fn,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.extensions.seed + 1),
            drop_last=False,
        )

    def set_class_weights(self) -> None:
        """Also attach the focal criterion.

        This is the last hook before ultralytics copies the model into its EMA (so validation
        losses use the same criterion) and after the model is on its device with ``args`` and any
        class weights set, which the criterion reads when it is built.
        """
        super().set_class_weights()
        model = self._detection_model()
        # ultralytics builds the layers as an nn.Sequential at runtime; nn.Module.__getattr__ types them Tensor | Module.
        head = cast(nn.Sequential, model.model)[-1]
        if getattr(head, "one2one_cv2", None) is not None:
            raise SpineEdgeError(
                f"{self.args.model}: end-to-end detection heads (YOLO26-style) are not supported by the focal "
                "loss; use a YOLO11 model YAML such as yolo11n.yaml"
            )
        model.criterion = FocalDetectionLoss(model, self.extensions.focal_gamma, self.extensions.focal_alpha)
