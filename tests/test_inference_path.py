"""One path from frame to detection: the gate, calibration and the device all run shared.snapshot.inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from server.snapshots.export import export_onnx
from shared import task
from shared.evaluate import nms as ultralytics_nms
from shared.snapshot.format import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from shared.snapshot.inference import Detector, NmsSettings, letterbox, to_chw_rgb

HEAVY = ("torch", "torchvision", "flwr", "ultralytics", "ray")


def fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "FLWR_", "RAY_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_snapshot_package_and_runtime_import_nothing_heavy_and_set_nothing():
    # The environment is compared before OpenCV loads: cv2's own loader edits LD_LIBRARY_PATH.
    code = ("import os, sys; before = dict(os.environ); "
            "import shared, shared.env, shared.snapshot, shared.snapshot.format; "
            "changed = sorted(set(os.environ.items()) ^ set(before.items())); "
            "import shared.snapshot.inference, client.runtime.cli, client.runtime.agent, client.runtime.collector; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); print(changed)")
    out = fresh_interpreter(code)
    assert out.returncode == 0, out.stderr
    loaded, env_changes = out.stdout.splitlines()
    assert loaded == "[]", f"heavy modules imported: {loaded}"
    assert env_changes == "[]", f"importing shared changed the environment: {env_changes}"


@pytest.mark.slow
@pytest.mark.numerics
def test_snapshot_decode_equals_ultralytics_nms(trained, tmp_path):
    """The numpy decode a camera runs gives Ultralytics' NMS result on the same raw outputs."""
    cfg, model, _ = trained
    settings = NmsSettings(conf=0.05, iou=0.6, max_det=100)
    detector = Detector(export_onnx(model, tmp_path / "m.onnx", 64, {}), settings=settings)
    compared = 0
    for batch in task.make_loader(task.base_yaml(cfg), "val", cfg, False):
        images = batch["img"].numpy()
        ours, reference = detector(images), ultralytics_nms(torch.from_numpy(detector.raw(images)), settings)
        for got, ref in zip(ours, reference):
            assert len(got) == len(ref)
            order_g, order_r = np.argsort(-got[:, 4]), np.argsort(-ref[:, 4])
            assert np.allclose(got[order_g], ref[order_r], atol=1e-3)
            compared += len(got)
    assert compared > 0, "no detections compared: the test would prove nothing"


def real_size_frames(cfg, folder: Path) -> Path:
    """The fixture world's val frames blown up to 1920x1080 and 640x480 (PNG: no codec loss), as a dataset."""
    (folder / "images" / "val").mkdir(parents=True)
    (folder / "labels" / "val").mkdir(parents=True)
    src = sorted((task.base_yaml(cfg).parent / "images" / "val").glob("*.jpg"))[:6]
    for i, image in enumerate(src):
        w, h = (1920, 1080) if i % 2 == 0 else (640, 480)
        big = cv2.resize(cv2.imread(str(image)), (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / "images" / "val" / f"f{i}_{w}x{h}.png"), big)
        label = task.base_yaml(cfg).parent / "labels" / "val" / f"{image.stem}.txt"
        (folder / "labels" / "val" / f"f{i}_{w}x{h}.txt").write_text(label.read_text())  # normalized: unchanged
    (folder / "data.yaml").write_text(f"path: {folder}\ntrain: images/val\nval: images/val\n"
                                      f"names: {list(cfg.data.names)}\n")
    return folder / "data.yaml"


@pytest.mark.slow
@pytest.mark.numerics
def test_gate_and_fedcam_device_detect_give_the_same_boxes_on_real_size_frames(trained, tmp_path):
    cfg, model, _ = trained
    snap = tmp_path / "snap"
    snap.mkdir()
    path = export_onnx(model, snap / MODEL_FILE, 64, {})
    conf = 0.05
    manifest = Manifest(version="v0001", round=1, target="x86", sha256=sha256_file(path), size=path.stat().st_size,
                        imgsz=64, names=list(cfg.data.names), map50_fp32=0, map50_int8=0, map_fp32=0, map_int8=0,
                        latency_ms=0, created="2000-01-01T00:00:00Z", parent_checkpoint="",
                        nms={"iou": cfg.eval.iou, "max_det": cfg.eval.max_det})
    (snap / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    data = real_size_frames(cfg, tmp_path / "frames")

    # The gate's path: the dataset loader letterboxes, the detector scores the batch, boxes in the canvas.
    gate = Detector(path, 64, NmsSettings(conf, cfg.eval.iou, cfg.eval.max_det))
    expected = {}
    for batch in task.make_loader(data, "val", cfg, False):
        for file, shape, (r, (left, top)), det in zip(batch["im_file"], batch["ori_shape"], batch["ratio_pad"],
                                                      gate(batch["img"].numpy())):
            h, w = shape
            boxes = np.clip((det[:, :4] - [left, top, left, top]) / r, 0, [w, h, w, h])
            expected[Path(file).name] = (boxes, det[:, 4])

    # The camera's path: `fedcam-device detect` on the image files, in its own process.
    out = subprocess.run([sys.executable, "-m", "client.runtime.cli", "detect", "--snapshot", str(snap),
                          "--source", str(data.parent / "images" / "val"), "--conf", str(conf)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = {Path(r["frame"]).name: r for r in map(json.loads, out.stdout.splitlines())}
    assert sorted(got) == sorted(expected) and {n.split("_")[1] for n in got} == {"1920x1080.png", "640x480.png"}
    compared = 0
    for name, (boxes, scores) in expected.items():
        device = got[name]
        assert len(device["boxes"]) == len(boxes), name
        assert np.allclose(np.reshape(device["boxes"], (-1, 4)), boxes, atol=0.051), name  # CLI rounds to 0.1 px
        assert np.allclose(device["scores"], scores, atol=5.1e-5), name
        compared += len(boxes)
    assert compared > 0, "no detections compared: the test would prove nothing"


def test_letterbox_shrinks_with_area_interpolation():
    """A 1080p frame of fine stripes shrunk to 64 px averages to grey (INTER_AREA), as training saw it."""
    stripes = np.zeros((1080, 1920, 3), np.uint8)
    stripes[:, ::2] = 255
    img, box = letterbox(stripes, 64)
    assert (box.width, box.height, box.left, box.top) == (64, 36, 0, 14)
    inside = img[box.top:box.top + box.height]
    assert np.abs(inside.astype(int) - 128).max() <= 2  # nearest or linear sampling would keep 0s and 255s
    assert to_chw_rgb(img).shape == (3, 64, 64)
