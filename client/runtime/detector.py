"""Snapshot inference on a device: letterbox, onnxruntime, decode and NMS in numpy, boxes in image pixels."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort


@dataclass
class Detections:
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 in the original frame's pixels
    scores: np.ndarray  # (n,)
    classes: np.ndarray  # (n,) int
    latency_ms: float

    def as_dict(self, names: list[str]) -> dict:
        return {"boxes": np.round(self.boxes, 1).tolist(), "scores": np.round(self.scores, 4).tolist(),
                "classes": [names[c] if c < len(names) else str(c) for c in self.classes.tolist()],
                "latency_ms": round(self.latency_ms, 2)}


def letterbox(img: np.ndarray, size: int, pad: int = 114) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect, centre on a size x size canvas (as training did); returns (img, ratio, (dw, dh))."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else img
    dw, dh = (size - nw) / 2, (size - nh) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    out = cv2.copyMakeBorder(resized, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT,
                             value=(pad, pad, pad))
    return out, r, (float(left), float(top))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS on xyxy boxes; returns kept indices by descending score."""
    order, keep = scores.argsort()[::-1], []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        xx1, yy1 = np.maximum(boxes[i, 0], boxes[rest, 0]), np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2, yy2 = np.minimum(boxes[i, 2], boxes[rest, 2]), np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(raw: np.ndarray, conf: float, iou: float, max_det: int) -> np.ndarray:
    """(4 + nc, anchors) head output -> (n, 6) x1, y1, x2, y2, score, class, as Ultralytics' NMS does it."""
    scores_all = raw[4:].T
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    sel = score > conf
    xywh, score, cls = raw[:4, sel].T, score[sel], cls[sel]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    offset = cls[:, None] * 7680.0  # class-aware NMS in one pass: boxes of different classes never overlap
    keep = nms(xyxy + offset, score, iou)[:max_det]
    return np.concatenate([xyxy[keep], score[keep, None], cls[keep, None].astype(np.float32)], 1)


class Detector:
    """One onnxruntime session over a snapshot's model.onnx."""

    def __init__(self, model: Path | str, imgsz: int, threads: int = 1, conf: float = 0.25, iou: float = 0.6,
                 max_det: int = 100):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.imgsz, self.conf, self.iou, self.max_det = imgsz, conf, iou, max_det

    def raw(self, chw_uint8: np.ndarray) -> np.ndarray:
        """(3, S, S) RGB uint8, already letterboxed -> (4 + nc, anchors)."""
        x = chw_uint8[None].astype(np.float32) / 255.0
        return self.session.run(None, {self.input: x})[0][0]

    def detect_letterboxed(self, chw_uint8: np.ndarray) -> np.ndarray:
        raw = self.raw(chw_uint8)
        if not np.isfinite(raw).all():  # NaN scores would silently look like "nothing detected"
            raise FloatingPointError("model produced non-finite outputs")
        return decode(raw, self.conf, self.iou, self.max_det)

    def __call__(self, bgr: np.ndarray) -> Detections:
        t0 = time.perf_counter()
        img, r, (dw, dh) = letterbox(bgr, self.imgsz)
        det = self.detect_letterboxed(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))
        boxes = (det[:, :4] - [dw, dh, dw, dh]) / r
        h, w = bgr.shape[:2]
        boxes = np.clip(boxes, 0, [w, h, w, h])
        return Detections(boxes, det[:, 4], det[:, 5].astype(int), (time.perf_counter() - t0) * 1000)
