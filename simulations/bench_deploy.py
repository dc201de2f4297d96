"""Round time of the same federated work on Flower's Simulation Engine vs its Deployment Engine (loopback, TLS)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.local import simulation
from server.federation.events import read_events
from server.local.loopback import Loopback, free_port_block
from server.local.warmstart import prepare
from shared.run_dir import RunDir
from shared.config import load_config, to_flat
from shared.cpu_isa import isa_summary


def phases(run_dir: Path) -> dict[str, float]:
    """Median per round: whole round, train phase (sent -> all updates back), and the clients' own figures."""
    ev = read_events(RunDir(run_dir).events)
    ends = {e["round"]: e["time"] for e in ev if e["kind"] == "round_end"}
    starts = {e["round"]: e["time"] for e in ev if e["kind"] == "round_start"}
    trains = {e["round"]: e for e in ev if e["kind"] == "train_result"}
    rounds = sorted(r for r in trains if r - 1 in ends and r in ends)
    clients = [c["metrics"] for r in rounds for c in trains[r]["data"]["clients"] if c["ok"]]

    def med(values):
        return statistics.median(values) if values else float("nan")

    return {"round": med([ends[r] - ends[r - 1] for r in rounds]),
            "train phase": med([trains[r]["time"] - starts[r] for r in rounds]),
            "client handler": med([m["seconds"] for m in clients]),
            "client training": med([m["train-seconds"] for m in clients]),
            "client imports": med([m.get("import-seconds", float("nan")) for m in clients]),
            "process age at message": med([m.get("process-age", float("nan")) for m in clients]),
            # the last update of a round leaving its camera, to the server holding them all (one clock on loopback)
            "last reply to server": med([trains[r]["time"] - max(c["metrics"].get("sent-at", float("nan"))
                                                                  for c in trains[r]["data"]["clients"] if c["ok"])
                                         for r in rounds])}


def deployed(cfg, cameras: int, work: Path, timeout: float) -> Path:
    run_dir = Path(cfg.run_dir)
    flat = {k: v for k, v in to_flat(cfg).items() if k != "resume"}
    for key in simulation.PATH_KEYS:  # the ServerApp runs elsewhere: relative paths would change meaning
        flat[key] = str(Path(flat[key]).resolve()) if flat[key] else ""
    with Loopback(work, free_port_block(), Path(sys.executable).parent) as lb:
        names = [f"cam{k:02d}" for k in range(cameras)]
        lb.make_pki(names)
        lb.start_superlink()
        for i, name in enumerate(names):
            lb.register(name)
            lb.start_supernode(name, i, {"data-path": str(Path(cfg.data.root, name, "data.yaml").resolve())})
        run_id = lb.submit(flat)
        try:
            lb.wait_run(run_id, timeout)
        finally:
            lb.stop_run(run_id)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", default="data/bench_world")
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_deploy")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--student", default="", help="starting student checkpoint (default: the cached distilled one)")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out = Path(args.out).resolve()
    common = {"data.root": args.world, "data.cameras": args.cameras, "fed.rounds": args.rounds,
              "snapshot.enabled": False, "train.threads": 1, "fed.round-timeout": 600.0}
    base = prepare(load_config({**common, "train.epochs": 30, "model.student-checkpoint": args.student}))
    stamp = time.strftime("%H%M%S")
    cfg = base.replace(**common, **{"run-dir": str(out / f"sim_{stamp}")})
    code = simulation.launch(cfg, args.cameras, timeout=args.timeout)
    rows = {"simulation": phases(Path(cfg.run_dir))} if code == 0 else {}
    dcfg = base.replace(**common, **{"run-dir": str(out / f"deploy_{stamp}")})
    rows["deployment"] = phases(deployed(dcfg, args.cameras, out / f"loopback_{stamp}", args.timeout))
    print(f"\n{args.cameras} cameras, {args.rounds} rounds, median seconds per round (simulation exit code {code})")
    keys = list(next(iter(rows.values())))
    print(f"{'':<26}" + "".join(f"{k:>14}" for k in rows))
    for k in keys:
        print(f"{k:<26}" + "".join(f"{r[k]:>14.2f}" for r in rows.values()))


if __name__ == "__main__":
    main()
