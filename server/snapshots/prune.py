"""Structured (channel) pruning of the student with Torch-Pruning's dependency graph; the head's outputs are kept."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from shared.env import prepare_ultralytics
from shared.pruned import split_c2f, with_structure
from shared.train import to_float

prepare_ultralytics()
from ultralytics.nn.modules import Detect  # noqa: E402


def taylor_importance(model: nn.Module, batches: Iterable[dict]) -> tp.importance.Importance:
    """First-order Taylor importance (Molchanov et al. 2019): |w * dL/dw| summed over each channel group, with L the
    detection loss on labelled frames, accumulated into `model`'s grads (train mode, as training sees it).
    Magnitude ranks channels by weight norm, which BatchNorm makes meaningless; measured on the demo student at 25%
    with no recovery, camera mAP50 0.075 (magnitude) vs 0.363 (Taylor), dense 0.445 (README)."""
    stats = {k: v.clone() for k, v in model.named_buffers()}  # train-mode forwards would move BN statistics
    model.train()
    for batch in batches:
        batch = to_float(batch)
        (model.loss(batch, model(batch["img"]))[0].sum() / batch["img"].shape[0]).backward()
    model.eval()
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(stats[k])
    return tp.importance.GroupTaylorImportance()


def prune(model: nn.Module, ratio: float, imgsz: int, round_to: int = 8,
          batches: Iterable[dict] | None = None) -> nn.Module:
    """A pruned copy: `ratio` of the prunable channels removed, ranked by Taylor importance on `batches` (labelled
    frames) or, without them, by group L2 magnitude. The head's hidden channels are pruned too (its 64-channel box
    branches are over half of this student's FLOPs); its outputs (box bins, classes) and the DFL decode are kept.
    Layers of at most 2 x `round_to` outputs are kept whole: with channel counts rounded to `round_to`, any cut
    there would remove half of them or more."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    pruned = split_c2f(copy.deepcopy(model)).eval()
    for p in pruned.parameters():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
        p.grad = None
    head = [m for m in pruned.modules() if isinstance(m, Detect)][-1]
    keep = [head.dfl] + [branch[-1] for branch in (*head.cv2, *head.cv3)]  # the last convs define the outputs
    keep += [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.out_channels <= 2 * round_to]
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    if ratio > 0 and batches is not None:
        importance = taylor_importance(pruned, batches)
    pruner = tp.pruner.MetaPruner(
        pruned, torch.zeros(1, 3, imgsz, imgsz), importance=importance,
        pruning_ratio=ratio, ignored_layers=keep, round_to=round_to if round_to > 1 else None,
        output_transform=lambda out: out[0] if isinstance(out, (tuple, list)) else out)
    pruner.step()
    for p in pruned.parameters():
        p.grad = None  # the importance's grads are not the snapshot's
    # The widths travel in the model yaml (to checkpoints, and to clients that train the pruned student).
    pruned.yaml = with_structure(model.yaml, pruned)
    # Which channels went, step after step: replay() cuts a camera's own copy of `model` the same way.
    history = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in pruner.DG.pruning_history()]
    pruned.prune_steps = [*getattr(model, "prune_steps", []), history]
    return pruned


def replay(model: nn.Module, steps: list, imgsz: int) -> nn.Module:
    """A copy of `model` pruned as `steps` (a pruned model's `prune_steps`, counted from a model of `model`'s
    structure) pruned that one: the same channels of the same layers, so the two line up tensor for tensor."""
    out = split_c2f(copy.deepcopy(model)).eval()
    for p in out.parameters():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    for history in steps:
        graph = tp.DependencyGraph().build_dependency(
            out, torch.zeros(1, 3, imgsz, imgsz),
            output_transform=lambda o: o[0] if isinstance(o, (tuple, list)) else o)
        graph.load_pruning_history(history)
    out.yaml = with_structure(model.yaml, out)
    return out.requires_grad_(False)
