"""Cheap, reproducible train-time augmentation of letterboxed images and their normalized labels."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.snapshot.inference import PAD_VALUE  # zoom-out borders match the letterbox borders

MIN_AREA_KEPT = 0.4  # a box losing more than 60% of its area to the frame edge is mostly invisible: drop it
MIN_SIDE_PX = 2.0  # boxes thinner than this carry no learnable signal and upset the box loss
# Hue is a circular channel where Ultralytics' default gain (0.015) is ~20x smaller than its
# saturation/value gains; a hue shift of the full `hsv` gain (e.g. ±54 of 180 at 0.3) would turn
# a red car green and destroy colour cues, so hue uses this fraction of the gain.
HUE_FRACTION = 0.05


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 disables the corresponding step."""

    fliplr: float = 0.5  # probability of a horizontal flip
    hsv: float = 0.3  # max relative gain on saturation and value (hue gets HUE_FRACTION of it)
    scale: float = 0.25  # max relative zoom in/out around the image centre

    def __post_init__(self) -> None:
        # Fail at config time rather than with an odd cv2 error deep inside a training step.
        if not 0.0 <= self.fliplr <= 1.0:
            raise ValueError(f"AugmentConfig.fliplr must be in [0, 1], got {self.fliplr}")
        if not 0.0 <= self.hsv <= 1.0:
            raise ValueError(f"AugmentConfig.hsv must be in [0, 1], got {self.hsv}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"AugmentConfig.scale must be in [0, 1), got {self.scale}")


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)


def _xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    return np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1)


def random_scale(img: np.ndarray, labels: np.ndarray, gain: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Zoom by a factor in [1-gain, 1+gain] around the centre, keeping the canvas; clip and filter boxes."""
    s = float(rng.uniform(1.0 - gain, 1.0 + gain))
    h, w = img.shape[:2]
    # One affine warp covers both zoom-in (crop) and zoom-out (pad) without intermediate copies.
    m = np.array([[s, 0.0, (1.0 - s) * w / 2], [0.0, s, (1.0 - s) * h / 2]], dtype=np.float32)
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(PAD_VALUE,) * 3)
    if len(labels) == 0:
        return img, labels
    size = np.array([w, h, w, h], dtype=np.float64)
    xyxy = _xywh_to_xyxy(labels[:, 1:5].astype(np.float64)) * size
    xyxy = xyxy * s + np.array([m[0, 2], m[1, 2], m[0, 2], m[1, 2]])
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    clipped = np.clip(xyxy, 0.0, size)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw >= MIN_SIDE_PX) & (ch >= MIN_SIDE_PX) & (cw * ch >= MIN_AREA_KEPT * np.maximum(area, 1e-9))
    out = np.empty((int(keep.sum()), 5), dtype=np.float32)
    out[:, 0] = labels[keep, 0]
    out[:, 1:5] = _xyxy_to_xywh(clipped[keep] / size)
    return img, out


def hflip(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; only cx changes in normalized xywh."""
    labels = labels.copy()
    labels[:, 1] = 1.0 - labels[:, 1]
    return np.ascontiguousarray(img[:, ::-1]), labels


def random_hsv(img: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Random hue/saturation/value gains via lookup tables, as Ultralytics' RandomHSV does (BGR uint8)."""
    r = rng.uniform(-1.0, 1.0, 3) * np.array([gain * HUE_FRACTION, gain, gain])
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x + r[0] * 180) % 180).astype(np.uint8)  # OpenCV 8-bit hue lives in [0, 180)
    lut_sat = np.clip(x * (1 + r[1]), 0, 255).astype(np.uint8)
    lut_sat[0] = 0  # keep greys grey: zero saturation must not gain a colour
    lut_val = np.clip(x * (1 + r[2]), 0, 255).astype(np.uint8)
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def augment(img: np.ndarray, labels: np.ndarray, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scale, flip and colour-jitter a letterboxed BGR image; labels (n,5) cls,cx,cy,w,h normalized.

    Inputs are not modified. All randomness comes from `rng`, so a seeded generator reproduces the output.
    """
    labels = np.array(labels, dtype=np.float32).reshape(-1, 5)  # a copy: the caller's array stays intact
    if cfg.scale > 0:
        img, labels = random_scale(img, labels, cfg.scale, rng)
    if cfg.fliplr > 0 and rng.random() < cfg.fliplr:
        img, labels = hflip(img, labels)
    if cfg.hsv > 0 and img.ndim == 3 and img.shape[2] == 3:
        img = random_hsv(img, cfg.hsv, rng)
    # Float rounding in the transforms must never push a kept box outside the frame.
    labels[:, 1:5] = np.clip(labels[:, 1:5], 0.0, 1.0)
    return img, labels
