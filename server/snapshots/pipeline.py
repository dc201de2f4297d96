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

from server.snapshots import costmodel, search
from server.snapshots.export import float_nodes, runs_integer_kernels
from server.snapshots.precision import paired_ms
from server.snapshots.prune import prune
from server.snapshots.registry import Registry, now_iso
from shared import models, task
from shared.config import Config
from shared.evaluate import TorchPredictor, evaluate
from shared.models import count_params
from shared.pruned import KEY, unpruned
from shared.snapshot.format import MANIFEST_FILE, Manifest, sha256_file
from shared.snapshot.inference import Detector
from shared.train import Progress, TrainSpec

log = logging.getLogger("fedcam.server")
COMPARE_RUNS = 128  # paired runs when the search weighs a passing candidate against the best one (about 1 s)
TAYLOR_BATCHES = 8  # labelled base-domain batches whose loss gradients rank the channels (taylor importance)
# (stage, done, total): what the snapshot is doing, for progress bars (e.g. "prune 25%: recovering", 40, 120).
StageProgress = Callable[[str, int, int], None]
within = search.within  # the gate, also the per-camera snapshots' (cameras.py)


@dataclass
class SnapshotResult:
    manifest: Manifest
    published: bool
    reason: str
    int8_convs: int
    float_convs: int
    params_dense: int  # of the architecture before any pruning
    params_pruned: int  # of the snapshot
    student: object = None  # the fp32 model the snapshot was quantized from (the structure of per-camera snapshots)


def calibration_frames(cfg: Config, count: int | None = None) -> np.ndarray:
    """Real frames of the server's own data (default: snapshot.calib-frames), letterboxed as inference sees them."""
    loader = task.make_loader(task.base_yaml(cfg), "train", cfg, False, batch=count or cfg.snapshot.calib_frames)
    return next(iter(loader))["img"].numpy()


def side_by_side(a: Path, b: Path, x: np.ndarray) -> float:
    """b's time relative to a's, (b - a) / a, from paired runs on one thread (precision.paired_ms)."""
    a_ms, delta = paired_ms(a, b, x, COMPARE_RUNS)
    return delta / a_ms if a_ms > 0 else 0.0


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


def float_reasons(chosen: dict, float_layers) -> dict[str, str]:
    """Why each float unit is float (precision.Precision.as_dict's record), keyed by the unit as text: modules ("2")
    and convs inside int8 modules ("2/m.0/cv1") in one JSON object."""
    units = [(x["index"], x) for x in chosen.get("layers", [])] + [(x["unit"], x) for x in chosen.get("convs", [])]
    listed = {str(u) for u in float_layers} if isinstance(float_layers, list) else set()
    return {str(u): x["why"] for u, x in units if x["float"] and str(u) in listed}


def held_float_layers(registry: Registry, target: str) -> list:
    """The float layers of the channel's current snapshot for `target` (an int in the manifest: the first N), which
    the next one keeps while float is no slower (precision.faster_in_float)."""
    before = registry.latest_manifest()
    layers = before.extra.get("float_layers", []) if before is not None and before.target == target else []
    return list(range(layers)) if isinstance(layers, int) else list(layers)


def make_snapshot(dense, cfg: Config, rnd: int, parent: str, registry: Registry,
                  progress: StageProgress | None = None) -> SnapshotResult:
    """Search the compression under the gate (search.py): the fastest candidate whose int8 mAP50 keeps all but
    snapshot.tolerance of the dense fp32 student's on held-out camera data, the unpruned int8 one as the fallback.
    Only when every candidate fails is the snapshot rejected."""
    s, imgsz, names = cfg.snapshot, cfg.data.imgsz, [dense.names[i] for i in sorted(dense.names)]
    say = progress or (lambda stage, done, total: None)
    say("scoring the fp32 student", 0, 1)
    held_out = [task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)]
    loader, settings = (lambda: task.make_loader(held_out, "val", cfg, False)), task.nms_settings(cfg)
    ref = evaluate(TorchPredictor(dense, settings), loader(), names)
    version, frames = registry.next_version(), calibration_frames(cfg)
    params_unpruned = unpruned_params(dense)
    metadata = {"snapshot_version": version, "round": str(rnd)}
    previous_float = held_float_layers(registry, s.target)
    with tempfile.TemporaryDirectory() as tmp:
        def score(cand: search.Candidate):
            say(f"prune {cand.ratio:.0%}: scoring the int8 candidate", 0, 1)
            return evaluate(Detector(cand.path, imgsz, settings, cfg.train.threads, runs_integer_kernels(s.target)),
                            loader(), names)

        def build(model, ratio: float, epochs: int, **kw) -> search.Candidate:
            return search.candidate(model, ratio, epochs, cfg, frames, Path(tmp), metadata, say, dense,
                                    previous_float=previous_float, **kw)

        x = np.ascontiguousarray(frames[:1], dtype=np.float32) / 255.0
        out = search.run(dense, cfg, ref.map50, score, build, lambda path: latency_ms(path, imgsz), say,
                         lambda a, b: side_by_side(a, b, x))
        cand, got = (out.best, out.best_score) if out.best is not None else (out.last, out.last_score)
        failed = [f"prune {t.ratio:.0%}: mAP50 {t.map50:.3f} int8 vs {ref.map50:.3f} fp32, {t.drop:.1%} lost > "
                  f"tolerance {s.tolerance:.0%}" for t in out.tried if not t.passed]
        chosen = search.figures_of(out.tried, cand)
        manifest = Manifest(version=version, round=rnd, target=s.target, sha256=sha256_file(cand.path),
                            size=cand.path.stat().st_size, imgsz=imgsz, names=names, map50_fp32=ref.map50,
                            map50_int8=got.map50, map_fp32=ref.map, map_int8=got.map,
                            latency_ms=latency_ms(cand.path, imgsz), created=now_iso(), parent_checkpoint=parent,
                            nms={"iou": settings.iou, "max_det": settings.max_det},
                            extra={"prune_ratio": cand.ratio, "params": cand.params, "params_unpruned": params_unpruned,
                                   "method": s.method, "float_layers": cand.float_layers,
                                   "float_layers_why": float_reasons(cand.precision, cand.float_layers),
                                   "precision": cand.precision, "int8_convs": cand.graph.int8_convs,
                                   "float_convs": cand.graph.float_convs, "cluster": s.cluster,
                                   "cluster_fit": s.cluster_fit if s.cluster else None,
                                   "privacy": privacy_of(parent), "tolerance": s.tolerance,
                                   "latency_target": s.latency_target, "target_ms": round(chosen.target_ms, 3),
                                   "latency_estimated": s.latency_target != "host",
                                   "cortex_a7_ms_estimate": round(costmodel.estimate_ms(
                                       cand.path.with_name("fp32.onnx"),
                                       float_nodes(cand.path.with_name("fp32.onnx"), cand.float_layers),
                                       "cortex-a7"), 1),
                                   "latency_budget_ms": s.latency_budget_ms,
                                   "latency_budget_met": bool(s.latency_budget_ms <= 0 or
                                                              chosen.target_ms <= s.latency_budget_ms),
                                   **search.record(out), "rejected_candidates": failed})
        published = out.best is not None
        if published:  # what was signed: the registry adds its delta and packed forms to the manifest
            folder = registry.publish(manifest, cand.path)
            manifest = Manifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
        else:
            registry.reject(manifest, "; ".join(failed))
    reason = "; ".join(failed)
    if published and failed and cand.ratio == 0.0 and s.ratio:  # what the dashboard shows next to "published"
        reason = f"fell back to unpruned; {reason}"
    return SnapshotResult(manifest, published, reason, cand.graph.int8_convs, cand.graph.float_convs,
                          params_unpruned, cand.params, cand.model)


def unpruned_params(model) -> int:
    """Parameters of `model`'s architecture before any pruning (a student pruned before the rounds is smaller)."""
    if KEY not in model.yaml:
        return count_params(model)
    return count_params(models.build(unpruned(model.yaml), list(model.names.values())))


def pruned_student(dense, ratio: float, cfg: Config, seed: int | None = None, progress: Progress | None = None,
                   teacher=None, epochs: int | None = None, ema: float = 0.0):
    """A copy of `dense` with `ratio` of its channels pruned, ranked by snapshot.importance (taylor: on the server's
    labelled frames), recovered for `epochs` (default snapshot.recover-epochs) by distillation from `teacher`
    (default `dense`) on the server's frames (seeded). Used by snapshots (`dense` itself stays as it is), their
    search (a step of a model already pruned, distilled from the dense one) and by the warm start; `ema` as in
    recover()."""
    s, batches = cfg.snapshot, None
    epochs = s.recover_epochs if epochs is None else epochs
    if s.importance == "taylor":
        loader = task.make_loader(task.base_yaml(cfg), "train", cfg, True, cfg.seed if seed is None else seed)
        batches = itertools.islice(loader, TAYLOR_BATCHES)
    model = prune(dense, ratio, cfg.data.imgsz, s.round_to, batches)
    if ratio > 0 and epochs > 0:
        recover(model, teacher if teacher is not None else dense, cfg, epochs, seed, progress, ema)
    return model


def recover(model, teacher, cfg: Config, epochs: int, seed: int | None = None, progress: Progress | None = None,
            ema: float = 0.0):
    """Train a pruned `model` in place for `epochs` by distillation from `teacher` on the server's frames; with
    `ema` > 0 it ends on an EMA of its weights at that decay (snapshot.recover-ema: the search's later steps)."""
    # Distillation alone (det_weight 0): the server's labels are of its base domain, and training on them pulls
    # the student away from the cameras' domains (measured: README, "Snapshots and devices").
    spec = TrainSpec.central(cfg.train, epochs=epochs, lr=cfg.train.lr / 2, warmup_steps=0, det_weight=0.0, ema=ema)
    task.distill_fit(model, copy.deepcopy(teacher), task.base_yaml(cfg), cfg, spec, seed, progress=progress)
    return model
