"""Estimated latency of a snapshot on ARM cores this machine cannot run: per-conv MACs over rates fitted to ncnn's
published timings. An estimate, labelled so wherever it is shown."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import shape_inference

# Multiply-accumulates per second of one core, fp32 and int8 convs, and a fixed cost per op (ms), fitted to ncnn's
# benchmark table (github.com/Tencent/ncnn, benchmark/README.md; 1 thread, the networks with dense 3x3/1x1 convs
# like this student's: resnet18, googlenet, vgg16, resnet50, and their _int8 twins). CALIBRATION below holds the
# figures they come from; `fit` recomputes the rates from them.
# Copied from that table (commit f4e9a78, 2026-03-30), `benchncnn <loops> 1 0 -1 1`: 1 thread, avg ms.
CALIBRATION: dict[str, dict] = {
    "cortex-a7": {"board": "Banana Pi M2 Zero 2, AllWinner H2+, Cortex-A7 1.2GHz",
                  "fp32": {"googlenet": 1880.76, "resnet18": 1839.17, "resnet50": 4847.80},
                  "int8": {"googlenet": 1279.59, "resnet18": 1013.01, "resnet50": 2797.30}},
    "cortex-a53": {"board": "Raspberry Pi 3 Model B+, BCM2837B0, Cortex-A53 1.4GHz",
                   "fp32": {"googlenet": 450.79, "resnet18": 379.57, "resnet50": 979.75},
                   "int8": {"googlenet": 425.78, "resnet18": 312.68, "resnet50": 893.83}},
    "cortex-a72": {"board": "Raspberry Pi 4 Model B, BCM2711B0, Cortex-A72 1.8GHz",
                   "fp32": {"googlenet": 235.94, "resnet18": 191.10, "vgg16": 1071.85, "resnet50": 534.11},
                   "int8": {"googlenet": 210.00, "resnet18": 158.50, "vgg16": 869.84, "resnet50": 423.96}},
}
NET_GMACS = {"resnet18": 1.82, "googlenet": 1.50, "vgg16": 15.5, "resnet50": 3.86}  # at 224 x 224 (resnet50: the Caffe original)
# What the fit leaves out, so the figure is a floor rather than a forecast: the student's SiLU (the fitted nets use
# ReLU, fused into their convs), the float decode and NMS, and onnxruntime's ARM kernels against ncnn's (the device
# runs onnxruntime: the rates assume it reaches ncnn's per-core throughput on dense convs).


def fit(target: str) -> tuple[float, float]:
    """(fp32, int8) GMAC/s of one core of `target`: the median over the calibration networks of MACs / time."""
    if target not in CALIBRATION:
        raise ValueError(f"no cost model for latency target '{target}' (known: {', '.join(CALIBRATION)})")
    c = CALIBRATION[target]
    rates = []
    for kind in ("fp32", "int8"):
        rates.append(float(np.median([NET_GMACS[n] / (ms / 1000) for n, ms in c[kind].items() if n in NET_GMACS])))
    return rates[0], rates[1]


def conv_macs(onnx_path: Path) -> dict[str, float]:
    """Multiply-accumulates of every Conv node of the (float) model, by node name, from inferred shapes."""
    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w, y = inits.get(node.input[1]), shapes.get(node.output[0])
        if not w or not y or 0 in y:
            raise ValueError(f"{onnx_path}: no static shape for conv {node.name}")
        # y: N x Cout x H x W; w: Cout x Cin/groups x kh x kw
        out[node.name] = float(np.prod(y[1:])) * float(np.prod(w[1:]))
    return out


def estimate_ms(fp32_onnx: Path, float_names: Iterable[str], target: str) -> float:
    """ms per frame on one core of `target`: each conv's MACs at the fp32 or int8 rate (float where its node is
    in `float_names`, as quantize leaves it)."""
    fp32_rate, int8_rate = fit(target)
    floats = set(float_names)
    seconds = sum(m / ((fp32_rate if name in floats else int8_rate) * 1e9) for name, m in conv_macs(fp32_onnx).items())
    return seconds * 1000
