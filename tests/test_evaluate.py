"""mAP from Ultralytics' metrics: a perfect predictor scores 1, an empty one 0, a half-right one in between."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from shared.evaluate import NmsSettings, TorchPredictor, evaluate, match

NAMES = ["person", "car", "bicycle"]
SIZE = 64


def make_batches(n_batches=3, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        idx, cls, boxes = [], [], []
        for i in range(per_batch):
            for _ in range(rng.integers(1, 4)):
                w, h = rng.uniform(0.1, 0.3, 2)
                cx, cy = rng.uniform(0.2, 0.8, 2)
                idx.append(i), cls.append(rng.integers(0, 3)), boxes.append([cx, cy, w, h])
        batches.append({"img": torch.zeros(per_batch, 3, SIZE, SIZE, dtype=torch.uint8),
                        "batch_idx": torch.tensor(idx, dtype=torch.float32),
                        "cls": torch.tensor(cls, dtype=torch.float32).view(-1, 1),
                        "bboxes": torch.tensor(boxes, dtype=torch.float32)})
    return batches


def oracle(batches, keep=lambda k: True):
    """Replays each batch's ground truth as detections (conf 0.9), in the order evaluate() asks."""
    answers = []
    for b in batches:
        per_img = []
        for i in range(b["img"].shape[0]):
            sel = b["batch_idx"] == i
            cx, cy, w, h = (b["bboxes"][sel] * SIZE).T
            det = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, torch.full_like(cx, 0.9),
                               b["cls"][sel, 0]], 1).numpy()
            per_img.append(det[[keep(k) for k in range(len(det))]] if len(det) else det)
        answers.append(per_img)
    it = iter(answers)
    return lambda images: next(it)


def test_perfect_predictor_scores_one():
    batches = make_batches()
    r = evaluate(oracle(batches), batches, NAMES)
    # Ultralytics' 101-point interpolated AP tops out at 0.995 for a perfect ranking.
    assert r.map50 >= 0.995 - 1e-6 and r.map >= 0.995 - 1e-6
    assert set(r.per_class) == set(NAMES) and r.images == 12


def test_empty_predictor_scores_zero():
    batches = make_batches()
    r = evaluate(lambda images: [np.zeros((0, 6), np.float32)] * len(images), batches, NAMES)
    assert r.map50 == 0.0 and r.map == 0.0


def test_missing_half_the_objects_lands_between():
    batches = make_batches(seed=1)
    r = evaluate(oracle(batches, keep=lambda k: k % 2 == 0), batches, NAMES)
    assert 0.2 < r.map50 < 0.95


def test_match_respects_class_and_iou():
    gt = np.array([[0, 0, 10, 10]], np.float32)
    pred = np.array([[0, 0, 10, 10, 0.9, 1], [0, 0, 10, 10, 0.8, 0], [0, 0, 10, 10, 0.7, 0]], np.float32)
    tp = match(pred, np.array([0]), gt)
    assert not tp[0].any() and tp[1].all() and not tp[2].any()  # wrong class; match; duplicate


def test_torch_predictor_runs_a_model(tiny_student):
    dets = TorchPredictor(tiny_student)(np.zeros((2, 3, 64, 64), np.uint8))
    assert len(dets) == 2 and all(d.shape[1] == 6 for d in dets)


def test_nms_never_drops_images_on_a_slow_machine(monkeypatch, tiny_student):
    """Ultralytics' NMS stops on a timer by default; a stalled machine (a clock jumping 10 s per look) must not
    change what the evaluation sees."""
    import ultralytics.utils.nms as unms

    images = np.random.default_rng(0).integers(0, 255, (6, 3, 64, 64), dtype=np.uint8)
    predictor = TorchPredictor(tiny_student, NmsSettings(conf=0.0, iou=0.6))
    calm = predictor(images)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(unms, "time", SimpleNamespace(time=lambda: float(next(clock))))
    stalled = predictor(images)
    assert all(len(d) > 0 for d in calm)
    assert len(stalled) == len(calm) and all(np.array_equal(a, b) for a, b in zip(calm, stalled))
