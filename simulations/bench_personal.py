"""Personalization benchmark: what each camera runs after the rounds, per arm (fed.personal, local budget), vs alone."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.events import read_events
from server.local.baselines import camera_runs_scores
from shared.cpu_isa import isa_summary
from shared.run_dir import RunDir

SCENARIOS = Path(__file__).parent / "scenarios"
# name -> overrides; every arm runs FedAvg on the same world, start and rounds.
DEFAULT_ARMS = ["none=", "none-bn-adapts=fed.freeze-bn=false", "bn=fed.personal=bn;fed.freeze-bn=false",
                "head=fed.personal=head", "bn+head=fed.personal=bn+head;fed.freeze-bn=false",
                "adabn=fed.adabn=true", "bn-adabn=fed.personal=bn;fed.adabn=true",
                "head-adabn=fed.personal=head;fed.adabn=true", "bn+head-adabn=fed.personal=bn+head;fed.adabn=true"]


def fedcam(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bytes_up(run_dir: Path) -> float:
    """Mean bytes a camera sent per round."""
    sent = [c["metrics"].get("bytes-up", 0.0) for e in read_events(RunDir(run_dir).events)
            if e["kind"] == "train_result" for c in e["data"]["clients"] if c["ok"]]
    return sum(sent) / max(1, len(sent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIOS / "demo.toml"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="runs/bench_personal")
    ap.add_argument("--arm", action="append", help="NAME=key=value;key=value (default: none, bn, head, ...)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="key=value for every arm and the local-only runs alike (e.g. fed.local-epochs=3)")
    ap.add_argument("--locals", default="local-only,centralized", help="baselines to run: local-only, local-bn-adapts, local-adabn, centralized")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out, rows = Path(args.out), []
    both = [x for s in args.sets for x in ("--set", s)]
    common = ["--scenario", args.scenario, "--rounds", str(args.rounds), "--set", "snapshot.enabled=false", *both]
    for arm in args.arm or DEFAULT_ARMS:
        name, _, sets = arm.partition("=")
        run = out / name
        extra = [x for s in sets.split(";") if s for x in ("--set", s)]
        wall = fedcam("simulate", *common, "--run-dir", str(run), "--timeout", "7200", "--dashboard-port", "0",
                      *extra)
        score = camera_runs_scores(run)
        rows.append((name, score, bytes_up(run), wall))
        print(f"{name}: {score['cam-map50']:.3f} ({wall:.0f}s)", flush=True)
    locals_ = {"local-only": ("local", []), "local-bn-adapts": ("local", ["--set", "fed.freeze-bn=false"]),
               "local-adabn": ("local", ["--set", "fed.adabn=true"]), "centralized": ("central", [])}
    for name in filter(None, args.locals.split(",")):
        kind, sets = locals_[name]
        wall = fedcam("baseline", kind, "--scenario", args.scenario, "--rounds", str(args.rounds),
                      "--run-dir", str(out / name), *both, *sets)  # the same local budget as every arm
        end = [e for e in read_events(RunDir(out / name).events) if e["kind"] == "round_end"][-1]
        rows.append((name, end["data"]["central"], 0.0, wall))
        if kind == "central":  # and that model fine-tuned one more local round by each camera alone
            tuned = {k.removeprefix("finetuned-"): v for k, v in end["data"]["central"].items()
                     if k.startswith("finetuned-")}
            rows.append(("central+ft", {**end["data"]["central"], **tuned}, 0.0, 0.0))
    print(f"\n{Path(args.scenario).stem}, {args.rounds} rounds: mean per-camera val mAP of what each camera runs")
    print(f"{'arm':<16}{'mAP50':>8}{'mAP50-95':>10}{'KB up/round':>13}{'wall s':>8}{'new cam':>9}{'+AdaBN':>8}"
          "  per camera")
    for name, s, up, wall in rows:
        per = " ".join(f"{v:.3f}" for v in s.get("per-camera-map50", []))
        new = f"{s['held-out-cam-map50']:>9.3f}{s['held-out-adabn-cam-map50']:>8.3f}" if "held-out-cam-map50" in s else " " * 17
        print(f"{name:<16}{s['cam-map50']:>8.3f}{s['cam-map']:>10.3f}{up / 1024:>13.0f}{wall:>8.0f}{new}  {per}")


if __name__ == "__main__":
    main()
