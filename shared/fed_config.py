"""The federation's run config section (fed.*) and the drills' (drill.*), with the checks that refuse combinations
that cannot work together; shared.config reads them from pyproject with the other sections."""

from __future__ import annotations

import math
from dataclasses import dataclass

PERSONAL_MODES = ("none", "bn", "head", "bn+head")  # fed.personal: what stays on each camera (shared/personal.py)
COMPRESS_MODES = ("none", "int8", "topk")  # fed.compress: how deltas travel (shared/compress.py)
DP_MODES = ("off", "central", "local")  # fed.dp: differential privacy (server/federation/privacy.py)
# drill.attack: what attacking cameras send (client/attack.py)
ATTACKS = ("none", "signflip", "scale", "noise", "malformed", "crash")
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
    lr_decay: float
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

    def round_lr(self, rnd: int) -> float:
        """The local lr of round `rnd` (1-based): cosine from fed.local-lr at round 1 to lr-decay of it at the last,
        so late rounds move the global model by less as it settles (README: personalization)."""
        if self.lr_decay == 1.0 or self.rounds <= 1:
            return self.local_lr
        t = min(max(rnd - 1, 0) / (self.rounds - 1), 1.0)
        return self.local_lr * (self.lr_decay + (1 - self.lr_decay) * 0.5 * (1 + math.cos(math.pi * t)))

    def __post_init__(self):
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"config key 'fed.lr-decay': {self.lr_decay} is not in (0, 1]")
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
