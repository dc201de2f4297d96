"""Detection evaluation (mAP50, mAP50-95, per class) with Ultralytics' metrics, for any predictor (torch or ONNX)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from shared.env import prepare_ultralytics
from shared.snapshot.inference import NmsSettings

prepare_ultralytics()
from ultralytics.utils.metrics import DetMetrics, box_iou  # noqa: E402
from ultralytics.utils.nms import non_max_suppression  # noqa: E402
from ultralytics.utils.ops import xywh2xyxy  # noqa: E402

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


class Predictor(Protocol):
    """Letterboxed RGB uint8 images (B, 3, S, S) -> per image an (n, 6) array: x1, y1, x2, y2, conf, cls (pixels)."""

    def __call__(self, images: np.ndarray) -> list[np.ndarray]: ...


def nms(raw: torch.Tensor, s: NmsSettings) -> list[np.ndarray]:
    """Ultralytics NMS on raw head output (B, 4 + nc, anchors) in xywh pixels, never cut short by a timer."""
    # By default it gives up after 2 s + 0.05 s per image and returns nothing for the rest of the batch (a warning
    # hidden when not verbose): a busy machine would then score, gate and publish on a wrong figure.
    out = non_max_suppression(raw, s.conf, s.iou, max_det=s.max_det, max_time_img=math.inf)
    return [d.cpu().numpy() for d in out]


class TorchPredictor:
    """Runs a DetectionModel in eval mode; the interface shared.snapshot.inference.Detector has for ONNX."""

    def __init__(self, model: torch.nn.Module, settings: NmsSettings = NmsSettings()):
        self.model, self.settings = model.eval(), settings

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        raw = self.model(torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0)
        return nms(raw[0] if isinstance(raw, (tuple, list)) else raw, self.settings)


@dataclass
class EvalResult:
    map50: float
    map: float
    per_class: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mAP50, mAP50-95)
    images: int = 0
    targets: int = 0


def match(pred: np.ndarray, gt_cls: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """(n_pred, 10) bool: is each prediction (sorted by confidence) a true positive at each IoU threshold."""
    correct = np.zeros((len(pred), len(IOU_THRESHOLDS)), dtype=bool)
    if len(pred) == 0 or len(gt_cls) == 0:
        return correct
    iou = box_iou(torch.from_numpy(gt_xyxy).float(), torch.from_numpy(pred[:, :4]).float()).numpy()
    iou = iou * (gt_cls[:, None] == pred[:, 5][None, :])
    taken = np.zeros((len(gt_cls), len(IOU_THRESHOLDS)), dtype=bool)
    cols = np.arange(len(IOU_THRESHOLDS))
    for j in np.argsort(-pred[:, 4], kind="stable"):  # greedy in confidence order, as Ultralytics' validator
        avail = np.where(taken, 0.0, iou[:, j, None])
        k = avail.argmax(0)
        correct[j] = avail[k, cols] >= IOU_THRESHOLDS
        taken[k, cols] |= correct[j]
    return correct


def evaluate(predictor: Predictor, batches: Iterable[dict], names: list[str],
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """mAP of `predictor` over collated batches (shared.data.dataset.collate) in the letterboxed frame."""
    metrics = DetMetrics(names=dict(enumerate(names)))
    n_img = n_tgt = 0
    for batch in batches:
        images = batch["img"].numpy() if isinstance(batch["img"], torch.Tensor) else batch["img"]
        size = images.shape[-1]
        preds = predictor(images)
        bidx, cls, boxes = (np.asarray(batch[k]).reshape(len(batch[k]), -1) for k in ("batch_idx", "cls", "bboxes"))
        for i, pred in enumerate(preds):
            sel = bidx[:, 0] == i
            gt_cls = cls[sel, 0].astype(int)
            gt_xyxy = xywh2xyxy(boxes[sel] * size) if sel.any() else np.zeros((0, 4))
            pred = np.asarray(pred, dtype=np.float32).reshape(-1, 6)
            metrics.update_stats({"tp": match(pred, gt_cls, gt_xyxy), "conf": pred[:, 4], "pred_cls": pred[:, 5],
                                  "target_cls": gt_cls, "target_img": np.unique(gt_cls), "im_name": str(n_img)})
            n_img += 1
            n_tgt += len(gt_cls)
        if progress:
            progress(len(preds))
    if n_img == 0:
        raise ValueError("evaluation got no images")
    metrics.process()
    per_class = {}
    for k, c in enumerate(metrics.ap_class_index):
        ap = metrics.box.all_ap[k]
        per_class[names[int(c)]] = (float(ap[0]), float(ap.mean()))
    return EvalResult(map50=float(metrics.box.map50), map=float(metrics.box.map), per_class=per_class,
                      images=n_img, targets=n_tgt)

