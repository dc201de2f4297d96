"""Per-camera snapshots during the rounds: each step of the exchange (personal part, ranges, int8 score) rides on a
train message the camera gets anyway, one step per round it trains in, and the server's work between steps
(fold, export, quantize, gate, sign) runs on a thread of its own. No round waits on it, and a camera is never sent
two messages at once: Flower's engines hand a node's messages their own copy of its state, and two at once would
let the later one undo what the other stored (its personal part, its copy of the global model)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message

from server.snapshots.cameras import Camera, Exchange, report
from shared.config import Config
from shared.snapshot.exchange import RIDE, RIDE_ARRAYS

log = logging.getLogger("fedcam.server")


@dataclass
class Ride:
    """One camera's exchange in flight: the step it is asked next and what that step sends (None: the server is
    still making it)."""
    cam: Camera
    base: object  # the SnapshotResult it makes the camera's own of
    ex: Exchange | None = None
    step: str = ""
    payload: bytes | None = None
    busy: bool = True


def rides(cfg: Config) -> bool:
    """Whether a run's per-camera snapshots also ride on its rounds: every snapshot.every rounds, without DP (a
    reply's second array record is not the DP mods' to clip)."""
    s = cfg.snapshot
    return s.enabled and s.per_camera and s.every > 0 and cfg.fed.dp == "off" and not cfg.fed.secure_aggregation


class Rider:
    """Attached to the strategy: `attach` adds each sampled camera's next step to its train message, `collect`
    takes the answers off the replies (before they are screened) and hands them to the worker thread. A camera
    starts an exchange of the newest published global snapshot once it has none in flight and has not done that
    one yet; an answer for another step or snapshot than the one asked is dropped."""

    def __init__(self, cfg: Config, snapshots, bus):
        self.cfg, self.snapshots, self.bus = cfg, snapshots, bus  # snapshots: the SnapshotHook (its `last`)
        self.work = Path(tempfile.mkdtemp(prefix="fedcam-rides-"))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fedcam-camera-snapshots")
        self.lock = threading.Lock()
        self.rides: dict[int, Ride] = {}  # node -> its exchange in flight
        self.exchanges: dict[str, Exchange] = {}  # base version -> its exchange
        self.done: dict[int, str] = {}  # node -> the base of its last exchange, finished or failed

    def attach(self, messages: list[Message]) -> None:
        base = self.snapshots.last
        with self.lock:
            for msg in messages:
                node = msg.metadata.dst_node_id
                ride = self.rides.get(node)
                if ride is None and base is not None and self.done.get(node) != base.manifest.version:
                    ride = self.rides[node] = Ride(Camera(node), base)  # opened on the thread, asked next round
                    self.pool.submit(self._open, ride)
                if ride is None or ride.busy:
                    continue
                asked = {"step": ride.step, "base": ride.base.manifest.version}
                if ride.payload:
                    asked["onnx"] = ride.payload
                if ride.step == "score":
                    asked["global"] = ride.ex.global_int8
                msg.content[RIDE] = ConfigRecord(asked)

    def collect(self, replies: list[Message]) -> None:
        for msg in replies:
            if msg.has_error() or RIDE not in msg.content.config_records:
                continue
            answer, arrays = msg.content[RIDE], msg.content.array_records.get(RIDE_ARRAYS)
            del msg.content[RIDE]  # the strategy sees the reply as it would without the exchange
            if arrays is not None:
                del msg.content[RIDE_ARRAYS]
            with self.lock:
                ride = self.rides.get(msg.metadata.src_node_id)
                if ride is None or ride.busy or (str(answer.get("base")), str(answer.get("step"))) != (
                        ride.base.manifest.version, ride.step):
                    continue
                ride.busy = True
            self.pool.submit(self._advance, ride, answer, arrays)

    def close(self) -> None:
        """After the rounds: finish the step being worked on (the exchange after the rounds takes over from there)."""
        with self.lock:
            left = sorted(r.cam.node for r in self.rides.values())
        self.pool.shutdown(wait=True, cancel_futures=True)
        if left:
            log.info("rounds over with per-camera exchanges in flight (nodes %s): the exchange after the rounds "
                     "makes their snapshots", left)
        shutil.rmtree(self.work, ignore_errors=True)

    # --- the worker thread -----------------------------------------------------------------------------------
    def _open(self, ride: Ride) -> None:
        """The camera's exchange of its base: shared by every camera on that base (one export of the global graph);
        the exchanges no camera is on any more are dropped."""
        version = ride.base.manifest.version
        with self.lock:
            on = {r.base.manifest.version for r in self.rides.values()}
        for old in [v for v in self.exchanges if v not in on]:
            shutil.rmtree(self.exchanges.pop(old).work, ignore_errors=True)
        try:
            if version not in self.exchanges:
                self.exchanges[version] = Exchange(self.cfg, ride.base, self.snapshots.registry, self.work / version)
            ride.ex = self.exchanges[version]
        except Exception as err:  # noqa: BLE001 - e.g. the base snapshot's files are gone
            log.exception("per-camera exchange of %s not opened", version)
            ride.cam.reason = f"opening the exchange of {version}: {type(err).__name__}: {err}"
            self._advance(ride, None, None)
            return
        if ride.ex.asks_personal:
            with self.lock:
                ride.step, ride.busy = "personal", False
        else:  # calibrate first: the global graph it is sent
            ride.step = "calibrate"
            self._advance(ride, None, None)

    def _advance(self, ride: Ride, answer: ConfigRecord | None, arrays: ArrayRecord | None) -> None:
        cam, ex, step, nxt, payload = ride.cam, ride.ex, ride.step, ride.step, None
        try:
            if answer is not None:
                cam.camera = str(answer.get("camera-id", cam.camera))
                if "error" in answer:
                    cam.reason = f"{step}: {answer['error']}"
            metrics = {k[len("metric-"):]: v for k, v in (answer or {}).items() if k.startswith("metric-")}
            if cam.reason or ex is None:  # (the exchange could not be opened: the reason says why)
                pass
            elif answer is None:  # calibrate first: the graph it is sent
                payload = ex.graph(cam)
            elif step == "personal":
                ex.take_personal(cam, list(answer.get("keys", [])), arrays if arrays is not None else ArrayRecord())
                payload, nxt = (None if cam.reason else ex.graph(cam)), "calibrate"
            elif step == "calibrate":
                stats = {k: answer[k] for k in ("tensors", "low", "high") if k in answer}
                payload, nxt = ex.quantize(cam, stats, metrics), "score"
            else:
                ex.publish(cam, metrics)
                payload = ex.retry(cam)  # refused for its int8 loss: once more, with more layers float
        except Exception as err:  # noqa: BLE001 - this camera keeps the global snapshot; the rest go on
            log.exception("per-camera exchange step %s of node %d failed", step, cam.node)
            cam.reason = f"{step}: {type(err).__name__}: {err}"
        with self.lock:
            if cam.reason or (step == "score" and answer is not None and payload is None):
                report(cam, ride.base, self.bus)
                self.done[cam.node] = ride.base.manifest.version
                self.rides.pop(cam.node, None)
            else:
                ride.step, ride.payload, ride.busy = nxt, payload, False
