"""How much of AdaBN helps a camera the federation never saw: the finished run's global model scored on held-out
cameras with BatchNorm statistics from their own train frames in all layers, in the first k only, or mixed with the
global statistics. Evaluation only, no training: `probe_adabn.py RUN_DIR [--cameras 8,9]` (a bench_personal arm)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from shared import models, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402
from shared.train import estimate_bn_stats  # noqa: E402

FIRST = (1, 3, 6, 12, 24)
MIX = (0.25, 0.5)


def norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def with_stats(base, own, first: int | None = None, alpha: float = 1.0):
    """`base` with the first `first` BatchNorm layers' statistics (all when None) moved to `own`'s by `alpha`."""
    net = copy.deepcopy(base)
    for mine, theirs in list(zip(norms(net), norms(own)))[:first]:
        mine.running_mean.lerp_(theirs.running_mean, alpha)
        mine.running_var.lerp_(theirs.running_var, alpha)
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cameras", default="", help="camera ids (default: the run's held-out cameras)")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    cfg = load_config({**json.loads(RunDir(args.run_dir).config.read_text()), "resume": True})
    base = models.load(RunCheckpoints(args.run_dir).latest_weights())
    cameras = [int(c) for c in args.cameras.split(",")] if args.cameras else cfg.data.held_out_cameras
    rows = {}
    for k in cameras:
        data = task.camera_yaml(cfg, k)
        own = copy.deepcopy(base)
        estimate_bn_stats(own, task.make_loader(data, "train", cfg, False, batch=cfg.train.batch))  # labels unused
        arms = {"global": base, "all": own, **{f"first {n}": with_stats(base, own, n) for n in FIRST},
                **{f"mix {a}": with_stats(base, own, alpha=a) for a in MIX}}
        rows[k] = {name: task.score(net, data, cfg).map50 for name, net in arms.items()}
        print(f"camera {k}: " + ", ".join(f"{n} {v:.3f}" for n, v in rows[k].items()), flush=True)
    print(f"mean over cameras {cameras} ({len(norms(base))} BatchNorm layers): " + ", ".join(
        f"{n} {sum(r[n] for r in rows.values()) / len(rows):.3f}" for n in rows[cameras[0]]))


if __name__ == "__main__":
    main()
