"""Camera side of the per-camera snapshot exchange: personal parameters, activation ranges and int8 scores from its
own frames. Frames never leave the camera; only the named statistics and figures do."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from client.camera import split_size
from shared import task
from shared.config import Config
from shared.evaluate import evaluate
from shared.snapshot.calibration import Ranges, activation_ranges
from shared.snapshot.inference import Detector


def camera_id(node_config: Mapping[str, Any], node_id: int) -> str:
    """The camera's registry channel: node config `camera-id` (a device), else its partition (simulation)."""
    if "camera-id" in node_config:
        return str(node_config["camera-id"])
    if "partition-id" in node_config:
        return f"cam{int(node_config['partition-id']):02d}"  # the world's folder name of that camera
    return f"node{node_id}"


def personal_params(model, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of what this camera runs that differ from the model it was sent: its personal part (or its
    whole own model) and nothing the server does not already have."""
    return {k: v for k, v in model.state_dict().items() if not torch.equal(v, received[k])}


def frames(data_yaml: Path, cfg: Config, count: int) -> np.ndarray:
    """Up to `count` of the camera's frames (its unlabelled pool first, then its train split), letterboxed exactly
    as the device's runtime will see them."""
    splits = [s for s in ("pool", "train") if split_size(data_yaml, s)]
    if not splits:
        raise ValueError(f"{data_yaml}: no frames to calibrate on (neither a pool nor a train split)")
    extra = [x for s in splits[1:] for x in task.samples_of(data_yaml, s)]
    loader = task.make_loader(data_yaml, splits[0], cfg, False, batch=count, extra_samples=extra)
    return next(iter(loader))["img"].numpy()


def calibrate(onnx_model: bytes, data_yaml: Path, cfg: Config) -> tuple[Ranges, int]:
    """MinMax activation ranges of the server's pre-processed fp32 graph over this camera's frames."""
    shots = frames(data_yaml, cfg, cfg.snapshot.calib_frames)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        path.write_bytes(onnx_model)
        return activation_ranges(path, shots), len(shots)


def onnx_score(onnx_model: bytes, data_yaml: Path, cfg: Config) -> dict[str, float]:
    """The model's val mAP on this camera, run by onnxruntime as the device will run it (the run's NMS)."""
    if not split_size(data_yaml, "val"):
        return {"num-examples": 0, "map50": 0.0, "map": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_model)
        detector = Detector(path, cfg.data.imgsz, task.nms_settings(cfg), cfg.train.threads)
        result = evaluate(detector, task.make_loader(data_yaml, "val", cfg, False), task.names_of(data_yaml))
    return {"num-examples": result.images, "map50": result.map50, "map": result.map}
