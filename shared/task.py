"""Task glue: data loaders from a data.yaml, and train/evaluate a model on a split, used by CLI and apps."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from shared.config import Config
from shared.data.augment import AugmentConfig
from shared.data.dataset import DetectionDataset, collate, load_split, read_data_yaml
from shared.evaluate import EvalResult, TorchPredictor, evaluate
from shared.snapshot.inference import NmsSettings
from shared.train import ExtraLoss, Progress, TrainResult, TrainSpec, train


def set_threads(n: int) -> None:
    # Camera boards and this machine have few cores; oversubscription costs more than it gives.
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def augment_config(cfg: Config) -> AugmentConfig | None:
    t = cfg.train
    return AugmentConfig(fliplr=t.fliplr, hsv=t.hsv, scale=t.scale) if t.augment else None


def samples_of(data_yamls: Path | str | list, split: str) -> list:
    """Validated samples of one split, pooled over one or several data.yaml files."""
    samples = []
    for data_yaml in data_yamls if isinstance(data_yamls, list) else [data_yamls]:
        spec = read_data_yaml(data_yaml)
        if split not in spec.splits:
            raise KeyError(f"{data_yaml}: no split '{split}' (has {sorted(spec.splits)})")
        samples += load_split(spec, split).samples
    return samples


def make_loader(data_yaml: Path | str | list, split: str, cfg: Config, train_mode: bool, seed: int | None = None,
                batch: int | None = None, extra_samples: list | None = None) -> DataLoader:
    """A loader over one split (plus extra samples); shuffled and augmented when training, seeded."""
    seed = cfg.seed if seed is None else seed
    samples = samples_of(data_yaml, split) + list(extra_samples or [])
    ds = DetectionDataset(samples, cfg.data.imgsz, augment_config(cfg) if train_mode else None, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    bs = batch or (cfg.train.batch if train_mode else cfg.eval.batch)
    return DataLoader(ds, batch_size=bs, shuffle=train_mode, collate_fn=collate, generator=gen, num_workers=0)


def names_of(data_yaml: Path | str | list) -> list[str]:
    return read_data_yaml(data_yaml[0] if isinstance(data_yaml, list) else data_yaml).names


def camera_yaml(cfg: Config, k: int) -> Path:
    """data.yaml of camera k in the generated world (simulation partitions map to cameras), generated on first use."""
    from shared.data.world import ensure_camera

    path = Path(cfg.data.root) / f"cam{k:02d}" / "data.yaml"
    return path if path.exists() else ensure_camera(Path(cfg.data.root), k)


def base_yaml(cfg: Config) -> Path:
    return Path(cfg.data.root) / "base" / "data.yaml"


def nms_settings(cfg: Config) -> NmsSettings:
    return NmsSettings(conf=cfg.eval.conf, iou=cfg.eval.iou, max_det=cfg.eval.max_det)


def fit(model, data_yaml: Path | str | list, cfg: Config, spec: TrainSpec, seed: int | None = None,
        extra_loss: ExtraLoss | None = None, progress: Progress | None = None, aux=None,
        extra_samples: list | None = None, anchor: list | None = None,
        correction: list | None = None) -> TrainResult:
    """Train on the train split(s) of `data_yaml`, plus `extra_samples` (e.g. teacher pseudo-labelled frames);
    `anchor`: the parameters a proximal term pulls toward; `correction`: SCAFFOLD's (shared.train.train)."""
    set_threads(cfg.train.threads)
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    loader = make_loader(data_yaml, "train", cfg, True, seed, extra_samples=extra_samples)
    return train(model, loader, spec, extra_loss, progress, aux, anchor, correction)


def score(model, data_yaml: Path | str | list, cfg: Config, split: str = "val",
          progress: Callable[[int], None] | None = None) -> EvalResult:
    set_threads(cfg.train.threads)
    loader = make_loader(data_yaml, split, cfg, False)
    return evaluate(TorchPredictor(model, nms_settings(cfg)), loader, names_of(data_yaml), progress)


def eval_cameras(cfg: Config) -> list[int]:
    """The cameras whose val split the server scores (fed.central-cameras): all, or that many spread evenly, so a
    256-camera simulation neither scores nor generates 256 cameras' frames for every central evaluation."""
    n, m = cfg.data.cameras, cfg.fed.central_cameras
    if m <= 0 or m >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})


def score_cameras(model, cfg: Config, cameras: list[int] | None = None) -> dict[str, float]:
    """Central evaluation on held-out camera data: pooled val mAP, and the mean of per-camera val mAPs."""
    cams = cameras if cameras is not None else eval_cameras(cfg)
    yamls = [camera_yaml(cfg, k) for k in cams]
    pooled = score(model, yamls, cfg)
    per = [score(model, y, cfg) for y in yamls]
    return {"map50": pooled.map50, "map": pooled.map, "cam-map50": sum(r.map50 for r in per) / len(per),
            "cam-map": sum(r.map for r in per) / len(per)}


def distill_fit(student, teacher, data_yaml, cfg: Config, spec: TrainSpec, seed: int | None = None,
                extra_samples: list | None = None, progress: Progress | None = None,
                anchor: list | None = None, correction: list | None = None) -> TrainResult:
    """fit() with the configured distillation terms from `teacher` added to the detection loss."""
    from shared.distill import Distiller, weights_from

    # The adapters' random start comes from the seed too, not from whatever drew on torch's RNG before this call: a
    # snapshot search's steps recovered differently from run to run (README: searched compression).
    torch.manual_seed(cfg.seed if seed is None else seed)
    distiller = Distiller(teacher, student, weights_from(cfg.distill), cfg.data.imgsz)
    return fit(student, data_yaml, cfg, spec, seed, distiller.extra_loss(), progress, aux=distiller.adapters,
               extra_samples=extra_samples, anchor=anchor, correction=correction)
