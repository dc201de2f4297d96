"""Shared fixtures: a tiny config (imgsz 64, ~350k-parameter student) and a tiny generated world."""

from __future__ import annotations

from pathlib import Path

import pytest

import shared  # noqa: F401  (offline environment first)
from shared.config import load_config

TINY = {
    "data.imgsz": 64, "data.cameras": 2, "data.base-train": 24, "data.base-val": 12,
    "data.camera-train": 16, "data.camera-val": 8, "data.camera-pool": 8,
    "model.student-width": 0.0625, "model.teacher-scale": "n", "model.family": "yolov8",
    "snapshot.round-to": 1, "train.batch": 8, "train.epochs": 1, "train.threads": 2, "train.warmup-steps": 0, "eval.batch": 8,
}


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_cfg) -> Path:
    from shared import task

    out = tmp_path_factory.mktemp("world")
    task.ensure_world(tiny_cfg.replace(**{"data.root": str(out)}))
    return out


@pytest.fixture()
def tiny_student(tiny_cfg):
    from shared import models

    return models.build_student(tiny_cfg.model, tiny_cfg.data.names)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_cfg):
    """A tiny student trained long enough to detect something (mAP50 > 0) on its own small world (~1 min)."""
    import torch

    from shared import models, task
    from shared.train import TrainSpec

    root = tmp_path_factory.mktemp("trainedworld")
    cfg = tiny_cfg.replace(**{"data.root": str(root), "data.base-train": 64, "data.cameras": 1,
                              "snapshot.calib-frames": 16, "snapshot.recover-epochs": 0})
    task.ensure_world(cfg)
    torch.manual_seed(0)
    model = models.build_student(cfg.model, cfg.data.names)
    task.fit(model, task.base_yaml(cfg), cfg, TrainSpec(epochs=20, lr=0.01, optimizer="AdamW", warmup_steps=5))
    return cfg, model.eval()
