"""Bytes on the wire per arm of fed.compress (none, int8, top-k): measured from the serialized Flower messages of real
simulated rounds, with the final mean camera mAP50 of the global model; one run per arm, same world, seed and start."""

from __future__ import annotations

import argparse
import gzip
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
CLUSTER = 16  # shared values per conv for the weight-shared snapshot
DEFAULT_ARMS = ["none=", "int8=fed.compress=int8", "topk10=fed.compress=topk;fed.compress-topk=0.1",
                "topk1=fed.compress=topk;fed.compress-topk=0.01"]


def wire(run_dir: Path) -> tuple[float, float, float, list[float]]:
    """Mean bytes down (first round apart: it is the whole model), down after it, up, per camera and round; and
    the global model's mAP50 on the cameras after every round."""
    trains = [e for e in read_events(RunDir(run_dir).events) if e["kind"] == "train_result"]
    per = [[c["metrics"] for c in e["data"]["clients"] if c["ok"]] for e in trains]
    first = statistics.mean(m["bytes-down"] for m in per[0])
    later = statistics.mean(m["bytes-down"] for ms in per[1:] for m in ms) if len(per) > 1 else first
    up = statistics.mean(m["bytes-up"] for ms in per for m in ms)
    curve = [e["data"]["central"].get("map50", float("nan")) for e in read_events(RunDir(run_dir).events)
             if e["kind"] == "round_end" and e["data"]["central"]]
    return first, later, up, curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIOS / "non_iid.toml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_compress")
    ap.add_argument("--arm", action="append", help="NAME=key=value;key=value (default: none, int8, topk 10 %%, 1 %%)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every arm")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out, rows = Path(args.out), []
    common = ["--scenario", args.scenario, "--rounds", str(args.rounds), "--set", "snapshot.enabled=false",
              *[x for s in args.sets for x in ("--set", s)]]
    for arm in args.arm or DEFAULT_ARMS:
        name, _, sets = arm.partition("=")
        run, t0 = out / name, time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", "simulate", *common, "--run-dir", str(run), "--timeout",
                        "7200", "--dashboard-port", "0", *[x for s in sets.split(";") if s for x in ("--set", s)]],
                       check=True, stdout=subprocess.DEVNULL)
        score, (first, later, up, curve) = camera_runs_scores(run), wire(run)
        rows.append((name, score, first, later, up, curve, time.perf_counter() - t0))
        print(f"{name}: {score['cam-map50']:.3f}, {up / 1024:.0f} KB up", flush=True)
    base = rows[0]
    print(f"\n{Path(args.scenario).stem}, {args.rounds} rounds; KB per camera per round, measured from the messages; "
          f"ratios against {base[0]}")
    # mAP50: mean over cameras of what each runs (camera_runs_scores); pooled: the server's central score of the
    # global model on all cameras' val frames, whose worst drop between consecutive rounds is shown too
    print(f"{'arm':<10}{'down 1st':>10}{'down':>8}{'up':>8}{'down x':>8}{'up x':>7}{'mAP50':>8}{'d mAP50':>9}"
          f"{'pooled':>8}{'d pooled':>9}{'worst drop':>11}{'wall s':>8}")
    for name, s, first, later, up, curve, wall in rows:
        drop = max((a - b for a, b in zip(curve, curve[1:])), default=0.0)
        print(f"{name:<10}{first / 1024:>10.0f}{later / 1024:>8.0f}{up / 1024:>8.0f}{later / base[3]:>8.3f}"
              f"{up / base[4]:>7.3f}{s['cam-map50']:>8.3f}{s['cam-map50'] - base[1]['cam-map50']:>+9.3f}"
              f"{curve[-1]:>8.3f}{curve[-1] - base[5][-1]:>+9.3f}{drop:>11.3f}{wall:>8.0f}")
    snapshot_bytes(out / base[0], args.rounds, args.sets)


def snapshot_bytes(run: Path, rounds: int, sets: list[str]) -> None:
    """Two snapshots of consecutive rounds of one structure (no post-round pruning), and two weight-shared ones of the
    last: bytes of the int8 ONNX, of it gzipped, of the delta a device that runs the first downloads for the second,
    and of the packed weight-shared forms."""
    from shared.snapshot.format import MODEL_FILE, Manifest

    registry = run / "bench_snapshots"
    flat = ["--set", f"snapshot.dir={registry}", "--set", "snapshot.prune-ratio=0", "--set", "snapshot.tolerance=1",
            *[x for s in sets for x in ("--set", s)]]
    # rounds N-1 and N plain (the second carries the delta from the first), then round N weight-shared, with
    # codebooks per output channel (the default) and per layer
    shared = [f"snapshot.cluster={CLUSTER}"]
    arms = ((rounds - 1, "plain", []), (rounds, "plain", []), (rounds, "shared per channel", shared),
            (rounds, "shared per layer", [*shared, "snapshot.cluster-per=layer"]))
    for rnd, _, more in arms:
        subprocess.run([sys.executable, "-m", "server.cli", "snapshot", "--checkpoint",
                        str(RunDir(run).checkpoints / f"global_r{rnd:04d}.pt"), "--run", str(run), "--round", str(rnd),
                        *flat, *[x for s in more for x in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
    folders = sorted(p for p in (registry / "global").iterdir() if p.name.startswith("v"))[-len(arms):]
    print(f"\nsnapshots of rounds {rounds - 1} and {rounds}, and of round {rounds} with {CLUSTER} shared values per "
          f"conv ({run.name} arm): bytes a device downloads")
    for folder, (rnd, label, _) in zip(folders, arms):
        m = Manifest.from_bytes((folder / "manifest.json").read_bytes())
        model = (folder / MODEL_FILE).read_bytes()
        delta, packed = m.extra.get("delta"), m.extra.get("packed")
        delta = f"{delta['from']} {delta['size'] / 1024:.0f} KB" if delta else "-"
        print(f"  {m.version} (round {rnd}, {label}): int8 ONNX {len(model) / 1024:.0f} KB, "
              f"gzip -9 {len(gzip.compress(model, 9)) / 1024:.0f} KB, delta from {delta},"
              f" packed {format(packed['size'] / 1024, '.0f') + ' KB' if packed else '-'};"
              f" mAP50 int8 {m.map50_int8:.3f} (fp32 {m.map50_fp32:.3f})")


if __name__ == "__main__":
    main()
