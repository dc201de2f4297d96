"""Federated benchmark: strategies vs local-only vs centralized on the non-IID scenario; simulation overhead."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.cli.common import scenario_overrides
from server.federation.events import read_events
from shared import models, task
from shared.run_dir import RunDir
from shared.config import load_config
from shared.cpu_isa import isa_summary

SCENARIO = Path(__file__).parent / "scenarios" / "non_iid.toml"


def fedcam(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def curve(run_dir: Path, key: str) -> dict[int, float]:
    return {e["round"]: e["data"]["central"][key] for e in read_events(RunDir(run_dir).events)
            if e["kind"] == "round_end" and key in e["data"].get("central", {})}


def peak_rss_while(fn, pss: bool = False, children_only: bool = False) -> tuple[float, float]:
    """Run fn(); sample the RSS (or PSS) of this process tree every 0.5 s; return (seconds, peak GiB). PSS counts
    the pages processes share (torch's libraries, Ray's object store) once, where a sum of RSS counts them per
    process; reading it costs CPU. `children_only` leaves this process out (a benchmark that has itself loaded
    torch and models to time the direct twin is not part of what it measures)."""
    peak, stop, me = 0.0, threading.Event(), psutil.Process()

    def sample():
        nonlocal peak
        while not stop.wait(0.5):
            procs = ([] if children_only else [me]) + me.children(recursive=True)
            total = 0
            for p in procs:
                try:
                    total += p.memory_full_info().pss if pss else p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total / 2**30)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return time.perf_counter() - t0, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--strategies", default="fedavg,fedprox,fedadam")
    ap.add_argument("--many", type=int, default=50, help="cameras for the memory measurement (0: skip)")
    ap.add_argument("--reuse", action="append", default=[], help="NAME=RUN_DIR of a finished run of this scenario")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out = Path(args.out)
    runs = {name: Path(d) for name, _, d in (r.partition("=") for r in args.reuse)}
    for s in args.strategies.split(","):
        if not s or s in runs:
            continue
        runs[s] = out / s
        wall = fedcam("simulate", "--scenario", str(SCENARIO), "--rounds", str(args.rounds), "--strategy", s,
                      "--run-dir", str(runs[s]), "--timeout", "7200", "--set", "snapshot.enabled=false")
        print(f"{s}: {wall:.0f}s wall", flush=True)
    for kind in ("local", "central"):
        runs[kind] = out / kind
        fedcam("baseline", kind, "--scenario", str(SCENARIO), "--rounds", str(args.rounds), "--run-dir", str(runs[kind]))

    key = "cam-map50"
    curves = {k: curve(v, key) for k, v in runs.items()}
    untouched = next(iter(curves.values())).get(0, float("nan"))
    central_final = curves["central"].get(args.rounds, float("nan"))
    print(f"\nnon-IID, {args.rounds} rounds, mean camera-val mAP50 (untouched base student: {untouched:.3f})")
    print(f"{'method':<10}" + "".join(f"{'r' + str(r):>7}" for r in range(1, args.rounds + 1)) + f"{'to 95% central':>16}")
    for k, c in curves.items():
        hit = next((r for r in sorted(c) if r > 0 and c[r] >= 0.95 * central_final), None)
        print(f"{k:<10}" + "".join(f"{c.get(r, float('nan')):>7.3f}" for r in range(1, args.rounds + 1))
              + f"{hit if hit is not None else '-':>16}")

    # Overhead: the same local work (same steps, same threads) done directly, no Flower, no Ray.
    cfg = load_config({**scenario_overrides(SCENARIO), "fed.rounds": args.rounds})
    from client.camera import local_evaluate, local_finetune
    from server.local.warmstart import prepare

    cfg = prepare(cfg)
    start = models.load(cfg.model.student_checkpoint)
    t0 = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        for k in range(cfg.data.cameras):
            net = models.load(cfg.model.student_checkpoint)
            local_finetune(net, task.camera_yaml(cfg, k), cfg, {"seed": rnd})
            local_evaluate(net, task.camera_yaml(cfg, k), cfg)  # the clients' federated evaluation
        task.score_cameras(start, cfg)  # the server's central evaluation
    direct = time.perf_counter() - t0
    ev = read_events(RunDir(runs["fedavg"]).events) if "fedavg" in runs else []
    ends = [e["time"] for e in ev if e["kind"] == "round_end" and e["round"] <= args.rounds]  # no snapshot work
    sim = ends[-1] - ev[0]["time"] if ends else float("nan")
    print(f"\noverhead: simulation {sim:.0f}s vs direct {direct:.0f}s for the same training and evaluation "
          f"-> ratio {sim / direct:.2f}")

    if args.many:
        many = Path(__file__).parent / "scenarios" / "many_cameras.toml"
        secs, peak = peak_rss_while(lambda: fedcam("simulate", "--scenario", str(many), "--rounds", "1",
                                                   "--cameras", str(args.many), "--run-dir", str(out / "many"),
                                                   "--set", "snapshot.enabled=false"))
        print(f"{args.many} cameras, 1 round: {secs:.0f}s, peak RSS of all processes {peak:.2f} GiB")


if __name__ == "__main__":
    main()
