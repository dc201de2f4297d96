"""What differential privacy costs: final mean camera mAP50 and the accountant's epsilon at delta 1e-5 for central DP
at several noise multipliers (clipping at the median update norm of a non-private run) and local DP at one setting;
one run per arm, same world, seed and start, the non-private run first."""

from __future__ import annotations

import argparse
import statistics
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


def trains(run: Path) -> list[dict]:
    return [e for e in read_events(RunDir(run).events) if e["kind"] == "train_result"]


def simulate(run: Path, common: list[str], sets: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", *common, "--run-dir", str(run), "--timeout",
                    "7200", "--dashboard-port", "0", *[x for s in sets for x in ("--set", s)]],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIOS / "non_iid.toml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_privacy")
    ap.add_argument("--central", default="0.3,0.7,1.0,2.0", help="noise multipliers of the central-DP arms")
    ap.add_argument("--local", type=float, default=1.0, help="noise multiplier of the local-DP arm (0: none)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every arm")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out, delta = Path(args.out), 1e-5
    common = ["--scenario", args.scenario, "--rounds", str(args.rounds), "--set", "snapshot.enabled=false",
              *[x for s in args.sets for x in ("--set", s)]]

    wall = simulate(out / "off", common, [])
    # Clip at the median norm of the non-private updates (the server's decoded norm of what each camera sent).
    clip = statistics.median(c["metrics"]["update-norm-server"] for e in trains(out / "off")
                             for c in e["data"]["clients"] if c["ok"])
    base = camera_runs_scores(out / "off")["cam-map50"]
    rows = [("off", 0.0, float("inf"), base, float("nan"), wall)]
    print(f"off: {base:.3f}; clip = median update norm {clip:.4g}", flush=True)
    dp = [f"fed.dp-clip={clip}", f"fed.dp-delta={delta}"]
    arms = [("central", float(z)) for z in args.central.split(",") if z] + ([("local", args.local)] * (args.local > 0))
    for mode, z in arms:
        run = out / f"{mode}_{z:g}"
        wall = simulate(run, common, [f"fed.dp={mode}", f"fed.dp-noise={z}", *dp])
        ts = trains(run)
        eps = ts[-1]["data"]["privacy"]["epsilon"]
        clipped = statistics.mean(c["metrics"].get("dp-clipped", float("nan")) for e in ts for c in e["data"]["clients"]
                                  if c["ok"])
        score = camera_runs_scores(run)["cam-map50"]
        rows.append((mode, z, eps, score, clipped, wall))
        print(f"{mode} z={z:g}: {score:.3f}, epsilon {eps:.2f}", flush=True)

    print(f"\n{Path(args.scenario).stem}, {args.rounds} rounds, clip {clip:.4g} (median update norm of 'off'), "
          f"delta {delta:g}; mAP50: mean over cameras of what each runs")
    print(f"{'arm':<10}{'z':>6}{'epsilon':>10}{'mAP50':>8}{'of off':>8}{'clipped':>9}{'wall s':>8}")
    for mode, z, eps, score, clipped, wall in rows:
        print(f"{mode:<10}{z:>6.2f}{eps:>10.2f}{score:>8.3f}{score / base:>8.2f}{clipped:>9.2f}{wall:>8.0f}")


if __name__ == "__main__":
    main()
