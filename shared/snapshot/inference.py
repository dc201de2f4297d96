"""The snapshot's one inference path, from camera frame to boxes: letterbox, onnxruntime, decode, NMS, map back.

The accuracy gate, the calibration frames and the device runtime all go through this module, so a camera runs
exactly what the server measured. numpy, OpenCV and onnxruntime only: no torch, no Flower, no Ultralytics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PAD_VALUE = 114  # the grey Ultralytics pads with
MAX_WH = 7680.0  # Ultralytics' class offset: boxes of different classes never overlap in one NMS pass


@dataclass(frozen=True)
class Letterbox:
    """Where a frame landed on the square canvas: x_canvas = x * ratio + left (likewise y with top)."""
    ratio: float
    left: int
    top: int
    width: int  # the resized frame's size on the canvas, exact despite rounding (labels map with it)
    height: int

    def to_frame(self, xyxy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Canvas boxes (n, 4) back to the frame's pixels, clipped to its (h, w)."""
        h, w = shape[:2]
        boxes = (xyxy - [self.left, self.top, self.left, self.top]) / self.ratio
        return np.clip(boxes, 0, [w, h, w, h])


def letterbox(img: np.ndarray, size: int, pad: int = PAD_VALUE) -> tuple[np.ndarray, Letterbox]:
    """Fit a BGR frame in size x size keeping its aspect, padded centred with grey."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nw, nh = max(1, min(size, round(w * r))), max(1, min(size, round(h * r)))
    if (nw, nh) != (w, h):
        # INTER_AREA avoids aliasing when shrinking (a 1080p frame to 320 px); INTER_LINEAR when enlarging.
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    left, top = (size - nw) // 2, (size - nh) // 2
    if (nw, nh) != (size, size):
        img = cv2.copyMakeBorder(img, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT,
                                 value=(pad,) * 3)
    return img, Letterbox(r, left, top, nw, nh)


def to_chw_rgb(bgr: np.ndarray) -> np.ndarray:
    """BGR HWC (OpenCV) -> RGB CHW, the layout the models take."""
    return np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))


@dataclass(frozen=True)
class NmsSettings:
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 100


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Greedy NMS on xyxy boxes: kept indices by descending score, at most max_keep (no timer, no early exit)."""
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size and len(keep) < max_keep:
        i, rest = order[0], order[1:]
        keep.append(i)
        xx1, yy1 = np.maximum(boxes[i, 0], boxes[rest, 0]), np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2, yy2 = np.minimum(boxes[i, 2], boxes[rest, 2]), np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(raw: np.ndarray, s: NmsSettings) -> np.ndarray:
    """One image's head output (4 + nc, anchors; xywh in canvas pixels) -> (n, 6) x1, y1, x2, y2, score, class.

    As Ultralytics' non_max_suppression with one label per box: best class, score > conf, class-aware NMS.
    """
    if not np.isfinite(raw).all():  # NaN scores would silently look like "nothing detected"
        raise FloatingPointError("model produced non-finite outputs")
    scores_all = raw[4:].T
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    sel = score > s.conf
    xywh, score, cls = raw[:4, sel].T, score[sel], cls[sel]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    keep = nms(xyxy + cls[:, None] * MAX_WH, score, s.iou, s.max_det)
    return np.concatenate([xyxy[keep], score[keep, None], cls[keep, None].astype(np.float32)], 1)


def session(model: Path | str, threads: int = 1, optimized: bool = True, profile: str = ""):
    """An onnxruntime CPU session as a camera runs it: `threads` intra-op threads, sequential execution.
    optimized=False runs the graph as written (a QDQ model's quantize/dequantize pairs in float arithmetic, no
    integer kernels): the quantizer's own definition of the int8 model, a reference for comparing CPUs.
    `profile`: onnxruntime's profiler on, its file named from this prefix (per-node kernel times)."""
    import onnxruntime as ort  # here, so that importing this module for letterbox alone stays light

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


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


def device_settings(manifest, conf: float) -> NmsSettings:
    """A camera's NMS: the gate's IoU and box limit from the signed manifest, the camera's own confidence."""
    gate = NmsSettings()
    return NmsSettings(conf, float(manifest.nms.get("iou", gate.iou)), int(manifest.nms.get("max_det", gate.max_det)))


class Detector:
    """A snapshot's model.onnx in onnxruntime: camera frames (`detect`) or letterboxed batches (`__call__`)."""

    def __init__(self, model: Path | str, imgsz: int | None = None, settings: NmsSettings = NmsSettings(),
                 threads: int = 1, optimized: bool = True):
        self.session = session(model, threads, optimized)
        spec = self.session.get_inputs()[0]
        self.input, self.settings = spec.name, settings
        self.imgsz = imgsz or int(spec.shape[-1])  # fedcam's exports have a static (1, 3, S, S) input

    def raw(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) RGB uint8 -> (B, 4 + nc, anchors), one image per run as on a camera."""
        x = np.ascontiguousarray(images, dtype=np.float32) / 255.0
        return np.concatenate([self.session.run(None, {self.input: x[i:i + 1]})[0] for i in range(len(x))])

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """Letterboxed (B, 3, S, S) RGB uint8 -> per image (n, 6) in canvas pixels (the evaluation's Predictor)."""
        return [decode(r, self.settings) for r in self.raw(images)]

    def detect(self, bgr: np.ndarray) -> Detections:
        """One camera frame (BGR, any size) -> detections in its own pixels."""
        t0 = time.perf_counter()
        img, box = letterbox(bgr, self.imgsz)
        (det,) = self(to_chw_rgb(img)[None])
        return Detections(box.to_frame(det[:, :4], bgr.shape), det[:, 4], det[:, 5].astype(int),
                          (time.perf_counter() - t0) * 1000)
