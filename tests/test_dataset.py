"""Dataset reading, validation, letterbox, augmentation and collate (tiny generated images, fast)."""

from __future__ import annotations

import copy
import logging
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from shared.data.augment import AugmentConfig, augment
from shared.data.dataset import (DataError, DetectionDataset, ImageFolderDataset, collate, label_path,
                                 load_image, load_split, parse_label_file, read_data_yaml, scan_split)
from shared.snapshot.inference import letterbox

NAMES = ["car", "person", "bike"]


def write_image(path: Path, w: int = 48, h: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def write_labels(image: Path, lines: list[str]) -> Path:
    lp = label_path(image)
    lp.parent.mkdir(parents=True, exist_ok=True)
    lp.write_text("".join(f"{ln}\n" for ln in lines))
    return lp


def make_dataset(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img = write_image(root / "images" / split / f"{i}.jpg", seed=i)
            if i > 0:  # frame 0 has no label file: a background frame
                write_labels(img, [f"{i % 3} 0.5 0.5 0.25 0.5"] + [f"0 0.2 0.{k + 2} 0.1 0.2" for k in range(i - 1)])
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\ntest:\nnames:\n  0: car\n  1: person\n  2: bike\nnc: 3\n")
    return root / "data.yaml"


# --- reading a valid dataset ---------------------------------------------------------------------------------------

def test_valid_dataset_counts_and_labels(tmp_path):
    spec = read_data_yaml(make_dataset(tmp_path, 4, 2))
    assert spec.names == NAMES and set(spec.splits) == {"train", "val"}
    assert len(spec.splits["train"]) == 4 and len(spec.splits["val"]) == 2
    report = load_split(spec, "train")
    assert len(report.samples) == 4 and report.skipped == []
    by_name = {s.image.name: s.labels for s in report.samples}
    assert by_name["0.jpg"].shape == (0, 5)
    assert by_name["1.jpg"].dtype == np.float32
    np.testing.assert_allclose(by_name["1.jpg"], [[1, 0.5, 0.5, 0.25, 0.5]])
    assert by_name["3.jpg"].shape == (3, 5)


def test_relative_path_list_names_and_txt_split(tmp_path):
    root = tmp_path / "ds"
    imgs = [write_image(root / "images" / f"{i}.png", seed=i) for i in range(3)]
    (root / "pool.txt").write_text("images/0.png\nimages/1.png\n")
    (tmp_path / "data.yaml").write_text("path: ds\ntrain: images\nval: images\npool: pool.txt\nnames: [a, b]\n"
                                        "license: CC-BY 4.0\n")
    spec = read_data_yaml(tmp_path / "data.yaml")
    assert spec.root == root.absolute() and spec.names == ["a", "b"]
    assert sorted(spec.splits) == ["pool", "train", "val"]  # `license` is metadata, not a split
    assert spec.splits["pool"] == imgs[:2]


# --- data.yaml errors ------------------------------------------------------------------------------------------------

def test_missing_yaml(tmp_path):
    with pytest.raises(DataError, match="nope.yaml"):
        read_data_yaml(tmp_path / "nope.yaml")


def test_missing_split_folder_names_it(tmp_path):
    yml = make_dataset(tmp_path)
    yml.write_text(yml.read_text().replace("val: images/val", "val: images/valid"))
    with pytest.raises(DataError, match="images/valid"):
        read_data_yaml(yml)


@pytest.mark.parametrize("text, match", [("train: [unclosed\n", "malformed YAML"), ("- a\n- b\n", "mapping"),
                                         ("train: images\nval: images\n", "names"),
                                         ("train: images\nval: images\nnames: [a]\nnc: 2\n", "nc=2")])
def test_malformed_yaml(tmp_path, text, match):
    (tmp_path / "images").mkdir()
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(DataError, match=match) as e:
        read_data_yaml(tmp_path / "data.yaml")
    assert "data.yaml" in str(e.value)


# --- bad inputs: direct errors name file and line --------------------------------------------------------------------

BAD_LINES = {
    "fields": ("0 0.5 0.5 0.2", "expected 5 fields"),
    "numeric": ("0 0.5 abc 0.2 0.2", "non-numeric"),
    "class_range": ("3 0.5 0.5 0.2 0.2", "class id 3"),
    "class_float": ("1.5 0.5 0.5 0.2 0.2", "class id 1.5"),
    "coord": ("0 1.2 0.5 0.2 0.2", r"\[0, 1\]"),
    "size": ("0 0.5 0.5 0 0.2", "positive"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_label_line_names_file_and_line(tmp_path, kind):
    line, match = BAD_LINES[kind]
    lp = tmp_path / "labels" / "x.txt"
    lp.parent.mkdir()
    lp.write_text(f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(DataError, match=match) as e:
        parse_label_file(lp, nc=3)
    assert f"{lp}:3" in str(e.value)


def test_label_tolerance_clip_and_missing(tmp_path):
    lp = tmp_path / "a.txt"
    lp.write_text("0 1.0000005 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    lb = parse_label_file(lp, nc=1)
    # Within tolerance, then clipped to the frame (x 0.9..1.0); the duplicate line is dropped.
    np.testing.assert_allclose(lb, [[0, 0.95, 0.5, 0.1, 0.2], [0, 0.5, 0.5, 0.2, 0.2]], atol=1e-6)
    assert np.all(lb[:, 1:] >= 0) and np.all(lb[:, 1:3] + lb[:, 3:5] / 2 <= 1 + 1e-6)
    assert parse_label_file(tmp_path / "missing.txt", nc=1).shape == (0, 5)


def bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = write_image(folder / "good.jpg")
    data = good.read_bytes()
    (folder / "trunc.jpg").write_bytes(data[: len(data) - 40])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50 + b"IEND\xaeB`\x82")
    return {"missing": folder / "missing.jpg", "trunc": folder / "trunc.jpg", "text": folder / "text.jpg",
            "corrupt": folder / "corrupt.png"}


@pytest.mark.parametrize("kind, match", [("missing", "not found"), ("trunc", "truncated JPEG"),
                                         ("text", "not a decodable image"), ("corrupt", "not a decodable image")])
def test_bad_image_names_file(tmp_path, kind, match):
    path = bad_images(tmp_path / "images")[kind]
    with pytest.raises(DataError, match=match) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_load_image_ok(tmp_path):
    img = load_image(write_image(tmp_path / "a.png", 40, 30))
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8


# --- bad inputs in scan_split: counted skips ---------------------------------------------------------------------

def test_scan_split_skips_bad_samples_keeps_good(tmp_path, caplog):
    folder = tmp_path / "images"
    bad = bad_images(folder)
    good = [write_image(folder / f"ok{i}.jpg", seed=i) for i in range(2)]
    write_labels(good[0], ["1 0.5 0.5 0.2 0.2"])
    label_errors = []
    for kind, (line, _) in BAD_LINES.items():
        img = write_image(folder / f"lb_{kind}.jpg")
        label_errors.append(write_labels(img, ["0 0.5 0.5 0.2 0.2", line]))
    images = [*bad.values(), *good, *[folder / f"lb_{k}.jpg" for k in BAD_LINES]]
    with caplog.at_level(logging.WARNING, logger="shared.data.dataset"):
        report = scan_split(images, nc=3)
    assert [s.image for s in report.samples] == good
    assert len(report.skipped) == len(bad) + len(BAD_LINES)
    skipped_files = [f for f, _ in report.skipped]
    assert set(skipped_files) == set(bad.values()) | set(label_errors)
    for f, reason in report.skipped:
        assert str(f) in reason
        if f.suffix == ".txt":
            assert f"{f}:2" in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"skipped {len(report.skipped)}" in warnings[0].getMessage()


def test_scan_split_without_image_check_still_skips_missing(tmp_path):
    good = write_image(tmp_path / "images" / "a.jpg")
    report = scan_split([good, tmp_path / "images" / "gone.jpg"], nc=1, check_images=False)
    assert len(report.samples) == 1 and "not found" in report.skipped[0][1]


def test_all_bad_raises(tmp_path):
    bad = bad_images(tmp_path / "images")
    with pytest.raises(DataError, match=r"no usable samples in .*: 4 skipped, first: .*missing.jpg"):
        scan_split(list(bad.values()), nc=3)
    with pytest.raises(DataError, match="no usable samples"):
        scan_split([], nc=3)


# --- letterbox and datasets ---------------------------------------------------------------------------------------

def test_letterbox_maps_box_non_square():
    img = np.zeros((50, 100, 3), np.uint8)
    img[10:30, 20:60] = 255  # a white box x 20..60, y 10..30
    out, box = letterbox(img, 64)
    r, pw, ph = box.ratio, box.left, box.top
    assert out.shape == (64, 64, 3) and r == pytest.approx(0.64) and (pw, ph) == (0.0, 16.0)
    assert out[0, 0, 0] == 114 and out[63, 63, 0] == 114
    ys, xs = np.nonzero(out[:, :, 0] > 200)
    assert xs.min() == pytest.approx(20 * r + pw, abs=1) and xs.max() + 1 == pytest.approx(60 * r + pw, abs=1)
    assert ys.min() == pytest.approx(10 * r + ph, abs=1) and ys.max() + 1 == pytest.approx(30 * r + ph, abs=1)


def test_detection_dataset_item_maps_labels(tmp_path):
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :, 2] = 255  # red in BGR
    path = tmp_path / "images" / "a.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), img)
    write_labels(path, ["2 0.4 0.4 0.4 0.4"])  # x 20..60, y 10..30 in pixels
    (sample,) = scan_split([path], nc=3).samples
    item = DetectionDataset([sample], 64)[0]
    assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, 64, 64)
    assert item["img"][0, 32, 32] == 255 and item["img"][2, 32, 32] == 0  # RGB order
    assert item["ori_shape"] == (50, 100) and item["ratio_pad"] == (0.64, (0.0, 16.0))
    assert item["cls"].tolist() == [[2.0]]
    x1, y1 = 20 * 0.64 / 64, (10 * 0.64 + 16) / 64
    x2, y2 = 60 * 0.64 / 64, (30 * 0.64 + 16) / 64
    np.testing.assert_allclose(item["bboxes"].numpy(), [[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]], atol=1e-5)


def test_image_folder_dataset(tmp_path):
    item = ImageFolderDataset([write_image(tmp_path / "a.jpg", 30, 60)], 32)[0]
    assert item["img"].shape == (3, 32, 32) and item["cls"].shape == (0, 1) and item["bboxes"].shape == (0, 4)


# --- augmentation ---------------------------------------------------------------------------------------------------

def random_case(seed: int):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    n = 20
    wh = rng.uniform(0.02, 0.6, (n, 2))
    cxy = rng.uniform(wh / 2, 1 - wh / 2)
    return img, np.column_stack([rng.integers(0, 3, n), cxy, wh]).astype(np.float32)


def test_augment_keeps_labels_in_unit_range():
    cfg = AugmentConfig(fliplr=0.5, hsv=0.5, scale=0.5)
    for seed in range(30):
        img, labels = random_case(seed)
        out, lb = augment(img, labels, cfg, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8 and lb.dtype == np.float32
        assert np.all(lb[:, 1:] >= 0) and np.all(lb[:, 1:] <= 1)
        assert np.all(lb[:, 1:3] - lb[:, 3:5] / 2 >= -1e-6) and np.all(lb[:, 1:3] + lb[:, 3:5] / 2 <= 1 + 1e-6)
        assert np.all(lb[:, 3:5] * 64 >= 2 - 1e-4)


def test_flip_mirrors_cx():
    img, labels = random_case(1)
    out, lb = augment(img, labels, AugmentConfig(fliplr=1.0, hsv=0.0, scale=0.0), np.random.default_rng(0))
    np.testing.assert_allclose(lb[:, 1], 1 - labels[:, 1], atol=1e-6)
    np.testing.assert_array_equal(lb[:, [0, 2, 3, 4]], labels[:, [0, 2, 3, 4]])
    np.testing.assert_array_equal(out, img[:, ::-1])


def test_zoom_out_shrinks_boxes_about_centre():
    img, _ = random_case(2)
    labels = np.array([[0, 0.25, 0.5, 0.2, 0.2]], np.float32)
    rng = np.random.default_rng(0)
    s = np.random.default_rng(0).uniform(0.5, 1.5)
    _, lb = augment(img, labels, AugmentConfig(fliplr=0.0, hsv=0.0, scale=0.5), rng)
    np.testing.assert_allclose(lb[0, 1:], [0.5 + (0.25 - 0.5) * s, 0.5, 0.2 * s, 0.2 * s], atol=1e-5)


def test_augment_same_seed_same_output_and_dataset_epochs(tmp_path):
    img, labels = random_case(3)
    cfg = AugmentConfig()
    a = augment(img, labels, cfg, np.random.default_rng(7))
    b = augment(img, labels, cfg, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    spec = read_data_yaml(make_dataset(tmp_path, 3, 1))
    samples = load_split(spec, "train").samples
    ds1, ds2 = DetectionDataset(samples, 64, cfg, seed=5), DetectionDataset(samples, 64, cfg, seed=5)
    assert all(torch.equal(ds1[i]["img"], ds2[i]["img"]) for i in range(3))
    ds2.epoch = 1
    assert not all(torch.equal(ds1[i]["img"], ds2[i]["img"]) for i in range(3))


# --- collate and the Ultralytics loss -------------------------------------------------------------------------------

def test_collate_shapes_and_batch_idx(tmp_path):
    spec = read_data_yaml(make_dataset(tmp_path, 4, 1))
    ds = DetectionDataset(load_split(spec, "train").samples, 64)
    batch = collate([ds[i] for i in range(4)])
    counts = [len(ds[i]["cls"]) for i in range(4)]
    assert batch["img"].shape == (4, 3, 64, 64) and batch["img"].dtype == torch.uint8
    assert batch["batch_idx"].dtype == torch.float32
    assert batch["batch_idx"].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    assert batch["cls"].shape == (sum(counts), 1) and batch["bboxes"].shape == (sum(counts), 4)
    assert len(batch["im_file"]) == len(batch["ori_shape"]) == len(batch["ratio_pad"]) == 4
    empty = collate([ds[0]])  # a background frame only
    assert empty["cls"].shape == (0, 1) and empty["bboxes"].shape == (0, 4) and empty["batch_idx"].shape == (0,)


@pytest.fixture(scope="module")
def tiny_model():
    import yaml

    from shared.env import prepare_ultralytics

    prepare_ultralytics()
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel

    cfg_path = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    cfg = copy.deepcopy(yaml.safe_load(cfg_path.read_text()))
    cfg.update(scale="n", scales={"n": [0.33, 0.0625, 1024]}, nc=3)
    torch.manual_seed(0)
    model = DetectionModel(cfg, ch=3, nc=3, verbose=False)
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    return model


@pytest.mark.parametrize("with_aug", [False, True])
def test_collated_batch_gives_finite_v8_loss(tmp_path, tiny_model, with_aug):
    from ultralytics.utils.loss import v8DetectionLoss

    spec = read_data_yaml(make_dataset(tmp_path, 4, 1))
    ds = DetectionDataset(load_split(spec, "train").samples, 64, AugmentConfig() if with_aug else None)
    batch = collate([ds[i] for i in range(len(ds))])
    assert len(batch["cls"]) > 0
    batch["img"] = batch["img"].float() / 255
    tiny_model.train()
    preds = tiny_model(batch["img"])
    loss, items = v8DetectionLoss(tiny_model)(preds, batch)
    assert torch.isfinite(loss).all() and loss.sum() > 0
    loss.sum().backward()
