"""What an EMA of the recovery's weights does to a pruned student's int8 mAP50 and its spread over seeds: one recovery
per seed, scored at its last step's weights and at EMAs of several decays of the same trajectory (an EMA draws no
random numbers). `probe_recover_ema.py --run RUN --round N [--fixed]`: the search's 50 % step (24 epochs from one
25 % student, stem float), or with --fixed the fixed recipe (one 50 % cut, 48 epochs, first 3 layers float).
"+bn": the same weights with BatchNorm statistics re-estimated on the recovery's frames (as SWA must: an average of
weights is a network no statistics were gathered for)."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from ultralytics.utils.torch_utils import ModelEMA  # noqa: E402

from server.snapshots import export  # noqa: E402
from server.snapshots.pipeline import calibration_frames, pruned_student, recover  # noqa: E402
from server.snapshots.prune import prune  # noqa: E402
from server.snapshots.search import step_ratio  # noqa: E402
from shared import models, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.evaluate import evaluate  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402
from shared.snapshot.inference import Detector  # noqa: E402
from shared.train import EMA_RAMP, estimate_bn_stats  # noqa: E402


def recovered(start, ratio: float, dense, cfg, epochs: int, seed: int, decays) -> tuple[torch.nn.Module, list]:
    """`start` cut by `ratio` and recovered from `dense` (without the built-in EMA), and the EMAs it passed by."""
    model = prune(start, ratio, cfg.data.imgsz, cfg.snapshot.round_to)
    emas = [ModelEMA(model, decay=d, tau=EMA_RAMP) for d in decays]
    hook = register_optimizer_step_post_hook(lambda *_: [e.update(model) for e in emas])
    try:
        recover(model, dense, cfg, epochs, seed)
    finally:
        hook.remove()
    return model, [e.ema for e in emas]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="a finished run")
    ap.add_argument("--round", type=int, required=True, help="its round checkpoint to prune")
    ap.add_argument("--seeds", default="0,1,2", help="recovery seeds")
    ap.add_argument("--decays", default="0.98,0.99,0.995", help="EMA decays to score beside the last step")
    ap.add_argument("--fixed", action="store_true", help="the fixed recipe instead of the search's 50 % step")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    run = RunDir(args.run)
    cfg = load_config({**run.overrides(), "resume": True})
    task.set_threads(cfg.train.threads)
    decays = [float(d) for d in args.decays.split(",")]
    frames = calibration_frames(cfg)
    dense = models.load(run.checkpoints / f"global_r{args.round:04d}.pt").eval()
    held = task.make_loader([task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)], "val", cfg, False)
    names = [dense.names[i] for i in sorted(dense.names)]
    base = task.make_loader(task.base_yaml(cfg), "train", cfg, True)  # the recovery's own (augmented) frames

    def rebn(model):
        model = copy.deepcopy(model)
        estimate_bn_stats(model, base)
        return model

    with tempfile.TemporaryDirectory() as tmp:
        def scores(model) -> list[float]:  # fp32 and int8 mAP50 on the cameras' val, as the gate scores
            fp = export.export_onnx(model, Path(tmp) / "fp32.onnx", cfg.data.imgsz, {})
            q = export.quantize(fp, Path(tmp) / "int8.onnx", frames, "x86", "static", 3 if args.fixed else [0])
            return [round(evaluate(Detector(p, cfg.data.imgsz, task.nms_settings(cfg), cfg.train.threads), held,
                                   names).map50, 4) for p in (fp, q)]

        print(f"dense fp32 {scores(dense)[0]:.4f}", flush=True)
        start = dense if args.fixed else pruned_student(dense, 0.25, cfg, teacher=dense, epochs=24)
        ratio, epochs = (0.5, 48) if args.fixed else (step_ratio(0.25, 0.5), 24)
        for seed in (int(s) for s in args.seeds.split(",")):
            model, emas = recovered(start, ratio, dense, cfg, epochs, seed, decays)
            row = {"last step": scores(model), "last step +bn": scores(rebn(model)),
                   **{f"ema {d}": scores(e) for d, e in zip(decays, emas)},
                   **{f"ema {d} +bn": scores(rebn(e)) for d, e in zip(decays, emas)}}
            print(f"seed {seed} (fp32, int8): {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
