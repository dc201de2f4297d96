"""Client-side task code: which data a node has, and local fine-tuning / evaluation of the global student."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from shared import models, task
from shared.arrays import is_packed, layout_of, to_record, to_state_dict, unpack
from shared.config import Config
from shared.train import TrainSpec


class NodeConfigError(ValueError):
    """The node was started without a usable data source."""


def node_data(node_config: Mapping[str, Any], cfg: Config) -> Path:
    """A device names its data with `data-path`; a simulated node is camera `partition-id` of the world."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
        path = path / "data.yaml" if path.is_dir() else path
        if not path.exists():
            raise NodeConfigError(f"data-path {path} does not exist on this node")
        return path
    if "partition-id" in node_config:
        return task.camera_yaml(cfg, int(node_config["partition-id"]))
    raise NodeConfigError("node config needs 'data-path' (device) or 'partition-id' (simulation)")


def global_model(arrays, config: Mapping[str, Any]):
    """Rebuild the student the server sent: its yaml and class names travel in the config record."""
    model = models.build(json.loads(str(config["model-yaml"])), list(config["names"]))
    if is_packed(arrays):  # the layout is this model's own: the server built it from the same yaml
        arrays = unpack(arrays, layout_of(to_record(model)))
    model.load_state_dict(to_state_dict(arrays))
    return model


def update_norm(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    sq = sum(float(((v.float() - before[k].float()) ** 2).sum()) for k, v in model.state_dict().items()
             if v.is_floating_point())
    return sq ** 0.5


def teacher_path(node_config: Mapping[str, Any], cfg: Config) -> str:
    """A device names its own teacher (`teacher-path`); simulated cameras share model.teacher-checkpoint."""
    if "teacher-path" in node_config:
        return str(node_config["teacher-path"])
    return cfg.model.teacher_checkpoint if cfg.distill.on_clients else ""


@functools.lru_cache(maxsize=2)
def load_teacher(path: str):
    return models.load(path)  # stays on this device: it is never put in a reply


@functools.lru_cache(maxsize=8)
def pseudo_labelled_pool(path: str, data_yaml: Path, cfg: Config) -> tuple:
    """The teacher's labels for this camera's unlabelled pool; computed once per process (the teacher is fixed)."""
    from shared.distill import pseudo_label

    if not split_size(data_yaml, "pool"):
        return ()
    loader = task.make_loader(data_yaml, "pool", cfg, False)
    settings = replace(task.nms_settings(cfg), conf=cfg.distill.pseudo_conf)  # the run's NMS, the teacher's bar
    return tuple(s for s in pseudo_label(load_teacher(path), loader, settings) if len(s.labels))


def local_finetune(model, data_yaml: Path, cfg: Config, config: Mapping[str, Any],
                   teacher: str = "") -> dict[str, float]:
    """Fine-tune in place on this camera's train split (plus, with a teacher, its pseudo-labelled pool and the
    distillation terms); metrics for the server (Flower's num-examples first)."""
    spec = TrainSpec.local(cfg.train, cfg.fed, config)  # the server's plan for this round (shared.train.local_plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seed = int(config["seed"])
    # A device's frame store may hold only unlabelled frames: then the teacher's pseudo-labels are all it has.
    labelled = data_yaml if split_size(data_yaml, "train") else []
    pool = list(pseudo_labelled_pool(teacher, data_yaml, cfg)) if teacher else []
    if not labelled and not pool:
        raise NodeConfigError(f"{data_yaml}: no labelled train frames" + (
            " and the teacher found nothing in the pool" if teacher else " and no teacher-path to pseudo-label its pool"))
    if teacher:
        result = task.distill_fit(model, load_teacher(teacher), labelled, cfg, spec, seed, extra_samples=pool)
    else:
        result = task.fit(model, labelled, cfg, spec, seed=seed)
    return {"num-examples": result.examples, "pseudo-labelled": len(pool), "loss": sum(result.losses) / max(1, len(result.losses)),
            "last-loss": result.losses[-1] if result.losses else 0.0, "steps": result.steps,
            "train-seconds": result.seconds, "update-norm": update_norm(before, model)}


def split_size(data_yaml: Path, split: str) -> int:
    from shared.data.dataset import read_data_yaml

    return len(read_data_yaml(data_yaml).splits.get(split, []))


def local_evaluate(model, data_yaml: Path, cfg: Config) -> dict[str, float]:
    if not split_size(data_yaml, "val"):  # a frame store without labelled val frames: weight 0 in the average
        return {"num-examples": 0, "map50": 0.0, "map": 0.0}
    result = task.score(model, data_yaml, cfg, "val")
    return {"num-examples": result.images, "map50": result.map50, "map": result.map}
