"""Client-side task code: which data a node has, and local fine-tuning / evaluation of the global student."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from shared import models, personal, task
from shared.arrays import is_packed, layout_of, to_record, to_state_dict, unpack
from shared.config import Config
from shared.run_dir import RunDir
from shared.train import TrainSpec, estimate_bn_stats


log = logging.getLogger("fedcam.client")
FINETUNED_KEY = "fedcam-finetuned"  # context.state entry of the whole model a camera runs (keep-finetuned, Ditto)


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


def personal_file(node_config: Mapping[str, Any], cfg: Config, model_yaml: Mapping, mode: str) -> Path:
    """A device keeps its personal part beside its frame store (or in node config `personal-dir`), a simulated
    camera under the run folder (so both survive a SuperNode restart and --resume)."""
    return personal.part_file(_state_folder(node_config, cfg), model_yaml, mode, _camera(node_config))


def wire_file(node_config: Mapping[str, Any], cfg: Config, model_yaml: Mapping) -> Path:
    """Where the camera keeps its copy of the global model and its unsent remainder (fed.compress)."""
    return personal.part_file(_state_folder(node_config, cfg), model_yaml, "wire", _camera(node_config)).with_suffix(
        ".npz")


def _state_folder(node_config: Mapping[str, Any], cfg: Config) -> Path:
    if "personal-dir" in node_config:
        return Path(str(node_config["personal-dir"]))
    if "data-path" in node_config:
        return node_data(node_config, cfg).parent / "personal"
    return RunDir(cfg.run_dir).personal


def _camera(node_config: Mapping[str, Any]) -> str:
    return str(node_config.get("camera-id", node_config.get("partition-id", "device")))


class PersonalPart:
    """A camera's personal part (fed.personal): in the node's context.state while it runs, on disk across
    restarts. A camera without one yet (it joined late, or the run is new) starts from the global model's.
    With fed.keep-finetuned it also keeps the whole model it fine-tuned last, with fed.ditto-lambda its own
    Ditto model, and runs that."""

    def __init__(self, model, mode: str, state, path: Path, finetuned: bool = False, finetuned_path: Path | None = None):
        self.state, self.path, self.finetuned, self.finetuned_path = state, path, finetuned, finetuned_path
        self.keys = personal.personal_keys(model, mode) if mode != "none" else []

    def restore(self, model) -> str:
        """Put the kept part into `model`; where it came from: 'state', 'disk' or 'global' (none kept yet)."""
        return self._load(model, personal.STATE_KEY, self.path, self.keys)

    def runs(self, model) -> str:
        """Make `model` what this camera runs: its last fine-tuned model (fed.keep-finetuned) if it has one, else
        the global model with its personal part."""
        if self.finetuned and self.finetuned_path is not None:
            source = self._load(model, FINETUNED_KEY, self.finetuned_path, list(model.state_dict()))
            if source != "global":
                return source
        return self.restore(model)

    def keep(self, model, runs=None) -> None:
        """Keep `model`'s personal part and, with a whole model of its own, `runs` (default: `model`)."""
        if self.keys:
            part = personal.part_of(model, self.keys)
            personal.save_part(self.path, part)
            self.state[personal.STATE_KEY] = to_record(part)
        if self.finetuned and self.finetuned_path is not None:
            runs = model if runs is None else runs
            whole = personal.part_of(runs, list(runs.state_dict()))
            personal.save_part(self.finetuned_path, whole)
            self.state[FINETUNED_KEY] = to_record(whole)

    def shared(self, model):
        """The reply's weights: everything but the personal part."""
        keep = set(self.keys)
        return to_record({k: v for k, v in model.state_dict().items() if k not in keep})

    def _load(self, model, state_key: str, path: Path, keys: list[str]) -> str:
        if not keys:
            return "global"
        source = "state" if state_key in self.state else "disk"
        try:
            if source == "state":
                part = to_state_dict(self.state[state_key])
            elif (part := personal.load_part(path)) is None:
                return "global"
            personal.apply_part(model, part, keys)
        except personal.PersonalError as err:  # set aside, never overwritten: the camera starts again from global
            aside = path.with_suffix(".unusable")
            if source == "disk":
                path.replace(aside)
            log.warning("personal part from %s not used (%s); starting from the global model%s", source, err,
                        f", file kept as {aside}" if source == "disk" else "")
            return "global"
        return source


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


def adapt_bn(model, data_yaml: Path, cfg: Config) -> int:
    """AdaBN on this camera: BatchNorm statistics from its own train and pool frames (no labels used)."""
    splits = [s for s in ("train", "pool") if split_size(data_yaml, s)]
    if not splits:
        return 0
    extra = [x for s in splits[1:] for x in task.samples_of(data_yaml, s)]
    loader = task.make_loader(data_yaml, splits[0], cfg, False, batch=cfg.train.batch, extra_samples=extra)
    return estimate_bn_stats(model, loader)


def local_finetune(model, data_yaml: Path, cfg: Config, config: Mapping[str, Any], teacher: str = "",
                   anchor: list | None = None, mu: float = 0.0, control=None) -> dict[str, float]:
    """Fine-tune in place on this camera's train split (plus, with a teacher, its pseudo-labelled pool and the
    distillation terms); metrics for the server (Flower's num-examples first). With `anchor`, a proximal term
    mu/2·||w − anchor||² (Ditto: the camera's own model pulled toward the global one); with `control`
    (client.scaffold.ControlVariate), SCAFFOLD's corrected steps, after which the control variate moves on."""
    spec = TrainSpec.local(cfg.train, cfg.fed, config)  # the server's plan for this round (shared.train.local_plan)
    spec = replace(spec, proximal_mu=mu) if anchor is not None else spec
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seed = int(config["seed"])
    # A device's frame store may hold only unlabelled frames: then the teacher's pseudo-labels are all it has.
    labelled = data_yaml if split_size(data_yaml, "train") else []
    pool = list(pseudo_labelled_pool(teacher, data_yaml, cfg)) if teacher else []
    if not labelled and not pool:
        raise NodeConfigError(f"{data_yaml}: no labelled train frames" + (
            " and the teacher found nothing in the pool" if teacher else " and no teacher-path to pseudo-label its pool"))
    correction = control.correction(model) if control is not None else None
    if teacher:
        result = task.distill_fit(model, load_teacher(teacher), labelled, cfg, spec, seed, extra_samples=pool,
                                  anchor=anchor, correction=correction)
    else:
        result = task.fit(model, labelled, cfg, spec, seed=seed, anchor=anchor, correction=correction)
    if control is not None:
        control.advance(model, result.mean_grad)
    return {"num-examples": result.examples, "pseudo-labelled": len(pool), "loss": sum(result.losses) / max(1, len(result.losses)),
            "last-loss": result.losses[-1] if result.losses else 0.0, "steps": result.steps, "lr": spec.lr,
            "train-seconds": result.seconds, "update-norm": update_norm(before, model)}


def split_size(data_yaml: Path, split: str) -> int:
    from shared.data.dataset import read_data_yaml

    return len(read_data_yaml(data_yaml).splits.get(split, []))


def local_evaluate(model, data_yaml: Path, cfg: Config) -> dict[str, float]:
    if not split_size(data_yaml, "val"):  # a frame store without labelled val frames: weight 0 in the average
        return {"num-examples": 0, "map50": 0.0, "map": 0.0}
    result = task.score(model, data_yaml, cfg, "val")
    return {"num-examples": result.images, "map50": result.map50, "map": result.map}
