"""Training of one DERNet member: the paper's recipe, checkpoints every epoch, resumable.

AdamW(lr, weight decay), CosineAnnealingLR(T_max) stepped once per epoch, BCE-with-logits on one
logit, the paper's augmentation on letterboxed uint8 canvases, optional progressive resizing
(successive equal parts of the epochs at each size), and early stopping on validation AUROC.
Validation runs the member through :class:`~training.models.TTAClassifier` with the identity
view only (the per-epoch signal; the ensemble search later scores all TTA views), at the final
input size, so it measures the deployed preprocessing.

Each epoch writes, in this order, the best checkpoint (when AUROC improved), the resumable state
and the metrics log, each atomically; a run killed at any point resumes from the last finished
epoch with the same optimizer, scheduler, RNG and early-stopping counters.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spine_edge.errors import DatasetError
from spine_edge.io_utils import write_text_atomic
from spine_edge.metrics import compute_auroc
from spine_edge.support import package_versions
from spine_edge.training.checkpoints import (
    CheckpointError,
    ClassifierMeta,
    classifier_checkpoint_path,
    load_train_state,
    save_classifier_checkpoint,
    save_train_state,
    train_state_path,
)
from spine_edge.training.datasets import ClassificationDataset, ClassificationItem, GrayAugment, read_prepared
from spine_edge.training.models import (
    DataConfig,
    GrayToModelInput,
    TTAClassifier,
    build_backbone,
    count_parameters,
    resolve_data_config,
    zero_head,
)
from spine_edge.training.profiles import ClassifierRecipe
from spine_edge.tta import DEFAULT_VIEWS, views_by_name

logger = logging.getLogger(__name__)

#: Recipe fields that may change between a run and its --resume (they only decide when to stop).
RESUMABLE_CHANGES = frozenset({"epochs", "patience"})
#: Probability clamp for the validation BCE computed from sigmoid outputs.
PROB_EPS = 1e-7


@dataclass(frozen=True)
class EpochRecord:
    """One line of the per-epoch metrics log.

    Attributes:
        epoch: 1-based epoch.
        size: Training input side this epoch.
        lr: Learning rate used during the epoch.
        train_loss: Mean BCE over training samples.
        val_loss: Mean BCE on validation (identity view).
        val_auroc: Validation AUROC (identity view).
        best_val_auroc: Best validation AUROC so far.
        seconds: Wall time of the epoch (training + validation).
    """

    epoch: int
    size: int
    lr: float
    train_loss: float
    val_loss: float
    val_auroc: float
    best_val_auroc: float
    seconds: float


@dataclass(frozen=True)
class ClassifierTrainResult:
    """What one member's training produced.

    Attributes:
        arch: timm model name.
        checkpoint: ``CKPT/classifier_<arch>.pt`` (best epoch).
        state: ``CKPT/resume/classifier_<arch>.pt`` (last epoch).
        log: ``CKPT/logs/<arch>.csv``.
        epochs_run: Epochs finished in total, resumed ones included.
        best_epoch: Epoch of the best checkpoint.
        best_val_auroc: Its validation AUROC.
        stopped_early: Whether patience ran out before ``recipe.epochs``.
        seconds: Wall time of this call.
        history: Every epoch's record.
    """

    arch: str
    checkpoint: Path
    state: Path
    log: Path
    epochs_run: int
    best_epoch: int
    best_val_auroc: float
    stopped_early: bool
    seconds: float
    history: tuple[EpochRecord, ...]


@dataclass(frozen=True)
class TrainingComponents:
    """The optimiser, schedule and loss a recipe prescribes.

    Attributes:
        optimizer: AdamW with the recipe's lr and weight decay.
        scheduler: CosineAnnealingLR with ``T_max = recipe.t_max`` epochs.
        loss: BCE with logits.
    """

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.CosineAnnealingLR
    loss: nn.BCEWithLogitsLoss


def build_training_components(model: nn.Module, recipe: ClassifierRecipe) -> TrainingComponents:
    """The paper's optimiser, schedule and loss for ``model``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.t_max)
    return TrainingComponents(optimizer, scheduler, nn.BCEWithLogitsLoss())


def size_for_epoch(recipe: ClassifierRecipe, epoch: int) -> int:
    """Training input side at 0-based ``epoch``: progressive sizes in equal parts of the epochs.

    Example:
        >>> size_for_epoch(ClassifierRecipe("x", 384, 8, 60, progressive_sizes=(128, 256, 384)), 25)
        256
    """
    sizes = recipe.progressive_sizes or (recipe.input_size,)
    return sizes[min(epoch * len(sizes) // max(1, recipe.epochs), len(sizes) - 1)]


def check_recipe(recipe: ClassifierRecipe) -> None:
    """Reject recipes the loop cannot honour.

    Raises:
        ValueError: Non-positive sizes or epochs, or progressive sizes not ending at ``input_size``.
    """
    if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.input_size < 32 or recipe.t_max < 1:
        raise ValueError(
            f"recipe for {recipe.arch!r} needs epochs, batch_size, t_max >= 1 and input_size >= 32: {recipe}"
        )
    if recipe.progressive_sizes and recipe.progressive_sizes[-1] != recipe.input_size:
        raise ValueError(
            f"recipe for {recipe.arch!r}: progressive sizes {recipe.progressive_sizes} must end at input_size {recipe.input_size}"
        )


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_all_cores() -> int:
    """Set torch's intra-op threads and return the number: ``$OMP_NUM_THREADS`` if set, else every core.

    The environment variable wins because on a machine shared with other jobs fewer threads are
    faster: with the 2 cores of the dev box busy, one thread trained the tiny profile in 4.5 s and
    two in 22 s (OpenMP threads spin at every barrier waiting for a descheduled peer).
    """
    configured = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(configured) if configured.isdigit() and int(configured) > 0 else max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads


def train_classifier(
    prepared: Path,
    out: Path,
    recipe: ClassifierRecipe,
    *,
    resume: bool = False,
    pretrained: Path | None = None,
    seed: int = 0,
    profile_name: str = "",
    progress: bool = True,
    workers: int | None = None,
) -> ClassifierTrainResult:
    """Train one member on a prepared cache and write its checkpoints.

    Args:
        prepared: Folder written by ``spine-edge data prepare``.
        out: Checkpoint folder (``CKPT``); created if needed.
        recipe: The member's recipe.
        resume: Continue from ``CKPT/resume/classifier_<arch>.pt`` if it exists (else start fresh).
        pretrained: Optional local ImageNet state-dict file for the backbone.
        seed: Seed of initialisation, augmentation and shuffling.
        profile_name: Recorded in the checkpoint metadata.
        progress: Show a tqdm bar per epoch.
        workers: DataLoader workers; by default 0 on CPU (decoding is already done, and on few cores
            worker processes only compete with the convolutions) and up to 8 on CUDA.

    Returns:
        Paths, best epoch and metrics, and the per-epoch history.

    Raises:
        DatasetError: The cache is missing, or train/val lack one of the two classes.
        CheckpointError: ``--resume`` state from other data or another recipe.
        ArchitectureError: Unknown arch or unsupported head.

    Example:
        >>> result = train_classifier(Path("runs/prepared"), Path("runs/ckpt"), get_profile("cpu").classifier("resnet10t"))
        >>> result.best_val_auroc
    """
    started = time.perf_counter()
    check_recipe(recipe)
    data = read_prepared(prepared)
    train_items, val_items = data.split("train"), data.split("val")
    for name, items in (("train", train_items), ("val", val_items)):
        _require_both_classes(data.root, name, items)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cores = use_all_cores()
    device = default_device()
    workers = (0 if device.type == "cpu" else min(8, cores)) if workers is None else workers

    torch.manual_seed(seed)
    model = zero_head(build_backbone(recipe.arch, pretrained=pretrained, output_stride=recipe.output_stride)).to(device)
    data_cfg = resolve_data_config(model, recipe.input_size)
    to_input = GrayToModelInput(data_cfg.mean, data_cfg.std).to(device)
    parts = build_training_components(model, recipe)
    validator = TTAClassifier(model, data_cfg, views_by_name(["identity"]))

    state_path, ckpt_path = train_state_path(out, recipe.arch), classifier_checkpoint_path(out, recipe.arch)
    log_path = out / "logs" / f"{recipe.arch}.csv"
    tracker = _Tracker()
    if resume and state_path.exists():
        tracker = _restore(state_path, model, parts, recipe, data.fingerprint, device)
        logger.info(
            "%s: resuming after epoch %d (best AUROC %.4f at epoch %d)",
            recipe.arch,
            tracker.epoch,
            tracker.best,
            tracker.best_epoch,
        )
    elif resume:
        logger.info("%s: no resume state at %s, starting at epoch 1", recipe.arch, state_path)

    val_set = ClassificationDataset(val_items, recipe.input_size)
    train_set: ClassificationDataset | None = None
    final_stage_size = (recipe.progressive_sizes or (recipe.input_size,))[-1]
    meta_base = _meta_base(recipe, data_cfg, data.fingerprint, profile_name, pretrained, count_parameters(model))

    while tracker.epoch < recipe.epochs and not tracker.stopped_early:
        epoch_started = time.perf_counter()
        size = size_for_epoch(recipe, tracker.epoch)
        if train_set is None or train_set.size != size:
            train_set = ClassificationDataset(train_items, size, GrayAugment(recipe, size))
        lr = parts.optimizer.param_groups[0]["lr"]
        train_loss = _train_one_epoch(
            model, to_input, parts, train_set, recipe, seed, tracker.epoch, workers, device, progress
        )
        parts.scheduler.step()
        val_loss, val_auroc = _validate(validator, val_set, recipe.batch_size, device)
        tracker.epoch += 1
        if val_auroc > tracker.best:
            tracker.best, tracker.best_epoch, tracker.bad_epochs = val_auroc, tracker.epoch, 0
            val_metrics = {
                "auroc": val_auroc,
                "loss": val_loss,
                "views": ["identity"],
                "n": len(val_set),
                "n_positive": int(val_set.labels.sum()),
            }
            meta = ClassifierMeta(**meta_base, val_metrics=val_metrics, epoch=tracker.epoch)
            save_classifier_checkpoint(ckpt_path, model.state_dict(), meta)
        else:
            tracker.bad_epochs += 1
        tracker.history.append(
            EpochRecord(
                tracker.epoch,
                size,
                lr,
                train_loss,
                val_loss,
                val_auroc,
                tracker.best,
                time.perf_counter() - epoch_started,
            )
        )
        tracker.stopped_early = (
            tracker.bad_epochs >= recipe.patience and size == final_stage_size and tracker.epoch < recipe.epochs
        )
        save_train_state(state_path, _snapshot(tracker, model, parts, recipe, data.fingerprint, device))
        _write_log(log_path, tracker.history)
        logger.info(
            "%s epoch %d/%d %dpx: train loss %.4f, val loss %.4f, val AUROC %.4f (best %.4f @ %d), %.1fs",
            recipe.arch,
            tracker.epoch,
            recipe.epochs,
            size,
            train_loss,
            val_loss,
            val_auroc,
            tracker.best,
            tracker.best_epoch,
            tracker.history[-1].seconds,
        )

    if not ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path}: missing although {state_path} says training ran; train without --resume")
    return ClassifierTrainResult(
        arch=recipe.arch,
        checkpoint=ckpt_path,
        state=state_path,
        log=log_path,
        epochs_run=tracker.epoch,
        best_epoch=tracker.best_epoch,
        best_val_auroc=tracker.best,
        stopped_early=tracker.stopped_early,
        seconds=time.perf_counter() - started,
        history=tuple(tracker.history),
    )


class _Tracker:
    """Mutable progress of one run: epochs done, early-stopping counters, history."""

    def __init__(self) -> None:
        self.epoch = 0
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[EpochRecord] = []


def _require_both_classes(root: Path, split: str, items: tuple[ClassificationItem, ...]) -> None:
    positives = sum(item.label for item in items)
    if positives == 0 or positives == len(items):
        kind = "normal" if positives == 0 else "abnormal"
        raise DatasetError(
            f"{root / 'classification.csv'}: every {split!r} image is {kind}, so AUROC is undefined; "
            "prepare the cache from more images or with a larger --val-fraction"
        )


def _meta_base(
    recipe: ClassifierRecipe,
    data_cfg: DataConfig,
    fingerprint: str,
    profile: str,
    pretrained: Path | None,
    num_params: int,
) -> dict[str, Any]:
    return {
        "arch": recipe.arch,
        "input_size": data_cfg.input_size,
        "mean": data_cfg.mean,
        "std": data_cfg.std,
        "interpolation": data_cfg.interpolation,
        "in_chans": 3,
        "recipe": recipe.to_dict(),
        "data_fingerprint": fingerprint,
        "tta_views": tuple(view.name for view in DEFAULT_VIEWS),
        "profile": profile,
        "pretrained": str(pretrained) if pretrained else "",
        "num_params": num_params,
        "versions": package_versions(["torch", "timm"]),
    }


def _train_one_epoch(
    model: nn.Module,
    to_input: GrayToModelInput,
    parts: TrainingComponents,
    dataset: ClassificationDataset,
    recipe: ClassifierRecipe,
    seed: int,
    epoch: int,
    workers: int,
    device: torch.device,
    progress: bool,
) -> float:
    # Shuffling is seeded by (seed, epoch) rather than carried RNG state, so a resumed run draws
    # the same order as an uninterrupted one; augmentation draws from the restored torch RNG.
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    # A last batch of one sample would make BatchNorm fail on its pooled statistics.
    drop_last = len(dataset) % recipe.batch_size == 1
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
    )
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(
        loader, desc=f"{recipe.arch} {epoch + 1}/{recipe.epochs} {dataset.size}px", leave=False, disable=not progress
    )
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(to_input(images)).squeeze(1)
        loss = parts.loss(logits, labels)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        total += loss.item() * len(labels)
        seen += len(labels)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(1, seen)


@torch.no_grad()
def _validate(
    validator: TTAClassifier, dataset: ClassificationDataset, batch_size: int, device: torch.device
) -> tuple[float, float]:
    validator.eval()
    probs = torch.cat(
        [validator(dataset.images[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(dataset), batch_size)]
    )
    loss = F.binary_cross_entropy(probs.clamp(PROB_EPS, 1 - PROB_EPS), dataset.labels).item()
    return loss, compute_auroc(dataset.labels.numpy(), probs.numpy())


def _snapshot(
    tracker: _Tracker,
    model: nn.Module,
    parts: TrainingComponents,
    recipe: ClassifierRecipe,
    fingerprint: str,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "arch": recipe.arch,
        "epoch": tracker.epoch,
        "best_val_auroc": tracker.best,
        "best_epoch": tracker.best_epoch,
        "bad_epochs": tracker.bad_epochs,
        "stopped_early": tracker.stopped_early,
        "history": [asdict(record) for record in tracker.history],
        "recipe": recipe.to_dict(),
        "data_fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def _restore(
    path: Path,
    model: nn.Module,
    parts: TrainingComponents,
    recipe: ClassifierRecipe,
    fingerprint: str,
    device: torch.device,
) -> _Tracker:
    state = load_train_state(path)
    if state["data_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path}: was trained on another prepared cache (fingerprint differs); train without --resume"
        )
    saved = state["recipe"]
    changed = sorted(
        k for k, v in recipe.to_dict().items() if k not in RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(v)
    )
    if changed:
        raise CheckpointError(
            f"{path}: recipe fields {changed} differ from the run being resumed; resume with the same recipe "
            f"(only {sorted(RESUMABLE_CHANGES)} may change) or train without --resume"
        )
    model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    tracker = _Tracker()
    tracker.epoch = int(state["epoch"])
    tracker.best = float(state["best_val_auroc"])
    tracker.best_epoch = int(state["best_epoch"])
    tracker.bad_epochs = int(state["bad_epochs"])
    tracker.history = [EpochRecord(**record) for record in state["history"]]
    # A larger --patience re-opens a run that stopped early; a larger --epochs extends a finished one.
    tracker.stopped_early = bool(state["stopped_early"]) and tracker.bad_epochs >= recipe.patience
    return tracker


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _write_log(path: Path, history: list[EpochRecord]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = list(EpochRecord.__dataclass_fields__)
    writer.writerow(columns)
    for record in history:
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in asdict(record).values()])
    return write_text_atomic(path, buffer.getvalue())
