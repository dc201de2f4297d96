"""Procedural camera world: determinism, label validity, layout, per-camera class mix, idempotence, atomicity."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from shared.data.world import WorldError, ensure_camera, make_world

NAMES = ["person", "car", "bicycle"]
TINY = {"imgsz": 64, "base_train": 6, "base_val": 3, "camera_train": 5, "camera_val": 3, "camera_pool": 2}
LINE = re.compile(r"^\d+ [01]\.\d{6} [01]\.\d{6} [01]\.\d{6} [01]\.\d{6}$")


def _make(out: Path, seed: int = 0, cameras: int = 2, names=NAMES, **kw) -> dict:
    return make_world(out, names, cameras, seed, **{**TINY, **kw})


def _labels(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.glob("*/labels/*/*.txt"))}


def _images(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): cv2.imread(str(p)) for p in sorted(root.glob("*/images/*/*.jpg"))}


def test_same_seed_is_identical(tmp_path):
    a, b = _make(tmp_path / "a", seed=3), _make(tmp_path / "b", seed=3)
    assert a == b
    la, lb = _labels(tmp_path / "a"), _labels(tmp_path / "b")
    assert la == lb and any(la.values())
    ia, ib = _images(tmp_path / "a"), _images(tmp_path / "b")
    assert ia.keys() == ib.keys() and len(ia) == 9 + 2 * 10
    for key in ia:
        assert np.array_equal(ia[key], ib[key]), key


def test_different_seed_differs(tmp_path):
    a, b = _make(tmp_path / "a", seed=3), _make(tmp_path / "b", seed=4)
    assert a["cameras"] != b["cameras"]
    assert _labels(tmp_path / "a") != _labels(tmp_path / "b")
    ia, ib = _images(tmp_path / "a"), _images(tmp_path / "b")
    assert sum(not np.array_equal(ia[k], ib[k]) for k in ia) == len(ia)


def test_labels_parse_and_fit(tmp_path):
    _make(tmp_path, seed=1, cameras=3, base_train=20)
    lines = [line for text in _labels(tmp_path).values() for line in text.splitlines()]
    assert len(lines) > 20
    for line in lines:
        assert LINE.match(line), line
        cls, cx, cy, w, h = line.split()
        cx, cy, w, h = map(float, (cx, cy, w, h))
        assert 0 <= int(cls) < len(NAMES)
        assert w > 0 and h > 0, line
        assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6 and cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6, line


def test_layout_counts_and_progress(tmp_path):
    calls = []
    world = _make(tmp_path, progress=lambda done, total: calls.append((done, total)))
    total = 6 + 3 + 2 * (5 + 3 + 2)
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert world["counts"]["camera_pool"] == 2 and [c["name"] for c in world["cameras"]] == ["cam00", "cam01"]
    assert json.loads((tmp_path / "world.json").read_text()) == world
    expected = {"base": {"train": 6, "val": 3}, "cam00": {"train": 5, "val": 3, "pool": 2},
                "cam01": {"train": 5, "val": 3, "pool": 2}}
    for dom, splits in expected.items():
        for split, n in splits.items():
            images = sorted((tmp_path / dom / "images" / split).glob("*.jpg"))
            assert len(images) == n
            assert cv2.imread(str(images[0])).shape == (64, 64, 3)
            labels = tmp_path / dom / "labels" / split
            if split == "pool":
                assert not labels.exists()  # the pool is unlabelled
            else:
                assert sorted(p.stem for p in labels.glob("*.txt")) == [p.stem for p in images]
    assert not list(tmp_path.glob(".tmp-world-*"))


def test_data_yaml(tmp_path):
    _make(tmp_path)
    for dom in ("base", "cam00", "cam01"):
        data = yaml.safe_load((tmp_path / dom / "data.yaml").read_text())
        assert Path(data["path"]) == (tmp_path / dom).resolve()
        assert data["nc"] == 3 and data["names"] == {0: "person", 1: "car", 2: "bicycle"}
        keys = ("train", "val", "pool") if dom != "base" else ("train", "val")
        assert all((Path(data["path"]) / data[k]).is_dir() for k in keys)
        assert ("pool" in data) == (dom != "base")


def test_cameras_have_different_class_mix(tmp_path):
    world = _make(tmp_path, seed=5, cameras=3, camera_train=40, camera_val=0, camera_pool=0)
    dominant = []
    for cam in world["cameras"]:
        hist = Counter(int(line.split()[0]) for p in (tmp_path / cam["name"] / "labels" / "train").glob("*.txt")
                       for line in p.read_text().splitlines())
        assert sum(hist.values()) >= 30, (cam["name"], hist)
        top, n = hist.most_common(1)[0]
        assert NAMES[top] == cam["dominant"] and n / sum(hist.values()) > 0.5, (cam["name"], hist)
        dominant.append(top)
    assert len(set(dominant)) == 3  # the first nc cameras each favour a different class
    assert len({(c["light"], c["view"], c["scene"]) for c in world["cameras"]}) == 3


def test_idempotent_and_regenerates_on_change(tmp_path):
    first = _make(tmp_path, cameras=2)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    calls = []
    assert _make(tmp_path, cameras=2, progress=lambda *a: calls.append(a)) == first
    assert not calls and stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert _make(tmp_path, cameras=1) == first  # fewer cameras of the same world: reused, nothing deleted
    assert (tmp_path / "cam01").exists()
    second = _make(tmp_path, cameras=1, camera_val=4)  # different parameters: regenerated, stale camera removed
    assert second["counts"]["cameras"] == 1 and not (tmp_path / "cam01").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "cam00", "world.json"]


def test_interrupted_run_leaves_no_world(tmp_path):
    def stop(done, total):
        if done == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _make(tmp_path, progress=stop)
    assert list(tmp_path.iterdir()) == []  # nothing that looks like a (half) world, no temp folder
    assert _make(tmp_path)["counts"]["cameras"] == 2 and (tmp_path / "world.json").exists()


def test_extra_class_gets_generic_shape(tmp_path):
    names = NAMES + ["dog"]
    _make(tmp_path, names=names, cameras=0, base_train=30, base_val=0)
    classes = {int(line.split()[0]) for text in _labels(tmp_path).values() for line in text.splitlines()}
    assert classes == {0, 1, 2, 3}
    assert yaml.safe_load((tmp_path / "base" / "data.yaml").read_text())["nc"] == 4


def test_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError):
        make_world(tmp_path, ["car", "car"], 1, 0, imgsz=64)


def test_lazy_cameras_are_the_same_pixels(tmp_path):
    eager = _make(tmp_path / "eager", seed=2, cameras=3)
    lazy = _make(tmp_path / "lazy", seed=2, cameras=3, lazy=True)
    assert lazy == eager and sorted(p.name for p in (tmp_path / "lazy").iterdir()) == ["base", "world.json"]
    assert ensure_camera(tmp_path / "lazy", 2) == (tmp_path / "lazy" / "cam02" / "data.yaml").resolve()
    assert sorted(p.name for p in (tmp_path / "lazy").iterdir()) == ["base", "cam02", "world.json"]  # only that one
    for k in (0, 1):
        ensure_camera(tmp_path / "lazy", k)
    assert _labels(tmp_path / "lazy") == _labels(tmp_path / "eager")
    ia, ib = _images(tmp_path / "lazy"), _images(tmp_path / "eager")
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    data = yaml.safe_load((tmp_path / "lazy" / "cam01" / "data.yaml").read_text())
    assert Path(data["path"]) == (tmp_path / "lazy" / "cam01").resolve()
    assert not list((tmp_path / "lazy").glob(".tmp-*"))


def test_lazy_camera_errors_name_the_world(tmp_path):
    _make(tmp_path, cameras=2, lazy=True)
    with pytest.raises(WorldError, match="camera 5 is not in the world"):
        ensure_camera(tmp_path, 5)
    with pytest.raises(WorldError, match="no world.json"):
        ensure_camera(tmp_path / "nowhere", 0)
    (tmp_path / "cam01").mkdir()  # a stray folder where the camera would go is never overwritten
    (tmp_path / "cam01" / "notes.txt").write_text("mine")
    with pytest.raises(WorldError, match="has no data.yaml"):
        ensure_camera(tmp_path, 1)
    assert [p.name for p in (tmp_path / "cam01").iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".tmp-*"))


def test_lazy_camera_race_keeps_one_copy(tmp_path):
    """Several simulation workers asking for the same camera at once: one folder, whole, and the same pixels."""
    import multiprocessing as mp

    _make(tmp_path, cameras=1, lazy=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=ensure_camera, args=(tmp_path, 0)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "cam00" / "images" / "train").glob("*.jpg"))) == TINY["camera_train"]
    assert not list(tmp_path.glob(".tmp-*"))
