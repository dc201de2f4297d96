"""Read and validate Ultralytics-format detection datasets into letterboxed, collatable torch samples."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from shared.data.augment import AugmentConfig, augment
from shared.snapshot.inference import letterbox, to_chw_rgb

LOG = logging.getLogger(__name__)
IMG_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
# Top-level data.yaml keys that are never splits; any other key naming an existing folder/list is one.
META_KEYS = {"path", "names", "nc", "download", "channels", "yaml_file", "kpt_shape", "flip_idx"}
STRICT_SPLITS = ("train", "val", "test", "pool")  # when present, these must resolve or we raise
COORD_TOL = 1e-6  # labels written as float32 may overshoot [0,1] by rounding; beyond this it is a real error
MAX_REASONS_LOGGED = 3


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Sample:
    image: Path
    labels: np.ndarray  # (n,5) float32: cls, cx, cy, w, h normalized to the original image


@dataclass(frozen=True)
class DataSpec:
    root: Path
    names: list[str]
    splits: dict[str, list[Path]]  # split -> image files


@dataclass
class ScanReport:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason naming file:line)


def label_path(image: Path | str) -> Path:
    """Ultralytics' rule: the last /images/ becomes /labels/ and the suffix becomes .txt."""
    s = str(image)
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(b.join(s.rsplit(a, 1)) if a in s else s).with_suffix(".txt")


def _names(raw, yaml_path: Path) -> list[str]:
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    if isinstance(raw, dict) and raw:
        # Class ids index the names, so a dict with holes would silently shift every later class.
        keys = sorted(raw)
        if keys != list(range(len(keys))):
            raise DataError(f"{yaml_path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        return [str(raw[k]) for k in keys]
    raise DataError(f"{yaml_path}: 'names' missing or empty (need a list or a dict id -> name)")


def _split_images(value, key: str, root: Path, yaml_path: Path, strict: bool) -> list[Path] | None:
    """Image files of one split entry (folder, .txt list, single image or a list of those)."""
    images: list[Path] = []
    for entry in value if isinstance(value, list) else [value]:
        if not isinstance(entry, str | os.PathLike):
            if strict:
                raise DataError(f"{yaml_path}: split '{key}' must be a path or a list of paths, got {entry!r}")
            return None
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_SUFFIXES and f.is_file())
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            # Relative entries resolve against the list's folder, so a dataset folder can be moved whole.
            images += [q if q.is_absolute() else (p.parent / q) for q in map(Path, filter(None, lines))]
        elif p.is_file() and p.suffix.lower() in IMG_SUFFIXES:
            images.append(p)
        elif strict:
            raise DataError(f"{yaml_path}: split '{key}' folder not found: {p}")
        else:
            return None  # an unknown key whose value is not a path: metadata, not a split
    return images


def read_data_yaml(path: Path | str) -> DataSpec:
    """Parse a data.yaml into class names and per-split image lists (labels are read by scan_split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data.yaml not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping with 'names' and split keys, got {type(raw).__name__}")
    names = _names(raw.get("names"), path)
    if raw.get("nc") is not None and raw["nc"] != len(names):
        raise DataError(f"{path}: nc={raw['nc']} but {len(names)} names")
    if raw.get("path") is not None and not isinstance(raw["path"], str):
        raise DataError(f"{path}: 'path' must be a string, got {raw['path']!r}")
    root = Path(raw["path"]).expanduser() if raw.get("path") else path.parent
    # Absolute so im_file and error messages stay meaningful whatever the working directory.
    root = (root if root.is_absolute() else path.parent / root).absolute()
    splits: dict[str, list[Path]] = {}
    for key, value in raw.items():
        if key in META_KEYS or value is None:  # `test:` left empty is common and means "no split"
            continue
        images = _split_images(value, str(key), root, path, strict=key in STRICT_SPLITS)
        if images is not None:
            splits[str(key)] = images
    if not splits:
        raise DataError(f"{path}: no splits (expected at least 'train' and 'val')")
    return DataSpec(root=root, names=names, splits=splits)


def parse_label_file(path: Path, nc: int) -> np.ndarray:
    """(n,5) float32 labels of one file; a missing file is a background frame with no objects."""
    path = Path(path)
    if not path.exists():
        return np.zeros((0, 5), dtype=np.float32)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable label file: {e}") from e
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 5 fields 'cls cx cy w h', got {len(fields)}: {line.strip()!r}")
        try:
            row = [float(f) for f in fields]
        except ValueError:
            raise DataError(f"{where}: non-numeric field in {line.strip()!r}") from None
        if not all(np.isfinite(row)):
            raise DataError(f"{where}: non-finite value in {line.strip()!r}")
        c, box = row[0], row[1:]
        if c != int(c) or not 0 <= c < nc:
            raise DataError(f"{where}: class id {fields[0]} is not an integer in [0, {nc - 1}]")
        if any(v < -COORD_TOL or v > 1 + COORD_TOL for v in box):
            raise DataError(f"{where}: coordinates must be normalized to [0, 1], got {' '.join(fields[1:])}")
        if box[2] <= 0 or box[3] <= 0:
            raise DataError(f"{where}: box width and height must be positive, got w={fields[3]} h={fields[4]}")
        rows.append(row)
    if not rows:
        return np.zeros((0, 5), dtype=np.float32)
    labels = np.array(rows, dtype=np.float64)
    # Clip the box extents (not only centre/size) so a box never spills outside its image.
    xyxy = np.clip(np.concatenate([labels[:, 1:3] - labels[:, 3:5] / 2, labels[:, 1:3] + labels[:, 3:5] / 2], 1), 0, 1)
    labels[:, 1:3], labels[:, 3:5] = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
    # Duplicate lines would double-weight a box in the loss and add a false negative to mAP.
    _, first = np.unique(labels, axis=0, return_index=True)
    return labels[np.sort(first)].astype(np.float32)


def load_image(path: Path) -> np.ndarray:
    """BGR uint8 image; DataError if missing, unreadable, truncated or corrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable image: {e}") from e
    # Some decoders return a grey-filled image for a truncated file instead of failing, so check the
    # end-of-image markers ourselves (trailing zero padding from some cameras is tolerated).
    tail = data.rstrip(b"\x00")
    if data[:3] == b"\xff\xd8\xff" and not tail.endswith(b"\xff\xd9"):
        raise DataError(f"{path}: truncated JPEG (no end-of-image marker)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail[-12:]:
        raise DataError(f"{path}: truncated PNG (no IEND chunk)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None or img.size == 0:
        raise DataError(f"{path}: not a decodable image (corrupt or not an image)")
    return img


def scan_split(images: list[Path], nc: int, check_images: bool = True, source: str | None = None) -> ScanReport:
    """Validate images and labels; bad samples are skipped and reported, not fatal unless none remain."""
    report = ScanReport()
    for image in map(Path, images):
        try:
            if check_images:
                load_image(image)  # a full decode is the only reliable corruption check
            elif not image.is_file():
                raise DataError(f"{image}: image file not found")
        except DataError as e:
            report.skipped.append((image, str(e)))
            continue
        lp = label_path(image)
        try:
            report.samples.append(Sample(image, parse_label_file(lp, nc)))
        except DataError as e:
            report.skipped.append((lp, str(e)))
    try:
        where = source or (os.path.commonpath([str(Path(p).parent) for p in images]) if images else "[]")
    except ValueError:  # mixed absolute/relative paths have no common folder
        where = f"{len(images)} images"
    reasons = "; ".join(r for _, r in report.skipped[:MAX_REASONS_LOGGED])
    if not report.samples:
        first = f", first: {reasons}" if reasons else ""
        raise DataError(f"no usable samples in {where}: {len(report.skipped)} skipped{first}")
    if report.skipped:
        # One summary line: a warning per bad file would bury the log of a large camera dataset.
        LOG.warning("%s: skipped %d of %d samples; first: %s", where, len(report.skipped), len(images), reasons)
    return report


def load_split(spec: DataSpec, split: str, check_images: bool = True) -> ScanReport:
    if split not in spec.splits:
        raise DataError(f"{spec.root}: no split '{split}' (has {sorted(spec.splits)})")
    return scan_split(spec.splits[split], len(spec.names), check_images, source=f"split '{split}' of {spec.root}")


class DetectionDataset(torch.utils.data.Dataset):
    """Labelled samples letterboxed to imgsz, optionally augmented reproducibly per (seed, epoch, index)."""

    def __init__(self, samples: list[Sample], imgsz: int, augment: AugmentConfig | None = None, seed: int = 0):
        self.samples, self.imgsz, self.augment, self.seed = list(samples), int(imgsz), augment, int(seed)
        self.epoch = 0  # the training loop sets this so each epoch draws new, yet reproducible, augmentations

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = load_image(s.image)
        h0, w0 = img.shape[:2]
        img, box = letterbox(img, self.imgsz)  # the snapshot's own letterbox: what a camera will feed
        labels = s.labels.astype(np.float32).reshape(-1, 5).copy()
        # Map normalized boxes into the letterboxed frame using the actual resized size (exact pixels).
        labels[:, 1] = (labels[:, 1] * box.width + box.left) / self.imgsz
        labels[:, 2] = (labels[:, 2] * box.height + box.top) / self.imgsz
        labels[:, 3] *= box.width / self.imgsz
        labels[:, 4] *= box.height / self.imgsz
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, int(i)))
            img, labels = augment(img, labels, self.augment, rng)
        chw = to_chw_rgb(img)
        return dict(img=torch.from_numpy(chw), cls=torch.from_numpy(labels[:, :1].copy()),
                    bboxes=torch.from_numpy(labels[:, 1:5].copy()), im_file=str(s.image), ori_shape=(h0, w0),
                    ratio_pad=(box.ratio, (float(box.left), float(box.top))))


class ImageFolderDataset(DetectionDataset):
    """Unlabelled frames (e.g. a camera's pool split) in the same item format, with empty cls/bboxes."""

    def __init__(self, images: list[Path | str], imgsz: int):
        # Same loading path as labelled data, so pool frames are letterboxed exactly like training frames.
        super().__init__([Sample(Path(p), np.zeros((0, 5), np.float32)) for p in images], imgsz)
        self.images = [s.image for s in self.samples]


def collate(batch: list[dict]) -> dict:
    """Stack images and concatenate targets with batch_idx, the layout v8DetectionLoss consumes."""
    return dict(
        img=torch.stack([b["img"] for b in batch]),
        batch_idx=torch.cat([torch.full((len(b["cls"]),), i, dtype=torch.float32) for i, b in enumerate(batch)]),
        cls=torch.cat([b["cls"].reshape(-1, 1) for b in batch]).float(),
        bboxes=torch.cat([b["bboxes"].reshape(-1, 4) for b in batch]).float(),
        im_file=[b["im_file"] for b in batch],
        ori_shape=[b["ori_shape"] for b in batch],
        ratio_pad=[b["ratio_pad"] for b in batch],
    )
