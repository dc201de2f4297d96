"""Searched snapshot vs the fixed recipe vs unpruned int8 vs Ultralytics' fp32 ONNX of one checkpoint, side by side."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from bench_isa import compare as compare_isa  # noqa: E402 - beside this script
from bench_snapshot import latencies, map50, resized, ultralytics_exports  # noqa: E402
from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from server.snapshots import costmodel  # noqa: E402
from server.snapshots.export import export_onnx, float_nodes, quantize  # noqa: E402
from server.snapshots.pipeline import calibration_frames, make_snapshot, pruned_student  # noqa: E402
from server.snapshots.registry import Registry  # noqa: E402
from shared import model_files, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.evaluate import TorchPredictor, evaluate  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/demo", help="a finished run: its last global student, or --round's")
    ap.add_argument("--round", type=int, default=0, help="the round checkpoint to use (default: the run's last)")
    ap.add_argument("--imgsz", type=int, default=320, help="the size latency is timed at")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model and timing round")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds; the median of their p50s is reported")
    ap.add_argument("--no-fixed", action="store_true", help="leave out the fixed recipe (48 epochs of recovery)")
    ap.add_argument("--dense-run", default="", help="a twin run whose rounds trained the unpruned student (--set "
                    "model.student-prune=0): with --run pruned before its rounds, the ratios against its dense model")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override of the search")
    ap.add_argument("--isa", default="", help="also time and score every model under these CPUID-masked levels in "
                    "fresh processes, beside this CPU's own (bench_isa.py; e.g. avx2)")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    run = Path(args.run)
    cfg = load_config({**RunDir(run).overrides(), "resume": True, "snapshot.prune-ratio": "auto",
                       "snapshot.float-layers": "auto", **dict(s.split("=", 1) for s in args.set)})
    task.set_threads(cfg.train.threads)
    checkpoints = RunCheckpoints(run)
    last = checkpoints.weights(args.round) if args.round else checkpoints.latest_weights()
    student = model_files.open_model(last).model
    names = [student.names[i] for i in sorted(student.names)]
    held = [task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        result = make_snapshot(student, cfg, 0, str(last), Registry(work / "reg", work / "key.pem"),
                               lambda stage, done, total: None)
        minutes = (time.perf_counter() - t0) / 60
        extra = result.manifest.extra
        print(f"search: {minutes:.1f} min, stopped: {extra['search_stopped']}; published "
              f"{result.published}, prune {extra['prune_ratio']:.0%}, float layers {extra['float_layers']}")
        for c in extra["candidates"]:
            print(f"  candidate prune {c['ratio']:.0%}: {c['params']} params, int8 mAP50 {c['map50']:.3f} "
                  f"({c['drop']:+.1%} lost), passed {c['passed']}, host {c['latency_ms']:.2f} ms, target "
                  f"{c['target_ms']:.2f} ms, {c['epochs']} epochs, {c['minutes']:.1f} min")
        print(f"dense fp32 mAP50 {result.manifest.map50_fp32:.3f}; estimated Cortex-A7 (1 core) "
              f"{extra['cortex_a7_ms_estimate']} ms against the seed camera's 50 ms")
        # The fixed recipe, timed beside it: 50 %, 48 recovery epochs, first 3 layers float
        fixed = None if args.no_fixed else pruned_student(student, 0.5, cfg, epochs=48)
        frames = calibration_frames(cfg)
        at = {}  # name -> (model at the timing size, its mAP50 at the training size, float layers)
        small = {}  # name -> the same model at the training size (what the mAP50 was scored on)
        searched = result.student
        for name, model, layers in (("searched", searched, extra["float_layers"]), ("fixed 50%/48/3", fixed, 3),
                                    ("unpruned int8 (3 float)", student, 3)):
            if model is None:
                continue
            fp = export_onnx(model, work / f"{len(at)}fp.onnx", cfg.data.imgsz, {})
            q = quantize(fp, work / f"{len(at)}q.onnx", frames, cfg.snapshot.target, "static", layers)
            big = export_onnx(model, work / f"{len(at)}fp{args.imgsz}.onnx", args.imgsz, {})
            qbig = quantize(big, work / f"{len(at)}q{args.imgsz}.onnx", resized(frames, args.imgsz),
                            cfg.snapshot.target, "static", layers)
            a7 = costmodel.estimate_ms(big, float_nodes(big, layers), "cortex-a7")
            at[name], small[name] = (qbig, map50(q, cfg, held, names), a7), q
        ul = ultralytics_exports(student, work, args.imgsz, task.base_yaml(cfg), False)["ultralytics fp32"]
        ul_small = ultralytics_exports(student, work, cfg.data.imgsz, task.base_yaml(cfg), False)["ultralytics fp32"]
        at["ultralytics fp32"] = (ul, map50(ul_small, cfg, held, names), float("nan"))
        small["ultralytics fp32"] = ul_small
        twin = None if not args.dense_run else dense_twin(Path(args.dense_run), args.round, cfg, held, names, work,
                                                          args.imgsz)
        if twin is not None:
            at["UL fp32, dense twin"] = (twin[0], twin[1], float("nan"))
        paths = {n: v[0] for n, v in at.items()}
        print(f"\n{'model':<26}{'thr':>4}{'p50 ms':>9}{'x UL':>7}{'MB':>7}{'mAP50':>8}{'of fp32':>9}{'A7 est ms':>11}")
        for threads in (1, 2):
            rounds = [latencies(paths, args.imgsz, threads, args.runs, "steady") for _ in range(args.rounds)]
            p50 = {n: float(np.median([r[n][0] for r in rounds])) for n in paths}
            for n, (path, m, a7) in at.items():
                print(f"{n:<26}{threads:>4}{p50[n]:>9.2f}{p50['ultralytics fp32'] / p50[n]:>7.2f}"
                      f"{path.stat().st_size / 1e6:>7.2f}{m:>8.3f}{m / result.manifest.map50_fp32:>9.1%}{a7:>11.1f}")
            if twin is not None:  # the whole compression, pruning before the rounds included
                for n in at:
                    print(f"  {n}: {p50['UL fp32, dense twin'] / p50[n]:.2f}x the dense twin's UL fp32, "
                          f"{at[n][1] / twin[2]:.1%} of its fp32 mAP50 ({twin[2]:.3f})")
        print(f"(latency at {args.imgsz} px, steady timing, median of {args.rounds} rounds; mAP50 on the held-out "
              f"camera val at {cfg.data.imgsz} px; A7: the cost model's estimate, one core)")
        if args.isa:  # the same files again, each instruction set level in a fresh process
            spec = {"run": str(run), "timed": {n: str(p) for n, p in paths.items()},
                    "scored": {n: str(p) for n, p in small.items()}, "names": names, "imgsz": args.imgsz,
                    "runs": args.runs, "rounds": args.rounds, "threads": [1, 2]}
            compare_isa(spec, "ultralytics fp32", ("native", *args.isa.split(",")))


def dense_twin(run: Path, rnd: int, cfg, held, names, work: Path, imgsz: int) -> tuple[Path, float, float]:
    """The twin run's dense global model of the same round: Ultralytics' fp32 export at the timing size, that
    export's mAP50, and the model's own fp32 mAP50 (as the gate scores the dense student)."""
    checkpoints = RunCheckpoints(run)
    path = checkpoints.weights(rnd) if rnd else checkpoints.latest_weights()
    model = model_files.open_model(path).model
    ref = evaluate(TorchPredictor(model, task.nms_settings(cfg)), task.make_loader(held, "val", cfg, False), names)
    twin = work / "twin"
    twin.mkdir()
    ul = ultralytics_exports(model, twin, imgsz, task.base_yaml(cfg), False)["ultralytics fp32"]
    ul_small = ultralytics_exports(model, twin, cfg.data.imgsz, task.base_yaml(cfg), False)["ultralytics fp32"]
    print(f"dense twin {path}: fp32 mAP50 {ref.map50:.3f}")
    return ul, map50(ul_small, cfg, held, names), ref.map50


if __name__ == "__main__":
    main()
