"""Per-camera snapshots: a calibration exchange over Flower (personal part, activation ranges, int8 score), then
fold, quantize, gate, sign and publish in each camera's own registry channel. The server never sees a frame."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from server.federation.events import client_error
from server.snapshots.export import export_onnx, inspect_optimized, pre_process, quantize, unit_order
from server.snapshots.pipeline import SnapshotResult, calibration_frames, latency_ms, within
from server.snapshots.registry import Registry, check_camera_id, now_iso
from shared import models
from shared.arrays import UpdateError, layout_of, pack, to_record, to_state_dict, unpack
from shared.config import Config
from shared.snapshot.calibration import activation_ranges, from_lists
from shared.snapshot.format import MODEL_FILE, Manifest, sha256_file

log = logging.getLogger("fedcam.server")


@dataclass
class Camera:
    """One camera's way through the exchange; `reason` says why it keeps the global snapshot."""
    node: int
    camera: str = ""
    own: dict = field(default_factory=dict)  # its personal parameters (name -> tensor)
    published: bool = False
    version: str = ""
    reason: str = ""
    map50_fp32: float = 0.0
    map50_int8: float = 0.0
    map50_global: float | None = None  # the global snapshot's on the camera's val split: its own must not be worse
    refused: str = ""  # why the gate refused its candidate: int8 (loss against fp32) | global | latency
    retried: bool = False  # refused for its int8 loss once, then made again with more layers float
    reply_bytes: int = 0  # what it sent: calibration statistics and personal parameters
    server_seconds: float = 0.0  # fold, export, quantize, gate and sign for this camera


def _ask(grid, cameras: list[Camera], kind: str, content: dict[int, RecordDict], timeout: float) -> dict[int, Message]:
    """One message to each camera still in the exchange; replies by node. No answer in time or an error reply
    drops that camera (it keeps the global snapshot); the others go on."""
    live = [c for c in cameras if not c.reason]
    messages = [Message(content[c.node], dst_node_id=c.node, message_type=kind) for c in live]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    for c in live:
        reply = replies.get(c.node)
        if reply is None:
            c.reason = f"{kind}: no answer within {timeout:.0f} s"
        elif reply.has_error():
            c.reason = f"{kind}: {client_error(reply.error.reason)}"
        elif reply.content.config_records:
            c.camera = str(next(iter(reply.content.config_records.values())).get("camera-id", c.camera))
    return {n: m for n, m in replies.items() if not m.has_error()}


RETRY_FLOAT = 3  # int8 layers a refused candidate keeps float in its second try


def more_float(layers, precision: dict, extra: int) -> list[int] | None:
    """`layers` (the first N, or a list) plus the `extra` int8 layers of largest measured error (precision.py's
    record); None when there is no record to choose from."""
    base = list(range(layers)) if isinstance(layers, int) else list(layers)
    ranked = sorted((x for x in precision.get("layers", []) if x["index"] not in base), key=lambda x: -x["error"])
    return unit_order(base + [x["index"] for x in ranked[:extra]]) if ranked else None


def _fold(student, own: dict[str, torch.Tensor], camera: str):
    """The global structure with the camera's personal tensors in it (their names and shapes were checked when
    they were unpacked); a non-finite one is refused."""
    bad = [k for k, v in own.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise ValueError(f"camera {camera}: personal tensor {bad[0]} is not finite")
    model = copy.deepcopy(student)
    model.load_state_dict({**student.state_dict(), **own})
    return model


def _graph(model, work: Path, cfg: Config, metadata: dict, frame) -> tuple[Path, Path, set[str]]:
    """fp32 ONNX, its pre-processed graph (what cameras calibrate) and the tensors the quantizer calibrates."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, work / "fp32.onnx", cfg.data.imgsz, metadata)
    pre = pre_process(fp32, work / "fp32.pre.onnx")
    return fp32, pre, set(activation_ranges(pre, frame))


class Exchange:
    """One global snapshot (`base`) made per camera, step by step: what each step needs from the camera, and the
    server's work between steps. The query messages after the rounds (`camera_snapshots`) and the train messages
    during them (rider.py) both drive it; every failure lands in the camera's `reason`, never raises."""

    def __init__(self, cfg: Config, base: SnapshotResult, registry: Registry, work: Path):
        self.cfg, self.base, self.registry, self.work = cfg, base, registry, work
        self.student, self.frame = base.student, calibration_frames(cfg, 1)  # any frame: the camera's ranges rule
        # Pruned after the rounds, the snapshot's structure is not the one the cameras trained: they are asked
        # about the round's model, and a camera with a part of its own gets its snapshot in that structure. Cut to
        # the pruned one (prune.replay), its part lost to the pruned global model on its own frames (README).
        self.pruned_here = float(base.manifest.extra.get("prune_ratio", 0.0)) > 0  # by the search or a fixed ratio
        self.dense = models.load(base.manifest.parent_checkpoint) if self.pruned_here else self.student
        self.layout = layout_of(to_record(self.dense))
        self.graphs: dict = {}  # one graph for every camera without a personal part, one per camera with one
        self.int8s: dict = {}
        self.ranges: dict = {}  # node -> the camera's activation ranges
        self.seen: dict = {}  # camera id -> node: one channel per camera
        # What a camera runs without its own snapshot: scored beside its candidate, on its frames
        self.global_int8 = (registry.folder() / base.manifest.version / MODEL_FILE).read_bytes()
        work.mkdir(parents=True, exist_ok=True)

    @property
    def asks_personal(self) -> bool:
        return self.cfg.fed.personal != "none" or self.cfg.fed.runs_own_model

    def personal_query(self) -> RecordDict:
        names = [self.dense.names[i] for i in sorted(self.dense.names)]
        config = ConfigRecord({"model-yaml": json.dumps(self.dense.yaml), "names": names,
                               "personal": self.cfg.fed.personal, "keep-finetuned": self.cfg.fed.runs_own_model})
        return RecordDict({"arrays": pack(to_record(self.dense)), "config": config})

    def take_personal(self, cam: Camera, keys: list[str], arrays) -> None:
        """Exactly the named tensors, each of the size the structure gives it (UpdateError otherwise)."""
        try:
            if unknown := set(keys) - {k for k, _, _ in self.layout}:
                raise UpdateError(f"unknown tensors {sorted(unknown)[:3]}")
            if keys:
                cam.own = dict(to_state_dict(unpack(arrays, [item for item in self.layout if item[0] in keys])))
        except UpdateError as err:
            cam.reason = f"camera {cam.camera}: unusable personal part: {err}"
        cam.reply_bytes += sum(v.numel() * v.element_size() for v in cam.own.values())

    def graph(self, cam: Camera) -> bytes | None:
        """The pre-processed fp32 graph the camera calibrates: the snapshot with its personal part folded in."""
        t0, b = time.perf_counter(), self.base.manifest
        try:
            key = cam.node if cam.own else "global"
            if key not in self.graphs:
                model = _fold(self.dense, cam.own, cam.camera) if cam.own else self.student
                meta = {"snapshot_version": b.version, "round": str(b.round), "camera": cam.camera if cam.own else ""}
                self.graphs[key] = _graph(model, self.work / str(key), self.cfg, meta, self.frame)
        except ValueError as err:
            cam.reason = str(err)
            return None
        cam.server_seconds += time.perf_counter() - t0
        return self.graphs[key][1].read_bytes()

    def quantize(self, cam: Camera, stats, metrics) -> bytes | None:
        """The int8 candidate, quantized with the camera's ranges."""
        t0, (fp32, pre, expected) = time.perf_counter(), self.graphs[cam.node if cam.own else "global"]
        cam.reply_bytes += len(json.dumps({k: list(v) for k, v in stats.items() if isinstance(v, list)}))
        cam.map50_fp32 = float(metrics["map50-fp32"])
        try:
            check_camera_id(cam.camera)
            if self.seen.setdefault(cam.camera, cam.node) != cam.node:
                raise ValueError(f"camera id {cam.camera} is also node {self.seen[cam.camera]}'s: one channel per "
                                 "camera")
            ranges = from_lists(stats["tensors"], stats["low"], stats["high"], expected, f"camera {cam.camera}")
        except ValueError as err:
            cam.reason = str(err)
            return None
        self.ranges[cam.node] = ranges
        # The float layers of the global snapshot: chosen for this structure (precision.py), the same here
        out = self._quantize(cam, self.base.manifest.extra.get("float_layers", 0), metrics, "model.onnx")
        cam.server_seconds += time.perf_counter() - t0
        return out

    def retry(self, cam: Camera) -> bytes | None:
        """A candidate refused once for its int8 loss: made again with the RETRY_FLOAT int8 layers of largest
        measured error (the global snapshot's precision record) kept float too, for the camera to score again."""
        extra = self.base.manifest.extra
        more = more_float(extra.get("float_layers", 0), extra.get("precision", {}), RETRY_FLOAT)
        if cam.refused != "int8" or cam.retried or more is None:
            return None
        t0, cam.retried, cam.refused, cam.reason = time.perf_counter(), True, "", ""
        out = self._quantize(cam, more, self.int8s[cam.node][4], "retry.onnx")
        cam.server_seconds += time.perf_counter() - t0
        return out

    def _quantize(self, cam: Camera, layers, calib_metrics, name: str) -> bytes:
        (fp32, pre, _), s = self.graphs[cam.node if cam.own else "global"], self.cfg.snapshot
        work = self.work / f"node{cam.node}"
        work.mkdir(exist_ok=True)
        out = quantize(fp32, work / name, self.frame, s.target, s.method, layers, ranges=self.ranges[cam.node],
                       pre=pre)
        self.int8s[cam.node] = (out, inspect_optimized(out, work), int(calib_metrics["frames"]),
                                len(self.ranges[cam.node]), calib_metrics)
        return out.read_bytes()

    def publish(self, cam: Camera, metrics) -> None:
        t0 = time.perf_counter()
        unpruned = self.pruned_here and bool(cam.own)  # the round's structure (see __init__)
        _gate_and_publish(cam, metrics, self.int8s[cam.node], self.base, self.cfg, self.registry, unpruned)
        cam.server_seconds += time.perf_counter() - t0


def report(cam: Camera, base: SnapshotResult, bus) -> None:
    if cam.reason and not cam.published:
        log.warning("camera %s (node %d) keeps the global snapshot: %s", cam.camera or "?", cam.node, cam.reason)
    bus.emit("camera_snapshot", base.manifest.round, camera=cam.camera, node=cam.node, published=cam.published,
             version=cam.version, reason=cam.reason, base=base.manifest.version, map50_fp32=cam.map50_fp32,
             map50_int8=cam.map50_int8, map50_global=cam.map50_global, reply_bytes=cam.reply_bytes,
             personal_tensors=len(cam.own),
             server_seconds=cam.server_seconds)


def camera_snapshots(grid, cfg: Config, base: SnapshotResult, registry: Registry, bus) -> list[Camera]:
    """Every connected camera's own snapshot of the newest global one (`base`), by query messages; returns each
    camera's outcome."""
    timeout = cfg.snapshot.camera_timeout
    cameras = [Camera(node) for node in sorted(grid.get_node_ids())]
    with tempfile.TemporaryDirectory() as tmp:
        ex = Exchange(cfg, base, registry, Path(tmp))
        if ex.asks_personal:  # ask for the personal parts first
            ask = ex.personal_query()
            for node, reply in _ask(grid, cameras, "query.personal", {c.node: ask for c in cameras}, timeout).items():
                cam = next(c for c in cameras if c.node == node)
                ex.take_personal(cam, list(reply.content["config"].get("keys", [])), reply.content["arrays"])
        graphs = {c.node: ex.graph(c) for c in cameras if not c.reason}
        content = {n: RecordDict({"config": ConfigRecord({"onnx": g})}) for n, g in graphs.items() if g is not None}
        replies, int8s = _ask(grid, cameras, "query.calibrate", content, timeout), {}
        for c in (c for c in cameras if not c.reason):
            int8s[c.node] = ex.quantize(c, replies[c.node].content["calibration"], replies[c.node].content["metrics"])
        score = {n: RecordDict({"config": ConfigRecord({"onnx": v, "global": ex.global_int8})})
                 for n, v in int8s.items() if v is not None}
        replies = _ask(grid, cameras, "query.score", score, timeout)
        for c in (c for c in cameras if not c.reason):
            ex.publish(c, replies[c.node].content["metrics"])
        again = {c.node: ex.retry(c) for c in cameras if c.refused == "int8"}  # one more try, more layers float
        if again := {n: v for n, v in again.items() if v is not None}:
            score = {n: RecordDict({"config": ConfigRecord({"onnx": v, "global": ex.global_int8})})
                     for n, v in again.items()}
            replies = _ask(grid, [c for c in cameras if c.node in again], "query.score", score, timeout)
            for c in (c for c in cameras if c.node in again and not c.reason):
                ex.publish(c, replies[c.node].content["metrics"])
    for c in cameras:
        report(c, base, bus)
    return cameras


def _gate_and_publish(c: Camera, metrics, int8, base: SnapshotResult, cfg: Config, registry: Registry,
                      unpruned: bool = False) -> None:
    """Gate on the camera's own figures (int8 against its fp32 score, snapshot.tolerance; not below the global
    snapshot on its frames), then sign and publish. `unpruned`: in the round's structure, not the snapshot's."""
    path, graph, frames, tensors, calib = int8
    c.map50_int8 = float(metrics["map50-int8"])
    b, drop = base.manifest, c.map50_fp32 - c.map50_int8
    extra = {**b.extra, "camera": c.camera, "base_snapshot": b.version, "personal_tensors": len(c.own),
             "calibration": {"source": f"camera {c.camera}", "frames": frames, "tensors": tensors},
             "int8_convs": graph.int8_convs, "float_convs": graph.float_convs, "rejected_candidates": []}
    if unpruned:
        extra.update(prune_ratio=0.0, structure="the round's model, unpruned: a camera's part does not survive "
                                                "pruning after the rounds")
    manifest = Manifest(version=registry.next_version(c.camera), round=b.round, target=b.target,
                        sha256=sha256_file(path), size=path.stat().st_size, imgsz=b.imgsz, names=b.names,
                        map50_fp32=c.map50_fp32, map50_int8=c.map50_int8, map_fp32=float(calib["map-fp32"]),
                        map_int8=float(metrics["map-int8"]), latency_ms=latency_ms(path, b.imgsz),
                        created=now_iso(), parent_checkpoint=b.parent_checkpoint, nms=b.nms, extra=extra)
    c.version = manifest.version
    if "map50-global" in metrics:
        c.map50_global = float(metrics["map50-global"])
    if not within(c.map50_int8, c.map50_fp32, cfg.snapshot.tolerance):
        c.refused = "int8"
        c.reason = (f"mAP50 {c.map50_int8:.3f} int8 vs {c.map50_fp32:.3f} fp32 on camera {c.camera}, drop {drop:.3f} "
                    f"> tolerance {cfg.snapshot.tolerance:.0%} of fp32")
    elif c.map50_global is not None and c.map50_int8 < c.map50_global:
        c.refused = "global"
        c.reason = (f"mAP50 {c.map50_int8:.3f} of its own snapshot vs {c.map50_global:.3f} of the global one on "
                    f"camera {c.camera}: it keeps the global one")
    elif unpruned and cfg.snapshot.latency_budget_ms > 0 and cfg.snapshot.latency_target == "host" and (
            manifest.latency_ms > cfg.snapshot.latency_budget_ms):
        c.refused = "latency"
        c.reason = (f"{manifest.latency_ms:.1f} ms a frame unpruned, over snapshot.latency-budget-ms "
                    f"{cfg.snapshot.latency_budget_ms:g}: camera {c.camera} keeps the global snapshot")
    if c.reason:
        registry.reject(manifest, c.reason, c.camera)
        return
    registry.publish(manifest, path, c.camera)
    c.published = True
