"""The federation's fault drills (issue 23: 1, 5 and 3) on Flower's Deployment Engine on loopback (TLS, node
authentication, three SuperNodes, a tiny world): a camera crashes mid-round and comes back, a camera's link
freezes past the round timeout and comes back, the SuperLink is SIGKILLed mid-run and the run is resumed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil

from server.federation.events import read_events
from server.local.loopback import Loopback, free_port_block
from shared.config import load_config, to_flat

ROUND_TIMEOUT = 40.0
TINY = {"data.imgsz": 64, "data.cameras": 3, "data.base-train": 24, "data.base-val": 12, "data.camera-train": 16,
        "data.camera-val": 8, "data.camera-pool": 0, "model.student-width": 0.0625, "train.batch": 8,
        "train.epochs": 1, "train.warmup-steps": 0, "eval.batch": 8, "train.threads": 1, "fed.local-lr": 0.01,
        "fed.min-nodes": 2, "fed.round-timeout": ROUND_TIMEOUT, "snapshot.enabled": False}


def events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [e for e in read_events(path) if e["kind"] == kind] if path.exists() else []


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def trained(run_dir: Path, rnd: int) -> dict | None:
    """Round `rnd`'s train_result event, once it is written."""
    return next((e for e in events(run_dir, "train_result") if e["round"] == rnd), None)


def failures(event: dict) -> str:
    return "; ".join(f"node {c['node_id']}: {c['reason']}" for c in event["data"]["clients"] if not c["ok"])


def freeze(proc, stop: bool) -> None:
    """SIGSTOP / SIGCONT a SuperNode and every process under it: its link goes silent, nothing is closed."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.suspend() if stop else p.resume()


def drill_federation(work: Path) -> list[tuple[str, str, str, str]]:
    from server.local import warmstart
    from shared.data.world import ensure_world

    run_dir = work / "run"
    cfg = load_config({**TINY, "data.root": str(work / "world"), "run-dir": str(run_dir), "fed.rounds": 10})
    ensure_world(cfg, lazy=False)
    cfg = warmstart.prepare(cfg)
    flat = {k: v for k, v in to_flat(cfg).items() if k != "resume"}
    cams = {f"cam0{i}": {"data-path": str(work / "world" / f"cam0{i}" / "data.yaml"), "camera-id": f"cam0{i}"}
            for i in range(3)}
    rows = []
    with Loopback(work / "deploy", free_port_block(), Path(sys.executable).parent) as lb:
        lb.make_pki(list(cams))
        lb.start_superlink()
        for name in cams:
            lb.register(name)
        nodes = {name: lb.start_supernode(name, i, conf) for i, (name, conf) in enumerate(cams.items())}
        run_id = lb.submit(flat)

        # 1: one camera of three (33 %) SIGKILLed mid-round, restarted as systemd would
        wait_for(lambda: trained(run_dir, 1), 600, "round 1")
        wait_for(lambda: any(e["round"] == 2 for e in events(run_dir, "round_start")), 300, "round 2's start")
        lb.kill("cam02")
        crashed = wait_for(lambda: trained(run_dir, 2), 600, "round 2 without the crashed camera")
        nodes["cam02"] = lb.restart_supernode("cam02", 2, cams["cam02"])
        back = wait_for(lambda: next((e for e in events(run_dir, "train_result") if e["round"] > 2
                                      and e["data"]["accepted"] == 3), None), 900, "a round with all three again")
        rows.append(("1 camera crash", "SIGKILL of 1 of 3 SuperNodes (33 %) mid-round 2, restarted",
                     f"round 2 completed with {crashed['data']['accepted']} of 3; the crash logged "
                     f"({failures(crashed)}); "
                     f"back in round {back['round']} with 3 of 3",
                     f"round 2 took {crashed['data']['seconds']:.0f} s"))

        # 5: one camera's link frozen (SIGSTOP) for longer than the round timeout, then back (SIGCONT)
        rnd = back["round"] + 1
        wait_for(lambda: any(e["round"] == rnd for e in events(run_dir, "round_start")), 300, f"round {rnd}'s start")
        freeze(nodes["cam01"], True)
        t0 = time.monotonic()
        silent = wait_for(lambda: trained(run_dir, rnd), ROUND_TIMEOUT + 600, f"round {rnd} without the frozen camera")
        frozen_for = time.monotonic() - t0
        time.sleep(max(0.0, ROUND_TIMEOUT + 10 - frozen_for))
        freeze(nodes["cam01"], False)
        after = wait_for(lambda: next((e for e in events(run_dir, "train_result") if e["round"] > rnd
                                       and e["data"]["accepted"] == 3), None), 900, "the frozen camera's return")
        held = max(frozen_for, ROUND_TIMEOUT + 10)
        rows.append(("5 link drop", f"SuperNode cam01 frozen (SIGSTOP) in round {rnd} for {held:.0f} s, "
                     f"round timeout {ROUND_TIMEOUT:.0f} s, then SIGCONT",
                     f"round {rnd} completed with {silent['data']['accepted']} of 3 ({failures(silent)}); "
                     f"its round {after['round']} counted 3 of 3",
                     f"round {rnd} took {silent['data']['seconds']:.0f} s"))

        # 3: the SuperLink SIGKILLed mid-run (its ServerApp with it), restarted on its state database; resumed
        done = max(e["round"] for e in events(run_dir, "round_end"))
        wait_for(lambda: any(e["round"] == done + 1 for e in events(run_dir, "round_start")), 300, "the next round")
        lb.kill("superlink")
        intact = sum(loads(run_dir, p) for p in (run_dir / "checkpoints").glob("global_r*.pt"))
        half = sorted(p.name for p in (run_dir / "checkpoints").glob("*.tmp*"))
        lb.start_superlink()  # its state database still holds the registered SuperNodes, which reconnect
        resumed = lb.submit({**flat, "resume": True})
        status = lb.wait_run(resumed, 1200)
        ends = sorted({e["round"] for e in events(run_dir, "round_end")})
        rows.append(("3 SuperLink killed", f"SIGKILL of the SuperLink (and its ServerApp) in round {done + 1}; "
                     "restarted on its state database; the run submitted again with resume=true",
                     f"resumed from round {done}, {status}, rounds {ends[0]}-{ends[-1]} all ended; "
                     f"{intact} checkpoints load after the kill, "
                     f"{'no half-written file' if not half else 'HALF-WRITTEN: ' + ', '.join(half)}",
                     f"run {run_id} then run {resumed}"))
        lb.stop_run(resumed)
    return rows


def loads(run_dir: Path, path: Path) -> bool:
    """A checkpoint the kill left: its weights and its server-state file both load."""
    from server.federation.checkpoint import RunCheckpoints

    try:
        RunCheckpoints(run_dir).load(int(path.stem.removeprefix("global_r")))
        return True
    except Exception:  # noqa: BLE001 - any failure to load is what this counts
        return False
