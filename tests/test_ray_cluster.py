"""Past one machine: a two-node Ray cluster on loopback (the README's recipe), a simulation whose clients run on both
nodes, no connection off loopback, and every process the test started stopped by PID."""

from __future__ import annotations

import json
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import sim_cfg
from server.federation.events import read_events
from server.local import simulation
from server.local.processes import Family

pytestmark = pytest.mark.slow
PROBE = ("8.8.8.8", "2001:4860:4860::8888")  # what Ray connects a UDP socket to, to learn its own IP


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own: its GCS, raylet and agents stay in that process group."""
    ray = Path(sys.executable).with_name("ray")
    with open(log, "ab") as out:
        return subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats", "--num-gpus=0",
                                 "--object-store-memory=100000000", "--node-ip-address=127.0.0.1", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def ray_nodes(address: str, env: dict) -> set[str]:
    ray = Path(sys.executable).with_name("ray")
    out = subprocess.run([str(ray), "status", f"--address={address}"], env=env, capture_output=True, text=True,
                         timeout=60)
    return set(re.findall(r"node_([0-9a-f]{40,})", out.stdout))


def family_while(pid: int, fn) -> dict:
    """Run fn() while noting every process descended from `pid` (each lives long enough to be seen: 0.2 s polls);
    returns those pids, and fn's result under "result"."""
    seen, stop = {}, threading.Event()

    def watch():
        while not stop.wait(0.2):
            try:
                seen.update((p.pid, True) for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)])
            except psutil.Error:
                pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        seen["result"] = fn()
    finally:
        stop.set()
        thread.join()
    return seen


def in_session(folder: Path) -> list[psutil.Process]:
    """Processes of a Ray node, found by its temp dir on their command line (a safety net after the group kill)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(folder) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(900)
def test_simulation_on_a_two_node_ray_cluster(tiny_cfg, tiny_world, tmp_path, egress_shim):
    run_dir, egress = tmp_path / "run", tmp_path / "egress.jsonl"
    guard = {"LD_PRELOAD": str(egress_shim), "FEDCAM_EGRESS_LOG": str(egress)}
    env = simulation.child_env(tmp_path / "ray", guard)  # the same HOME (no cloud probe) and telemetry settings
    joining = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # a worker node refuses to join without it
    gcs, *ports = free_ports(9)
    address = f"127.0.0.1:{gcs}"
    short = Path(tempfile.mkdtemp(prefix="fcray", dir="/tmp"))  # Ray's socket paths must fit in 107 bytes
    heads, node2 = short / "h", short / "w"
    started: list[subprocess.Popen] = []
    try:
        started.append(ray_start(["--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
                                  f"--temp-dir={heads}", f"--dashboard-agent-listen-port={ports[0]}",
                                  f"--dashboard-agent-grpc-port={ports[1]}", f"--runtime-env-agent-port={ports[2]}",
                                  f"--metrics-export-port={ports[3]}"], env, tmp_path / "head.log"))
        deadline = time.monotonic() + 120
        while len(ray_nodes(address, env)) < 1 and time.monotonic() < deadline:
            time.sleep(2)
        started.append(ray_start([f"--address={address}", "--num-cpus=1", f"--temp-dir={node2}",
                                  f"--dashboard-agent-listen-port={ports[4]}", f"--dashboard-agent-grpc-port={ports[5]}",
                                  f"--runtime-env-agent-port={ports[6]}", f"--metrics-export-port={ports[7]}"],
                                 joining, tmp_path / "node2.log"))
        while len(nodes := ray_nodes(address, env)) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        assert len(nodes) == 2, (tmp_path / "head.log").read_text()[-2000:] + (tmp_path / "node2.log").read_text()[-2000:]

        # One CPU per node and one thread per client: one client actor fits on each node.
        cfg = sim_cfg(tiny_cfg, tiny_world, run_dir, **{"train.threads": 1, "snapshot.enabled": False})
        joined = family_while(started[1].pid, lambda: simulation.launch(cfg, 2, extra_env=guard, timeout=600,
                                                                          ray_address=address))
        code = joined.pop("result")
        assert code == 0, (run_dir / "simulation.log").read_text()[-3000:]
    finally:
        for proc in started[::-1]:
            Family(proc).stop()
        for folder in (heads, node2):
            for p in in_session(folder):
                p.kill()
        leftover = in_session(heads) + in_session(node2)
        shutil.rmtree(short, ignore_errors=True)
    assert not leftover

    trains = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "train_result"]
    assert [t["data"]["accepted"] for t in trains] == [2, 2]
    ran_on = {int(c["metrics"]["ray-node"]) for t in trains for c in t["data"]["clients"]}
    assert ran_on == {int(n[:12], 16) for n in nodes}  # clients ran on both nodes, and only on them
    records = [json.loads(line) for line in egress.read_text().splitlines()]
    assert len({r["pid"] for r in records}) >= 4  # both nodes' daemons, the driver and the workers were watched
    # One known exception, blocked by the guard: the joining node runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (or
    # `ray start --address` refuses), and then Ray's native code works out its own IP with a UDP connect toward
    # Google's DNS (a UDP connect sends no packet) even with --node-ip-address given; the guard made the connect
    # fail and Ray used the given address. Nothing else, and nothing from the head, the driver or its workers.
    blocked = [r for r in records if not r["allowed"]]
    assert all(r["pid"] in joined and r["call"] == "connect" and r["address"] in PROBE for r in blocked), blocked
