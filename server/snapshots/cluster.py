"""Weight sharing for snapshot downloads (snapshot.cluster): every conv's weights take one of k shared values (1-D
k-means per layer, Han et al. 2016), the shared values are fine-tuned by distillation on the server's frames, and
per-channel int8 then leaves at most k values in each channel, which packs into indices + codebooks."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from shared import task
from shared.config import Config
from shared.train import TrainSpec

MIN_WEIGHTS = 64  # convs smaller than this (k values would be most of them) keep their own weights


def kmeans_1d(w: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, index of each weight's centroid); centroids start at the quantiles, so dense ranges get more."""
    flat = w.detach().reshape(-1).float()
    centroids = torch.quantile(flat, torch.linspace(0, 1, k, dtype=flat.dtype)) if flat.numel() <= 1 << 24 else \
        torch.linspace(float(flat.min()), float(flat.max()), k)
    for _ in range(iters):
        idx = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)  # nearest centroid (they stay sorted)
        sums = torch.zeros(k).index_add_(0, idx, flat)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(flat))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
    idx = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, idx.reshape(w.shape)


class SharedWeights(nn.Module):
    """A parametrization: the conv's weight is centroids[index]; training moves the k centroids only."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("index", index.clone())

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.centroids[self.index]


def share_weights(model: nn.Module, k: int) -> int:
    """Cluster every conv of `model` in place; the number of convs clustered."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= max(MIN_WEIGHTS, 4 * k)]
    for conv in convs:
        centroids, index = kmeans_1d(conv.weight, k)
        parametrize.register_parametrization(conv, "weight", SharedWeights(centroids, index), unsafe=True)
        conv.parametrizations.weight.original.requires_grad_(False)
    return len(convs)


def freeze_shared(model: nn.Module) -> None:
    """Plain convs again, their weights the shared values (for export)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def clustered_student(model: nn.Module, teacher: nn.Module, cfg: Config, progress=None) -> nn.Module:
    """A copy of `model` with k shared values per conv, the centroids (and BatchNorm, biases) fine-tuned for
    snapshot.cluster-epochs by distillation from `teacher` (the dense student) on the server's frames."""
    s = cfg.snapshot
    out = copy.deepcopy(model)
    share_weights(out, s.cluster)
    if s.cluster_epochs > 0:
        spec = TrainSpec.central(cfg.train, epochs=s.cluster_epochs, lr=cfg.train.lr / 4, warmup_steps=0,
                                 det_weight=0.0)
        task.distill_fit(out, copy.deepcopy(teacher), task.base_yaml(cfg), cfg, spec, cfg.seed, progress=progress)
    freeze_shared(out)
    return out
