"""Local multi-camera simulation on Flower's Simulation Engine, driven through `flwr run`; every process stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import tomli_w

from shared.config import Config, PYPROJECT, to_flat
from shared.env import OFFLINE_ENV, STATE_DIR, ray_home
from server.federation.events import EventTail
from server.federation.store import query
from server.local.processes import Family, stop_on_sigterm
from shared.run_dir import RunDir

APP_DIR = PYPROJECT.parent
BIN = Path(sys.executable).parent  # this environment's Flower commands
PATH_KEYS = ("data.root", "model.student-checkpoint", "model.teacher-checkpoint")
PACKAGES = ("server", "client", "shared")  # all a FAB can hold; pyproject's fab-include picks among them


def app_source(dest: Path) -> Path:
    """A copy of what `flwr run` builds the FAB from: pyproject.toml, .gitignore and the three packages, at `dest`
    (replaced). Flower's builder walks every file under the app folder before it filters them, and a checkout's
    folder also holds the venv, worlds and runs: about 50,000 paths and 3-4 s per `flwr run` here. Flower's own
    filter (fab-include, .gitignore) still picks the files from the copy, so the FAB is the same."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", ".gitignore"):
        if (APP_DIR / name).exists():
            shutil.copy2(APP_DIR / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(APP_DIR / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def federation_config(cfg: Config, num_nodes: int, ray_address: str = "") -> dict:
    """Flower's simulation settings for `flwr run --federation-config`: the number of simulated SuperNodes and the
    Ray backend's resources (one CPU budget per client). On an existing cluster (`ray_address`) Ray refuses
    init-time CPU counts: the cluster owns its resources."""
    threads = max(1, cfg.train.threads)
    cpus = os.cpu_count() or 1
    config = {"num-supernodes": num_nodes, "backend": "ray", "client-resources-num-gpus": 0.0,
              "client-resources-num-cpus": threads if ray_address else min(threads, cpus)}
    if not ray_address:
        config.update({"init-args-num-cpus": cpus, "init-args-num-gpus": 0})
    return config


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
    env["YOLO_CONFIG_DIR"] = env.get("YOLO_CONFIG_DIR") or str(STATE_DIR / "yolo")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # flower-superlink starts flower-superexec by name
    return env


PRESTART = "RAY_prestart_worker_first_driver"  # a Ray system config flag, read from the environment by its raylet


def ray_env(ray_address: str) -> dict[str, str]:
    """What Flower's backend config cannot say, told to Ray through its own variables: the cluster to join; for a
    local one, a small object store (cameras' arrays are small; Ray's default is 30 % of RAM) and no workers started
    ahead of the first driver. Ray starts one per CPU, but Flower asks for its actors with a runtime env (PYTHONPATH)
    those plain workers do not have, so they are never used: on 2 cores their start slowed round 0's central
    evaluation by about 1.3 s (README, "Many cameras on one machine"). A value set in the environment wins."""
    if ray_address:
        return {"RAY_ADDRESS": ray_address}
    share = 256 * 1024 * 1024 / psutil.virtual_memory().total
    return {"RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": f"{min(0.3, share):.4f}",
            PRESTART: os.environ.get(PRESTART, "0")}


def run_config_file(path: Path, flat: dict) -> Path:
    """The run's config as a TOML file for `flwr run --run-config` (flat dotted keys, as Flower flattens them)."""
    path.write_text(tomli_w.dumps(flat))
    return path


def launch(cfg: Config, num_nodes: int, extra_env: dict[str, str] | None = None, timeout: float | None = None,
           on_tick: Callable[[], None] | None = None, ray_address: str = "") -> int:
    """Run the apps on Flower's Simulation Engine through its public path: a SuperLink of our own in simulation
    mode on a free loopback port, and `flwr run` of this app (built into a FAB) with this run's config. Waits
    (bounded), then stops every process started here by PID (a Ray cluster given by `ray_address` is not ours:
    it keeps running, only this run's workers on it end).

    Returns 0 when the run finished completed, 1 when it finished otherwise, -1 when `timeout` ran out. The
    SuperLink's output goes to RUN_DIR/superlink.log, the run's streamed log to RUN_DIR/simulation.log. Once the
    ServerApp has recorded its run's end (`ServerAppDone`), Flower's own shutdown is not waited for.
    """
    run_dir = Path(cfg.run_dir).resolve()
    layout = RunDir(run_dir)
    flat = {**to_flat(cfg), "run-dir": str(run_dir)}
    for key in PATH_KEYS:  # the apps run from Flower's app folder: relative paths must not change meaning
        if flat[key]:
            flat[key] = str(Path(flat[key]).resolve())
    layout.save_overrides(flat)
    env = child_env(run_dir, {**ray_env(ray_address), **(extra_env or {})})
    port = free_port()
    connection(layout.flwr_home, port)
    deadline = time.monotonic() + timeout if timeout else float("inf")
    done = ServerAppDone(layout)
    families: list[Family] = []
    with stop_on_sigterm():  # a SIGTERM'd `fedcam simulate` still stops what it started
        try:
            with open(run_dir / "superlink.log", "ab") as out:
                superlink = subprocess.Popen(
                    [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                     "--port", str(port), "--disable-runtime-dependency-installation"],
                    env=env, cwd=run_dir, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
            families.append(Family(superlink))
            if not wait_listening(port, superlink, min(deadline, time.monotonic() + 120)):
                return -1 if time.monotonic() >= deadline else 1
            overrides = run_config_file(layout.flwr_home / "run_config.toml", flat)
            fed = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config(cfg, num_nodes, ray_address).items())
            app = app_source(layout.flwr_home / "app")
            with open(layout.log, "ab") as out:
                seen = out.tell()  # a resumed run appends to the log: its run id comes after this
                stream = subprocess.Popen(
                    [str(BIN / "flwr"), "run", str(app), SUPERLINK, "--run-config", str(overrides),
                     "--federation-config", fed, "--stream"], env=env, cwd=run_dir, start_new_session=True, stdout=out,
                    stderr=subprocess.STDOUT)
            families.append(Family(stream))
            ticks = 0
            while stream.poll() is None and time.monotonic() < deadline and not done.settled():
                time.sleep(0.5)
                ticks += 1
                if ticks % 4 == 0:  # the simulation and Ray's daemons, while they are still attached
                    families[0].watch()
                if on_tick:
                    on_tick()
            if stream.returncode is None:
                return done.note(layout.log) if done.settled() else -1
            return finished(env, layout, seen)
        finally:
            for family in families[::-1]:
                family.stop()


class ServerAppDone:
    """Whether this launch's ServerApp has finished its work: `run_end` in the event log and in the run store (its
    last hook), so every checkpoint, snapshot and event is on disk. What follows is Flower's own shutdown: the
    engine's 1 s queue timeouts, `ray.shutdown`, the status report, the log stream's end and `flwr list`, about 5 s
    of a run (README, "Many cameras on one machine"), for processes `launch` then stops by PID anyway. A run that
    failed (`run_error`) is left to finish, so Flower's status and traceback reach the log."""

    GRACE = 1.0  # s after the end, for the ServerApp's last log lines (Flower uploads every 0.2 s, streams every 0.5)

    def __init__(self, layout: RunDir):
        self.events = EventTail(layout.events, start=layout.events.stat().st_size if layout.events.exists() else 0)
        self.store = layout.store
        self.runs_before = self._newest()
        self.at: float | None = None

    def _newest(self) -> int:
        if not self.store.exists():
            return 0
        return query(self.store, "SELECT MAX(id) AS id FROM runs")[0]["id"] or 0

    def settled(self) -> bool:
        if self.at is None and any(e["kind"] == "run_end" for e in self.events.read()) and self._stored():
            self.at = time.monotonic()
        return self.at is not None and time.monotonic() - self.at >= self.GRACE

    def _stored(self) -> bool:
        return self.store.exists() and bool(query(
            self.store, "SELECT id FROM runs WHERE id > ? AND ended IS NOT NULL AND status NOT LIKE 'failed%'",
            (self.runs_before,)))

    @staticmethod
    def note(log: Path) -> int:
        with open(log, "a") as out:
            out.write("\n[fedcam] the ServerApp logged run_end: every process stopped by PID, without waiting for "
                      "Flower's shutdown\n")
        return 0


SUPERLINK = "fedcam-sim"  # the Flower CLI's connection name, kept in the run's own FLWR_HOME


def connection(flwr_home: Path, port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": SUPERLINK, SUPERLINK: {"address": f"127.0.0.1:{port}", "insecure": True}}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Wait (bounded) until the SuperLink accepts connections; False if it exited or time ran out."""
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.3)
    return False


def finished(env: dict[str, str], layout: RunDir, seen: int) -> int:
    """0 if the run `flwr run` started (its id in the log after byte `seen`) finished completed; else 1, with
    Flower's status appended to the log."""
    with open(layout.log, "rb") as f:
        f.seek(seen)
        match = re.search(r"Successfully started run (\d+)", f.read().decode(errors="replace"))
    if not match:
        return 1
    status, details = run_status(env, layout.root, SUPERLINK, int(match.group(1)))
    with open(layout.log, "a") as log:
        log.write(f"\n[fedcam] run {match.group(1)}: {status} {details}\n")
    return 0 if status == "finished:completed" else 1


def run_status(env: dict[str, str], cwd: Path, superlink: str, run_id: int) -> tuple[str, str]:
    """(status, details) of a run as the SuperLink reports it (`flwr list --run-id`), e.g. ('finished:failed',
    'ServerApp failed ...'); ('unknown', what the CLI said) when it cannot tell."""
    out = subprocess.run([str(BIN / "flwr"), "list", superlink, "--run-id", str(run_id), "--format", "json"], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        run = json.loads(out.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr)[-2000:]
    return run.get("status", "unknown"), run.get("status-details", "")
