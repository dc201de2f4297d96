"""fed.secure-aggregation: Flower's SecAgg+ workflow, which in 1.42 drives only a legacy strategy, around Flower's
legacy FedAvg; the server unmasks the sum of the cameras' updates and never holds one camera's update."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from server.federation.events import ClientOutcome
from server.federation.run import FederatedRun

log = logging.getLogger("fedcam.server")
QUANTIZATION_RANGE = 2**22  # Flower's default: each update value becomes one of 2^22 steps over +-secagg-clip


class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg, told the run's config and round offset, whose aggregate_fit gets what SecAgg+ unmasked: every
    result carries the same vector, the uniform mean of the cameras' updates of the summed keys. It adds that mean
    to the global model (the personal and integer keys keep the global values) and logs the round."""

    ledger = None  # FederatedRun's hooks read these: no DP accountant and no server-optimizer state here

    def __init__(self, run: FederatedRun, summed: list[str], **kwargs):
        self.run, self.keys, self.summed = run, list(run.arrays.keys()), summed
        self.current = OrderedDict((k, run.arrays[k].numpy()) for k in self.keys)
        super().__init__(initial_parameters=ndarrays_to_parameters(list(self.current.values())),
                         on_fit_config_fn=self._fit_config, evaluate_fn=self._evaluate, **kwargs)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _fit_config(self, server_round: int) -> dict:
        from shared.train import round_seed

        rnd = server_round + self.run.done
        return {**dict(self.run.train_config()), "seed": round_seed(self.run.cfg.seed, rnd),
                "lr": self.run.cfg.fed.round_lr(rnd), "keys": self.keys,
                "summed": self.summed}

    def configure_fit(self, server_round, parameters, client_manager):
        chosen = super().configure_fit(server_round, parameters, client_manager)
        self._started = time.time()
        self.run.bus.emit("round_start", server_round + self.run.done, sampled=[p.node_id for p, _ in chosen],
                          available=client_manager.num_available(), secure=True)
        return chosen

    def aggregate_fit(self, server_round, results, failures):
        rnd = server_round + self.run.done
        outcomes = [ClientOutcome(proxy.node_id, True, "", {k: float(v) for k, v in res.metrics.items()
                                                            if isinstance(v, (int, float))}) for proxy, res in results]
        outcomes += [ClientOutcome(0, False, f"secure aggregation: {type(f).__name__}: {f}") for f in failures]
        mean, metrics = super().aggregate_fit(server_round, results, failures) if results else (None, {})
        if mean is not None:
            update = parameters_to_ndarrays(mean)
            if len(update) != len(self.summed) or not all(np.isfinite(u).all() for u in update):
                raise RuntimeError(f"round {rnd}: the unmasked sum does not fit the {len(self.summed)} summed keys "
                                   "or is not finite; the global model stays as it was")
            for key, value in zip(self.summed, update):
                base = self.current[key]
                self.current[key] = (base.astype(np.float64) + value).astype(base.dtype)
        else:
            log.warning("round %d: no unmasked sum; the global model stays as it was", rnd)
        self.run.bus.emit("train_result", rnd, clients=[vars(o) for o in outcomes], accepted=len(results),
                          seconds=time.time() - self._started, metrics=dict(metrics or {}), privacy={}, secure=True)
        return ndarrays_to_parameters(list(self.current.values())), metrics or {}

    def _evaluate(self, server_round: int, ndarrays, config):
        arrays = ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in zip(self.keys, ndarrays)))
        metrics = dict(self.evaluate_fn_of_run(server_round, arrays))
        return float(metrics.get("loss", 0.0)), metrics


def run_secure(grid: Grid, context: Context, run: FederatedRun) -> None:
    """The rounds under SecAgg+: Flower's DefaultWorkflow with its SecAgg+ fit workflow; no federated evaluate
    (the cameras score the model they receive in the train stage, fed.evaluate-in-train)."""
    f = run.cfg.fed
    summed = [k for k in run.arrays.keys()
              if k not in set(run.personal_keys()) and np.issubdtype(run.arrays[k].numpy().dtype, np.floating)]
    strategy = SecureFedAvg(run, summed, fraction_fit=f.fraction_train, fraction_evaluate=0.0,
                            min_fit_clients=f.min_nodes, min_evaluate_clients=0, min_available_clients=f.min_nodes)
    strategy.evaluate_fn_of_run = run.central_evaluate(strategy)
    run.start_event(strategy)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=run.remaining, round_timeout=f.round_timeout),
                           strategy=strategy)
    # num_shares 1.0: every camera shares its mask seeds with all the others (a full graph; SecAgg+'s sparse graph
    # pays off past hundreds of cameras).
    fit = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=f.secagg_threshold, max_weight=1.0,
                             clipping_range=f.secagg_clip, quantization_range=QUANTIZATION_RANGE,
                             timeout=f.round_timeout)
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
