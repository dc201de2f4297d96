"""Activation ranges for int8 calibration, computed where the frames are (a camera) and checked where they are used."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator

Ranges = dict[str, tuple[float, float]]  # tensor name -> (lowest, highest) activation seen


class CalibrationError(ValueError):
    """Calibration statistics that do not fit the model they are for (missing, extra or non-finite tensors)."""


class FrameReader(CalibrationDataReader):
    """Feeds calibration frames (letterboxed RGB uint8, N x 3 x S x S) one at a time."""

    def __init__(self, frames: np.ndarray, input_name: str = "images"):
        self.frames, self.name = frames, input_name
        self.iter: Iterator | None = None

    def get_next(self):
        if self.iter is None:
            self.iter = iter(self.frames)
        frame = next(self.iter, None)
        return None if frame is None else {self.name: frame[None].astype(np.float32) / 255.0}

    def rewind(self):
        self.iter = None


def activation_ranges(model: Path | str, frames: np.ndarray) -> Ranges:
    """MinMax ranges of every tensor onnxruntime's static quantizer calibrates in `model` (a pre-processed fp32
    graph), over `frames`: exactly what quantize_static computes from the same frames, and nothing of the frames."""
    if not len(frames):
        raise CalibrationError("no frames to calibrate on")
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(model), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(FrameReader(frames))
        data = calibrator.compute_data().data
    return {name: (_scalar(t.range_value[0]), _scalar(t.range_value[1])) for name, t in sorted(data.items())}


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


def to_lists(ranges: Ranges) -> dict[str, list]:
    """Three parallel lists (for a Flower ConfigRecord): names, lows, highs."""
    names = sorted(ranges)
    return {"tensors": names, "low": [ranges[n][0] for n in names], "high": [ranges[n][1] for n in names]}


def from_lists(tensors, low, high, expected: set[str], source: str) -> Ranges:
    """Ranges from a reply, checked against the tensors the quantizer calibrates; errors name `source`."""
    tensors, low, high = list(tensors), list(low), list(high)
    if not len(tensors) == len(low) == len(high):
        raise CalibrationError(f"{source}: {len(tensors)} tensor names but {len(low)} lows and {len(high)} highs")
    got = set(tensors)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise CalibrationError(f"{source}: ranges do not fit the model (missing {missing}, unknown {extra})")
    out = {}
    for name, lo, hi in zip(tensors, low, high):
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise CalibrationError(f"{source}: tensor {name} has an unusable range ({lo}, {hi})")
        out[name] = (lo, hi)
    return out
