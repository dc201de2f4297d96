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
from server.snapshots.export import export_onnx, inspect_optimized, pre_process, quantize
from server.snapshots.pipeline import SnapshotResult, calibration_frames, latency_ms, within
from server.snapshots.registry import Registry, check_camera_id, now_iso
from shared.arrays import UpdateError, layout_of, pack, to_record, to_state_dict, unpack
from shared.config import Config
from shared.snapshot.calibration import activation_ranges, from_lists
from shared.snapshot.format import Manifest, sha256_file

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


def camera_snapshots(grid, cfg: Config, base: SnapshotResult, registry: Registry, bus) -> list[Camera]:
    """Every connected camera's own snapshot of the newest global one (`base`); returns each camera's outcome."""
    s, b, timeout = cfg.snapshot, base.manifest, cfg.snapshot.camera_timeout
    cameras = [Camera(node) for node in sorted(grid.get_node_ids())]
    student, frame = base.student, calibration_frames(cfg, 1)  # any one frame: the cameras' ranges replace its
    names = [student.names[i] for i in sorted(student.names)]
    if cfg.fed.personal != "none" or cfg.fed.runs_own_model:  # ask for the personal parts first
        config = ConfigRecord({"model-yaml": json.dumps(student.yaml), "names": names, "personal": cfg.fed.personal,
                               "keep-finetuned": cfg.fed.runs_own_model})
        layout = layout_of(to_record(student))
        ask = RecordDict({"arrays": pack(to_record(student)), "config": config})
        for node, reply in _ask(grid, cameras, "query.personal", {c.node: ask for c in cameras}, timeout).items():
            cam = next(c for c in cameras if c.node == node)
            keys = set(reply.content["config"].get("keys", []))
            try:  # exactly the named tensors, each of the size the structure gives it (UpdateError otherwise)
                if unknown := keys - {k for k, _, _ in layout}:
                    raise UpdateError(f"unknown tensors {sorted(unknown)[:3]}")
                if keys:
                    own = unpack(reply.content["arrays"], [item for item in layout if item[0] in keys])
                    cam.own = dict(to_state_dict(own))
            except UpdateError as err:
                cam.reason = f"camera {cam.camera}: unusable personal part: {err}"
            cam.reply_bytes += sum(v.numel() * v.element_size() for v in cam.own.values())
    with tempfile.TemporaryDirectory() as tmp:
        graphs, content = {}, {}  # one graph for every camera without a personal part, one per camera with one
        for c in (c for c in cameras if not c.reason):
            t0, key = time.perf_counter(), (c.node if c.own else "global")
            try:
                if key not in graphs:
                    model = _fold(student, c.own, c.camera) if c.own else student
                    meta = {"snapshot_version": b.version, "round": str(b.round), "camera": c.camera if c.own else ""}
                    graphs[key] = _graph(model, Path(tmp) / str(key), cfg, meta, frame)
            except ValueError as err:
                c.reason = str(err)
                continue
            c.server_seconds += time.perf_counter() - t0
            content[c.node] = RecordDict({"config": ConfigRecord({"onnx": graphs[key][1].read_bytes()})})
        replies = _ask(grid, cameras, "query.calibrate", content, timeout)
        int8s, seen = {}, {}
        for c in (c for c in cameras if not c.reason):
            t0, (fp32, pre, expected) = time.perf_counter(), graphs[c.node if c.own else "global"]
            stats, metrics = replies[c.node].content["calibration"], replies[c.node].content["metrics"]
            c.reply_bytes += len(json.dumps({k: list(v) for k, v in stats.items() if isinstance(v, list)}))
            c.map50_fp32 = float(metrics["map50-fp32"])
            try:
                check_camera_id(c.camera)
                if seen.setdefault(c.camera, c.node) != c.node:
                    raise ValueError(f"camera id {c.camera} is also node {seen[c.camera]}'s: one channel per camera")
                ranges = from_lists(stats["tensors"], stats["low"], stats["high"], expected, f"camera {c.camera}")
            except ValueError as err:
                c.reason = str(err)
                continue
            work = Path(tmp) / f"node{c.node}"
            work.mkdir()
            # The float layers of the global snapshot: chosen for this structure (precision.py), the same here
            out = quantize(fp32, work / "model.onnx", frame, s.target, s.method,
                           b.extra.get("float_layers", 0), ranges=ranges, pre=pre)
            int8s[c.node] = (out, inspect_optimized(out, work), int(metrics["frames"]), len(ranges), metrics)
            c.server_seconds += time.perf_counter() - t0
        score = {n: RecordDict({"config": ConfigRecord({"onnx": v[0].read_bytes()})}) for n, v in int8s.items()}
        replies = _ask(grid, cameras, "query.score", score, timeout)
        for c in (c for c in cameras if not c.reason):
            t0 = time.perf_counter()
            _gate_and_publish(c, replies[c.node].content["metrics"], int8s[c.node], base, cfg, registry)
            c.server_seconds += time.perf_counter() - t0
    for c in cameras:
        if c.reason and not c.published:
            log.warning("camera %s (node %d) keeps the global snapshot: %s", c.camera or "?", c.node, c.reason)
        bus.emit("camera_snapshot", b.round, camera=c.camera, node=c.node, published=c.published, version=c.version,
                 reason=c.reason, base=b.version, map50_fp32=c.map50_fp32, map50_int8=c.map50_int8,
                 reply_bytes=c.reply_bytes, personal_tensors=len(c.own), server_seconds=c.server_seconds)
    return cameras


def _gate_and_publish(c: Camera, metrics, int8, base: SnapshotResult, cfg: Config, registry: Registry) -> None:
    """Gate on the camera's own figures (int8 against its fp32 score, snapshot.tolerance), then sign and publish."""
    path, graph, frames, tensors, calib = int8
    c.map50_int8 = float(metrics["map50-int8"])
    b, drop = base.manifest, c.map50_fp32 - c.map50_int8
    extra = {**b.extra, "camera": c.camera, "base_snapshot": b.version, "personal_tensors": len(c.own),
             "calibration": {"source": f"camera {c.camera}", "frames": frames, "tensors": tensors},
             "int8_convs": graph.int8_convs, "float_convs": graph.float_convs, "rejected_candidates": []}
    manifest = Manifest(version=registry.next_version(c.camera), round=b.round, target=b.target,
                        sha256=sha256_file(path), size=path.stat().st_size, imgsz=b.imgsz, names=b.names,
                        map50_fp32=c.map50_fp32, map50_int8=c.map50_int8, map_fp32=float(calib["map-fp32"]),
                        map_int8=float(metrics["map-int8"]), latency_ms=latency_ms(path, b.imgsz),
                        created=now_iso(), parent_checkpoint=b.parent_checkpoint, nms=b.nms, extra=extra)
    c.version = manifest.version
    if not within(c.map50_int8, c.map50_fp32, cfg.snapshot.tolerance):
        c.reason = (f"mAP50 {c.map50_int8:.3f} int8 vs {c.map50_fp32:.3f} fp32 on camera {c.camera}, drop {drop:.3f} "
                    f"> tolerance {cfg.snapshot.tolerance:.0%} of fp32")
        registry.reject(manifest, c.reason, c.camera)
        return
    registry.publish(manifest, path, c.camera)
    c.published = True
