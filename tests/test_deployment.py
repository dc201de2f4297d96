"""Flower's Deployment Engine on loopback: TLS, node auth, 2 SuperNodes, a killed-and-restarted node, all by PID."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.federation.events import read_events
from server.local.loopback import Loopback, free_port_block
from shared.config import to_flat
from conftest import sim_cfg

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def kinds(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [e for e in read_events(path) if e["kind"] == kind] if path.exists() else []


@pytest.mark.timeout(1500)
def test_deployment_tls_auth_two_rounds_with_a_node_killed_and_restarted(tmp_path, tiny_cfg, tiny_world, egress_shim):
    run_dir = tmp_path / "run"
    cfg = sim_cfg(tiny_cfg, tiny_world, run_dir, **{"fed.round-timeout": 240.0, "fed.rounds": 3, "snapshot.recover-epochs": 0,
                                                    "snapshot.tolerance": 1.0,  # gating is tested elsewhere
                                                    "snapshot.per-camera": True,
                                                    "fed.compress": "int8"})  # deltas both ways (tests/test_compress.py)
    flat = {k: v for k, v in to_flat(cfg).items() if k != "resume"}
    egress = tmp_path / "egress.jsonl"
    env = {"LD_PRELOAD": str(egress_shim), "FEDCAM_EGRESS_LOG": str(egress)}
    cams = {f"cam0{i}": {"data-path": str(tiny_world / f"cam0{i}" / "data.yaml"), "camera-id": f"cam0{i}"}
            for i in range(2)}
    started: list[int] = []
    with Loopback(tmp_path / "deploy", free_port_block(), Path(sys.executable).parent, env) as lb:
        lb.make_pki([*cams, "intruder"])
        started.append(lb.start_superlink().pid)
        for name in cams:
            lb.register(name)
        for i, (name, node_config) in enumerate(cams.items()):
            started.append(lb.start_supernode(name, i, node_config).pid)

        # An unregistered key is refused by node authentication and gives up (bounded retries).
        intruder = lb.start_supernode("intruder", 9, cams["cam00"], max_retries=1)
        started.append(intruder.pid)
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (lb.work / "intruder.log").read_text()
        assert "No SuperNode found with the given public key" in (lb.work / "superlink.log").read_text()

        run_id = lb.submit(flat)
        wait_for(lambda: kinds(run_dir, "train_result"), 600, "round 1's client updates")
        lb.kill("cam01")  # SIGKILL mid-run: no goodbye to the SuperLink
        restarted = lb.restart_supernode("cam01", 1, cams["cam01"])
        started.append(restarted.pid)
        try:
            assert lb.wait_run(run_id, 900) == "finished:completed"
        finally:
            lb.stop_run(run_id)

        ends = {e["round"]: e["data"]["central"] for e in kinds(run_dir, "round_end")}
        assert set(ends) == {0, 1, 2, 3}
        # Round 2 goes on without the dead node (Flower answers "Node Unavailable" for it); by round 3 the
        # restarted SuperNode is back under the same node id and trains again.
        trains = kinds(run_dir, "train_result")
        assert [t["round"] for t in trains] == [1, 2, 3]
        assert [t["data"]["accepted"] for t in trains][::2] == [2, 2] and trains[1]["data"]["accepted"] >= 1
        # int8 deltas on the Deployment Engine: every upload is a quarter of a whole download or less; in round 3 a
        # node that confirmed round 2's copy gets a delta from it, the restarted one the whole model if it missed it.
        down = [[c["metrics"]["bytes-down"] for c in t["data"]["clients"] if c["ok"]] for t in trains]
        whole = max(down[0])
        assert all(c["metrics"]["bytes-up"] < whole / 4 for t in trains for c in t["data"]["clients"] if c["ok"])
        assert min(down[2]) < whole / 4, down
        snap = wait_for(lambda: kinds(run_dir, "snapshot"), 300, "the snapshot")[0]
        assert snap["round"] == 3 and snap["data"]["published"], snap["data"]
        latest = json.loads((run_dir / "snapshots" / "global" / "latest.json").read_text())
        assert latest["version"] == snap["data"]["version"]
        # After the rounds, each SuperNode calibrated the global structure on its own frames and scored its int8
        # candidate: one channel per camera id its node config names (the restarted node included).
        own = {e["data"]["camera"]: e["data"] for e in kinds(run_dir, "camera_snapshot")}
        assert set(own) == set(cams) and all(o["published"] for o in own.values()), own
        for name in cams:
            pointer = json.loads((run_dir / "snapshots" / "cameras" / name / "latest.json").read_text())
            assert pointer["version"] == own[name]["version"] == "v0001"
    # Every process group we started is gone: SuperLink with its ServerApp, SuperNodes with their ClientApps.
    # (and nothing else whose command line points into this test's folder: SuperExecs, ServerApp, ClientApps)
    # A zombie runs nothing (whether it is reaped depends on the container's init), so it does not count.
    alive = [f"{p.pid} {_cmdline(p)[:160]}" for p in psutil.process_iter()
             if (_pgid(p.pid) in started or str(tmp_path) in _cmdline(p)) and _running(p)]
    assert alive == []
    records = [json.loads(line) for line in egress.read_text().splitlines()] if egress.exists() else []
    assert records and [r for r in records if not r["allowed"]] == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
