"""fed.dp through the real Simulation Engine: clipped updates, noise of the configured scale, Flower's accountant's
epsilon round by round, and a run that stops at its budget; the unit parts (config, ledger state) beside them."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import numpy as np
import pytest

from shared.run_dir import RunDir
from server.federation.events import EventBus


def accountant_epsilons(noise: float, sample: int, population: int, delta: float, rounds: int) -> list[float]:
    """Flower's RDP accountant, called directly: epsilon after each of `rounds` Gaussian releases."""
    from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant,
                                SamplingMethod)

    acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    out = []
    for _ in range(rounds):
        acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sample, population_size=population))
        out.append(acc.get_privacy_spent().epsilon)
    return out


def events_of(run_dir, kind: str) -> list[dict]:
    from server.federation.events import read_events

    return [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == kind]


def released_delta(run_dir, shared: list[str], a: int, b: int) -> tuple[np.ndarray, dict]:
    """The change of the global model's released keys from round a to b, and of every other key."""
    from server.federation.checkpoint import RunCheckpoints

    ck = RunCheckpoints(run_dir)
    (ra, _), (rb, _) = ck.load(a), ck.load(b)
    moved = np.concatenate([(rb[k].numpy().astype(np.float64) - ra[k].numpy()).ravel() for k in shared])
    rest = {k: float(np.abs(rb[k].numpy().astype(np.float64) - ra[k].numpy()).max()) for k in rb if k not in shared}
    return moved, rest


def test_dp_config_is_checked(tiny_cfg):
    with pytest.raises(ValueError, match="fed.dp' = central needs fed.strategy"):
        tiny_cfg.replace(**{"fed.dp": "central", "fed.strategy": "fedadam"})
    with pytest.raises(ValueError, match="fed.dp-noise"):
        tiny_cfg.replace(**{"fed.dp": "local", "fed.dp-noise": 0.0})
    with pytest.raises(ValueError, match="'fed.dp': 'secret'"):
        tiny_cfg.replace(**{"fed.dp": "secret"})


def test_the_ledger_resumes_where_it_stopped(tiny_cfg):
    """The accountant's state travels with the checkpoint: a resumed run goes on from the epsilon already spent."""
    from server.federation.privacy import Ledger

    f = dataclasses.replace(tiny_cfg.fed, dp="local", dp_noise=1.1, dp_delta=1e-5)
    first = Ledger(f)
    for _ in range(3):
        first.check(4)
        first.released(4)
    again = Ledger(f)
    again.load_json(first.state_json())
    again.released(4)
    assert again.spent()["releases"] == 4
    assert again.spent()["epsilon"] == pytest.approx(accountant_epsilons(1.1, 1, 4, 1e-5, 4)[-1], rel=1e-9)


def test_a_central_dp_strategy_is_flowers_wrapper_around_fedavg(tiny_cfg):
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedProx

    from server.federation.privacy import WEIGHT_KEY
    from server.federation.strategies import make_strategy

    f = dataclasses.replace(tiny_cfg.fed, strategy="fedprox", dp="central", dp_noise=0.8, dp_clip=0.5)
    s = make_strategy(f, EventBus([]), seed=0)
    assert isinstance(s, DifferentialPrivacyClientSideFixedClipping) and isinstance(s.strategy, FedProx)
    assert s.strategy.weighted_by_key == WEIGHT_KEY and (s.noise_multiplier, s.clipping_norm) == (0.8, 0.5)


@pytest.mark.slow
def test_central_dp_clips_noises_accounts_and_stops_at_its_budget(tiny_cfg, tiny_world, tmp_path):
    """Central DP with int8 uploads: every update the server decodes is within the clipping norm, the global model
    moves by noise of std z*C/n on the released keys and not at all elsewhere, epsilon after each round is the
    accountant's, and with a budget between two rounds' epsilon the run stops after round 2 with a clear message
    and a snapshot of that round that records its epsilon."""
    from conftest import sim_cfg
    from server.local import simulation

    z, clip, delta, n = 0.7, 5e-3, 1e-5, 2  # clip: half the smallest update norm these cameras make here
    eps = accountant_epsilons(z, n, n, delta, 3)
    run = tmp_path / "run"
    cfg = sim_cfg(tiny_cfg, tiny_world, run, **{
        "fed.rounds": 3, "fed.dp": "central", "fed.dp-noise": z, "fed.dp-clip": clip, "fed.dp-delta": delta,
        "fed.dp-max-epsilon": (eps[1] + eps[2]) / 2, "fed.compress": "int8", "snapshot.every": 0})
    assert simulation.launch(cfg, n, timeout=400) == 0, (run / "simulation.log").read_text()[-3000:]

    manifest = json.loads((run / "run_manifest.json").read_text())
    shared, withheld = manifest["shared_keys"], manifest["withheld_keys"]
    trains = events_of(run, "train_result")
    assert [t["round"] for t in trains] == [1, 2] and all(t["data"]["accepted"] == n for t in trains)
    for t in trains:
        start = _start_state(cfg, run, t["round"] - 1)
        for c in t["data"]["clients"]:
            m = c["metrics"]
            # What the server decoded, after int8, within the clip up to float32's rounding of the sum base + delta.
            assert m["update-norm-server"] <= clip * (1 + 1e-5) + _rounding(start, shared), m
            assert m["dp-norm"] > clip and m["dp-clipped"] == 1.0, m  # the clip was binding: the check means something
    assert [t["data"]["privacy"]["epsilon"] for t in trains] == pytest.approx(eps[:2], rel=1e-9)
    assert trains[0]["data"]["privacy"]["delta"] == delta

    (end,) = events_of(run, "run_end")
    assert end["round"] == 2 and "privacy budget" in end["data"]["stopped"] and "max_epsilon" in end["data"]["stopped"]
    with sqlite3.connect(RunDir(run).store) as db:
        status = db.execute("SELECT status FROM runs").fetchone()[0]
        rows = db.execute("SELECT round, epsilon, dp_delta FROM rounds WHERE round > 0 ORDER BY round").fetchall()
    assert status.startswith("stopped: privacy budget"), status
    assert [(r, pytest.approx(e, rel=1e-9), d) for r, e, d in rows] == [(1, eps[0], delta), (2, eps[1], delta)]

    assert manifest["dp"]["mode"] == "central" and manifest["dp"]["noise"] == z and manifest["dp"]["clip"] == clip
    assert shared and any(k.endswith("num_batches_tracked") for k in withheld)
    assert not set(shared) & set(withheld)
    moved, rest = released_delta(run, shared, 1, 2)
    # The noise dwarfs the clipped signal (its norm is at most C over ~1e5 values): the spread is z*C/n.
    assert moved.size > 10_000 and 0.9 < moved.std() / (z * clip / n) < 1.1, moved.std()
    assert max(rest.values()) == 0.0, rest  # withheld keys are the server's: no noise on them

    (snap,) = events_of(run, "snapshot")
    assert snap["round"] == 2 and snap["data"]["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-9)


@pytest.mark.slow
def test_local_dp_noises_each_update_before_it_leaves_the_camera(tiny_cfg, tiny_world, tmp_path):
    """Local DP (Flower's LocalDpMod): each update the server receives carries noise of std z*C in every released
    value, and epsilon is one camera's, composed over its releases."""
    from conftest import sim_cfg
    from server.local import simulation

    z, clip, delta = 0.5, 1e-3, 1e-5
    run = tmp_path / "run"
    cfg = sim_cfg(tiny_cfg, tiny_world, run, **{"fed.dp": "local", "fed.dp-noise": z, "fed.dp-clip": clip,
                                                "fed.dp-delta": delta, "fed.personal": "head",
                                                "snapshot.enabled": False})
    assert simulation.launch(cfg, 2, timeout=300) == 0, (run / "simulation.log").read_text()[-3000:]
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["personal_keys"] and not set(manifest["personal_keys"]) & set(manifest["shared_keys"])
    size = sum(int(np.prod(v.shape)) for k, v in _student_state(cfg).items() if k in manifest["shared_keys"])
    trains = events_of(run, "train_result")
    norms = [c["metrics"]["update-norm-server"] for t in trains for c in t["data"]["clients"]]
    assert len(norms) == 4
    for norm in norms:  # the noise's norm is z*C*sqrt(d); the clipped update adds at most C
        assert 0.95 < norm / (z * clip * np.sqrt(size)) < 1.05, (norm, size)
    assert [t["data"]["privacy"]["epsilon"] for t in trains] == pytest.approx(
        accountant_epsilons(z, 1, 2, delta, 2), rel=1e-9)


def _student_state(cfg):
    from shared import models, task

    return models.build_student(cfg.model, task.names_of(task.base_yaml(cfg))).state_dict()


def _start_state(cfg, run, rnd: int) -> dict:
    """The global model round rnd + 1 started from: the run's starting student, or round rnd's checkpoint."""
    import torch

    from server.federation.checkpoint import RunCheckpoints
    from shared.arrays import to_state_dict

    if rnd == 0:
        return torch.load(cfg.model.student_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return to_state_dict(RunCheckpoints(run).load(rnd)[0])


def _rounding(state: dict, keys: list[str]) -> float:
    """The L2 norm of float32's spacing at the model's values: what storing base + delta in float32 may add."""
    return float(np.sqrt(sum(np.sum(np.spacing(np.abs(state[k].numpy().astype(np.float32))).astype(np.float64) ** 2)
                             for k in keys)))
