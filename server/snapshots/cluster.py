"""Weight sharing for snapshot downloads (snapshot.cluster): every conv's weights take one of k shared values (1-D
k-means per output channel or per layer, Han et al. 2016), each weight's choice and the shared values are then fit to
the conv's outputs on calibration frames (GPTQ-style compensation, least squares) and optionally fine-tuned by
distillation, and per-channel int8 then leaves at most k values in each channel, which packs into indices +
per-channel codebooks."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
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


@torch.no_grad()
def input_moments(model: nn.Module, frames: np.ndarray, batch: int = 8) -> dict[nn.Conv2d, torch.Tensor]:
    """E[x x^T] of each (ungrouped) conv's input patches over `frames` (uint8 NCHW) in eval mode: what the conv's
    output error (W' - W) x weighs, so that a fit to it is a fit to the outputs."""
    sums: dict[nn.Conv2d, torch.Tensor] = {}
    counts: dict[nn.Conv2d, int] = {}

    def hook(conv: nn.Conv2d, inputs: tuple) -> None:
        u = F.unfold(inputs[0], conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, fan_in, L)
        u = u.transpose(1, 2).reshape(-1, u.shape[1]).double()
        sums[conv] = sums.get(conv, 0) + u.T @ u
        counts[conv] = counts.get(conv, 0) + u.shape[0]

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    hooks = [c.register_forward_pre_hook(hook) for c in convs]
    was_training = model.training
    try:
        model.eval()
        x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {c: sums[c] / counts[c] for c in sums}


def assign_with_compensation(rows: torch.Tensor, centroids: torch.Tensor, moments: torch.Tensor,
                             damp: float = 0.01) -> torch.Tensor:
    """Each weight's centroid chosen column by column as GPTQ rounds (Frantar et al. 2023), onto each row's codebook
    instead of a uniform grid: the error of a column is spread over the columns not yet chosen, in proportion to how
    their inputs correlate with it (the inverse of E[x x^T]), so the conv's outputs move less than with the nearest
    value. (out, fan_in) rows, (out, k) centroids -> (out, fan_in) indices."""
    w = rows.detach().double().clone()
    h = moments.double().clone()
    dead = h.diagonal() == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1.0
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    c = centroids.double()
    index = torch.empty(w.shape, dtype=torch.long)
    for i in range(w.shape[1]):
        index[:, i] = (w[:, i:i + 1] - c).abs().argmin(dim=1)
        err = (w[:, i] - c.gather(1, index[:, i:i + 1])[:, 0]) / h_inv[i, i]
        w[:, i + 1:] -= err[:, None] * h_inv[i, i + 1:][None, :]
    return index


def refit_centroids(rows: torch.Tensor, index: torch.Tensor, k: int, moments: torch.Tensor) -> torch.Tensor:
    """The k values of each codebook that minimise the conv's output error E|(W' - W) x|^2 with the assignment kept:
    a k x k least-squares system per codebook (Hessian-aware, as GPTQ and OBQ weigh errors). `rows`: (out, fan_in)
    weights; `index` (out, fan_in) per channel, or (1, out * fan_in) for one codebook per layer."""
    out, fan_in = rows.shape
    onehot = F.one_hot(index.reshape(out, fan_in), k).double()  # (out, fan_in, k)
    w, h = rows.detach().double(), moments.double()
    per_layer = index.shape[0] == 1 and out > 1
    gram = torch.einsum("ofk,fg,ogj->" + ("kj" if per_layer else "okj"), onehot, h, onehot)
    rhs = torch.einsum("ofk,fg,og->" + ("k" if per_layer else "ok"), onehot, h, w)
    gram, rhs = gram.reshape(-1, k, k), rhs.reshape(-1, k)
    # a light ridge keeps near-singular systems (inputs that never vary) solvable; an empty cluster is set to 0
    eye = torch.eye(k, dtype=gram.dtype)
    empty = (onehot.sum(dim=(0, 1)) if per_layer else onehot.sum(dim=1)).reshape(-1, k) == 0
    gram = gram + 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)[:, None, None] * eye
    gram = gram + empty.double()[:, :, None] * eye
    return torch.linalg.solve(gram, rhs).float()


def share_weights(model: nn.Module, k: int, per: str = "channel",
                  moments: dict[nn.Conv2d, torch.Tensor] | None = None) -> int:
    """Cluster every conv of `model` in place, k values per output channel (per="channel": the codebooks the packed
    download stores anyway, so the fit is better at no cost in bytes) or per layer; the number of convs clustered.
    With `moments` (input_moments of this model) each conv's values are then refit to its outputs. A conv whose rows
    hold no more than k weights already has at most k values per channel and is left alone."""
    def worth(conv: nn.Conv2d) -> bool:
        fan_in = conv.weight[0].numel()
        return fan_in > k if per == "channel" else conv.weight.numel() >= max(MIN_WEIGHTS, 4 * k)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and worth(m)]
    for conv in convs:
        w = conv.weight
        centroids, index = kmeans_rows(w.reshape(w.shape[0] if per == "channel" else 1, -1), k)
        if moments is not None and conv in moments:
            # k-means of the weights treats every weight alike; the conv's outputs do not. Seed 1's round 10, fp32,
            # squared error of the outputs on the cameras' val frames relative to their variance, classes (boxes):
            # k-means 0.084 (0.0063), values refit 0.011 (0.0013), choices compensated then values refit 0.0072
            # (0.00095)
            rows = w.reshape(w.shape[0], -1)
            choices = assign_with_compensation(rows, centroids.expand(len(rows), k), moments[conv])
            index = choices.reshape(index.shape)
            centroids = refit_centroids(rows, index, k, moments[conv])
        parametrize.register_parametrization(conv, "weight", SharedWeights(centroids, index, w.shape), unsafe=True)
        conv.parametrizations.weight.original.requires_grad_(False)
    return len(convs)


def freeze_shared(model: nn.Module) -> None:
    """Plain convs again, their weights the shared values (for export)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def clustered_student(model: nn.Module, teacher: nn.Module, cfg: Config, frames: np.ndarray,
                      progress=None) -> nn.Module:
    """A copy of `model` with k shared values per conv, fit to each conv's outputs on `frames` (the calibration
    frames; snapshot.cluster-fit = outputs) or to its weights, then, for snapshot.cluster-epochs, the centroids (and
    biases) fine-tuned by distillation from `teacher` (the dense student) on the server's frames."""
    s = cfg.snapshot
    out = copy.deepcopy(model)
    moments = input_moments(out, frames) if s.cluster_fit == "outputs" else None
    share_weights(out, s.cluster, s.cluster_per, moments)
    if s.cluster_epochs > 0:
        # BatchNorm statistics stay the federation's: trained on the server's base-domain frames they moved away
        # from the cameras' (non-IID run, round 10: 0.702 dense, 0.718 clustered untuned, 0.666 tuned with BatchNorm
        # in train mode, 0.699 with it frozen; mAP50 on the cameras' val frames)
        spec = TrainSpec.central(cfg.train, epochs=s.cluster_epochs, lr=cfg.train.lr / 4, warmup_steps=0,
                                 det_weight=0.0, freeze_bn=True)
        task.distill_fit(out, copy.deepcopy(teacher), task.base_yaml(cfg), cfg, spec, cfg.seed, progress=progress)
    freeze_shared(out)
    return out
