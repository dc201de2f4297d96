"""Flower ServerApp: reads config, runs the chosen strategy round by round, logs and checkpoints each round."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.run import FederatedRun
from server.federation.strategies import make_strategy
from shared.config import load_config
from shared.task import set_threads

app = ServerApp()
log = logging.getLogger("fedcam.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(context.run_config)
    set_threads(cfg.train.threads)
    run = FederatedRun(cfg)
    if cfg.fed.secure_aggregation:  # Flower's SecAgg+ exists only as a legacy workflow: its own round loop
        return secure(grid, context, cfg, run)
    strategy = make_strategy(cfg.fed, run.bus, cfg.seed, round_offset=run.done, personal=run.personal_keys())
    strategy.load_state_arrays(run.state)
    if cfg.snapshot.per_camera and cfg.snapshot.every > 0:
        from server.snapshots.rider import Rider, rides

        if rides(cfg):  # every snapshot.every rounds, each camera's own snapshot too, its steps riding on the rounds
            strategy.rider = Rider(cfg, run.snapshots, run.bus)
    run.start_event(strategy)
    stopped = ""
    try:
        result = strategy.start(grid, run.arrays, num_rounds=run.remaining, timeout=cfg.fed.round_timeout,
                                train_config=run.train_config(), evaluate_config=run.evaluate_config(),
                                evaluate_fn=run.central_evaluate(strategy))
        final = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    except PrivacyBudgetExhausted as err:  # fed.dp-max-epsilon: the rounds so far stand, the next would not
        stopped, final = f"privacy budget: {err}", {}
        log.warning("run stopped before round %d: %s", run.last_round() + 1, stopped)
        run.snapshot_last()
    except Exception as err:
        run.snapshots.close()
        run.bus.emit("run_error", run.done, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if strategy.rider is not None:  # the step it is working on is finished; the rest is the exchange's below
            strategy.rider.close()
    run.snapshots.finish(timeout=cfg.snapshot.timeout)  # snapshots were made beside the rounds: wait for the last
    if cfg.snapshot.enabled and cfg.snapshot.per_camera:
        per_camera(grid, cfg, run)
    run.bus.emit("run_end", run.last_round(), central=final, stopped=stopped)


def secure(grid: Grid, context: Context, cfg, run: FederatedRun) -> None:
    from server.federation.secure import run_secure

    try:
        run_secure(grid, context, run)
    except Exception as err:
        run.snapshots.close()
        run.bus.emit("run_error", run.done, error=f"{type(err).__name__}: {err}")
        raise
    run.snapshots.finish(timeout=cfg.snapshot.timeout)
    run.bus.emit("run_end", run.last_round(), central={}, stopped="")


def per_camera(grid: Grid, cfg, run: FederatedRun) -> None:
    """After the rounds: each connected camera's own snapshot of the newest published global one."""
    from server.snapshots.cameras import camera_snapshots

    if run.snapshots.last is None:
        log.warning("no global snapshot was published in this run: no per-camera snapshots either")
        return
    camera_snapshots(grid, cfg, run.snapshots.last, run.snapshots.registry, run.bus)

