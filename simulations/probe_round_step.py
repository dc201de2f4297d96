"""FedAvg's round step, taken apart in one process: how far the cameras' updates agree, and what the mean update is
worth when the server scales it (a server lr above 1), per parameter group (issue 17's "effective step" question)."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
import torch  # noqa: E402

from server.cli.common import scenario_overrides  # noqa: E402
from server.local.warmstart import prepare  # noqa: E402
from shared import models, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.train import TrainSpec, local_plan, round_seed  # noqa: E402

SCENARIOS = Path(__file__).parent / "scenarios"
HEAD_OUT = re.compile(r"\.(cv2|cv3)\.\d\.2\.")  # the detect head's output convs (box bins, class scores)
GROUPS = {"all": lambda k: True, "conv weights": lambda k: k.endswith("conv.weight"),
          "BatchNorm": lambda k: ".bn." in k, "head outputs": lambda k: HEAD_OUT.search(k) is not None}


def camera_deltas(model, cfg, yamls) -> list[dict[str, torch.Tensor]]:
    """Each camera's update from `model` after one local round of the run's plan (what it would send)."""
    spec, start = TrainSpec.local(cfg.train, cfg.fed, local_plan(cfg.fed)), model.state_dict()
    out = []
    for y in yamls:
        net = copy.deepcopy(model)
        task.fit(net, y, cfg, spec, seed=round_seed(cfg.seed, 1))
        out.append({k: v.double() - start[k].double() for k, v in net.state_dict().items() if v.is_floating_point()})
    return out


def norm(d: dict[str, torch.Tensor], keys: list[str]) -> float:
    return sum(float((d[k] ** 2).sum()) for k in keys) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIOS / "demo.toml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value config override")
    ap.add_argument("--scales", default="1,2,4,8", help="server learning rates to try on the mean update")
    args = ap.parse_args()
    flat = {**scenario_overrides(Path(args.scenario)), **dict(s.split("=", 1) for s in args.sets)}
    cfg = prepare(load_config(flat))
    print(f"instruction sets: {isa_summary()}", flush=True)
    yamls = [task.camera_yaml(cfg, k) for k in range(cfg.data.cameras)]
    model = models.load(Path(cfg.model.student_checkpoint))
    deltas = camera_deltas(model, cfg, yamls)
    mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in deltas[0]}
    # |mean|² against the cameras' mean |Δ_k|²: 1 when they agree, 1/K when they are orthogonal (FedExP's signal).
    print(f"{'group':<14}{'|mean update|':>15}{'mean |camera update|':>22}{'agreement':>11}")
    for name, pick in GROUPS.items():
        keys = [k for k in mean if pick(k)]
        each = (sum(norm(d, keys) ** 2 for d in deltas) / len(deltas)) ** 0.5
        print(f"{name:<14}{norm(mean, keys):>15.4g}{each:>22.4g}{norm(mean, keys) ** 2 / max(each ** 2, 1e-30):>11.2f}")

    def score(scale: float, pick) -> float:
        net = copy.deepcopy(model)
        net.load_state_dict({k: (v.double() + scale * mean[k]).to(v.dtype) if k in mean and pick(k) else v
                             for k, v in model.state_dict().items()})
        return sum(task.score(net, y, cfg).map50 for y in yamls) / len(yamls)

    scales = [float(s) for s in args.scales.split(",")]
    print(f"\nmean per-camera val mAP50 of start + s × mean update (start: {score(0.0, GROUPS['all']):.3f})")
    print(f"{'group':<14}" + "".join(f"{'s=' + format(s, 'g'):>8}" for s in scales))
    for name, pick in GROUPS.items():
        print(f"{name:<14}" + "".join(f"{score(s, pick):>8.3f}" for s in scales), flush=True)


if __name__ == "__main__":
    main()
