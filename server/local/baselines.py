"""Baselines in the federated harness: each camera alone (local-only) and all camera data pooled (centralized)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from client.camera import adapt_bn
from server.federation.events import EventBus, JsonlLog
from shared import models, task
from shared.config import Config
from shared.run_dir import RunDir
from shared.train import TrainSpec, local_plan, round_seed


def _local_spec(cfg: Config, rnd: int) -> TrainSpec:
    # Same optimizer, lr (fed.lr-decay's too) and per-round budget as a federated client: only the sharing differs.
    return TrainSpec.local(cfg.train, cfg.fed, local_plan(cfg.fed, rnd))


def local_only(cfg: Config, start: Path) -> EventBus:
    """Every camera fine-tunes its own copy for the same rounds; each is scored on its own val split."""
    bus = EventBus([JsonlLog(RunDir(cfg.run_dir).events)])
    base = models.load(start)
    nets = [copy.deepcopy(base) for _ in range(cfg.data.cameras)]
    bus.emit("run_start", 0, baseline="local-only")
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.time()
        scores = []
        for k, net in enumerate(nets):
            if cfg.fed.adabn:  # the same recipe as a federated camera's (client/client_app.py)
                adapt_bn(net, task.camera_yaml(cfg, k), cfg)
            task.fit(net, task.camera_yaml(cfg, k), cfg, _local_spec(cfg, rnd), seed=round_seed(cfg.seed, rnd))
            if cfg.fed.adabn:
                adapt_bn(net, task.camera_yaml(cfg, k), cfg)
            scores.append(task.score(net, task.camera_yaml(cfg, k), cfg))
        central = {"cam-map50": sum(s.map50 for s in scores) / len(scores),
                   "cam-map": sum(s.map for s in scores) / len(scores),
                   "per-camera-map50": [round(s.map50, 4) for s in scores]}
        bus.emit("round_end", rnd, central=central, seconds=time.time() - t0)
    bus.emit("run_end", cfg.fed.rounds)
    return bus


def centralized(cfg: Config, start: Path) -> EventBus:
    """One model fine-tuned on the pooled camera train data, one pass over it per round. After the last round
    also: that model fine-tuned one more local round by each camera alone, and the held-out cameras' scores."""
    bus = EventBus([JsonlLog(RunDir(cfg.run_dir).events)])
    net = models.load(start)
    yamls = [task.camera_yaml(cfg, k) for k in range(cfg.data.cameras)]
    bus.emit("run_start", 0, baseline="centralized")
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.time()
        task.fit(net, yamls, cfg, _local_spec(cfg, rnd), seed=round_seed(cfg.seed, rnd))
        central = task.score_cameras(net, cfg)
        if rnd == cfg.fed.rounds:
            central.update(_mean([task.score(net, y, cfg) for y in yamls]))
            central.update({f"held-out-{k}": v for k, v in held_out_scores(net, cfg).items()} if cfg.data.held_out else {})
            tuned = []
            for y in yamls:
                own = copy.deepcopy(net)
                task.fit(own, y, cfg, _local_spec(cfg, rnd), seed=round_seed(cfg.seed, rnd + 1))
                tuned.append(task.score(own, y, cfg))
            central.update({f"finetuned-{k}": v for k, v in _mean(tuned).items()})
        bus.emit("round_end", rnd, central=central, seconds=time.time() - t0)
    bus.emit("run_end", cfg.fed.rounds)
    return bus


def _mean(scores) -> dict[str, Any]:
    return {"cam-map50": sum(r.map50 for r in scores) / len(scores), "cam-map": sum(r.map for r in scores) / len(scores),
            "per-camera-map50": [round(r.map50, 4) for r in scores]}


def camera_runs_scores(run_dir: Path) -> dict[str, Any]:
    """Mean per-camera val mAP of what each simulated camera runs after a finished run: the last global model
    plus, where the run personalized (fed.personal), that camera's personal part from the run folder, or with
    fed.keep-finetuned or fed.ditto-lambda the model of its own it kept (and with fed.adabn, BatchNorm statistics of its own frames).
    With held-out cameras (data.held-out) also theirs: the global model as it is, and after AdaBN on their frames."""
    import json

    from client.camera import personal_file
    from server.federation.checkpoint import RunCheckpoints
    from shared import personal
    from shared.config import load_config

    layout = RunDir(run_dir)
    cfg = load_config({**json.loads(layout.config.read_text()), "resume": True})
    mode, latest = cfg.fed.personal, RunCheckpoints(run_dir).latest_weights()
    per = []
    for k in range(cfg.data.cameras):
        net = models.load(latest)
        if cfg.fed.runs_own_model:
            kept, keys = personal_file({"partition-id": k}, cfg, net.yaml, "finetuned"), list(net.state_dict())
        else:
            kept, keys = personal_file({"partition-id": k}, cfg, net.yaml, mode), personal.personal_keys(net, mode)
        if cfg.fed.runs_own_model or mode != "none":
            part = personal.load_part(kept)
            if part is None:
                raise FileNotFoundError(f"{run_dir}: camera {k} kept nothing in {kept.name}")
            personal.apply_part(net, part, keys)
        if cfg.fed.adabn and not cfg.fed.runs_own_model:  # as the camera does with every model it receives
            adapt_bn(net, task.camera_yaml(cfg, k), cfg)
        per.append(task.score(net, task.camera_yaml(cfg, k), cfg))
    out = _mean(per)
    if cfg.data.held_out:
        out.update({f"held-out-{k}": v for k, v in held_out_scores(models.load(latest), cfg).items()})
    return out


def held_out_scores(model, cfg: Config) -> dict[str, Any]:
    """A new camera's start (data.held-out): the model as it is, and with AdaBN on the camera's own frames."""
    cams = [task.camera_yaml(cfg, k) for k in cfg.data.held_out_cameras]
    plain = [task.score(model, y, cfg) for y in cams]
    adapted = []
    for y in cams:
        net = copy.deepcopy(model)
        adapt_bn(net, y, cfg)
        adapted.append(task.score(net, y, cfg))
    return {**_mean(plain), **{f"adabn-{k}": v for k, v in _mean(adapted).items()}}
