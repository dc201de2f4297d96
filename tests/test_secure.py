"""fed.secure-aggregation through the real Simulation Engine: Flower's SecAgg+ workflow and mod give the same global
model as plain FedAvg up to SecAgg+'s quantization step, and the server never holds one camera's update."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.federation.events import read_events
from shared.run_dir import RunDir


def test_secure_aggregation_refuses_what_needs_one_cameras_update(tiny_cfg):
    on = {"fed.secure-aggregation": True}
    for key, value in (("fed.strategy", "krum"), ("fed.compress", "int8"), ("fed.dp", "central")):
        with pytest.raises(ValueError, match=f"needs fed.{key.split('.')[1]} = "):
            tiny_cfg.replace(**on, **{key: value})
    with pytest.raises(ValueError, match="fed.secagg-threshold"):
        tiny_cfg.replace(**on, **{"fed.secagg-threshold": 0.0})
    tiny_cfg.replace(**on, **{"fed.personal": "bn"})  # personal keys simply stay out of the sum


def _round_one(run) -> dict:
    from server.federation.checkpoint import RunCheckpoints

    arrays, _ = RunCheckpoints(run).load(1)
    return {k: arrays[k].numpy() for k in arrays.keys()}


@pytest.mark.slow
def test_secure_aggregation_matches_plain_fedavg_within_its_quantization_step(tiny_cfg, tiny_world, tmp_path):
    """One round, 2 cameras, the same seed and start: the SecAgg+ global model equals plain FedAvg's on every summed
    key within one quantization step (2 * clip / 2^22) plus float32 rounding; the replies the server logged carry
    no update norm (it never decoded one), and the run's manifest says the run was secure."""
    import torch
    from conftest import sim_cfg

    from server.federation.secure import QUANTIZATION_RANGE
    from server.local import simulation

    common = {"fed.rounds": 1, "snapshot.enabled": False, "fed.strategy": "fedavg"}
    plain = sim_cfg(tiny_cfg, tiny_world, tmp_path / "plain", **common)
    secure = sim_cfg(tiny_cfg, tiny_world, tmp_path / "secure", **common, **{"fed.secure-aggregation": True})
    for cfg in (plain, secure):
        assert simulation.launch(cfg, 2, timeout=300) == 0, (RunDir(cfg.run_dir).root / "simulation.log").read_text()[-3000:]

    def trains(cfg):
        return [e for e in read_events(RunDir(cfg.run_dir).events) if e["kind"] == "train_result"]

    (p,), (s,) = trains(plain), trains(secure)
    examples = [c["metrics"]["num-examples"] for c in p["data"]["clients"]]
    assert len(set(examples)) == 1, examples  # equal weights: FedAvg's weighted mean is the uniform one SecAgg+ sums
    assert s["data"]["accepted"] == 2 and s["data"]["secure"]
    assert all("update-norm-server" not in c["metrics"] for c in s["data"]["clients"])
    assert all("update-norm-server" in c["metrics"] for c in p["data"]["clients"])  # what the plain server sees

    manifest = json.loads(RunDir(secure.run_dir).manifest.read_text())
    assert manifest["secure_aggregation"] is True
    a, b = _round_one(plain.run_dir), _round_one(secure.run_dir)
    start = {k: v.numpy() for k, v in torch.load(secure.model.student_checkpoint, map_location="cpu",
                                                 weights_only=True)["state_dict"].items()}
    step = 2 * secure.fed.secagg_clip / QUANTIZATION_RANGE
    summed = [k for k in a if np.issubdtype(a[k].dtype, np.floating)]
    # Each camera's value is rounded (stochastically) to one step, so their mean is within one; float32's rounding
    # of the two global models (twice its spacing) comes on top.
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max() - 2 * np.spacing(np.abs(a[k])).max())
                for k in summed)
    moved = max(float(np.abs(a[k].astype(np.float64) - start[k]).max()) for k in summed)
    assert worst <= step, (worst, step)
    assert moved > 100 * step, moved  # the round moved the model far more than the tolerance: the check means something
    for k in a:  # integer counters stay the server's under SecAgg+
        if not np.issubdtype(a[k].dtype, np.floating):
            assert np.array_equal(b[k], start[k]), k
