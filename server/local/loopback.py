"""Flower's Deployment Engine on loopback: a TLS SuperLink, authenticated SuperNodes and runs, each stopped by PID."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from server.local.processes import Family, stop_strays
from server.local.simulation import APP_DIR, app_source, run_status
from shared.env import OFFLINE_ENV

DEPLOY = APP_DIR / "deploy"  # the same scripts an operator runs on real machines


def free_port_block(offsets: tuple[int, ...] = (0, 10, 11, 12, 13, 19)) -> int:
    """A port p such that p + each offset is free on 127.0.0.1 (SuperLink, SuperNodes, an extra one)."""
    for _ in range(50):
        base = random.randint(30000, 45000)
        try:
            for offset in offsets:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports on 127.0.0.1")


class DeploymentError(RuntimeError):
    """A step of the loopback deployment failed; the message names the step and its log."""


class Loopback:
    """Start SuperLink and SuperNodes as process groups of our own, and stop every one of them on exit.

    Use as a context manager. `port` is the SuperLink's one port; SuperNode i serves its runtime API on port+10+i.
    """

    def __init__(self, work: Path, port: int = 29091, bin_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None):
        self.work, self.port = Path(work).resolve(), port
        self.work.mkdir(parents=True, exist_ok=True)
        self.pki = self.work / "pki"
        self.procs: dict[str, subprocess.Popen] = {}
        path = f"{bin_dir}:{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
        self.env = {**os.environ, **OFFLINE_ENV, **(extra_env or {}), "PATH": path}
        self.cli_home = self.work / "cli"

    # --- processes -------------------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env={**self.env, "FLWR_HOME": str(flwr_home)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work)
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 15.0) -> None:
        """Signal `name` and every process it started, by PID: its process group and its descendants (the
        SuperLink's SuperExec runs in a session of its own); SIGKILL whatever outlives `grace`."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            Family(proc).stop(grace, sig)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
        # A ClientApp or ServerApp whose SuperExec started it after the last look at the family, then lost its
        # parent, belongs to no family any more: it still works in our folder or names it on its command line.
        left = stop_strays(self.work)
        if left:
            print("stopped strays of the loopback deployment:", *left, sep="\n  ")

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def _cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env={**self.env, "FLWR_HOME": str(self.cli_home)}, cwd=APP_DIR,
                              capture_output=True, text=True, timeout=timeout)

    # --- steps -----------------------------------------------------------------------------------------------
    def make_pki(self, devices: list[str]) -> None:
        out = subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(self.pki), "127.0.0.1", "localhost", "--",
                              *devices], capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise DeploymentError(f"certs.sh failed: {out.stderr[-2000:]}")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fleet"\n[superlink.fleet]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.pki / "ca.crt"}"\n')

    def start_superlink(self) -> subprocess.Popen:
        state = self.work / "superlink"
        return self._start("superlink", ["bash", str(DEPLOY / "superlink.sh"), str(self.pki), str(self.port),
                                         str(state)], state)

    def register(self, device: str, timeout: float = 90.0) -> None:
        """Register a device's public key; retries (bounded) while the SuperLink is still starting."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            out = self._cli("supernode", "register", str(self.pki / "nodes" / f"{device}.pub"), "fleet")
            if out.returncode == 0:
                return
            last = out.stdout + out.stderr
            if self.procs.get("superlink") and self.procs["superlink"].poll() is not None:
                break
            time.sleep(1.0)
        raise DeploymentError(f"registering {device} failed: {last[-1500:]} (see {self.work / 'superlink.log'})")

    def start_supernode(self, device: str, index: int, node_config: dict[str, str], max_retries: int | None = None):
        config = " ".join(f"{k}='{v}'" for k, v in node_config.items())
        cmd = ["flower-supernode", "--root-certificates", str(self.pki / "ca.crt"),
               "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(self.pki / "nodes" / device),
               "--node-config", config, "--port", str(self.port + 10 + index)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self._start(device, cmd, self.work / f"sn_{device}")

    def restart_supernode(self, device: str, index: int, node_config: dict[str, str], timeout: float = 240.0,
                          settle: float = 8.0) -> subprocess.Popen:
        """Start a SuperNode again after a crash, as systemd's Restart= would: the SuperLink refuses to activate
        a node id it still believes online (until its heartbeat expires, ~1 min), and the SuperNode then exits
        (Flower's exit code 305, 'Failed to activate SuperNode'); retry until it stays up for `settle` seconds,
        bounded by `timeout`."""
        deadline, log = time.monotonic() + timeout, self.work / f"{device}.log"
        while time.monotonic() < deadline:
            seen = log.stat().st_size if log.exists() else 0
            proc = self.start_supernode(device, index, node_config)
            try:
                code = proc.wait(timeout=settle)
            except subprocess.TimeoutExpired:
                return proc  # connected and running
            self.procs.pop(device, None)
            with open(log, "rb") as f:
                f.seek(seen)
                if b"Failed to activate SuperNode" not in f.read():
                    raise DeploymentError(f"SuperNode {device} exited with {code} (see {log})")
            time.sleep(5.0)
        raise DeploymentError(f"SuperNode {device} was not re-admitted within {timeout:.0f}s")

    def submit(self, run_config: dict) -> int:
        """`flwr run` this app (its FAB built from `app_source`'s copy) with run-config overrides; its run id."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = app_source(self.cli_home / "app")
        out = self._cli("run", str(app), "fleet", "--run-config", pairs, "--format", "json", timeout=300)
        match = re.search(r'"run-id":\s*"?(\d+)', out.stdout)
        if out.returncode or not match:
            raise DeploymentError(f"flwr run failed: {(out.stdout + out.stderr)[-2000:]}")
        return int(match.group(1))

    def status(self, run_id: int) -> tuple[str, str]:
        """(status, details) of a run as the SuperLink reports it, e.g. ('finished:failed', 'ServerApp failed ...')."""
        return run_status({**self.env, "FLWR_HOME": str(self.cli_home)}, APP_DIR, "fleet", run_id)

    def wait_run(self, run_id: int, timeout: float, every: float = 3.0) -> str:
        """Wait (bounded) for the run to finish; its status. A failed ServerApp raises with Flower's details."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, details = self.status(run_id)
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise DeploymentError(f"run {run_id} {status}: {details}")
                return status
            time.sleep(every)
        raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f}s")

    def stop_run(self, run_id: int) -> None:
        self._cli("stop", str(run_id), "fleet", timeout=60)
