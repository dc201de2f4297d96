"""Would serving an average of the global models over the rounds stop FedAvg's round-to-round drops (issue 17's
"no arm diverges")? The cameras keep training from each round's global model G_t, so the served average
E_t = b E_(t-1) + (1 - b) G_t is computed here from a finished run's checkpoints, exactly as the server would keep it.
Evaluation only: `probe_round_ema.py RUN_DIR [--betas 0,0.5,0.7]`; pooled camera-val mAP50 per round and beta."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from shared import models, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402


def averaged(ema: dict | None, state: dict, beta: float) -> dict:
    """One step of the average; integer buffers (BatchNorm's batch count) are taken as they are."""
    if ema is None or beta == 0:
        return {k: v.clone() for k, v in state.items()}
    return {k: (beta * ema[k].double() + (1 - beta) * v.double()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def largest_drop(scores: list[float]) -> float:
    return max([0.0] + [a - b for a, b in zip(scores, scores[1:])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--betas", default="0,0.5,0.7", help="weights of the previous average (0: the round's model)")
    args = ap.parse_args()
    cfg = load_config({**RunDir(args.run_dir).overrides(), "resume": True})
    print(f"instruction sets: {isa_summary()}", flush=True)
    task.set_threads(cfg.train.threads)
    ckpt, rounds = RunCheckpoints(args.run_dir), cfg.fed.rounds
    yamls = [task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)]
    betas = [float(b) for b in args.betas.split(",")]
    model = models.load(ckpt.weights(1))
    ema: dict[float, dict | None] = {b: None for b in betas}
    scores: dict[float, list[float]] = {b: [] for b in betas}
    for rnd in range(1, rounds + 1):
        state = models.load(ckpt.weights(rnd)).state_dict()
        for b in betas:
            ema[b] = averaged(ema[b], state, b)
            model.load_state_dict(ema[b])
            scores[b].append(task.score(model, yamls, cfg).map50)
        print(f"round {rnd}: " + ", ".join(f"beta {b:g} {scores[b][-1]:.3f}" for b in betas), flush=True)
    for b in betas:
        print(f"beta {b:g}: final {scores[b][-1]:.3f}, mean of rounds {sum(scores[b]) / rounds:.3f}, "
              f"largest drop {largest_drop(scores[b]):.3f}")


if __name__ == "__main__":
    main()
