"""Weight sharing for snapshot downloads (snapshot.cluster): every conv's weights take one of k shared values (1-D
k-means per output channel or per layer, Han et al. 2016), the shared values are fine-tuned by distillation on the
server's frames, and per-channel int8 then leaves at most k values in each channel, which packs into indices +
per-channel codebooks."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from shared import task
from shared.config import Config
from shared.train import TrainSpec

MIN_WEIGHTS = 64  # convs smaller than this (k values would be most of them) keep their own weights


def kmeans_rows(rows: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of each row's values apart: (centroids (rows, k), sorted; index of each value's centroid). Centroids
    start at the row's quantiles, so dense ranges get more."""
    flat = rows.detach().float()
    if flat.numel() <= 1 << 24:
        centroids = torch.quantile(flat, torch.linspace(0, 1, k, dtype=flat.dtype), dim=1).T.contiguous()
    else:
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        centroids = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, k)
    for _ in range(iters + 1):
        # nearest centroid: they stay sorted, so it is the bucket between midpoints
        idx = torch.searchsorted(((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous(), flat.contiguous())
        if _ == iters:
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, idx, flat)
        counts = torch.zeros_like(centroids).scatter_add_(1, idx, torch.ones_like(flat))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort(dim=1).values
    return centroids, idx


def kmeans_1d(w: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(k centroids, index of each weight's centroid) over all of `w`."""
    centroids, idx = kmeans_rows(w.reshape(1, -1), k, iters)
    return centroids[0], idx.reshape(w.shape)


class SharedWeights(nn.Module):
    """A parametrization: row r of the conv's weight is centroids[r][index[r]] (one row per output channel, or one
    for the layer); training moves the centroids only."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, shape: torch.Size):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("index", index.clone())
        self.shape = tuple(shape)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return torch.gather(self.centroids, 1, self.index).reshape(self.shape)


def share_weights(model: nn.Module, k: int, per: str = "channel") -> int:
    """Cluster every conv of `model` in place, k values per output channel (per="channel": the codebooks the packed
    download stores anyway, so the fit is better at no cost in bytes) or per layer; the number of convs clustered.
    A conv whose rows hold no more than k weights already has at most k values per channel and is left alone."""
    def worth(conv: nn.Conv2d) -> bool:
        fan_in = conv.weight[0].numel()
        return fan_in > k if per == "channel" else conv.weight.numel() >= max(MIN_WEIGHTS, 4 * k)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and worth(m)]
    for conv in convs:
        w = conv.weight
        centroids, index = kmeans_rows(w.reshape(w.shape[0] if per == "channel" else 1, -1), k)
        parametrize.register_parametrization(conv, "weight", SharedWeights(centroids, index, w.shape), unsafe=True)
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
    share_weights(out, s.cluster, s.cluster_per)
    if s.cluster_epochs > 0:
        # BatchNorm statistics stay the federation's: trained on the server's base-domain frames they moved away
        # from the cameras' (non-IID run, round 10: 0.702 dense, 0.718 clustered untuned, 0.666 tuned with BatchNorm
        # in train mode, 0.699 with it frozen; mAP50 on the cameras' val frames)
        spec = TrainSpec.central(cfg.train, epochs=s.cluster_epochs, lr=cfg.train.lr / 4, warmup_steps=0,
                                 det_weight=0.0, freeze_bn=True)
        task.distill_fit(out, copy.deepcopy(teacher), task.base_yaml(cfg), cfg, spec, cfg.seed, progress=progress)
    freeze_shared(out)
    return out
