"""Simulation at scale: where a simulated round's time goes against the same work done directly (interleaved), and
seconds per round, peak RSS and world generation at 4 to 256 cameras with a fixed number sampled per round."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.events import read_events
from server.local.warmstart import prepare
from shared import models, task
from shared.config import load_config
from shared.cpu_isa import isa_summary
from shared.data.world import ensure_camera, ensure_world
from shared.run_dir import RunDir
from shared.train import local_plan, round_seed

from bench_federated import peak_rss_while  # noqa: E402 - beside this script


def scenario(out: Path, cameras: int, sampled: int, rounds: int, imgsz: int) -> dict:
    """Cameras of the default size (80 labelled train and 40 val frames; no unlabelled pool, no teacher) in a lazy
    world, a quickly base-trained student, `sampled` cameras per round, central evaluation on 8 cameras after round
    0 and the last round only, no snapshot: the rounds themselves are measured."""
    return {"data.root": str(out / "world"), "data.cameras": cameras, "data.imgsz": imgsz, "data.base-train": 64,
            "data.base-val": 16, "data.camera-pool": 0,
            "model.start": "base", "train.epochs": 2, "fed.rounds": rounds, "fed.fraction-train": sampled / cameras,
            "fed.min-nodes": min(2, cameras), "fed.central-cameras": 8, "fed.central-every": rounds,
            "snapshot.enabled": False}


# First match wins; a Ray worker starts as default_worker.py, then retitles itself ray::IDLE, then ray::<actor>.
ROLES = (("ClientAppActor", "client actors"), ("ray::IDLE", "idle Ray workers"), ("default_worker", "idle Ray workers"),
         ("flwr-simulation", "ServerApp + Ray driver"), ("flower-super", "Flower SuperLink, SuperExec"),
         ("bin/flwr", "flwr run --stream"), ("multiprocessing", "snapshot worker"),
         ("server.cli", "fedcam simulate (CLI)"), ("raylet", "Ray: raylet"), ("gcs_server", "Ray: GCS"),
         ("ray", "Ray: agents, monitors"))
FLOWER, CLI = (next(i for i, (key, _) in enumerate(ROLES) if key == k) for k in ("flower-super", "server.cli"))


def role(p: psutil.Process) -> int:
    """Index into ROLES of what `p` is now (a process that retitles itself is sampled again)."""
    text = " ".join(p.cmdline()) or p.name()
    return next((i for i, (key, _) in enumerate(ROLES) if key in text), len(ROLES))


def cpu_by_role_while(fn) -> tuple[float, dict[str, float]]:
    """Run fn(); every 2 s note each descendant's CPU seconds (user + system) by what it is; (wall s, role -> CPU s).
    Cheap (no memory maps read), so the timed runs use it: it says which processes share the 2 cores."""
    last: dict[tuple[int, float], tuple[int, float]] = {}
    stop, me, cli_before = threading.Event(), psutil.Process(), [0.0]

    def sample():
        while not stop.wait(2.0):
            for p in me.children(recursive=True):
                try:
                    with p.oneshot():
                        t, key, now = p.cpu_times(), (p.pid, p.create_time()), role(p)
                        last[key] = (min(now, last[key][0]) if key in last else now, t.user + t.system)
                except psutil.Error:
                    pass
            if not any(r == FLOWER for r, _ in last.values()):  # no SuperLink yet: the CLI is still preparing
                cli_before[0] = sum(c for r, c in last.values() if r == CLI)

    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    by_role: dict[str, float] = {"fedcam simulate (CLI), before the SuperLink started": cli_before[0]}
    for index, cpu in last.values():
        name = ROLES[index][1] if index < len(ROLES) else "other"
        by_role[name] = by_role.get(name, 0.0) + cpu
    return time.perf_counter() - t0, by_role


def simulate(flat: dict, run_dir: Path, memory: bool) -> tuple[float, float | dict[str, float]]:
    """`fedcam simulate` as a user runs it: (wall seconds, peak GiB) with `memory`, else (wall seconds, CPU seconds
    by process role). Reading every process' PSS costs CPU, so the runs timed against direct compute don't."""
    sets = [a for k, v in flat.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--run-dir", str(run_dir), "--dashboard-port", "0",
           "--timeout", "3600", *sets]
    run = lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # noqa: E731
    if memory:
        return peak_rss_while(run, pss=True, children_only=True)
    return cpu_by_role_while(run)


def rounds_of(run_dir: Path) -> tuple[list[dict], dict[int, float]]:
    """Per-round events: client metrics of each train_result, and each round_end's time."""
    ev = read_events(RunDir(run_dir).events)
    return ev, {e["round"]: e["time"] for e in ev if e["kind"] == "round_end"}


def direct(flat: dict, run_dir: Path, events: list[dict]) -> dict[str, float]:
    """The simulation's compute, done here: each sampled camera's evaluation and fine-tune of the model it was sent
    (same weights from the round checkpoints, plan, seed, threads, data) and the server's central evaluations of
    each round's model, without Flower or Ray. The weights matter: NMS and matching cost follow the boxes a model
    proposes."""
    from client.camera import local_evaluate, local_finetune

    start = next(e for e in events if e["kind"] == "run_start")["data"]["config"]["model.student-checkpoint"]
    cfg = load_config({**flat, "model.student-checkpoint": start})
    task.set_threads(cfg.train.threads)
    weights = lambda rnd: RunDir(run_dir).checkpoints / f"global_r{rnd:04d}.pt" if rnd else Path(start)  # noqa: E731
    got, per_message = {"eval": 0.0, "finetune": 0.0, "central": 0.0, "central-0": 0.0}, []
    scored = [e["round"] for e in events if e["kind"] == "round_end" and e["data"].get("central")]
    for e in (e for e in events if e["kind"] in ("train_result", "round_end")):
        if e["kind"] == "round_end":
            if e["round"] in scored:
                net = models.load(weights(e["round"]))
                t0 = time.perf_counter()
                task.score_cameras(net, cfg)
                got["central" if e["round"] else "central-0"] += time.perf_counter() - t0
            continue
        for c in e["data"]["clients"]:
            net, data = models.load(weights(e["round"] - 1)), task.camera_yaml(cfg, int(c["metrics"]["partition"]))
            t0 = time.perf_counter()
            local_evaluate(net, data, cfg)
            t1 = time.perf_counter()
            local_finetune(net, data, cfg, {**local_plan(cfg.fed, e["round"]), "seed": round_seed(cfg.seed, e["round"])})
            got["eval"] += t1 - t0
            got["finetune"] += time.perf_counter() - t1
            per_message.append(time.perf_counter() - t1)
    got["finetune-median"] = statistics.median(per_message) if per_message else float("nan")
    return got


def profile(name: str, run_dir: Path, wall: float, here: dict[str, float]) -> dict[str, float]:
    """One simulated run split into stages, next to the same compute done directly."""
    ev, ends = rounds_of(run_dir)
    clients = [c["metrics"] for e in ev if e["kind"] == "train_result" for c in e["data"]["clients"]]
    total = lambda key: sum(m.get(key, 0.0) for m in clients)  # noqa: E731
    start = next(e["time"] for e in ev if e["kind"] == "run_start")
    rows = {"whole run (process start to exit)": wall,
            "Ray, actors, round-0 evaluation (run_start to round 0 end)": ends[0] - start,
            "rounds (round 0 end to last round end)": ends[max(ends)] - ends[0],
            "client: imports": total("import-seconds"), "client: setup (config, model rebuild, data)":
            total("setup-seconds"), "client: evaluation": total("eval-seconds"),
            "client: fine-tune": total("finetune-seconds"), "client: reply (personal part, packing)":
            total("reply-seconds"),
            "server: central evaluation": sum(e["data"].get("eval_seconds", 0.0) for e in ev if e["kind"] == "round_end"),
            "direct: evaluation": here["eval"], "direct: fine-tune": here["finetune"],
            "direct: central evaluation, round 0": here["central-0"],
            "direct: central evaluation, later rounds": here["central"]}
    rounds = rows["rounds (round 0 end to last round end)"]
    compute = here["eval"] + here["finetune"] + here["central"]  # what the rounds after round 0 did
    rows["direct compute of the rounds"] = compute
    print(f"\n{name}: where the time goes (s)")
    for k, v in rows.items():
        print(f"  {k:<60}{v:>8.1f}")
    # The same fine-tunes' medians: a machine that ran slower while one side ran shows here, not as overhead.
    mine = [m["finetune-seconds"] for m in clients if "finetune-seconds" in m]
    print(f"  fine-tune per message, median: simulation {statistics.median(mine) if mine else float('nan'):.2f} s, "
          f"direct {here['finetune-median']:.2f} s")
    whole = wall / (compute + here["central-0"])
    print(f"  -> simulation / direct: rounds {rounds / compute:.2f}x, whole run (with Ray start) {whole:.2f}x")
    return {"rounds": rounds / compute, "whole": whole}


def fresh(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`... if a run of an earlier call is there: a run folder that exists is resumed,
    not measured again, and an earlier run's figures are kept."""
    for k in range(1, 1000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        if not candidate.exists():
            return candidate
    raise SystemExit(f"{path}: 999 earlier runs there; give another --out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench_scale")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sampled", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--overhead", default="4,32", help="camera counts measured against direct compute")
    ap.add_argument("--scale", default="4,32,128,256", help="camera counts of the scale table")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    out = Path(args.out).resolve()
    biggest = max(int(n) for n in (args.scale + "," + args.overhead).split(",") if n)
    # World generation: world.json and the base domain up front, then one camera on first use (lazy).
    cfg = load_config(scenario(out, biggest, args.sampled, args.rounds, args.imgsz))
    t0 = time.perf_counter()
    ensure_world(cfg)
    head = time.perf_counter() - t0
    cams = sorted(int(p.name[3:]) for p in (out / "world").glob("cam[0-9]*"))
    probe = next((k for k in range(biggest) if k not in cams), None)
    per_camera = float("nan")  # a world this size made before has no camera left to time
    if probe is not None:
        t0 = time.perf_counter()
        ensure_camera(out / "world", probe)
        per_camera = time.perf_counter() - t0
    print(f"world: world.json + base {head:.1f}s; one camera {per_camera:.2f}s on first use "
          f"(all {biggest} up front would take {head + biggest * per_camera:.0f}s)", flush=True)
    # The starting student is made before any timed run: the direct twin does not train it, and the first simulation
    # would otherwise count its training (about 10 s at 320 px) as overhead.
    prepare(cfg)

    for n in (int(x) for x in args.overhead.split(",") if x):  # interleaved: simulation, then its direct twin
        flat = scenario(out, n, min(args.sampled, n), args.rounds, args.imgsz)
        for k in range(n):  # generated beforehand: the world's cost is its own column, not the simulation's
            ensure_camera(out / "world", k)
        run = fresh(out / f"overhead{n}")
        wall, cpu = simulate(flat, run, memory=False)
        print(f"\nCPU seconds by process over the {wall:.0f} s run (2 s samples; the last seen per process):")
        for name, sec in sorted(cpu.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<60}{sec:>8.1f}")
        profile(f"{n} cameras, {min(args.sampled, n)} per round, {args.rounds} rounds", run, wall,
                direct(flat, run, rounds_of(run)[0]))

    print("\ncameras | sampled | s/round (median) | peak PSS GiB (all processes) | cameras generated | world s")
    for n in (int(x) for x in args.scale.split(",") if x):
        flat, run = scenario(out, n, min(args.sampled, n), args.rounds, args.imgsz), fresh(out / f"scale{n}")
        had = len(list((out / "world").glob("cam[0-9]*")))
        _, peak = simulate(flat, run, memory=True)
        _, ends = rounds_of(run)
        per_round = statistics.median(ends[r] - ends[r - 1] for r in range(2, max(ends) + 1)) if max(ends) > 1 \
            else ends[1] - ends[0]
        made = len(list((out / "world").glob("cam[0-9]*"))) - had
        print(f"{n:>7} | {min(args.sampled, n):>7} | {per_round:>16.1f} | {peak:>28.2f} | {made:>17} | "
              f"{head + made * per_camera:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
