"""Typed, frozen run configuration read from `[tool.flwr.app.config]` (the only place defaults live)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from shared.fed_config import (ATTACKS, COMPRESS_MODES, DP_MODES, DP_STRATEGIES, PERSONAL_MODES,  # noqa: F401
                               DrillConfig, FedConfig)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@dataclass(frozen=True)
class DataConfig:
    root: str
    cameras: int
    held_out: int
    classes: str
    imgsz: int
    base_train: int
    base_val: int
    camera_train: int
    camera_val: int
    camera_pool: int
    shift: bool

    @property
    def names(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",") if c.strip()]

    @property
    def held_out_cameras(self) -> list[int]:
        """Camera ids that never take part in training: the world's last `held-out` cameras."""
        return list(range(self.cameras, self.cameras + self.held_out))


@dataclass(frozen=True)
class ModelConfig:
    family: str
    student_scale: str
    student_width: float
    student_activation: str
    teacher_scale: str
    student_checkpoint: str
    teacher_checkpoint: str
    start: str
    student_prune: float

    def __post_init__(self):
        if not 0.0 <= self.student_prune < 1.0:
            raise ValueError(f"config key 'model.student-prune': {self.student_prune} is not in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch: int
    optimizer: str
    lr: float
    lr_final: float
    weight_decay: float
    momentum: float
    warmup_steps: int
    augment: bool
    fliplr: float
    hsv: float
    scale: float
    threads: int


@dataclass(frozen=True)
class DistillConfig:
    response: float
    box: float
    feature: float
    attention: float
    temperature: float
    pseudo_conf: float
    on_clients: bool


@dataclass(frozen=True)
class SnapshotConfig:
    enabled: bool
    every: int
    prune_ratio: str  # "auto" (searched under the gate) or a fraction of the channels: read it with .ratio
    search_ratios: str
    search_minutes: float
    round_to: int
    importance: str
    recover_epochs: int
    recover_ema: float
    float_layers: str  # "auto" (chosen from measured sensitivity and latency) or a count: read it with .first_float
    float_budget: float
    latency_target: str
    latency_budget_ms: float
    target: str
    method: str
    calib_frames: int
    tolerance: float
    per_camera: bool
    camera_timeout: float
    timeout: float
    dir: str
    key_path: str
    cluster: int
    cluster_per: str
    cluster_fit: str
    cluster_epochs: int

    def __post_init__(self) -> None:
        if self.cluster != 0 and not 2 <= self.cluster <= 256:
            raise ValueError(f"config key 'snapshot.cluster': {self.cluster} is neither 0 (off) nor 2..256 values")
        if self.cluster_per not in ("channel", "layer"):
            raise ValueError(f"config key 'snapshot.cluster-per': '{self.cluster_per}' is neither channel nor layer")
        if self.cluster_fit not in ("outputs", "weights"):
            raise ValueError(f"config key 'snapshot.cluster-fit': '{self.cluster_fit}' is neither outputs nor weights")
        if not 0.0 <= self.recover_ema < 1.0:
            raise ValueError(f"config key 'snapshot.recover-ema': {self.recover_ema} is not in [0, 1) (0: off)")
        if self.importance not in ("magnitude", "taylor"):
            raise ValueError(f"config key 'snapshot.importance': '{self.importance}' is neither 'magnitude' nor 'taylor'")
        for key, value, check in (("prune-ratio", self.prune_ratio, lambda v: 0.0 <= float(v) < 1.0),
                                  ("float-layers", self.float_layers, lambda v: int(v) >= 0)):
            try:
                ok = value == "auto" or check(value)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"config key 'snapshot.{key}': '{value}' is neither 'auto' nor a valid number")
        try:
            ladder = self.ladder
        except ValueError:
            ladder = []
        if not ladder or any(not 0 < r < 1 for r in ladder) or ladder != sorted(set(ladder)):
            raise ValueError(f"config key 'snapshot.search-ratios': '{self.search_ratios}' is not a rising list of "
                             "fractions in (0, 1), e.g. '0.25,0.5'")
        if self.latency_target not in LATENCY_TARGETS:
            raise ValueError(f"config key 'snapshot.latency-target': '{self.latency_target}' is none of "
                             f"{', '.join(LATENCY_TARGETS)}")

    @property
    def ratio(self) -> float | None:
        """The fixed prune ratio, or None when it is searched."""
        return None if self.prune_ratio == "auto" else float(self.prune_ratio)

    @property
    def first_float(self) -> int | None:
        """How many first layers stay float, or None when the layers are chosen per checkpoint."""
        return None if self.float_layers == "auto" else int(self.float_layers)

    @property
    def ladder(self) -> list[float]:
        """The prune ratios the search steps through, each of the starting model's channels."""
        return [float(x) for x in self.search_ratios.split(",") if x.strip()]


@dataclass(frozen=True)
class EvalConfig:
    conf: float
    iou: float
    max_det: int
    batch: int


# snapshot.latency-target: this machine's onnxruntime, measured, or an ARM core, estimated
# (server/snapshots/costmodel.py)
LATENCY_TARGETS = ("host", "cortex-a7", "cortex-a53", "cortex-a72")


@dataclass(frozen=True)
class Config:
    seed: int
    run_dir: str
    resume: bool
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    distill: DistillConfig
    snapshot: SnapshotConfig
    eval: EvalConfig
    fed: FedConfig
    drill: DrillConfig

    def replace(self, **flat: Any) -> "Config":
        """A copy with flat overrides such as {"train.lr": 0.01} applied (same rules as run config)."""
        return load_config({**to_flat(self), **flat})


def default_flat() -> dict[str, Any]:
    """The defaults from pyproject, flattened with '.' the way Flower flattens run config."""
    if not PYPROJECT.exists():
        raise FileNotFoundError(f"fedcam defaults not found: {PYPROJECT} is missing")
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    return _flatten(table)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def _coerce(name: str, value: Any, typ: type) -> Any:
    # Run config from `--run-config` may arrive as int for a float field, or as a string.
    try:
        if typ is bool:
            if isinstance(value, str):
                return value.strip().lower() in {"1", "true", "yes", "on"}
            return bool(value)
        return typ(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key '{name}': cannot read {value!r} as {typ.__name__}") from err


def _build(cls: type, flat: Mapping[str, Any], prefix: str) -> Any:
    kwargs = {}
    for f in fields(cls):
        key = f"{prefix}{f.name.replace('_', '-')}"
        if key not in flat:
            raise KeyError(f"config key '{key}' missing (defaults live in pyproject [tool.flwr.app.config])")
        typ = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        kwargs[f.name] = _coerce(key, flat[key], typ)
    return cls(**kwargs)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "distill": DistillConfig,
             "snapshot": SnapshotConfig, "eval": EvalConfig, "fed": FedConfig,
             "drill": DrillConfig}


def load_config(overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults from pyproject, then `overrides` (e.g. Flower's `context.run_config`) on top."""
    flat = {**default_flat(), **dict(overrides or {})}
    unknown = set(flat) - set(default_flat())
    if unknown:
        raise KeyError(f"unknown config keys: {sorted(unknown)}")
    sections = {name: _build(cls, flat, f"{name}.") for name, cls in _SECTIONS.items()}
    top = {"seed": _coerce("seed", flat["seed"], int), "run_dir": _coerce("run-dir", flat["run-dir"], str),
           "resume": _coerce("resume", flat["resume"], bool)}
    return Config(**top, **sections)


def to_flat(cfg: Config) -> dict[str, Any]:
    """The inverse of load_config: flat '.'-joined keys, as Flower's run config holds them."""
    out: dict[str, Any] = {"seed": cfg.seed, "run-dir": cfg.run_dir, "resume": cfg.resume}
    for name in _SECTIONS:
        for k, v in dataclasses.asdict(getattr(cfg, name)).items():
            out[f"{name}.{k.replace('_', '-')}"] = v
    return out
