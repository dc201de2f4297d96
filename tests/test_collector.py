"""Frame collection on a device: bounded store, change/rate sampling, video source, and training from the store."""

from __future__ import annotations

import itertools
import subprocess
import sys

import cv2
import numpy as np
import pytest

from client.runtime.cli import frames
from client.runtime.collector import FrameStore, collect
from shared.data.dataset import read_data_yaml
from shared.train import local_plan


def scene(i: int, size: int = 64) -> np.ndarray:
    """A frame whose content depends on i (a moving bright square on a grey background)."""
    img = np.full((size, size, 3), 90, np.uint8)
    x = (i * 9) % (size - 16)
    img[20:36, x:x + 16] = 240
    return img


def test_store_is_bounded_evicts_oldest_and_survives_restart(tmp_path):
    store = FrameStore(tmp_path / "s", ["person", "car"], max_frames=5)
    written = [store.add(scene(i)) for i in range(7)]
    kept = store.frames()
    assert kept == written[2:]  # the two oldest went first
    spec = read_data_yaml(tmp_path / "s" / "data.yaml")
    assert spec.names == ["person", "car"] and len(spec.splits["pool"]) == 5
    assert spec.splits["train"] == [] and spec.splits["val"] == []
    again = FrameStore(tmp_path / "s", ["person", "car"], max_frames=5)  # e.g. after a reboot
    newest = again.add(scene(99))
    assert newest not in written and again.frames()[-1] == newest and len(again.frames()) == 5
    assert not list((tmp_path / "s" / "pool" / "images").glob("*.part"))


def test_collect_skips_static_scenes_and_respects_the_rate(tmp_path):
    store = FrameStore(tmp_path / "s", ["a"], max_frames=100)
    static = [(f"f{i}", scene(0)) for i in range(10)]
    assert collect(iter(static), store, every_s=0.0, min_change=2.0) == 1  # one frame of a scene that never moves
    ticks = itertools.count(0.0, 0.5)  # a fake clock: frames arrive every 0.5 s
    moving = [(f"m{i}", scene(i + 1)) for i in range(20)]
    assert collect(iter(moving), store, every_s=2.0, min_change=2.0, clock=lambda: next(ticks)) == 5
    assert collect(iter(moving), store, every_s=0.0, min_change=2.0, max_new=3) == 3
    assert len(store.frames()) == 1 + 5 + 3


def test_collect_from_a_video_file_through_the_cli(tmp_path):
    video = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    assert writer.isOpened()
    for i in range(12):
        writer.write(scene(i))
    writer.release()
    assert len(list(frames(str(video)))) == 12
    out = subprocess.run([sys.executable, "-m", "client.runtime.cli", "collect", "--source", str(video), "--store",
                          str(tmp_path / "store"), "--names", "person,car,bicycle", "--max-frames", "4",
                          "--every", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(FrameStore(tmp_path / "store", ["person", "car", "bicycle"]).frames()) == 4


def test_client_trains_from_an_unlabelled_store_only_with_a_teacher(tmp_path, tiny_cfg, tiny_world):
    from client import camera
    from shared import models

    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "distill.pseudo-conf": 0.0001, "fed.local-epochs": 1})
    store = FrameStore(tmp_path / "store", cfg.data.names, max_frames=8)
    for p in read_data_yaml(tiny_world / "cam00" / "data.yaml").splits["train"][:8]:
        store.add(cv2.imread(str(p)))
    data = store.root / "data.yaml"
    student = models.build_student(cfg.model, cfg.data.names)
    with pytest.raises(camera.NodeConfigError, match="no teacher-path"):
        camera.local_finetune(student, data, cfg, {**local_plan(cfg.fed), "seed": 0})
    teacher = models.save(models.build_teacher(cfg.model, cfg.data.names), tmp_path / "teacher.pt")
    metrics = camera.local_finetune(student, data, cfg, {**local_plan(cfg.fed), "seed": 0}, teacher=str(teacher))
    assert metrics["pseudo-labelled"] > 0 and metrics["steps"] > 0 and metrics["update-norm"] > 0
    assert camera.local_evaluate(student, data, cfg)["num-examples"] == 0  # no labelled val frames yet
