"""Snapshots off the round loop: a worker process makes them from round checkpoints while the rounds go on."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

import torch

from server.snapshots.registry import registry_for
from shared.config import Config, to_flat

if TYPE_CHECKING:  # the pipeline (onnx, Torch-Pruning) loads in the worker, and here only with its first result
    from server.snapshots.pipeline import SnapshotResult

log = logging.getLogger("fedcam.server")
STOP = None  # the job that tells the worker no more rounds will come


def snapshot_round(cfg: Config, rnd: int) -> bool:
    """Whether round `rnd` gets a snapshot: every `snapshot.every` rounds, and the last one."""
    s = cfg.snapshot
    return s.enabled and rnd > 0 and (rnd == cfg.fed.rounds or (s.every > 0 and rnd % s.every == 0))


class SnapshotHook:
    """Round-event hook of the ServerApp. On a snapshot round it hands the round's checkpoint to a worker process and
    returns at once, so no camera waits on pruning, recovery and quantization; the worker's progress and results
    come back as events. `finish()` waits for the final snapshot: a run ends only once it is published or rejected."""

    def __init__(self, cfg: Config):
        self.cfg, self.bus = cfg, None
        self.registry = registry_for(cfg)
        self.last: SnapshotResult | None = None  # the newest published one: the base of per-camera snapshots
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or Ray state inherited
        self._jobs = self._results = self._proc = self._listener = None

    def attach(self, bus) -> SnapshotHook:
        self.bus = bus
        bus.add(self)
        return self

    def __call__(self, event, arrays=None) -> None:
        if event.kind == "run_start" and self.cfg.snapshot.enabled:
            # Start the worker now: its interpreter imports torch and Ultralytics (~6 s) while the first round trains,
            # so round 1's snapshot is not skipped for a newer one merely because the worker was still starting.
            self._start()
            return
        if event.kind != "round_end" or not snapshot_round(self.cfg, event.round):
            return
        checkpoint = event.data.get("checkpoint", "")
        if not checkpoint:  # FederatedRun saves every snapshot round; a missing one is a bug to hear about
            log.error("round %d: no checkpoint to make a snapshot from", event.round)
            return
        self.submit(event.round, checkpoint)

    def submit(self, rnd: int, checkpoint: str) -> None:
        self._start()
        self._jobs.put((rnd, checkpoint))

    def finish(self, timeout: float | None = None) -> None:
        """Wait (bounded by `timeout`) for the worker to finish what it was given; then stop it."""
        if self._proc is None:
            return
        self._jobs.put(STOP)
        self._listener.join(timeout)
        if self._listener.is_alive():
            log.error("snapshot worker still busy after %.0f s: stopped, its snapshot is not published", timeout)
        self.close()

    def close(self) -> None:
        """Stop the worker: a finished one exits by itself within seconds; a busy one (a failed run) is terminated."""
        if self._proc is None:
            return
        self._jobs.put(STOP)  # an idle worker (started at run start) exits at once
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)
        self._proc = None

    def _start(self) -> None:
        if self._proc is not None:
            return
        self._jobs, self._results = self._ctx.Queue(), self._ctx.Queue()
        self._proc = self._ctx.Process(target=serve, args=(to_flat(self.cfg), self._jobs, self._results, os.getpid()),
                                       name="fedcam-snapshots", daemon=True)
        self._proc.start()
        self._listener = threading.Thread(target=self._listen, name="fedcam-snapshot-events", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        """The worker's messages, emitted as this run's events (from this process: one writer of the run's store)."""
        while True:
            try:
                item = self._results.get(timeout=5)
            except queue.Empty:
                if self._proc is not None and not self._proc.is_alive():
                    log.error("snapshot worker died (exit code %s)", self._proc.exitcode)
                    return
                continue
            if item is STOP:
                return
            kind, rnd, data = item
            try:
                self.bus.emit(kind, rnd, **(self._result(*data) if kind == "snapshot" else data))
            except Exception:  # noqa: BLE001 - one bad message must not leave the run waiting for the rest
                log.exception("snapshot worker message %s of round %d not handled", kind, rnd)

    def _result(self, result: SnapshotResult, student) -> dict:
        if result.published:
            if student is not None:  # the fp32 structure every per-camera snapshot starts from
                from shared import models

                yaml, names, weights = student
                result.student = models.build(yaml, names)
                result.student.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            self.last = result  # only now: the rounds' per-camera exchanges (rider.py) read it from another thread
        m = result.manifest
        return dict(version=m.version, published=result.published, reason=result.reason, map50_fp32=m.map50_fp32,
                    map50_int8=m.map50_int8, size=m.size, latency_ms=m.latency_ms, int8_convs=result.int8_convs,
                    float_convs=result.float_convs, privacy=m.extra.get("privacy", {}))


def serve(flat: dict, jobs, results, parent: int) -> None:
    """The worker: newest ready round first (older pending ones are skipped, and said so), until told to stop or its
    parent is gone."""
    from shared.env import setup_offline

    setup_offline()
    from server.snapshots.pipeline import make_snapshot
    from shared import models
    from shared.config import load_config
    from shared.task import set_threads

    cfg = load_config(flat)
    set_threads(cfg.train.threads)
    registry, stop = registry_for(cfg), False
    while not stop:
        try:
            pending = [jobs.get(timeout=5)]
        except queue.Empty:
            if os.getppid() != parent:  # the server died (SIGKILL): nobody will read what this makes
                return
            continue
        while True:
            try:
                pending.append(jobs.get_nowait())
            except queue.Empty:
                break
        stop = STOP in pending
        pending = [job for job in pending if job is not STOP]
        if not pending:
            break
        *older, (rnd, checkpoint) = pending
        for old, _ in older:
            results.put(("snapshot_skipped", old, {"newer": rnd}))
        try:
            dense = models.load(checkpoint)
            result = make_snapshot(dense, cfg, rnd, checkpoint, registry, _progress(results, rnd))
            # Plain arrays, not the module: torch would share its tensors through file descriptors of this process,
            # which may be gone by the time they are read.
            student, result.student = result.student, None
            weights = None if student is None else (student.yaml, [student.names[i] for i in sorted(student.names)],
                                                    {k: v.detach().numpy().copy() for k, v in student.state_dict().items()})
            results.put(("snapshot", rnd, (result, weights)))
        except Exception as err:  # noqa: BLE001 - reported as an event; the rounds go on without this snapshot
            log.exception("snapshot of round %d failed", rnd)
            results.put(("snapshot_error", rnd, {"error": f"{type(err).__name__}: {err}"}))
    results.put(STOP)


def _progress(results, rnd: int):
    """Snapshot stages as events (for the CLI's progress line), at most one a second within a stage."""
    last = {"stage": "", "time": 0.0}

    def emit(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == last["stage"] and now - last["time"] < 1.0 and done < total:
            return
        last.update(stage=stage, time=now)
        results.put(("snapshot_progress", rnd, {"stage": stage, "done": done, "total": total}))

    return emit
