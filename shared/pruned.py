"""A channel-pruned student's structure: recorded in its model yaml, so a node rebuilds it without the pruner."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from shared.env import prepare_ultralytics

prepare_ultralytics()
from ultralytics.nn.modules import C2f, Conv  # noqa: E402

KEY = "fedcam-pruned"  # the model yaml's entry; Ultralytics' parser reads only its own keys and ignores it


class StructureError(ValueError):
    """A pruned-structure record that does not describe a narrowing of the model it is applied to."""


def _conv_slice(src: Conv, rows: slice) -> Conv:
    """A Conv (conv + BN + act) holding output channels `rows` of `src`, numerically identical."""
    out = copy.deepcopy(src)
    out.conv = nn.Conv2d(src.conv.in_channels, rows.stop - rows.start, src.conv.kernel_size, src.conv.stride,
                         src.conv.padding, bias=False)
    out.conv.weight.data = src.conv.weight.data[rows].clone()
    bn = nn.BatchNorm2d(rows.stop - rows.start, eps=src.bn.eps, momentum=src.bn.momentum)
    for name in ("weight", "bias"):
        getattr(bn, name).data = getattr(src.bn, name).data[rows].clone()
    for name in ("running_mean", "running_var"):
        getattr(bn, name).data = getattr(src.bn, name)[rows].clone()
    bn.num_batches_tracked.data = src.bn.num_batches_tracked.clone()
    out.bn = bn
    return out


class C2fSplit(nn.Module):
    """C2f whose chunked 1x1 conv is two convs: chunk() hides the two halves from the pruner's dependency graph."""

    def __init__(self, c2f: C2f):
        super().__init__()
        c = c2f.c
        self.cv0, self.cv1 = _conv_slice(c2f.cv1, slice(0, c)), _conv_slice(c2f.cv1, slice(c, 2 * c))
        self.cv2, self.m = c2f.cv2, c2f.m
        for attr in ("f", "i", "type", "np"):  # Ultralytics' graph bookkeeping (_predict_once reads f and i)
            if hasattr(c2f, attr):
                setattr(self, attr, getattr(c2f, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module) -> nn.Module:
    """Replace every C2f in place by its C2fSplit equivalent (same outputs)."""
    for name, child in model.named_children():
        if isinstance(child, C2f):
            setattr(model, name, C2fSplit(child))
        else:
            split_c2f(child)
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """The record of a pruned model's widths: [in, out, groups] of every conv, the size of every BatchNorm."""
    return {"split-c2f": any(isinstance(m, C2fSplit) for m in model.modules()),
            "conv": {n: [m.in_channels, m.out_channels, m.groups] for n, m in model.named_modules()
                     if isinstance(m, nn.Conv2d)},
            "bn": {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}}


def unpruned(yaml: dict[str, Any]) -> dict[str, Any]:
    """The model yaml without its widths record: the architecture before any pruning."""
    return {k: v for k, v in yaml.items() if k != KEY}


def with_structure(yaml: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`yaml` (any pruning record dropped) plus the record of `model`'s widths."""
    return {**copy.deepcopy(unpruned(yaml)), KEY: describe(model)}


def apply(model: nn.Module, record: Any) -> nn.Module:
    """Narrow `model` (built from the unpruned yaml) in place to `record`'s widths, weights left to load.
    The record may come over the network: it must name exactly the model's layers and only ever narrow them."""
    if not isinstance(record, dict) or not isinstance(record.get("conv"), dict) or \
            not isinstance(record.get("bn"), dict):
        raise StructureError(f"{KEY}: expected {{'split-c2f', 'conv', 'bn'}}, got {type(record).__name__}")
    if record.get("split-c2f"):
        split_c2f(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for kind, have, want in (("conv", convs, record["conv"]), ("bn", norms, record["bn"])):
        if set(have) != set(want):
            odd = sorted(set(have) ^ set(want))
            raise StructureError(f"{KEY}: {kind} layers differ from the model's, e.g. {odd[:3]}")
    for name, conv in convs.items():
        _narrow_conv(name, conv, record["conv"][name])
    for name, bn in norms.items():
        _narrow_bn(name, bn, record["bn"][name])
    return model


def _width(name: str, value: Any, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise StructureError(f"{KEY}: {name} width {value!r} is not an integer in [1, {most}]")
    return value


def _narrow_conv(name: str, conv: nn.Conv2d, spec: Any) -> None:
    if not isinstance(spec, list) or len(spec) != 3:
        raise StructureError(f"{KEY}: conv {name} expects [in, out, groups], got {spec!r}")
    cin, cout = _width(f"{name} in", spec[0], conv.in_channels), _width(f"{name} out", spec[1], conv.out_channels)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    groups = _width(f"{name} groups", spec[2], conv.groups)
    if (depthwise and not cin == cout == groups) or (not depthwise and groups != conv.groups) or cin % groups:
        raise StructureError(f"{KEY}: conv {name} groups {groups} do not fit [in {cin}, out {cout}]")
    conv.in_channels, conv.out_channels, conv.groups = cin, cout, groups
    conv.weight = nn.Parameter(conv.weight.new_empty(cout, cin // groups, *conv.kernel_size))
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.new_empty(cout))


def _narrow_bn(name: str, bn: nn.BatchNorm2d, size: Any) -> None:
    n = _width(f"{name}", size, bn.num_features)
    bn.num_features = n
    bn.weight, bn.bias = nn.Parameter(bn.weight.new_empty(n)), nn.Parameter(bn.bias.new_empty(n))
    bn.running_mean, bn.running_var = bn.running_mean.new_zeros(n), bn.running_var.new_ones(n)
