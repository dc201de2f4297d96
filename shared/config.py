"""Typed, frozen run configuration read from `[tool.flwr.app.config]` (the only place defaults live)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

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
    cluster_epochs: int

    def __post_init__(self) -> None:
        if self.cluster != 0 and not 2 <= self.cluster <= 256:
            raise ValueError(f"config key 'snapshot.cluster': {self.cluster} is neither 0 (off) nor 2..256 values")
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
PERSONAL_MODES = ("none", "bn", "head", "bn+head")  # fed.personal: what stays on each camera (shared/personal.py)
COMPRESS_MODES = ("none", "int8", "topk")  # fed.compress: how deltas travel (shared/compress.py)
DP_MODES = ("off", "central", "local")  # fed.dp: differential privacy (server/federation/privacy.py)
ATTACKS = ("none", "signflip", "scale", "noise", "malformed", "crash")  # drill.attack: what attacking cameras send (client/attack.py)
DP_STRATEGIES = ("fedavg", "fedprox")  # what Flower's accountant accepts: FedAvg's own uniform average


@dataclass(frozen=True)
class FedConfig:
    rounds: int
    strategy: str
    fraction_train: float
    fraction_evaluate: float
    evaluate_in_train: bool
    min_nodes: int
    local_epochs: int
    local_steps: int
    local_lr: float
    local_optimizer: str
    freeze_bn: bool
    adabn: bool
    personal: str
    keep_finetuned: bool
    ditto_lambda: float
    proximal_mu: float
    server_lr: float
    server_momentum: float
    adam_eta: float
    trim_beta: float
    krum_byzantine: int
    max_update_norm: float
    norm_outlier: float
    round_timeout: float
    checkpoint_every: int
    central_every: int
    central_cameras: int
    compress: str
    compress_topk: float
    compress_down: str
    dp: str
    dp_noise: float
    dp_clip: float
    dp_delta: float
    dp_max_epsilon: float
    secure_aggregation: bool
    secagg_threshold: float
    secagg_clip: float

    @property
    def runs_own_model(self) -> bool:
        """Each camera runs a whole model of its own (fed.keep-finetuned or Ditto), not the global one."""
        return self.keep_finetuned or self.ditto_lambda > 0

    def __post_init__(self):
        if not self.ditto_lambda >= 0:
            raise ValueError(f"config key 'fed.ditto-lambda': {self.ditto_lambda} is not >= 0")
        if self.personal not in PERSONAL_MODES:
            raise ValueError(f"config key 'fed.personal': '{self.personal}' is not one of "
                             f"{', '.join(PERSONAL_MODES)}")
        for key, value, allowed in (("compress", self.compress, COMPRESS_MODES),
                                    ("compress-down", self.compress_down, ("same", *COMPRESS_MODES))):
            if value not in allowed:
                raise ValueError(f"config key 'fed.{key}': '{value}' is not one of {', '.join(allowed)}")
        if not 0 < self.compress_topk <= 1:
            raise ValueError(f"config key 'fed.compress-topk': {self.compress_topk} is not in (0, 1]")
        self._check_dp()
        self._check_secure()
        if self.strategy.lower() == "scaffold" and (self.compress, self.downlink, self.dp) != ("none", "none", "off"):
            # The control variates travel beside the weights as a second record that neither codec nor DP covers.
            raise ValueError("config key 'fed.strategy' = scaffold needs fed.compress = none and fed.dp = off "
                             f"(not '{self.compress}' / '{self.downlink}' / '{self.dp}')")

    def _check_secure(self) -> None:
        """fed.secure-aggregation: the server only ever holds the masked sum, so nothing that needs one camera's update
        (decoding a compressed one, screening, a robust rule, server-side DP noise on known updates) can run."""
        if not self.secure_aggregation:
            return
        if not 0 < self.secagg_threshold <= 1:
            raise ValueError(f"config key 'fed.secagg-threshold': {self.secagg_threshold} is not in (0, 1]")
        if not self.secagg_clip > 0:
            raise ValueError(f"config key 'fed.secagg-clip': {self.secagg_clip} is not > 0")
        for key, value, plain in (("strategy", self.strategy.lower(), "fedavg"), ("compress", self.compress, "none"),
                                  ("compress-down", self.downlink, "none"), ("dp", self.dp, "off")):
            if value != plain:
                raise ValueError(f"config key 'fed.secure-aggregation' = true needs fed.{key} = {plain}, not "
                                 f"'{value}' (the server never sees one camera's update; README)")
        if self.runs_own_model or self.adabn:
            raise ValueError("config key 'fed.secure-aggregation' = true does not support fed.keep-finetuned, "
                             "fed.ditto-lambda or fed.adabn yet")

    def _check_dp(self) -> None:
        if self.dp not in DP_MODES:
            raise ValueError(f"config key 'fed.dp': '{self.dp}' is not one of {', '.join(DP_MODES)}")
        if self.dp == "off":
            return
        if not self.dp_noise > 0:
            raise ValueError(f"config key 'fed.dp-noise': {self.dp_noise} is not > 0 (fed.dp = {self.dp})")
        if not self.dp_clip > 0:
            raise ValueError(f"config key 'fed.dp-clip': {self.dp_clip} is not > 0")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"config key 'fed.dp-delta': {self.dp_delta} is not in (0, 1)")
        if not self.dp_max_epsilon >= 0:
            raise ValueError(f"config key 'fed.dp-max-epsilon': {self.dp_max_epsilon} is not >= 0")
        if self.dp == "central" and self.strategy.lower() not in DP_STRATEGIES:
            # Flower's accountant holds only for FedAvg's uniform average of clipped updates; a server optimizer
            # or a robust rule changes the sensitivity the noise is scaled to.
            raise ValueError(f"config key 'fed.dp' = central needs fed.strategy in {', '.join(DP_STRATEGIES)}, "
                             f"not '{self.strategy}'")

    @property
    def downlink(self) -> str:
        """How the server sends the global model: fed.compress-down, or fed.compress when that says 'same'."""
        return self.compress if self.compress_down == "same" else self.compress_down


@dataclass(frozen=True)
class DrillConfig:
    """Fault injection for the drills (simulations/drills_attack.py): which simulated cameras attack, and how."""

    attack: str
    attackers: float
    attack_scale: float
    flip_scale: float
    crash_round: int

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ValueError(f"config key 'drill.attack': '{self.attack}' is not one of {', '.join(ATTACKS)}")
        if not 0 <= self.attackers <= 1:
            raise ValueError(f"config key 'drill.attackers': {self.attackers} is not in [0, 1]")


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
