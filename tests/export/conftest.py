"""Tiny ONNX graphs and bundles for the export tests, built with ``onnx.helper`` in milliseconds.

The classifier stand-in mirrors the real graph's interface: uint8 ``[batch, 1, S, S]`` in, a cast and
scale to [0, 1], then Conv → Relu → GlobalAveragePool → Flatten → Gemm → Sigmoid → ``prob [batch, 1]``.
Variants: ``fp16`` (the body in float16 between casts) and ``int8`` (Q/DQ on the conv input and
weights, with a chosen zero point so the symmetric check has something to find).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spine_edge.bundle import (
    SCHEMA_VERSION,
    ClassifierInfo,
    DetectorInfo,
    EnsembleMember,
    Manifest,
    ModelEntry,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from spine_edge.constants import CLASS_NAMES

SIZE = 16
OPSET = 17


def tiny_classifier(
    precision: str = "fp32",
    input_name: str = "image",
    output_name: str = "prob",
    seed: int = 0,
    zero_point: int = 0,
    zero_point_dtype: int = TensorProto.INT8,
) -> onnx.ModelProto:
    """The stand-in classifier graph (dynamic batch, opset 17)."""
    rng = np.random.default_rng(seed)
    np_float = np.float16 if precision == "fp16" else np.float32
    weight = rng.normal(0, 0.5, size=(4, 1, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale_255"),
        numpy_helper.from_array(rng.normal(0, 0.1, size=4).astype(np_float), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, size=(1, 4)).astype(np_float), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, size=1).astype(np_float), "fc_b"),
    ]
    nodes = [
        helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT, name="cast_in"),
        helper.make_node("Mul", ["as_float", "scale_255"], ["x"], name="normalise"),
    ]
    conv_in, conv_w = "x", "conv_w"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="cast_fp16"))
        conv_in = "x16"
        inits.append(numpy_helper.from_array(weight.astype(np.float16), "conv_w"))
    elif precision == "int8":
        zp_np = np.int8 if zero_point_dtype == TensorProto.INT8 else np.uint8
        w_scale = float(np.abs(weight).max() / 127)
        inits += [
            numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(zero_point, zp_np), "x_zero"),
            numpy_helper.from_array(np.round(weight / w_scale).astype(np.int8), "conv_w_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="quant_x"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dequant_x"),
            helper.make_node("DequantizeLinear", ["conv_w_q", "w_scale", "w_zero"], ["conv_w_dq"], name="dequant_w"),
        ]
        conv_in, conv_w = "x_dq", "conv_w_dq"
    else:
        inits.append(numpy_helper.from_array(weight, "conv_w"))
    nodes += [
        helper.make_node("Conv", [conv_in, conv_w, "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logit"], transB=1, name="fc"),
        helper.make_node("Sigmoid", ["logit"], ["sig" if precision == "fp16" else output_name], name="sigmoid"),
    ]
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["sig"], [output_name], to=TensorProto.FLOAT, name="cast_out"))
    graph = helper.make_graph(
        nodes,
        f"tiny_{precision}",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # opset 17's IR version: every onnxruntime and TensorRT 10 parser reads it
    onnx.checker.check_model(model)
    return model


def single_node_graph(
    op: str,
    inputs: list[tuple[str, int, list]],
    outputs: list[tuple[str, int, list]],
    domain: str = "",
    opset: int = OPSET,
    **attrs: object,
) -> onnx.ModelProto:
    """A one-node graph (for operator checks; not necessarily runnable)."""
    node = helper.make_node(
        op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], name=f"the_{op.lower()}", domain=domain, **attrs
    )
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def _entry(folder: Path, file: str, role: str, precision: str, target: str, model: onnx.ModelProto) -> ModelEntry:
    onnx.save(model, str(folder / file))
    graph_in, graph_out = model.graph.input[0].name, model.graph.output[0].name
    return ModelEntry(
        role=role,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        format="onnx",
        file=file,
        sha256=sha256_file(folder / file),
        inputs=(TensorSpec(graph_in, ("batch", 1, SIZE, SIZE), "uint8"),),
        outputs=(TensorSpec(graph_out, ("batch", 1), "float32"),),
        target=target,
    )


#: (role, precision, target, file) of the default test bundle: an ORT-only U8S8-style INT8 graph and a
#: TensorRT-only symmetric one, as the export writes them.
DEFAULT_GRAPHS = (
    ("classifier", "fp32", "any", "classifier.fp32.onnx"),
    ("classifier", "int8", "onnxruntime", "classifier.int8.ort.onnx"),
    ("classifier", "int8", "tensorrt", "classifier.int8.trt.onnx"),
    ("detector", "fp32", "any", "detector.fp32.onnx"),
)


def write_bundle(folder: Path, graphs: tuple[tuple[str, str, str, str], ...] = DEFAULT_GRAPHS) -> Manifest:
    """Write the graphs and a manifest listing them; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for role, precision, target, file in graphs:
        names = ("images", "output0") if role == "detector" else ("image", "prob")
        seed = 1 if target == "onnxruntime" else 0
        model = tiny_classifier(precision, *names, seed=seed)
        entries.append(_entry(folder, file, role, precision, target, model))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id="test0001",
        created="2026-11-27T00:00:00Z",
        class_names=CLASS_NAMES,
        classifier=ClassifierInfo(
            input_size=SIZE,
            members=(EnsembleMember("tiny", "tiny", 1.0),),
            tta_views=("identity",),
            threshold=0.5,
            cam_shape=(SIZE, SIZE),
        ),
        detector=DetectorInfo(input_size=SIZE, class_names=CLASS_NAMES, conf_threshold=0.25, iou_threshold=0.65),
        models=tuple(entries),
    )
    write_manifest(folder, manifest)
    return manifest


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A fresh bundle with the default graphs."""
    folder = tmp_path / "bundle"
    write_bundle(folder)
    return folder


# --- Tiny checkpoints and a tiny prepared cache for the graph/precision/bundle tests -------------------
# Appended for test_classifier_graph / test_detector_graph / test_precision / test_bundle_writer: three
# timm members at 64 px in the spine-edge-classifier/1 format with an ensemble.json, a YOLO11n (nc=7)
# saved the way ultralytics saves a checkpoint, and a prepared cache in the CONTRACTS.md layout whose
# lesions are bright rectangles of several classes. Weights are random: the tests prove the graphs
# compute what the PyTorch modules compute, not accuracy.

import json  # noqa: E402  (this section is appended to a shared conftest)
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

EXPORT_SIZE = 64
#: (timm arch, ensemble weight): two of timm's test models and the smallest real ResNet, so the graph
#: has residual adds, squeeze-excitation (test_efficientnet) and depthwise convs like the real members.
EXPORT_MEMBERS = (("test_resnet", 0.45), ("test_efficientnet", 0.35), ("resnet10t", 0.20))
EXPORT_THRESHOLD = 0.5


def write_export_prepared(root: Path, counts: dict[str, int], long_side: int = 96, seed: int = 0) -> Path:
    """A prepared cache: gray PNGs of varied aspect, half abnormal with 1–2 boxes of random classes."""
    from spine_edge.io_utils import write_image_atomic

    rng = np.random.default_rng(seed)
    rows = ["image_id,study_id,split,abnormal,path"]
    for split, n in counts.items():
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (long_side, long_side * 5 // 8) if i % 3 else (long_side * 3 // 4, long_side)
            image = rng.normal(50, 10, (h, w))
            image[:, w // 2 - w // 8 : w // 2 + w // 8] += 60
            lines = []
            if i % 2:
                for _ in range(1 + i % 4 // 2):
                    bw, bh = int(rng.integers(8, w // 3)), int(rng.integers(8, h // 3))
                    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                    image[y : y + bh, x : x + bw] = 230
                    cls = int(rng.integers(0, len(CLASS_NAMES)))
                    lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            image_id = f"{split}{i:03d}"
            write_image_atomic(root / "images" / split / f"{image_id}.png", np.clip(image, 0, 255).astype(np.uint8))
            (root / "labels" / split / f"{image_id}.txt").write_text("".join(line + "\n" for line in lines))
            rows.append(f"{image_id},study_{image_id},{split},{i % 2},images/{split}/{image_id}.png")
    (root / "classification.csv").write_text("\n".join(rows) + "\n")
    info = {
        "version": 1,
        "source": "tests/export/conftest.py",
        "long_side": long_side,
        "seed": seed,
        "val_fraction": 0.5,
        "class_names": list(CLASS_NAMES),
        "counts": counts,
        "fingerprint": "export-test-data",
    }
    (root / "prepare.json").write_text(json.dumps(info))
    return root


def write_export_classifiers(folder: Path, size: int = EXPORT_SIZE, prepared: Path | None = None) -> Path:
    """Random-weight members (BN statistics perturbed so folding matters) and ``ensemble.json``."""
    import torch

    from spine_edge.training.checkpoints import ClassifierMeta, classifier_checkpoint_path, save_classifier_checkpoint
    from spine_edge.training.models import build_backbone, resolve_data_config
    from spine_edge.tta import DEFAULT_VIEWS

    torch.manual_seed(0)
    views = [view.name for view in DEFAULT_VIEWS]
    members = []
    for arch, weight in EXPORT_MEMBERS:
        model = build_backbone(arch)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
        # A wider logit spread than the default init, so probabilities differ between images.
        model.get_classifier().weight.data.mul_(20.0)
        cfg = resolve_data_config(model, size)
        meta = ClassifierMeta(
            arch=arch,
            input_size=size,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            in_chans=3,
            recipe={},
            data_fingerprint="export-test-data",
            val_metrics={"auroc": 0.5},
            tta_views=tuple(views),
            epoch=1,
        )
        path = save_classifier_checkpoint(classifier_checkpoint_path(folder, arch), model.state_dict(), meta)
        members.append({"name": arch, "arch": arch, "weight": weight, "checkpoint": path.name, "val_auroc": 0.5})
    ensemble = {
        "format": "spine-edge-ensemble/1",
        "members": members,
        "threshold": EXPORT_THRESHOLD,
        "tta_views": views,
        "input_size": size,
        "metrics": {"ensemble": {"auroc": 0.5}},
        "search": {"step": 0.05},
    }
    if prepared is not None:
        ensemble["prepared"] = str(prepared)
    (folder / "ensemble.json").write_text(json.dumps(ensemble, indent=2))
    return folder


def write_export_detector(folder: Path, prepared: Path, imgsz: int = EXPORT_SIZE) -> Path:
    """A random YOLO11n with 7 classes saved as ultralytics' ``Model.save`` does, plus ``detector.json``.

    With ultralytics' initialisation, activations of an untrained YOLO11n vanish layer by layer, so
    every anchor would get the same score. The BatchNorm statistics are therefore measured on the
    prepared train images (one forward pass in train mode), class-logit biases put a few anchors per
    image above conf 0.25, and box-logit biases favour short DFL distances (boxes of 10–30 px).
    """
    from copy import deepcopy

    import torch

    from spine_edge.imageio import read_image
    from spine_edge.preprocess import letterbox
    from spine_edge.training.detector import configure_ultralytics

    configure_ultralytics()  # offline, settings in spine-edge's config dir, before ultralytics is imported
    from ultralytics import __version__ as ultralytics_version
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=len(CLASS_NAMES), verbose=False)
    model.names = dict(enumerate(CLASS_NAMES))
    paths = sorted((prepared / "images" / "train").glob("*.png"))
    gray = np.stack([letterbox(read_image(p).image, imgsz, 114)[0] for p in paths])[:, None]
    batch = torch.from_numpy(gray).float().div(255).expand(-1, 3, -1, -1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()
    head = model.model[-1]
    for branch in head.cv3:
        torch.nn.init.normal_(branch[-1].bias, mean=-3.0, std=0.5)
    for branch in head.cv2:
        branch[-1].bias.data = (-0.5 * torch.arange(float(head.reg_max))).repeat(4)
    checkpoint = {
        "model": deepcopy(model).half(),
        "ema": None,
        "train_args": {"imgsz": imgsz, "task": "detect"},
        "date": "2026-11-27T00:00:00+00:00",
        "version": ultralytics_version,
    }
    torch.save(checkpoint, folder / "detector.pt")
    meta = {
        "arch": "yolo11n",
        "imgsz": imgsz,
        "class_names": list(CLASS_NAMES),
        "recipe": {"conf": 0.25, "iou": 0.65},
        "val_metrics": {"map50": 0.0, "map50_95": 0.0},
        "data_fingerprint": "export-test-data",
    }
    (folder / "detector.json").write_text(json.dumps(meta, indent=2))
    return folder / "detector.pt"


@pytest.fixture(scope="session")
def export_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train / 16 val images, long side 96."""
    return write_export_prepared(tmp_path_factory.mktemp("export_prepared"), {"train": 12, "val": 16})


@pytest.fixture(scope="session")
def export_checkpoints(tmp_path_factory: pytest.TempPathFactory, export_prepared: Path) -> Path:
    """A checkpoint folder as `spine-edge train` writes it (tiny, random weights)."""
    folder = tmp_path_factory.mktemp("export_ckpt")
    write_export_classifiers(folder, prepared=export_prepared)
    write_export_detector(folder, export_prepared)
    return folder


@dataclass(frozen=True)
class ExportedGraphs:
    """FP32 graphs of the tiny checkpoints with the PyTorch modules they were traced from."""

    classifier: Path
    detector: Path
    ensemble: Any
    detector_module: Any
    spec: Any
    checkpoints: Path


@pytest.fixture(scope="session")
def export_graphs(tmp_path_factory: pytest.TempPathFactory, export_checkpoints: Path) -> ExportedGraphs:
    """The FP32 classifier and detector graphs, exported once per session."""
    from spine_edge.export.classifier_graph import build_ensemble, export_classifier_graph, read_ensemble_spec
    from spine_edge.export.detector_graph import build_detector_module, export_detector_graph

    folder = tmp_path_factory.mktemp("export_graphs")
    spec = read_ensemble_spec(export_checkpoints)
    ensemble = build_ensemble(spec)
    module, source = build_detector_module(export_checkpoints / "detector.pt")
    return ExportedGraphs(
        classifier=export_classifier_graph(ensemble, folder / "classifier.fp32.onnx", spec.input_size),
        detector=export_detector_graph(module, source, folder / "detector.fp32.onnx", EXPORT_SIZE),
        ensemble=ensemble,
        detector_module=module,
        spec=spec,
        checkpoints=export_checkpoints,
    )


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, export_checkpoints: Path) -> tuple[Path, Any]:
    """`spine-edge export CKPT -o OUT --calib-images 8` on the tiny checkpoints, run once.

    Evaluation and calibration data come from the prepared cache recorded in ensemble.json. Returns
    the bundle folder and click's result (exit code 0, or 4 when a random-weight model misses a gate).
    """
    from click.testing import CliRunner

    from spine_edge.cli import main

    out = tmp_path_factory.mktemp("export_bundle") / "bundle"
    result = CliRunner().invoke(main, ["export", str(export_checkpoints), "-o", str(out), "--calib-images", "8"])
    return out, result
