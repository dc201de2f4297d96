"""Process families fedcam starts (SuperLink, SuperExec, the simulation, Ray's daemons): tracked and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


class Family:
    """Every process descended from one we started, remembered as it is seen.

    Flower's SuperExec and simulation run detached (sessions of their own) and Ray's daemons may outlive their
    parent, so a process-group kill misses them: `watch()` notes descendants while they are still attached, and
    `stop()` signals each by PID (psutil checks the start time, so a reused PID is never hit).
    """

    def __init__(self, root: subprocess.Popen):
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self.watch()

    def watch(self) -> None:
        try:
            top = psutil.Process(self.root.pid)
            for p in [top, *top.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def alive(self) -> list[psutil.Process]:
        return living(self.seen.values())

    def stop(self, grace: float = 10.0, first: int = signal.SIGTERM) -> None:
        """`first` (the root's group too), then SIGKILL whatever outlives `grace`; reap the root."""
        self.watch()
        for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.root.pid, sig)
            family = self.alive()
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            if not wait_gone(family, wait):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.root.wait(timeout=5.0)



def living(procs) -> list[psutil.Process]:
    """Those of `procs` still running; a zombie has exited (its parent, or whoever inherits it, reaps it later)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait (bounded) until `procs` have exited; those still running. Not psutil.wait_procs: that also waits for
    zombies, and the zombie of a process whose parent died stays until whatever inherits it reaps it (about 2 s
    here, for Flower's and Ray's processes, on every stop)."""
    until = time.monotonic() + timeout
    while (left := living(procs)) and time.monotonic() < until:
        time.sleep(0.05)
    return left


def strays(folder: Path) -> list[psutil.Process]:
    """Living processes that work in `folder` or name it on their command line: what a run there may have left
    detached from every family (a SuperExec's app process started after the last `watch()`), never this one."""
    folder, me = str(Path(folder).resolve()), os.getpid()
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid == me or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if folder in " ".join(p.cmdline()) or p.cwd().startswith(folder):
                found.append(p)
    return found


def stop_strays(folder: Path, grace: float = 10.0) -> list[str]:
    """SIGTERM, then SIGKILL, every stray of `folder`; returns what was found, for the log."""
    found = strays(folder)
    names = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in found if _quiet(p.is_running)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in found:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        found = wait_gone(found, grace if sig == signal.SIGTERM else 5.0)
        if not found:
            break
    return names


def _quiet(call) -> bool:
    try:
        return bool(call())
    except psutil.Error:
        return False


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM unwinds like Ctrl-C while this is open: the `finally` that stops every started process runs. Python's
    default is to die at once, leaving a SuperLink and Ray's daemons behind."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
