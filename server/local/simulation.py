"""Local multi-camera simulation on Flower's Simulation Engine, in a child process fedcam owns and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from shared.config import Config, PYPROJECT, to_flat
from shared.env import OFFLINE_ENV, ray_home
from shared.run_dir import RunDir

APP_DIR = PYPROJECT.parent
PATH_KEYS = ("data.root", "model.student-checkpoint", "model.teacher-checkpoint")


def backend_config(cfg: Config, ray_address: str = "") -> dict:
    """Ray backend: one CPU budget per client, no dashboard, a small object store (cameras are small). With
    `ray_address`, the clients run on that existing cluster instead, which owns its resources."""
    threads = max(1, cfg.train.threads)
    if ray_address:
        init = {"address": ray_address, "ignore_reinit_error": True}
        if ray_address.split(":")[0] in ("127.0.0.1", "localhost"):  # a cluster on loopback: the driver too
            init["_node_ip_address"] = "127.0.0.1"
        return {"client_resources": {"num_cpus": threads, "num_gpus": 0.0}, "init_args": init}
    cpus = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": min(threads, cpus), "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                          "object_store_memory": 256 * 1024 * 1024, "ignore_reinit_error": True}}


def child_env(run_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every simulation process: Ray's HOME with a local bootstrap config, so it never
    probes cloud metadata; Flower's home inside the run folder; telemetry and installs off."""
    env = {**os.environ, **OFFLINE_ENV, **(extra or {})}
    layout = RunDir(run_dir)
    env["HOME"], env["FLWR_HOME"] = str(ray_home(layout.home)), str(layout.flwr_home)
    env["RAY_DISABLE_IMPORT_WARNING"] = "1"
    # Local Ray finds "its" IP by connecting a UDP socket to a public DNS server; with clusters off it
    # uses loopback instead (a multi-node Ray cluster sets this back to 1, see README).
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("YOLO_CONFIG_DIR", os.environ.get("YOLO_CONFIG_DIR", ""))
    return env


def launch(cfg: Config, num_nodes: int, extra_env: dict[str, str] | None = None, timeout: float | None = None,
           on_tick: Callable[[], None] | None = None, ray_address: str = "") -> int:
    """Run the simulation in a child process group and wait (bounded); always stop the whole group (a Ray cluster
    given by `ray_address` is not ours: it keeps running, only this run's workers on it end).

    Returns the child's exit code, or -1 when `timeout` ran out. Its output goes to RUN_DIR/simulation.log.
    """
    run_dir = Path(cfg.run_dir).resolve()
    layout = RunDir(run_dir)
    flat = {**to_flat(cfg), "run-dir": str(run_dir)}
    for key in PATH_KEYS:  # the child runs inside the run folder: relative paths must not change meaning
        if flat[key]:
            flat[key] = str(Path(flat[key]).resolve())
    layout.save_overrides(flat)
    cmd = [sys.executable, "-m", "server.local.simulation", str(run_dir), str(num_nodes), ray_address]
    deadline = time.monotonic() + timeout if timeout else float("inf")
    with open(layout.log, "ab") as out:
        proc = subprocess.Popen(cmd, env=child_env(run_dir, extra_env), cwd=run_dir, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                if on_tick:
                    on_tick()
            return proc.returncode if proc.returncode is not None else -1
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL the child's whole session: Ray's raylet, GCS and workers included."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        proc.poll()


def _worker(run_dir: Path, num_nodes: int, ray_address: str) -> None:
    """Inside the child: hand the apps to Flower's Simulation Engine with this run's config."""
    from shared.env import setup_offline

    setup_offline()

    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, _run_simulation
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from shared.config import load_config

    # As flwr.simulation.run_simulation sets up its Run, plus the run config overrides it cannot pass on.
    overrides = RunDir(run_dir).overrides()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = overrides
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(APP_DIR, overrides)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)

    _run_simulation(num_supernodes=num_nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app_attr="client.client_app:app", server_app_attr="server.federation.server_app:app",
                    backend_config=backend_config(load_config(overrides), ray_address), app_dir=str(APP_DIR), run=run,
                    server_app_context=context, is_app=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
