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
