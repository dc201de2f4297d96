"""Bounded on-device frame store: keep sampled camera/video frames as a YOLO-layout pool for local training."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

SUFFIX = ".jpg"


class FrameStore:
    """ROOT/pool/images holds at most `max_frames` JPEGs (oldest evicted first); ROOT/data.yaml points at them.

    Frames labelled on site go to ROOT/train and ROOT/val in YOLO layout (images/ + labels/); they are never
    evicted. The SuperNode's node config names this folder as `data-path`; with a `teacher-path` the client
    pseudo-labels the pool, without one it trains on the labelled frames alone.
    """

    def __init__(self, root: Path | str, names: list[str], max_frames: int = 500):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.root, self.max_frames = Path(root), max_frames
        self.pool = self.root / "pool" / "images"
        for d in (self.pool, self.root / "train" / "images", self.root / "val" / "images"):
            d.mkdir(parents=True, exist_ok=True)
        yaml_path = self.root / "data.yaml"
        if not yaml_path.exists():
            listed = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
            text = f"path: .\ntrain: train/images\nval: val/images\npool: pool/images\nnames:\n{listed}\n"
            tmp = yaml_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, yaml_path)
        self._seq = self._last_seq()

    def _last_seq(self) -> int:
        seqs = [int(p.stem.split("_")[0]) for p in self.pool.glob(f"*{SUFFIX}") if p.stem.split("_")[0].isdigit()]
        return max(seqs, default=0)

    def frames(self) -> list[Path]:
        """Stored frames, oldest first (names carry a sequence number that survives restarts)."""
        return sorted(self.pool.glob(f"*{SUFFIX}"))

    def add(self, img: np.ndarray, quality: int = 90) -> Path:
        """Write one frame atomically (a reader never sees half a JPEG), then evict beyond the bound."""
        ok, buf = cv2.imencode(SUFFIX, img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("frame could not be encoded as JPEG")
        self._seq += 1
        path = self.pool / f"{self._seq:09d}_{int(time.time())}{SUFFIX}"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
        for old in self.frames()[:-self.max_frames]:
            old.unlink(missing_ok=True)
        return path


def changed(a: np.ndarray | None, b: np.ndarray, threshold: float) -> bool:
    """Mean absolute difference of small grey thumbnails: skips near-duplicate frames of a static scene."""
    if a is None:
        return True
    return float(np.abs(thumb(a).astype(np.int16) - thumb(b).astype(np.int16)).mean()) >= threshold


def thumb(img: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    return cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)


def collect(source: Iterable[tuple[str, np.ndarray]], store: FrameStore, every_s: float = 2.0,
            min_change: float = 4.0, max_new: int | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    """Store frames from `source` at most once per `every_s` seconds and only when the scene changed.

    Returns how many frames were stored; stops after `max_new` (None: when the source ends).
    """
    stored, last_time, last_img = 0, -float("inf"), None
    for _frame_id, img in source:
        now = clock()
        if now - last_time < every_s or not changed(last_img, img, min_change):
            continue
        store.add(img)
        stored, last_time, last_img = stored + 1, now, img
        if max_new is not None and stored >= max_new:
            break
    return stored
