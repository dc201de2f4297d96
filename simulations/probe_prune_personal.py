"""How a camera's own part should enter a snapshot pruned after the rounds: the finished run's global model pruned
and recovered once on the server, then per camera (fp32 val mAP50 on its own frames) what the camera runs unpruned,
the pruned global one, the camera's copy cut the same way (prune.replay) replacing it, or the camera's difference
from the global model added to it (parameters; statistics replaced). `probe_prune_personal.py RUN_DIR` (a run with
fed.personal, fed.keep-finetuned or fed.ditto-lambda > 0)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from client import camera  # noqa: E402
from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from server.snapshots.pipeline import pruned_student  # noqa: E402
from server.snapshots.prune import replay  # noqa: E402
from shared import models, personal, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402


def with_state(model, state: dict[str, torch.Tensor]):
    net = copy.deepcopy(model)
    net.load_state_dict({**net.state_dict(), **state})
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ratio", type=float, default=0.25)
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    cfg = load_config({**json.loads(RunDir(args.run_dir).config.read_text()), "resume": True})
    dense = models.load(RunCheckpoints(args.run_dir).latest_weights())
    student = pruned_student(dense, args.ratio, cfg)  # as the snapshot does: Taylor or magnitude, then recovery
    twin = replay(dense, student.prune_steps, cfg.data.imgsz).state_dict()
    rows = {}
    for k in range(cfg.data.cameras):
        node = {"partition-id": k}
        own = copy.deepcopy(dense)
        mode = "finetuned" if cfg.fed.runs_own_model else cfg.fed.personal
        part = personal.load_part(camera.personal_file(node, cfg, dense.yaml, mode))
        if part is None:
            print(f"camera {k}: no {mode} part on disk", flush=True)
            continue
        personal.apply_part(own, part, list(part))
        cut = replay(own, student.prune_steps, cfg.data.imgsz).state_dict()
        params = {n for n, _ in student.named_parameters()}
        delta = {n: (student.state_dict()[n] + cut[n] - twin[n]) if n in params else cut[n] for n in cut}
        arms = {"own unpruned": own, "global unpruned": dense, "global pruned": student, "own cut": with_state(student, cut),
                "global + own delta": with_state(student, delta)}
        data = task.camera_yaml(cfg, k)
        rows[k] = {name: task.score(net, data, cfg).map50 for name, net in arms.items()}
        print(f"camera {k}: " + ", ".join(f"{n} {v:.3f}" for n, v in rows[k].items()), flush=True)
    names = next(iter(rows.values()))
    print(f"mean over {len(rows)} cameras, pruned {args.ratio:.0%}: " +
          ", ".join(f"{n} {statistics.fmean(r[n] for r in rows.values()):.3f}" for n in names))


if __name__ == "__main__":
    main()
