"""Process families fedcam starts (SuperLink, SuperExec, the simulation, Ray's daemons): tracked and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

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
        living = []
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    living.append(p)
        return living

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
            _, left = psutil.wait_procs(family, timeout=wait)
            if not left:
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.root.wait(timeout=5.0)


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
