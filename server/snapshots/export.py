"""ONNX export with Ultralytics-readable metadata, static int8 QDQ quantization, and an int8 check of the graph."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_dynamic,
                                      quantize_static)

from shared.snapshot.calibration import FrameReader, Ranges, activation_ranges

OPSET = 17  # TorchScript exporter: the dynamo exporter at 17 produces graphs onnxruntime rejects
INT8_CONV_OPS = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}
TARGETS = {  # activations, weights: U8S8 fuses into real int8 kernels on x86; ARM's kernels want S8S8
    "x86": (QuantType.QUInt8, QuantType.QInt8),
    "arm64": (QuantType.QInt8, QuantType.QInt8),
}



def runs_integer_kernels(target: str) -> bool:
    """Whether the server scores a target's int8 model with onnxruntime's integer kernels on this CPU (x86: what an
    x86 device runs) or as the QDQ graph is written, in float arithmetic (arm64). Measured with
    simulations/arm64_check.py: aarch64's NEON kernels match the float-evaluated graph within 4 quantization steps
    at the int8 -> float boundaries, while this machine's x86 kernels (AVX2, no VNNI) depart from it by up to 57
    steps on the signed-int8 graph; gating with them would judge arithmetic the camera never runs."""
    return target != "arm64"


class ExpectationDFL(torch.nn.Module):
    """Ultralytics' DFL decode (expected bin under a softmax over the bins of each box side), computed without a
    Softmax: exp(x - max) in one pass over the head's own channel layout, then one matmul giving, per side, the
    bin-weighted sum and the plain sum, and a division. The same numbers (1e-4 px); onnxruntime runs a Softmax over
    a middle axis by transposing around it (~11 % of this student at 320 px) and one over 16-bin rows slowly, while
    this costs ~3 % (measured: 0.15 ms less per frame at 320 px, 0.5 ms at 640)."""

    def __init__(self, bins: int):
        super().__init__()
        self.c1 = bins
        weights = torch.zeros(8, 4 * bins)  # rows 0-3: sum of bin * e per side; rows 4-7: sum of e per side
        for side in range(4):
            weights[side, side * bins:(side + 1) * bins] = torch.arange(bins, dtype=torch.float32)
            weights[4 + side, side * bins:(side + 1) * bins] = 1.0
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        sides = x.view(b, 4, self.c1, a)
        e = (sides - sides.amax(2, keepdim=True)).exp().view(b, 4 * self.c1, a)  # max first: exp cannot overflow
        sums = self.weights @ e
        return sums[:, :4] / sums[:, 4:]


def export_onnx(model: torch.nn.Module, path: Path, imgsz: int, metadata: dict[str, str]) -> Path:
    """Fused, single-output (B, 4 + nc, anchors) ONNX, simplified, with metadata Ultralytics' YOLO() reads."""
    import onnxslim

    net = copy.deepcopy(model).float().eval()
    net.fuse(verbose=False)
    head = net.model[-1]
    head.export, head.format, head.dynamic = True, "onnx", False
    if hasattr(head.dfl, "c1"):  # reg_max > 1 (reg_max 1 has an Identity here)
        head.dfl = ExpectationDFL(head.dfl.c1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, imgsz, imgsz), str(path), opset_version=OPSET, dynamo=False,
                          input_names=["images"], output_names=["output0"], do_constant_folding=True)
    proto = onnxslim.slim(onnx.load(str(path)))
    names = dict(sorted(net.names.items()))
    meta = {"task": "detect", "stride": str(int(head.stride.max())), "batch": "1", "channels": "3",
            "imgsz": str([imgsz, imgsz]), "names": str(names), "author": "fedcam", **metadata}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(path))
    return path


Unit = int | str  # kept float: a module index (/model.<i>/), or one conv inside one ("2/m.0/cv1": /model.2/m.0/cv1/)


def unit_prefix(unit: Unit) -> str:
    return f"/model.{unit}/"


def unit_module(unit: Unit) -> int:
    """The module a unit is or lies in."""
    return int(str(unit).split("/")[0])


def unit_order(units: Iterable[Unit]) -> list[Unit]:
    """Modules and convs in graph order by module, a module before the convs inside it (JSON keeps int and str)."""
    return sorted(units, key=lambda u: (unit_module(u), isinstance(u, str), str(u)))


def float_nodes(onnx_path: Path, layers: int | Iterable[Unit] = 0) -> list[str]:
    """Nodes kept in float: the detection decode and the head's last convs (accurate boxes), and `layers`: the
    first N layers of the model, or the listed units (module indices and convs inside them, chosen per checkpoint:
    precision.py). The first layers run at full resolution with 8-16 channels, where onnxruntime's int8 kernels
    can be slower than its blocked float ones (measured: README)."""
    graph = onnx.load(str(onnx_path)).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    head = max(int(m.group(1)) for n in convs if (m := re.match(r"/model\.(\d+)/", n)))
    keep_float = re.compile(rf"/model\.{head}/(dfl/|cv[23]\.\d+/cv[23]\.\d+\.2/)")
    # The decode: the head's nodes outside its conv branches. The branches' activations stay int8 (their int8
    # convs absorb them); keeping them float cost a dequantize/quantize round trip per hidden layer.
    branch = re.compile(rf"/model\.{head}/cv[23]\.\d+/")
    decode = [n.name for n in graph.node if n.name.startswith(f"/model.{head}/") and not branch.match(n.name)]
    chosen = range(layers) if isinstance(layers, int) else layers
    stem = tuple(unit_prefix(u) for u in chosen if unit_module(u) < head)
    early = [n.name for n in graph.node if stem and n.name.startswith(stem)]
    return [n for n in convs if keep_float.search(n)] + decode + early


def pre_process(fp32: Path, out: Path) -> Path:
    """onnxruntime's pre-quantization pass (shape inference, fusions): the graph whose tensors are calibrated."""
    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    return out


# Ops whose int8 output the quantizer puts on their input's scale (onnxruntime.quantization's QDQ registry)
SAME_AS_INPUT = ("Slice", "Split", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize",
                 "Pad")


def shared_concat_ranges(pre: Path, ranges: Ranges) -> Ranges:
    """Every Concat's inputs and output on one range, their union (concats that share a tensor join into one group,
    and so do the two sides of an op the quantizer gives its input's scale: a Slice feeding a Concat, a Resize).
    Why: onnxruntime's QLinearConcat copies an input whose scale and zero point equal the output's and otherwise
    requantizes it through a lookup table; with NHWC layouts both are per-pixel, and the copies cost less (measured
    on a 50 % pruned student at 320 px, 1 thread: 3.8 % of the frame; int8 mAP50 within +-0.003 on five
    checkpoints: README)."""
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for node in onnx.load(str(pre)).graph.node:
        if node.op_type in ("Concat", *SAME_AS_INPUT):
            data = node.input if node.op_type == "Concat" else node.input[:1]
            tensors = [t for t in [*data, *node.output] if t in ranges]
            for t in tensors[1:]:
                parent[root(t)] = root(tensors[0])
    groups: dict[str, list[str]] = {}
    for t in ranges:
        groups.setdefault(root(t), []).append(t)
    out = dict(ranges)
    for group in groups.values():
        lo, hi = min(ranges[t][0] for t in group), max(ranges[t][1] for t in group)
        out.update({t: (lo, hi) for t in group})
    return out


def quantize(fp32: Path, out: Path, frames: np.ndarray, target: str = "x86", method: str = "static",
             float_layers: int | Iterable[Unit] = 0, ranges: Ranges | None = None, pre: Path | None = None) -> Path:
    """int8 QDQ (static, calibrated on `frames`, each Concat on one range: shared_concat_ranges) or dynamic
    quantization; `float_layers` (the first N, or these units: float_nodes) stay float.

    `ranges`: activation ranges computed elsewhere (a camera's, shared.snapshot.calibration) on `pre`, the
    pre-processed `fp32` it was sent; they replace every range `frames` would give (bit for bit the model
    quantize_static calibrates on the camera's own frames, test), so one frame of any kind is enough here."""
    if target not in TARGETS:
        raise ValueError(f"unknown target '{target}' ({', '.join(TARGETS)})")
    own_pre = pre is None
    pre = pre_process(fp32, out.with_suffix(".pre.onnx")) if own_pre else pre
    excluded = float_nodes(pre, float_layers)
    try:
        if method == "dynamic":  # for comparison only: slow for conv nets (activations quantized at run time)
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                             nodes_to_exclude=excluded)
        else:
            act, weight = TARGETS[target]
            ranges = shared_concat_ranges(pre, ranges if ranges is not None else activation_ranges(pre, frames))
            extra = {"ActivationSymmetric": target == "arm64",
                     "TensorQuantOverrides": {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                              for name, (lo, hi) in ranges.items()}}
            frames = frames[:1]  # every range is given: the quantizer's own calibration pass is a formality
            # Every op type, not just Conv: SiLU, Concat and Add then run as QLinear* ops between the int8 convs
            # instead of dequantize/float/quantize round trips (measured 6.8 vs 8.1 ms at 1 thread, same mAP).
            quantize_static(str(pre), str(out), FrameReader(frames), quant_format=QuantFormat.QDQ,
                            activation_type=act, weight_type=weight, per_channel=True, op_types_to_quantize=None,
                            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                            extra_options=extra)
    finally:
        if own_pre:
            pre.unlink(missing_ok=True)
    src = onnx.load(str(fp32))  # carry the metadata over: quantization drops it
    q = onnx.load(str(out))
    del q.metadata_props[:]
    q.metadata_props.extend(src.metadata_props)
    onnx.save(q, str(out))
    return out


@dataclass
class GraphReport:
    int8_convs: int
    float_convs: int
    ops: dict[str, int]


def inspect_optimized(path: Path, workdir: Path) -> GraphReport:
    """What onnxruntime really runs: optimize the graph as a session would and count int8 vs float convs."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(workdir / (path.stem + ".optimized.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(opts.optimized_model_filepath).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    Path(opts.optimized_model_filepath).unlink(missing_ok=True)
    int8 = sum(v for k, v in ops.items() if k in INT8_CONV_OPS)
    fp = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "NhwcFusedConv"))
    return GraphReport(int8, fp, ops)
