"""Global student -> deployable snapshot: prune, recover, export, quantize, gate, sign and publish."""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from server.snapshots.export import GraphReport, export_onnx, inspect_optimized, quantize
from server.snapshots.prune import prune
from server.snapshots.registry import Registry, now_iso
from shared import models, task
from shared.config import Config
from shared.env import STATE_DIR
from shared.evaluate import TorchPredictor, evaluate
from shared.models import count_params
from shared.pruned import KEY, unpruned
from shared.run_dir import RunDir
from shared.snapshot.format import MANIFEST_FILE, Manifest, sha256_file
from shared.snapshot.inference import Detector
from shared.train import Progress, TrainSpec

log = logging.getLogger("fedcam.server")
# (stage, done, total): what the snapshot is doing, for progress bars (e.g. "prune 25%: recovering", 40, 120).
TAYLOR_BATCHES = 8  # labelled base-domain batches whose loss gradients rank the channels (taylor importance)
StageProgress = Callable[[str, int, int], None]


@dataclass
class SnapshotResult:
    manifest: Manifest
    published: bool
    reason: str
    int8_convs: int
    float_convs: int
    params_dense: int  # of the architecture before any pruning
    params_pruned: int  # of the snapshot
    student: object = None  # the fp32 model the snapshot was quantized from (its structure is every camera's)


def registry_for(cfg: Config) -> Registry:
    s = cfg.snapshot
    return Registry(RunDir(cfg.run_dir).registry(s.dir), s.key_path or STATE_DIR / "server_ed25519.pem")


def calibration_frames(cfg: Config, count: int | None = None) -> np.ndarray:
    """Real frames of the server's own data (default: snapshot.calib-frames), letterboxed as inference sees them."""
    loader = task.make_loader(task.base_yaml(cfg), "train", cfg, False, batch=count or cfg.snapshot.calib_frames)
    return next(iter(loader))["img"].numpy()


def latency_ms(path: Path, imgsz: int, runs: int = 30) -> float:
    predictor = Detector(path, imgsz, threads=1)
    x = np.zeros((1, 3, imgsz, imgsz), np.uint8)
    predictor.raw(x)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predictor.raw(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def privacy_of(checkpoint: str) -> dict:
    """The fed.dp record (epsilon spent, at which delta, noise, clip) of the round checkpoint a snapshot is made from;
    {} for a model from elsewhere or a run without DP."""
    try:
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError):
        return {}
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    return dict(meta.get("privacy", {}) or {})


def make_snapshot(dense, cfg: Config, rnd: int, parent: str, registry: Registry,
                  progress: StageProgress | None = None) -> SnapshotResult:
    """Gate the pruned int8 candidate; if it loses too much, fall back to the dense int8 one (never to nothing
    while a good snapshot can be made). Only when every candidate fails is the snapshot rejected."""
    s, imgsz, names = cfg.snapshot, cfg.data.imgsz, [dense.names[i] for i in sorted(dense.names)]
    say = progress or (lambda stage, done, total: None)
    say("scoring the fp32 student", 0, 1)
    held_out = [task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)]
    loader, settings = (lambda: task.make_loader(held_out, "val", cfg, False)), task.nms_settings(cfg)
    ref = evaluate(TorchPredictor(dense, settings), loader(), names)
    version, failed, frames = registry.next_version(), [], calibration_frames(cfg)
    params_unpruned = unpruned_params(dense)
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in dict.fromkeys([s.prune_ratio, 0.0]):  # the configured ratio first, then no pruning
            work = Path(tmp) / f"prune{ratio}"
            cand = _candidate(dense, ratio, cfg, frames, work, {"snapshot_version": version, "round": str(rnd)}, say)
            say(f"prune {ratio:.0%}: scoring the int8 candidate", 0, 1)
            got = evaluate(Detector(cand.path, imgsz, settings, cfg.train.threads), loader(), names)
            drop = ref.map50 - got.map50
            if drop <= s.tolerance:
                break
            failed.append(f"prune {ratio:.0%}: mAP50 {got.map50:.3f} int8 vs {ref.map50:.3f} fp32, drop {drop:.3f} > "
                          f"tolerance {s.tolerance}")
            log.warning("snapshot %s candidate rejected: %s", version, failed[-1])
        manifest = Manifest(version=version, round=rnd, target=s.target, sha256=sha256_file(cand.path),
                            size=cand.path.stat().st_size, imgsz=imgsz, names=names, map50_fp32=ref.map50,
                            map50_int8=got.map50, map_fp32=ref.map, map_int8=got.map,
                            latency_ms=latency_ms(cand.path, imgsz), created=now_iso(), parent_checkpoint=parent,
                            nms={"iou": settings.iou, "max_det": settings.max_det},
                            extra={"prune_ratio": ratio, "params": cand.params, "params_unpruned": params_unpruned,
                                   "method": s.method, "float_layers": s.float_layers,
                                   "int8_convs": cand.graph.int8_convs, "float_convs": cand.graph.float_convs,
                                   "cluster": s.cluster, "privacy": privacy_of(parent),
                                   "rejected_candidates": failed})
        published = drop <= s.tolerance
        if published:  # what was signed: the registry adds its delta and packed forms to the manifest
            folder = registry.publish(manifest, cand.path)
            manifest = Manifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
        else:
            registry.reject(manifest, "; ".join(failed))
    reason = "; ".join(failed)
    if published and failed:  # what the dashboard shows next to "published"
        reason = f"fell back to unpruned; {reason}"
    return SnapshotResult(manifest, published, reason, cand.graph.int8_convs, cand.graph.float_convs,
                          params_unpruned, cand.params, cand.model)


def unpruned_params(model) -> int:
    """Parameters of `model`'s architecture before any pruning (a student pruned before the rounds is smaller)."""
    if KEY not in model.yaml:
        return count_params(model)
    return count_params(models.build(unpruned(model.yaml), list(model.names.values())))


@dataclass
class Candidate:
    path: Path
    graph: GraphReport
    params: int
    model: object  # the fp32 student it was quantized from


def pruned_student(dense, ratio: float, cfg: Config, seed: int | None = None, progress: Progress | None = None):
    """A copy of `dense` with `ratio` of its channels pruned, ranked by snapshot.importance (taylor: on the server's
    labelled frames), recovered for snapshot.recover-epochs by distillation from `dense` on the server's frames
    (seeded). Used by snapshots (`dense` itself stays as it is) and by the warm start (model.student-prune)."""
    s, batches = cfg.snapshot, None
    if s.importance == "taylor":
        loader = task.make_loader(task.base_yaml(cfg), "train", cfg, True, cfg.seed if seed is None else seed)
        batches = itertools.islice(loader, TAYLOR_BATCHES)
    model = prune(dense, ratio, cfg.data.imgsz, s.round_to, batches)
    if ratio > 0 and s.recover_epochs > 0:
        # Distillation alone (det_weight 0): the server's labels are of its base domain, and training on them pulls
        # the student away from the cameras' domains (measured: README, "Snapshots and devices").
        spec = TrainSpec.central(cfg.train, epochs=s.recover_epochs, lr=cfg.train.lr / 2, warmup_steps=0,
                                 det_weight=0.0)
        task.distill_fit(model, copy.deepcopy(dense), task.base_yaml(cfg), cfg, spec, seed, progress=progress)
    return model


def _candidate(dense, ratio: float, cfg: Config, frames: np.ndarray, work: Path, metadata: dict[str, str],
               progress: StageProgress) -> Candidate:
    """1. prune and recover (ratio > 0), 2. export, 3. quantize and check what onnxruntime really runs."""
    s = cfg.snapshot
    steps = lambda done, total, _loss: progress(f"prune {ratio:.0%}: recovering", done, total)  # noqa: E731
    model = pruned_student(dense, ratio, cfg, progress=steps) if ratio > 0 else dense
    if s.cluster:  # weight sharing: the int8 model then packs into indices + codebooks (shared/snapshot/packed.py)
        from server.snapshots.cluster import clustered_student

        shares = lambda done, total, _loss: progress(f"prune {ratio:.0%}: sharing weights", done, total)  # noqa: E731
        model = clustered_student(model, dense, cfg, progress=shares)
    progress(f"prune {ratio:.0%}: export and int8 quantization", 0, 1)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, work / "fp32.onnx", cfg.data.imgsz, metadata)
    int8 = quantize(fp32, work / "model.onnx", frames, s.target, s.method, s.float_layers)
    return Candidate(int8, inspect_optimized(int8, work), count_params(model), model)
