"""Snapshot benchmark: latency, size and mAP of teacher, student, pruned and int8 snapshots vs Ultralytics' exports."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import shared  # noqa: F401
from server.export import export_onnx, inspect_optimized, quantize
from server.prune import prune
from server.snapshot import calibration_frames
from shared import models, task
from shared.config import load_config
from shared.evaluate import OnnxPredictor, evaluate
from shared.train import TrainSpec


def latency(path: Path, imgsz: int, threads: int, runs: int) -> tuple[float, float]:
    p = OnnxPredictor(path, threads=threads)
    x = np.random.default_rng(0).integers(0, 255, (1, 3, imgsz, imgsz), dtype=np.uint8)
    for _ in range(5):
        p.raw(x)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p.raw(x)
        t.append((time.perf_counter() - t0) * 1000)
    return float(np.median(t)), float(np.percentile(t, 95))


def ultralytics_exports(student, work: Path, imgsz: int, data_yaml: Path) -> dict[str, Path]:
    """The same trained student exported by Ultralytics itself (fp32 ONNX, and its int8 option)."""
    from ultralytics import YOLO

    pt = work / "student_ul.pt"
    torch.save({"model": copy.deepcopy(student).half(), "train_args": {"imgsz": imgsz, "task": "detect"}}, pt)
    fp32 = Path(YOLO(str(pt)).export(format="onnx", imgsz=imgsz, opset=17))
    out = {"ultralytics fp32": fp32.rename(work / "ultralytics_fp32.onnx")}  # the int8 export reuses the name
    try:
        q = YOLO(str(pt)).export(format="onnx", imgsz=imgsz, int8=True, data=str(data_yaml))
        out["ultralytics int8"] = Path(q)
    except Exception as err:  # noqa: BLE001 - report, do not fake a number
        print(f"ultralytics int8 export failed: {type(err).__name__}: {err}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/noniid_fedavg", help="a finished run: its last global student is used")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--prune-ratio", type=float, default=0.1)
    args = ap.parse_args()
    run = Path(args.run)
    cfg = load_config({**json.loads((run / "run_config.json").read_text()), "resume": True})
    task.set_threads(cfg.train.threads)
    student = models.load(cfg.model.student_checkpoint)
    last = sorted((run / "checkpoints").glob("global_r*.pt"))[-1]
    student.load_state_dict(torch.load(last, weights_only=True))
    teacher = models.build_teacher(cfg.model, [student.names[i] for i in sorted(student.names)])
    held = [task.camera_yaml(cfg, k) for k in range(cfg.data.cameras)]
    names = [student.names[i] for i in sorted(student.names)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pruned = prune(student, args.prune_ratio, cfg.data.imgsz, cfg.snapshot.round_to)
        spec = TrainSpec.central(cfg.train, epochs=cfg.snapshot.recover_epochs, lr=cfg.train.lr / 2, warmup_steps=0)
        task.distill_fit(pruned, copy.deepcopy(student), task.base_yaml(cfg), cfg, spec)
        frames = calibration_frames(cfg)
        rows = []
        for imgsz in (int(s) for s in args.sizes.split(",")):
            variants = {"teacher fp32 (untrained)": export_onnx(teacher, work / f"t{imgsz}.onnx", imgsz, {}),
                        "student fp32": export_onnx(student, work / f"s{imgsz}.onnx", imgsz, {}),
                        "pruned fp32": export_onnx(pruned, work / f"p{imgsz}.onnx", imgsz, {})}
            if imgsz == cfg.data.imgsz:  # calibration frames exist at the training size only
                variants["student int8"] = quantize(variants["student fp32"], work / "sq.onnx", frames, "x86")
                variants["pruned int8"] = quantize(variants["pruned fp32"], work / f"q{imgsz}.onnx", frames, "x86")
            if imgsz == cfg.data.imgsz:
                variants.update(ultralytics_exports(student, work, imgsz, task.base_yaml(cfg)))
            for name, path in variants.items():
                m50 = evaluate(OnnxPredictor(path, task.nms_settings(cfg), threads=2),
                               task.make_loader(held, "val", cfg, False), names).map50 \
                    if imgsz == cfg.data.imgsz and "teacher" not in name else float("nan")
                for threads in (1, 2):
                    p50, p95 = latency(path, imgsz, threads, args.runs)
                    rows.append((imgsz, name, threads, p50, p95, path.stat().st_size / 1e6, m50))
        print(f"\n{'imgsz':>5} {'model':<26}{'thr':>4}{'p50 ms':>9}{'p95 ms':>9}{'MB':>7}{'mAP50':>8}")
        for r in rows:
            print(f"{r[0]:>5} {r[1]:<26}{r[2]:>4}{r[3]:>9.2f}{r[4]:>9.2f}{r[5]:>7.2f}{r[6]:>8.3f}")
        base = {(r[0], r[2]): r[3] for r in rows if r[1] == "ultralytics fp32"}
        for r in rows:
            if r[1].endswith("int8") and not r[1].startswith("ultra") and (r[0], r[2]) in base:
                print(f"speed-up of {r[1]} vs Ultralytics fp32 ONNX at {r[0]} px, {r[2]} thread(s): "
                      f"{base[(r[0], r[2])] / r[3]:.2f}x")
        rep = inspect_optimized(work / "sq.onnx", work)
        gflops = models.gflops(student, cfg.data.imgsz)
        best = min(r[3] for r in rows if r[1] == "student int8")
        # Ultralytics counts 2 ops per multiply-accumulate; almost all of them run in the int8 convs.
        print(f"int8 graph: {rep.int8_convs} int8 convs, {rep.float_convs} float; {gflops:.2f} GOPs per frame -> "
              f"{gflops / (best / 1000):.1f} GOPS achieved at the best p50 ({best:.2f} ms)")


if __name__ == "__main__":
    main()
