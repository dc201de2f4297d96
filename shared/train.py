"""The training loop: Ultralytics' detection loss, an optimizer and schedule from config, seeded."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from ultralytics.utils.torch_utils import ModelEMA

from shared.config import FedConfig, TrainConfig

# (batch, preds) -> extra loss term; distillation plugs in here.
ExtraLoss = Callable[[dict, dict], torch.Tensor]
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 1
    max_steps: int = 0  # > 0 caps the number of optimizer steps (federated rounds count in steps)
    lr: float = 1e-3
    lr_final: float = 0.1  # final lr as a fraction of lr (cosine)
    optimizer: str = "AdamW"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    freeze_bn: bool = False
    proximal_mu: float = 0.0
    grad_clip: float = 10.0
    det_weight: float = 1.0  # 0 trains on the extra (distillation) loss alone
    ema: float = 0.0  # > 0: the model ends as Ultralytics' EMA of its weights after each step, at this decay

    @classmethod
    def central(cls, t: TrainConfig, **kw) -> "TrainSpec":
        base = dict(epochs=t.epochs, lr=t.lr, lr_final=t.lr_final, optimizer=t.optimizer, momentum=t.momentum,
                    weight_decay=t.weight_decay, warmup_steps=t.warmup_steps)
        return cls(**{**base, **kw})

    @classmethod
    def local(cls, t: TrainConfig, f: FedConfig, plan: Mapping[str, Any]) -> "TrainSpec":
        """A camera's fine-tuning this round: budget and lr from the server's plan (the train message), the rest
        from the run config. Fine-tuning a good global model: constant lr, no warmup, BN statistics kept."""
        return cls(epochs=int(plan["local-epochs"]), max_steps=int(plan["local-steps"]), lr=float(plan["lr"]),
                   lr_final=1.0, optimizer=f.local_optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
                   freeze_bn=f.freeze_bn, proximal_mu=float(plan.get("proximal-mu", 0.0)))  # FedProx sends mu


def local_plan(f: FedConfig, rnd: int = 1) -> dict[str, Any]:
    """What the server decides about every camera's local training in round `rnd`: the train message carries it."""
    return {"lr": f.round_lr(rnd), "local-epochs": f.local_epochs, "local-steps": f.local_steps, "personal": f.personal,
            "adabn": f.adabn, "keep-finetuned": f.keep_finetuned, "ditto-lambda": f.ditto_lambda,
            "compress": f.compress, "compress-topk": f.compress_topk, "dp": f.dp, "dp-noise": f.dp_noise,
            "dp-clip": f.dp_clip, "dp-delta": f.dp_delta}


CONTROL = "control"  # SCAFFOLD: the train message's ArrayRecord of control variates (c down, c_k+ − c_k up)


def round_seed(seed: int, rnd: int) -> int:
    """The seed of round `rnd` (sampling and local training), so a resumed run replays the same draws."""
    return seed * 100_003 + rnd


EMA_RAMP = 1.0  # steps: ModelEMA's decay ramps in as 1 - exp(-step / EMA_RAMP) (Ultralytics: 2000, for long runs)
EMA_SPAN = 5  # the EMA's window, 1 / (1 - decay) steps, spans at most 1 / EMA_SPAN of a run (short runs forget)


@dataclass
class TrainResult:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    mean_grad: list[torch.Tensor] | None = None  # with a SCAFFOLD correction: the mean raw gradient per parameter


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only, as Ultralytics does (not on BatchNorm or biases)."""
    decay, no_decay = [], []
    for module in model.modules():  # `model` may be a ModuleList of the student and its distillation adapters
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            (no_decay if name == "bias" or is_bn else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    name = spec.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.momentum, 0.999))
    if name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=(spec.momentum, 0.999))
    raise ValueError(f"unknown optimizer '{spec.optimizer}' (SGD, Adam, AdamW)")


def lr_factor(step: int, total: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.lr_final + (1 - spec.lr_final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Train mode; with freeze_bn, BatchNorm layers keep their running statistics (small local batches)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def estimate_bn_stats(model: torch.nn.Module, loader) -> int:
    """Every BatchNorm's running statistics re-estimated as the plain average over `loader`'s frames (AdaBN,
    Li et al. 2016): a camera's own statistics from its own frames, labels unused, weights unchanged. The
    running averages training leaves behind lag the weights by the BN momentum; this does not."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    frames = 0
    try:
        for batch in loader:
            model(to_float(batch)["img"])
            frames += batch["img"].shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return frames


def to_float(batch: dict) -> dict:
    return {**batch, "img": batch["img"].float() / 255.0}


def train(model, loader, spec: TrainSpec, extra_loss: ExtraLoss | None = None,
          progress: Progress | None = None, aux: torch.nn.Module | None = None,
          anchor: list[torch.Tensor] | None = None, correction: list[torch.Tensor] | None = None) -> TrainResult:
    """Train `model` in place on `loader` (batches from shared.data.dataset.collate).

    `aux` holds extra trainable modules of the loss (distillation adapters); they are optimized alongside.
    With spec.proximal_mu > 0 the loss pulls the parameters toward `anchor` (default: where they start, FedProx;
    Ditto's personal model is pulled toward the global model instead).
    With `correction` (SCAFFOLD, Karimireddy et al. 2020: c − c_k, one tensor per trainable parameter) every step
    follows the gradient plus the correction, so a camera's steps track the federation's mean gradient rather
    than drift toward its own optimum; result.mean_grad is then the mean raw gradient (the camera's new c_k).
    """
    total = len(loader) * spec.epochs
    total = min(total, spec.max_steps) if spec.max_steps > 0 else total
    opt = make_optimizer(torch.nn.ModuleList([model, aux]) if aux is not None else model, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, spec))
    if spec.proximal_mu > 0 and anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    anchor = anchor if spec.proximal_mu > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    grad_sum = [torch.zeros_like(p) for p in params] if correction is not None else None
    result, start = TrainResult(), time.perf_counter()
    # An average of the last ~1 / (1 - ema) steps' weights: a short recovery's end point spreads by its last steps'
    # noise (README, searched compression)
    ema = ModelEMA(model, decay=min(spec.ema, 1 - EMA_SPAN / total), tau=EMA_RAMP) if spec.ema > 0 else None
    set_train_mode(model, spec.freeze_bn)
    if aux is not None:
        aux.train()
    for epoch in range(spec.epochs):
        if hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch = epoch  # new augmentation draw each epoch, reproducible
        for batch in loader:
            if result.steps >= total:
                break
            batch = to_float(batch)
            preds = model(batch["img"])
            loss = spec.det_weight * model.loss(batch, preds)[0].sum() / batch["img"].shape[0]
            if extra_loss is not None:
                loss = loss + extra_loss(batch, preds)
            if anchor is not None:  # FedProx and Ditto: stay near the global model
                loss = loss + spec.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {result.steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            if correction is not None:
                for p, g, c in zip(params, grad_sum, correction):
                    if p.grad is not None:
                        g += p.grad
                        p.grad += c
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            result.steps += 1
            result.examples += batch["img"].shape[0]
            result.losses.append(loss.item())
            if progress:
                progress(result.steps, total, result.losses[-1])
    if ema is not None and result.steps:
        model.load_state_dict(ema.ema.state_dict())
    model.eval()
    if grad_sum is not None:
        result.mean_grad = [g / max(1, result.steps) for g in grad_sum]
    result.seconds = time.perf_counter() - start
    return result
