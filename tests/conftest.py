"""Shared fixtures: a tiny config (imgsz 64, ~350k-parameter student) and a tiny generated world."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from shared.data.world import ensure_world
from shared.config import load_config

TINY = {
    "data.imgsz": 64, "data.cameras": 2, "data.base-train": 24, "data.base-val": 12,
    "data.camera-train": 16, "data.camera-val": 8, "data.camera-pool": 8,
    "model.student-width": 0.0625, "model.teacher-scale": "n", "model.family": "yolov8",
    "snapshot.round-to": 1, "snapshot.recover-epochs": 1,
    # The fixed recipe: most tests are not about the search (tests/test_search.py is), and it costs seconds each
    "snapshot.prune-ratio": "0.5", "snapshot.float-layers": "3", "snapshot.calib-frames": 16, "train.batch": 8, "train.epochs": 1, "train.warmup-steps": 0, "eval.batch": 8,
    # 2 threads on this 2-core machine; `make test` runs two streams side by side with 1 each (two 2-thread
    # streams on 2 cores made a 36 s fixture take 304 s)
    "train.threads": int(os.environ.get("FEDCAM_TEST_THREADS", "2")),
}


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_cfg) -> Path:
    from shared.data.world import ensure_world

    out = tmp_path_factory.mktemp("world")
    ensure_world(tiny_cfg.replace(**{"data.root": str(out)}), lazy=False)  # tests open camera folders by path
    return out


@pytest.fixture()
def tiny_student(tiny_cfg):
    from shared import models

    return models.build_student(tiny_cfg.model, tiny_cfg.data.names)


# The `trained` fixture trains in chunks until the model clearly detects on the frames the snapshot gate scores.
# A fixed short training is chaotic: the same seed ended at mAP50 0.0 on one CPU and 0.27 on another.
TRAINED_MAP50, TRAINED_CHUNK_EPOCHS, TRAINED_MAX_CHUNKS = 0.05, 10, 12


def gate_map50(model, cfg) -> float:
    """mAP50 on the cameras' pooled val splits: the figure the snapshot gate compares (server.snapshots.pipeline)."""
    from shared import task

    return task.score(model, [task.camera_yaml(cfg, k) for k in range(cfg.data.cameras)], cfg).map50


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_cfg):
    """A tiny student that detects (gate mAP50 >= TRAINED_MAP50), trained on its own small world (~10-60 s).

    Returns (cfg, model, map50), map50 being the gate's fp32 reference figure for that model.
    """
    import torch

    from shared import models, task
    from shared.train import TrainSpec

    root = tmp_path_factory.mktemp("trainedworld")
    # SiLU: at this tiny width (4-channel first layers) a ReLU student trained this briefly detects almost nothing
    # (mAP50 0.003 against > 0.02), and the gate tests need a model that detects. 32 camera val frames, so that the
    # gate's figure is not decided by a handful of boxes.
    cfg = tiny_cfg.replace(**{"data.root": str(root), "data.base-train": 64, "data.cameras": 1,
                              "data.camera-val": 32, "snapshot.calib-frames": 16, "snapshot.recover-epochs": 0,
                              "model.student-activation": "silu"})
    ensure_world(cfg)
    torch.manual_seed(0)
    model = models.build_student(cfg.model, cfg.data.names)
    seen = []
    for chunk in range(TRAINED_MAX_CHUNKS):
        spec = TrainSpec(epochs=TRAINED_CHUNK_EPOCHS, lr=0.01, optimizer="AdamW", warmup_steps=5 if chunk == 0 else 0)
        task.fit(model, task.base_yaml(cfg), cfg, spec, seed=chunk)
        seen.append(gate_map50(model, cfg))
        if seen[-1] >= TRAINED_MAP50:
            return cfg, model.eval(), seen[-1]
    raise RuntimeError(f"the `trained` fixture never reached camera mAP50 {TRAINED_MAP50} in "
                       f"{TRAINED_MAX_CHUNKS * TRAINED_CHUNK_EPOCHS} epochs (after each chunk: {seen})")


GUARD = Path(__file__).parent / "egress_guard"


def sim_cfg(tiny_cfg, world: Path, run_dir: Path, **flat):
    from server.local import warmstart

    cfg = tiny_cfg.replace(**{"data.root": str(world), "run-dir": str(run_dir), "fed.rounds": 2,
                              "fed.local-epochs": 1, "fed.local-lr": 0.01, "fed.round-timeout": 120.0, **flat})
    return warmstart.prepare(cfg)


@pytest.fixture(scope="session")
def egress_shim(tmp_path_factory) -> Path:
    """The LD_PRELOAD shim that logs every connect/sendto off loopback (FEDCAM_EGRESS_LOG names the log)."""
    shim = tmp_path_factory.mktemp("shim") / "connect_guard.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(GUARD / "connect_guard.c"), "-ldl"],
                   check=True)
    return shim


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_cfg, tiny_world, egress_shim):
    """A real 2-camera, 2-round simulation (ending in a snapshot), every process under the LD_PRELOAD egress guard."""
    from server.local import simulation

    run_dir = tmp_path_factory.mktemp("run")
    log, shim = run_dir / "egress.jsonl", egress_shim
    cfg = sim_cfg(tiny_cfg, tiny_world, run_dir / "run", **{"fed.lr-decay": 0.5})
    code = simulation.launch(cfg, 2, extra_env={"LD_PRELOAD": str(shim), "FEDCAM_EGRESS_LOG": str(log)},
                             timeout=300)
    return cfg, code, log


