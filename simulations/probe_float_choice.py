"""Is the float-layer choice (server/snapshots/precision.py) faster than simpler layouts, timed as cameras run it?"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from bench_snapshot import latencies  # noqa: E402 - beside this script
from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from server.snapshots import precision  # noqa: E402
from server.snapshots.export import export_onnx, quantize  # noqa: E402
from server.snapshots.pipeline import calibration_frames, pruned_student  # noqa: E402
from shared import model_files, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="a finished run")
    ap.add_argument("--round", type=int, default=0, help="its round checkpoint (default: the last)")
    ap.add_argument("--ratio", type=float, default=0.5, help="channels pruned (no recovery: latency only)")
    ap.add_argument("--choices", type=int, default=2, help="times the float-layer choice is made")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model and timing round")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds; the median of their p50s is reported")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    run = Path(args.run)
    cfg = load_config({**RunDir(run).overrides(), "resume": True})
    task.set_threads(cfg.train.threads)
    checkpoints = RunCheckpoints(run)
    last = checkpoints.weights(args.round) if args.round else checkpoints.latest_weights()
    dense = model_files.open_model(last).model
    model = pruned_student(dense, args.ratio, cfg, epochs=0) if args.ratio > 0 else dense
    frames, imgsz = calibration_frames(cfg), cfg.data.imgsz
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, work / "fp32.onnx", imgsz, {})
        layouts: dict[str, list] = {"all int8": [], "stem float": [0], "first 3 float": [0, 1, 2]}
        for k in range(args.choices):
            chosen = precision.choose(fp32, frames, cfg.snapshot.target, work, cfg.snapshot.float_budget)
            why = {x.index: x.why for x in chosen.layers if x.float}
            print(f"choice {k}: {chosen.float_layers} in {chosen.seconds:.0f} s; all-int8 {chosen.int8_ms:.2f} ms; "
                  f"why: {why}; marginal picks timed together: {chosen.confirm}", flush=True)
            layouts[f"choice {k} ({len(chosen.float_layers)} float)"] = chosen.float_layers
        paths = {name: quantize(fp32, work / f"q{i}.onnx", frames, cfg.snapshot.target, "static", layers)
                 for i, (name, layers) in enumerate(layouts.items())}
        paths["fp32"] = fp32
        first = next(n for n in layouts if n.startswith("choice 0"))
        a, d = precision.paired_ms(paths["stem float"], paths[first], frames[:1].astype(np.float32) / 255, 256)
        print(f"paired, 1 thread (as the choice times): stem float {a:.2f} ms, {first} {d:+.3f} ms against it")
        for threads in (1, 2):
            rounds = [latencies(paths, imgsz, threads, args.runs, "steady") for _ in range(args.rounds)]
            for name in paths:
                p50s = [r[name][0] for r in rounds]
                print(f"{threads} thr {name:<28} p50 {np.median(p50s):6.2f} ms (rounds: "
                      f"{', '.join(f'{t:.2f}' for t in p50s)})", flush=True)


if __name__ == "__main__":
    main()
