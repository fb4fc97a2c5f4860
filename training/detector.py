"""Train the YOLO11 lesion detector with the paper's recipe, offline, from the prepared cache.

The model is built from ultralytics' model YAML (``yolo11l.yaml`` for ``paper``), so nothing is
downloaded. The paper's recipe becomes ultralytics training arguments (:func:`detector_train_args`);
focal loss, class-balanced sampling and rare-lesion copy-paste come from :mod:`training.yolo_ext`.

Everything training writes lands in ``OUT`` (ultralytics' run folder is ``OUT/detector_run``; its
label caches go to a linked view of the dataset inside it, never into the prepared cache) and in
ultralytics' config dir (settings and a local font), which :func:`configure_ultralytics` points
at spine-edge's own config dir before ultralytics is first imported.

Example:
    >>> from spine_edge.training.profiles import get_profile
    >>> result = train_detector(Path("prep"), Path("ckpt"), get_profile("cpu").detector)  # doctest: +SKIP
    >>> result.map50  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from spine_edge.errors import DatasetError, SpineEdgeError
from spine_edge.io_utils import write_bytes_atomic, write_text_atomic
from spine_edge.support import import_optional, json_safe, package_versions
from spine_edge.training.profiles import DetectorRecipe

#: Ultralytics' run folder inside OUT (weights/last.pt, weights/best.pt, results.csv, plots).
RUN_DIR_NAME = "detector_run"
#: Inside the run folder: symlinks to the prepared images and labels, so that ultralytics' label
#: caches (written next to the labels folder) stay inside OUT.
DATA_VIEW_NAME = "data"
CHECKPOINT_NAME = "detector.pt"
METADATA_NAME = "detector.json"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class DetectorTrainResult:
    """What :func:`train_detector` produced.

    Attributes:
        checkpoint: ``OUT/detector.pt`` (ultralytics checkpoint of the best epoch).
        metadata: ``OUT/detector.json``.
        map50: Validation mAP@0.5 of the checkpoint.
        map50_95: Validation mAP@0.5:0.95.
        per_class_ap50: AP@0.5 per class name, for the classes with validation boxes.
        epochs: Epochs trained in total (including those before a resume).
        seconds: Wall time of this call.
    """

    checkpoint: Path
    metadata: Path
    map50: float
    map50_95: float
    per_class_ap50: Mapping[str, float]
    epochs: int
    seconds: float


@dataclass(frozen=True)
class PreparedDetectorData:
    """The parts of a prepared cache the detector needs (see docs/CONTRACTS.md).

    Attributes:
        root: The prepared cache folder.
        class_names: Class names in detector index order.
        channels: Image channels ultralytics loads (``channels`` in dataset.yaml, default 3).
        fingerprint: ``prepare.json``'s data fingerprint.
    """

    root: Path
    class_names: tuple[str, ...]
    channels: int
    fingerprint: str


# --------------------------------------------------------------------------------------------
# Ultralytics, offline
# --------------------------------------------------------------------------------------------


def default_config_dir() -> Path:
    """spine-edge's config dir: ``$SPINE_EDGE_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/spine-edge``."""
    if env := os.environ.get("SPINE_EDGE_CONFIG_DIR"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "spine-edge"


def configure_ultralytics(config_dir: Path | None = None) -> Path:
    """Make ultralytics work offline, then import it.

    Ultralytics reads ``YOLO_CONFIG_DIR`` and decides whether it is online once, when it is first
    imported, and looks for ``Arial.ttf`` in that dir on every dataset check and plot, downloading
    it when missing. So, before the first import: ``YOLO_CONFIG_DIR`` defaults to
    ``config_dir/ultralytics`` (a user's own ``YOLO_CONFIG_DIR`` wins) and ``YOLO_OFFLINE=1``.
    After it: a local TrueType font (matplotlib's DejaVu Sans, installed with ultralytics) is
    copied in as ``Arial.ttf``; and, when the settings file is ours, ultralytics' analytics and
    experiment-tracker integrations are switched off so nothing writes outside OUT.

    Call it again at any time: it is idempotent and only repairs what is missing.

    Args:
        config_dir: spine-edge config dir; :func:`default_config_dir` when None.

    Returns:
        Ultralytics' config dir in use.
    """
    own_dir = (config_dir or default_config_dir()) / "ultralytics"
    if "ultralytics" not in sys.modules:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(own_dir))
        os.environ["YOLO_OFFLINE"] = "1"
    matplotlib = import_optional("matplotlib", "train", "Detector training")
    ultralytics_utils = import_optional("ultralytics.utils", "train", "Detector training")
    SETTINGS, USER_CONFIG_DIR = ultralytics_utils.SETTINGS, ultralytics_utils.USER_CONFIG_DIR

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if not target.exists() and font.exists():
            write_bytes_atomic(target, font.read_bytes())
    if Path(USER_CONFIG_DIR).resolve().is_relative_to(own_dir.resolve()):
        off = dict.fromkeys(("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb"), False)
        if any(SETTINGS.get(k) is not False for k in off):
            SETTINGS.update(off)
    return Path(USER_CONFIG_DIR)


def import_yolo_extensions(config_dir: Path | None = None) -> ModuleType:
    """:mod:`training.yolo_ext`, imported after :func:`configure_ultralytics`."""
    configure_ultralytics(config_dir)
    from spine_edge.training import yolo_ext

    return yolo_ext


def select_amp() -> bool | str:
    """Mixed precision for this machine: ``"bf16"`` on a bf16 GPU, else off.

    fp16 AMP (``amp=True``) would make ultralytics download yolo26n.pt for its AMP self-test;
    bf16 needs neither that test nor a gradient scaler. CPUs train in fp32 anyway.
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return False


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_prepared_cache(prepared: Path) -> PreparedDetectorData:
    """Check a prepared cache and read what the detector needs.

    Raises:
        DatasetError: A file is missing or inconsistent, naming it and what to run.
    """
    prepared = Path(prepared)
    redo = f"run `spine-edge data prepare VINDR_ROOT {prepared}` again"
    meta_path, yaml_path = prepared / "prepare.json", prepared / "dataset.yaml"
    for path in (meta_path, yaml_path):
        if not path.is_file():
            raise DatasetError(f"{path}: missing, so {prepared} is not a prepared training cache ({redo})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DatasetError(f"{prepared}: cannot read prepare.json / dataset.yaml ({exc}); {redo}") from exc
    if not isinstance(meta, dict) or not meta.get("fingerprint") or not meta.get("class_names"):
        raise DatasetError(f"{meta_path}: no 'fingerprint' or 'class_names' ({redo})")
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    class_names = tuple(str(n) for n in meta["class_names"])
    if names is None or tuple(names) != class_names:
        raise DatasetError(f"{yaml_path}: class names {names} differ from prepare.json's {list(class_names)} ({redo})")
    for split in _SPLITS:
        folder = prepared / "images" / split
        if not folder.is_dir() or not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.iterdir()):
            raise DatasetError(f"{folder}: no images for the {split} split ({redo})")
    return PreparedDetectorData(prepared, class_names, int(data.get("channels", 3)), str(meta["fingerprint"]))


def link_dataset_view(data: PreparedDetectorData, view: Path) -> Path:
    """Write a dataset view of symlinks to the prepared images and labels, and its YAML.

    Ultralytics writes ``labels/<split>.cache`` next to the labels folder and resolves dataset
    folders through symlinks, so the view links files, not folders: the caches then land in the
    view, inside OUT, and the prepared cache is only read.

    Returns:
        The view's dataset YAML.
    """
    if view.exists():
        shutil.rmtree(view)
    for split in _SPLITS:
        for kind, suffixes in (("images", _IMAGE_SUFFIXES), ("labels", {".txt"})):
            source = data.root / kind / split
            target = view / kind / split
            target.mkdir(parents=True)
            if not source.is_dir():
                continue
            for path in sorted(source.iterdir()):
                if path.suffix.lower() in suffixes:
                    (target / path.name).symlink_to(path.resolve())
    spec = {
        "path": str(view.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(data.class_names)),
        "channels": data.channels,
    }
    return Path(write_text_atomic(view / "dataset.yaml", yaml.safe_dump(spec, sort_keys=False)))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def detector_train_args(
    recipe: DetectorRecipe, data_yaml: Path, out: Path, *, seed: int, amp: bool | str
) -> dict[str, Any]:
    """Ultralytics training arguments for a recipe (the paper's, by name).

    Named explicitly where ultralytics' default differs or would ignore the recipe: ``optimizer``
    (``auto`` ignores lr0), ``close_mosaic`` (ultralytics' default 10 would turn mosaic off for most
    of a short run), ``copy_paste=0`` (ours replaces it), ``pretrained=False`` (nothing downloaded).
    Augmentations the paper does not name (translate, scale) keep ultralytics' defaults.
    """
    return {
        "model": recipe.model,
        "data": str(data_yaml),
        "epochs": recipe.epochs,
        "batch": recipe.batch,
        "nbs": recipe.nbs,
        "imgsz": recipe.imgsz,
        "optimizer": recipe.optimizer,
        "lr0": recipe.lr0,
        "lrf": recipe.lrf,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "cos_lr": recipe.cos_lr,
        "warmup_epochs": recipe.warmup_epochs,
        "mosaic": recipe.mosaic,
        "close_mosaic": recipe.close_mosaic,
        "hsv_h": recipe.hsv_h,
        "hsv_s": recipe.hsv_s,
        "hsv_v": recipe.hsv_v,
        "fliplr": recipe.fliplr,
        "multi_scale": recipe.multi_scale,
        "copy_paste": 0.0,
        "workers": recipe.workers,
        "pretrained": False,
        "amp": amp,
        "seed": seed,
        "project": str(Path(out).resolve()),
        "name": RUN_DIR_NAME,
        "exist_ok": True,
        "plots": recipe.plots,
        "val": True,
    }


def rare_class_ids(recipe: DetectorRecipe, class_names: tuple[str, ...]) -> tuple[int, ...]:
    """Indices of ``recipe.rare_classes``.

    Raises:
        DatasetError: A rare class is not among the cache's classes.
    """
    missing = [name for name in recipe.rare_classes if name not in class_names]
    if missing:
        raise DatasetError(f"recipe.rare_classes {missing} are not classes of the prepared cache {list(class_names)}")
    return tuple(class_names.index(name) for name in recipe.rare_classes)


def check_resumable(last: Path) -> None:
    """Refuse a resume ultralytics would refuse, with a message that says what to do.

    Raises:
        SpineEdgeError: No ``last.pt``, or it belongs to a run that already finished (ultralytics
            marks a finished run's ``last.pt`` with ``epoch = -1``).
    """
    import torch

    if not last.is_file():
        raise SpineEdgeError(f"{last}: no interrupted detector run to resume; train without --resume")
    # ultralytics pickles the model object into last.pt and unpickles it to resume (weights_only cannot
    # read it), so this reads no more than the resume itself will. The file is this training run's own
    # output under --out, never something a bundle names: bundles are never a source of checkpoints.
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    if int(checkpoint.get("epoch", -1)) < 0:
        raise SpineEdgeError(f"{last}: this detector run already finished; train again without --resume")


def build_detector_trainer(
    prepared: Path, out: Path, recipe: DetectorRecipe, *, resume: bool = False, seed: int = 0
) -> Any:
    """Set up (but do not run) ultralytics training for :func:`train_detector`.

    Returns:
        A :class:`training.yolo_ext.SpineDetectionTrainer`; ``.train()`` runs it.

    Raises:
        DatasetError: The prepared cache is unusable.
        SpineEdgeError: ``recipe.model`` is not a model YAML, or ``resume`` without an interrupted
            run in ``out``.
    """
    out = Path(out)
    if Path(recipe.model).suffix not in {".yaml", ".yml"}:
        raise SpineEdgeError(
            f"recipe.model={recipe.model!r}: the detector is built from an ultralytics model YAML "
            "(e.g. yolo11l.yaml), never from downloadable weights"
        )
    data = read_prepared_cache(prepared)
    rare_ids = rare_class_ids(recipe, data.class_names)
    run_dir = out / RUN_DIR_NAME
    last = run_dir / "weights" / "last.pt"
    ext = import_yolo_extensions()
    if resume:
        check_resumable(last)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    data_yaml = link_dataset_view(data, run_dir / DATA_VIEW_NAME)
    overrides = detector_train_args(recipe, data_yaml, out, seed=seed, amp=select_amp())
    if resume:
        overrides["resume"] = str(last)
    extensions = ext.DetectorExtensions(
        focal_gamma=recipe.focal_gamma,
        focal_alpha=recipe.focal_alpha,
        balanced_sampling=recipe.balanced_sampling,
        copy_paste_p=recipe.copy_paste_p,
        rare_class_ids=rare_ids,
        seed=seed,
    )
    return ext.SpineDetectionTrainer(extensions, overrides=overrides)


def train_detector(
    prepared: Path,
    out: Path,
    recipe: DetectorRecipe,
    *,
    resume: bool = False,
    profile_name: str = "",
    seed: int = 0,
) -> DetectorTrainResult:
    """Train the detector on a prepared cache; write ``OUT/detector.pt`` and ``OUT/detector.json``.

    Args:
        prepared: Prepared training cache (``spine-edge data prepare``).
        out: Checkpoint folder; ultralytics' run folder is ``out/detector_run``.
        recipe: Detector recipe (``get_profile(name).detector``).
        resume: Continue the interrupted run in ``out/detector_run``.
        profile_name: Recorded in the metadata.
        seed: Training seed (ultralytics, sampler).

    Returns:
        Paths and validation metrics of the best epoch's checkpoint.

    Raises:
        DatasetError: The prepared cache is unusable.
        SpineEdgeError: ``recipe.model`` is not a model YAML, or ``resume`` without an interrupted
            run.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_detector_trainer(prepared, out, recipe, resume=resume, seed=seed)
    trainer.train()
    data = read_prepared_cache(prepared)
    best = trainer.best if Path(trainer.best).is_file() else trainer.last
    checkpoint = write_bytes_atomic(out / CHECKPOINT_NAME, Path(best).read_bytes())
    metrics = collect_val_metrics(trainer.validator.metrics, data.class_names)
    epochs = int(trainer.epoch) + 1
    seconds = time.perf_counter() - start
    meta = {
        "arch": Path(recipe.model).stem,
        "imgsz": recipe.imgsz,
        "class_names": list(data.class_names),
        "recipe": recipe.to_dict(),
        "val_metrics": metrics,
        "data_fingerprint": data.fingerprint,
        "prepared": str(Path(prepared).resolve()),
        "profile": profile_name,
        "seed": seed,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "ultralytics_version": package_versions(["ultralytics"], missing="")["ultralytics"],
    }
    metadata = write_text_atomic(out / METADATA_NAME, json.dumps(json_safe(meta), indent=2, allow_nan=False) + "\n")
    return DetectorTrainResult(
        checkpoint=Path(checkpoint),
        metadata=Path(metadata),
        map50=metrics["map50"],
        map50_95=metrics["map50_95"],
        per_class_ap50=dict(metrics["per_class_ap50"]),
        epochs=epochs,
        seconds=seconds,
    )


def collect_val_metrics(det_metrics: Any, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Plain-type metrics from ultralytics' ``DetMetrics`` of the final validation.

    Per-class AP is reported only for classes with validation boxes (ultralytics computes none
    for the others).
    """
    box = det_metrics.box
    per_class = {class_names[int(c)]: float(ap) for c, ap in zip(box.ap_class_index, box.ap50)}
    return {
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
        "per_class_ap50": per_class,
    }
