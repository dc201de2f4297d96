"""fed.dp on the server: Flower's central-DP wrapper (noise on the mean of camera-clipped updates) and its RDP
accountant, which also prices local DP; the epsilon spent, checkpointed with the rounds so a resume goes on from it."""

from __future__ import annotations

import json
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from shared.config import FedConfig

WEIGHT_KEY = "dp-weight"  # under central DP every camera counts once: the server sets it on each accepted reply


class Ledger:
    """The run's RDP accountant (Flower's, backed by dp-accounting). It is made at the first round, when the number of
    connected cameras is known; Flower's accountant counts whole-camera neighbours (add or remove one camera's updates)
    without credit for sampling, the setting its fixed-clipping wrapper supports."""

    def __init__(self, f: FedConfig):
        self.f, self.population, self.accountant = f, 0, None

    def open(self, population: int):
        if self.accountant is None:
            from flwr.serverapp import RdpAccountant

            self.population = max(1, population)
            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=self.f.dp_delta, population_size=self.population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=self.f.dp_max_epsilon if self.f.dp_max_epsilon > 0 else None))
        return self.accountant

    def event(self, sampled: int) -> GaussianPrivacyEvent:
        """One round's release. Central: the noised mean of `sampled` clipped updates (z = dp-noise). Local: each
        camera's own noised update, a release of one (so epsilon is per camera, and the same for all)."""
        if self.f.dp == "local":
            return GaussianPrivacyEvent(noise_multiplier=self.f.dp_noise, sample_size=1, population_size=self.population)
        if sampled > self.population:
            raise RuntimeError(f"fed.dp: {sampled} cameras sampled, but the accountant was opened for "
                               f"{self.population} (the cameras connected in the first round)")
        return GaussianPrivacyEvent(noise_multiplier=self.f.dp_noise, sample_size=sampled,
                                    population_size=self.population)

    def check(self, sampled: int) -> None:
        """Local DP: refuse the round before it would take epsilon past fed.dp-max-epsilon (Flower's wrapper does this
        itself for central DP)."""
        acc = self.open(sampled)
        if self.f.dp == "local" and acc.config.max_epsilon is not None and acc.would_exceed(self.event(sampled)):
            spent = acc.get_privacy_spent()
            raise PrivacyBudgetExhausted(f"The next private release would exceed max_epsilon (current epsilon: "
                                         f"{spent.epsilon}, delta: {spent.delta}).")

    def released(self, sampled: int) -> None:
        """Local DP: the sampled cameras each released a noised update this round."""
        if self.f.dp == "local" and sampled:
            self.open(sampled).compose(self.event(sampled))

    def spent(self) -> dict:
        """epsilon at fed.dp-delta so far, with what it was computed for (events, the store, manifests)."""
        out = {"mode": self.f.dp, "noise": self.f.dp_noise, "clip": self.f.dp_clip, "delta": self.f.dp_delta,
               "max_epsilon": self.f.dp_max_epsilon, "epsilon": 0.0, "releases": 0}
        if self.accountant is not None and self.accountant.num_releases:
            s = self.accountant.get_privacy_spent()
            out.update(epsilon=s.epsilon, releases=s.num_releases)
        return out

    def state_json(self) -> str:
        if self.accountant is None:
            return ""
        return json.dumps({"population": self.population, "accountant": self.accountant.state_dict()})

    def load_json(self, text: str) -> None:
        if text:
            saved = json.loads(text)
            self.open(int(saved["population"])).load_state_dict(saved["accountant"])


class CentralDp(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central-DP wrapper, told each round how many cameras it samples, with uniform weights (the noise is
    scaled to one camera's share of the mean). Clipping happens on the cameras (client/privacy.py)."""

    ledger: Ledger  # the same object as the mixin's: it opens the accountant this wrapper composes into

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        inner = self.strategy
        # FedAvg's own sample size: the wrapper checks each round's messages against it.
        connected = len(list(grid.get_node_ids()))
        self.num_sampled_clients = max(int(connected * inner.fraction_train), inner.min_train_nodes)
        self.accountant = self.ledger.open(connected)
        self.ledger.event(self.num_sampled_clients)  # a clear error when more cameras are sampled than accounted for
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                msg.content["metrics"][WEIGHT_KEY] = 1.0
        return super().aggregate_train(server_round, replies)

