"""Teacher -> student distillation terms (response, box/DFL, neck feature, spatial attention) and pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.dataset import Sample
from shared.evaluate import TorchPredictor
from shared.snapshot.inference import NmsSettings


class DistillError(ValueError):
    """Teacher and student cannot be distilled into each other (classes, strides or box encoding differ)."""


@dataclass(frozen=True)
class DistillWeights:
    response: float = 1.0
    box: float = 1.0
    feature: float = 1.0
    attention: float = 0.0
    temperature: float = 2.0


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL between per-class Bernoulli distributions at temperature t (YOLO class scores are sigmoids)."""
    p = torch.sigmoid(teacher_logits / t)
    # BCE(s, p) - BCE(t, p) = KL(p || q): exactly zero when the logits agree.
    kl = F.binary_cross_entropy_with_logits(student_logits / t, p, reduction="none") - \
        F.binary_cross_entropy_with_logits(teacher_logits / t, p, reduction="none")
    return kl * t * t


def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """Spatial attention (Zagoruyko & Komodakis): channel-mean of squared activations, L2-normalised."""
    return F.normalize(feat.pow(2).mean(1).flatten(1), dim=1)


def weights_from(d) -> DistillWeights:
    """DistillWeights from the config's distill section."""
    return DistillWeights(response=d.response, box=d.box, feature=d.feature, attention=d.attention,
                          temperature=d.temperature)


class Distiller(nn.Module):
    """Holds a frozen teacher and the student-side adapters; returns the weighted distillation loss."""

    def __init__(self, teacher: nn.Module, student: nn.Module, weights: DistillWeights, imgsz: int):
        super().__init__()
        self.teacher, self.w = teacher.eval(), weights
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        t_head, s_head = teacher.model[-1], student.model[-1]
        if t_head.nc != s_head.nc:
            raise DistillError(f"teacher has {t_head.nc} classes, student {s_head.nc}: they must match")
        if t_head.reg_max != s_head.reg_max:
            raise DistillError(f"box encodings differ (reg_max {t_head.reg_max} vs {s_head.reg_max})")
        if not torch.equal(t_head.stride, s_head.stride):
            raise DistillError(f"strides differ ({t_head.stride.tolist()} vs {s_head.stride.tolist()})")
        t_ch, s_ch = self._neck_channels(teacher, imgsz), self._neck_channels(student, imgsz)
        # A learned 1x1 projection where widths differ; identity where they match (so equal outputs cost 0).
        self.adapters = nn.ModuleList(nn.Identity() if s == t else nn.Conv2d(s, t, 1, bias=False)
                                      for s, t in zip(s_ch, t_ch))

    @staticmethod
    @torch.no_grad()
    def _neck_channels(model: nn.Module, imgsz: int) -> list[int]:
        was_training = model.training
        out = model.eval()(torch.zeros(1, 3, imgsz, imgsz))
        model.train(was_training)
        return [f.shape[1] for f in out[1]["feats"]]

    @torch.no_grad()
    def teacher_preds(self, img: torch.Tensor) -> dict:
        return self.teacher(img)[1]

    def losses(self, s: dict, t: dict) -> dict[str, torch.Tensor]:
        """Each term unweighted; s and t are the head's raw dicts (boxes, scores, feats)."""
        tt = self.w.temperature
        out = {"response": binary_kl(s["scores"], t["scores"], tt).sum(1).mean()}  # sum over classes
        # Localization distillation: KL between DFL bin distributions, where the teacher sees objects.
        b, c, a = s["boxes"].shape
        sb, tb = s["boxes"].view(b, 4, c // 4, a), t["boxes"].view(b, 4, c // 4, a)
        kl = F.kl_div(F.log_softmax(sb / tt, 2), F.log_softmax(tb / tt, 2), log_target=True, reduction="none")
        weight = torch.sigmoid(t["scores"]).amax(1)  # (b, a): teacher's objectness
        out["box"] = (kl.sum(2).mean(1) * weight).sum() / weight.sum().clamp_min(1e-6) * tt * tt
        feats = list(zip(s["feats"], t["feats"], self.adapters))
        out["feature"] = sum(F.mse_loss(ad(sf), tf) for sf, tf, ad in feats) / len(feats)
        out["attention"] = sum((attention_map(sf) - attention_map(tf)).pow(2).sum(1).mean() for sf, tf, _ in feats)
        return out

    def forward(self, img: torch.Tensor, student_preds: dict) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.losses(student_preds, self.teacher_preds(img))
        weights = {"response": self.w.response, "box": self.w.box, "feature": self.w.feature,
                   "attention": self.w.attention}
        total = sum(weights[k] * v for k, v in terms.items() if weights[k] > 0)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def extra_loss(self):
        """The hook shared.train.train() takes: distillation added to the detection loss."""
        return lambda batch, preds: self(batch["img"], preds)[0]


def pseudo_label(teacher: nn.Module, loader, settings: NmsSettings) -> list[Sample]:
    """Teacher detections at confidence >= settings.conf on unlabelled frames, as Samples in original-image coords."""
    predictor, conf = TorchPredictor(teacher, settings), settings.conf
    samples = []
    for batch in loader:
        dets = predictor(batch["img"].numpy())
        for det, path, (h, w), (ratio, (pad_w, pad_h)) in zip(dets, batch["im_file"], batch["ori_shape"],
                                                               batch["ratio_pad"]):
            det = det[det[:, 4] >= conf]
            # Undo the letterbox so the labels fit the frame on disk, whatever its size.
            xyxy = (det[:, :4] - [pad_w, pad_h, pad_w, pad_h]) / ratio / [w, h, w, h]
            xyxy = np.clip(xyxy, 0, 1)
            wh = xyxy[:, 2:] - xyxy[:, :2]
            keep = (wh > 1e-3).all(1)
            labels = np.concatenate([det[keep, 5:6], (xyxy[keep, :2] + xyxy[keep, 2:]) / 2, wh[keep]], 1)
            samples.append(Sample(image=Path(path), labels=labels.astype(np.float32)))
    return samples
