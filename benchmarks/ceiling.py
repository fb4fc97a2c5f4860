"""Measured arithmetic ceilings of this box: one large dense matrix product per precision and library.

:class:`~spine_edge.benchmarks.paper_size.CpuFloors` gives the *nominal* peak (cores × clock × the
units' operations per cycle). A virtual machine or a busy host rarely delivers it: on the 2-core
AMX Xeon VM these benchmarks were written on, a 4096² BF16 product in PyTorch reached about a third
of the nominal AMX peak and OpenVINO's INT8 product about a tenth of the INT8 one. A graph's
"percent of peak" alone then cannot tell a slow graph from a slow box. This module times what the
libraries *can* do here, in the same run as the graphs: a square product, the friendliest shape
there is, is as close to the limit as a convolution can hope to come.

Each function returns GFLOP/s (GOP/s for INT8) per precision, the median of ``runs`` calls after a
warm-up; the caller keeps the best library per precision (:func:`best_ceilings`). Every library is
imported lazily and skipped with its reason where absent, so the numbers come from what this box has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Side of the square matrices per precision: large enough for every library's blocked kernels (the
#: AMX kernels need the larger size: PyTorch BF16 measured 787 GFLOP/s at 2048 and 1,436 at 4096 on the
#: VM above), small enough for well under a second per call (FP32: 2 × 2048³ = 17.2 GFLOP).
GEMM_SIZES: dict[str, int] = {"fp32": 2048, "bf16": 4096, "int8": 4096}


def _median_rate(flop: float, runs: int, call: Callable[..., object], *args: object) -> float:
    """GFLOP/s of ``call(*args)`` at its median time over ``runs`` calls, after two untimed ones."""
    for _ in range(2):
        call(*args)
    samples = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        call(*args)
        samples.append(time.perf_counter() - start)
    return round(flop / float(np.median(samples)) / 1e9, 1)


def torch_gemm(threads: int, precisions: Sequence[str] = ("fp32", "bf16"), runs: int = 5) -> dict[str, float]:
    """PyTorch (oneDNN / MKL) matrix products in ``fp32`` and ``bf16`` (call it where torch may be imported)."""
    import torch

    torch.set_num_threads(threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rates: dict[str, float] = {}
    with torch.inference_mode():
        for precision in precisions:
            size = GEMM_SIZES[precision]
            a = torch.randn(size, size).to(dtypes[precision])
            b = torch.randn(size, size).to(dtypes[precision])
            rates[precision] = _median_rate(2.0 * size**3, runs, torch.mm, a, b)
    return rates


def onnxruntime_gemm(threads: int, runs: int = 5) -> dict[str, float]:
    """ONNX Runtime (MLAS) products: ``fp32`` MatMul and ``int8`` MatMulInteger (uint8 × int8 → int32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f, i = GEMM_SIZES["fp32"], GEMM_SIZES["int8"]
    graphs: dict[str, tuple[str, int, np.ndarray, np.ndarray, int]] = {
        "fp32": ("MatMul", TensorProto.FLOAT, rng.standard_normal((f, f), dtype=np.float32),
                 rng.standard_normal((f, f), dtype=np.float32), TensorProto.FLOAT),
        "int8": ("MatMulInteger", TensorProto.UINT8, rng.integers(0, 255, (i, i), dtype=np.uint8),
                 rng.integers(-127, 127, (i, i), dtype=np.int8), TensorProto.INT32),
    }  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rates: dict[str, float] = {}
    for precision, (op, in_type, a, weight, out_type) in graphs.items():
        size = len(a)
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "w"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("a", in_type, [size, size])],
            [helper.make_tensor_value_info("y", out_type, [size, size])],
            [numpy_helper.from_array(weight, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rates[precision] = _median_rate(2.0 * size**3, runs, session.run, None, {"a": a})
    return rates


def openvino_gemm(
    threads: int, precisions: Sequence[str] = ("fp32", "bf16", "int8"), runs: int = 5
) -> dict[str, float]:
    """OpenVINO CPU products: FP32 / BF16 by the precision hint, INT8 as FakeQuantize → MatMul on int8 weights."""
    import openvino as ov
    from openvino import opset13 as ops

    core = ov.Core()
    rng = np.random.default_rng(0)
    rates: dict[str, float] = {}
    for precision in precisions:
        size = GEMM_SIZES[precision]
        weight = rng.standard_normal((size, size), dtype=np.float32)
        x = rng.standard_normal((size, size), dtype=np.float32)
        a = ops.parameter([size, size], ov.Type.f32, name="a")
        if precision == "int8":
            low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
            quantised = ops.fake_quantize(a, low, high, low, high, 256)
            codes = np.clip(np.round(weight * 32), -127, 127).astype(np.int8)
            weights = ops.multiply(ops.convert(ops.constant(codes), ov.Type.f32), ops.constant(np.float32(1 / 32)))
            product = ops.matmul(quantised, weights, False, False)
        else:
            product = ops.matmul(a, ops.constant(weight), False, False)
        compiled = core.compile_model(
            ov.Model([product], [a]),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                "INFERENCE_NUM_THREADS": threads,
            },
        )
        request = compiled.create_infer_request()
        rates[precision] = _median_rate(2.0 * size**3, runs, request.infer, {0: x})
    return rates


def best_ceilings(measured: Mapping[str, Mapping[str, float]], wanted: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per precision in ``wanted``, the fastest library's rate: ``{"bf16": {"gflops": 1436.0, "library": "torch"}}``.

    Args:
        measured: ``{library: {precision: GFLOP/s}}``; a library that could not run is simply absent.
        wanted: The precisions to report (those the graphs ran in).
    """
    best: dict[str, dict[str, Any]] = {}
    for precision in wanted:
        options = [(rates[precision], library) for library, rates in measured.items() if rates.get(precision)]
        if options:
            rate, library = max(options)
            best[precision] = {"gflops": rate, "library": library}
    return best
