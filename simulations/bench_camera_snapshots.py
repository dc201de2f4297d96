"""Per-camera snapshots benchmark: per camera, int8 mAP50 of (a) the global snapshot calibrated on the server's frames,
(b) the global model calibrated on the camera's own statistics, (c) the camera's personalized snapshot, against the
camera's personalized fp32 model; server time and reply size per camera; latencies of (a) and (c) side by side."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from client.calibration import frames, onnx_score
from server.federation.checkpoint import RunCheckpoints
from server.federation.events import read_events
from server.snapshots.export import export_onnx, pre_process, quantize
from server.snapshots.pipeline import latency_ms
from server.snapshots.registry import Registry
from shared import models, task
from shared.config import load_config
from shared.cpu_isa import isa_summary
from shared.run_dir import RunDir
from shared.snapshot.calibration import activation_ranges
from shared.snapshot.format import MODEL_FILE

SCENARIOS = Path(__file__).parent / "scenarios"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIOS / "demo.toml"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="runs/bench_camera_snapshots")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="key=value for the run (default arm: fed.keep-finetuned=true, the best at 3 cameras)")
    ap.add_argument("--score-only", action="store_true", help="score the finished run in --out again, no new run")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    run = Path(args.out)
    sets = args.sets or ["fed.keep-finetuned=true"]
    if not args.score_only:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--scenario", args.scenario, "--rounds",
                        str(args.rounds), "--run-dir", str(run), "--dashboard-port", "0", "--timeout", "7200",
                        "--set", "snapshot.per-camera=true", *[x for s in sets for x in ("--set", s)]],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"run: {time.perf_counter() - t0:.0f} s ({', '.join(sets)})", flush=True)
    cfg = load_config(RunDir(run).overrides())
    registry = Registry(RunDir(run).registry(cfg.snapshot.dir))
    glob = registry.folder() / registry.latest()["version"] / MODEL_FILE
    events = {e["data"]["camera"]: e["data"] for e in read_events(RunDir(run).events) if e["kind"] == "camera_snapshot"}
    dense = models.load(RunCheckpoints(run).latest_weights())  # the global model: (b) is its own snapshot per camera
    rows, lat = [], {"a": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(dense, Path(tmp) / "fp32.onnx", cfg.data.imgsz, {})
        pre = pre_process(fp32, Path(tmp) / "fp32.pre.onnx")
        for k in range(cfg.data.cameras):
            cam, data = f"cam{k:02d}", task.camera_yaml(cfg, k)
            shots = frames(data, cfg, cfg.snapshot.calib_frames)  # what the camera calibrates on in the exchange
            b = quantize(fp32, Path(tmp) / f"{cam}.onnx", shots[:1], cfg.snapshot.target,
                         cfg.snapshot.method, cfg.snapshot.first_float or 0, ranges=activation_ranges(pre, shots), pre=pre)
            e = events.get(cam, {})
            own = registry.latest(cam)
            c = registry.folder(cam) / own["version"] / MODEL_FILE if own else None
            score = lambda p: onnx_score(Path(p).read_bytes(), data, cfg)["map50"] if p else float("nan")  # noqa: E731
            a = score(glob)
            # (c): its own snapshot; a candidate the gate rejected is its own figure from the exchange, and the
            # camera runs the global snapshot instead
            own_c = score(c) if c else e.get("map50_int8", float("nan"))
            rows.append((cam, e.get("map50_fp32", float("nan")), a, score(b), own_c, own_c if c else a,
                         e.get("server_seconds", 0.0), e.get("reply_bytes", 0), e.get("reason", "")))
            for _ in range(3):  # interleaved: the same machine state for both
                lat["a"].append(latency_ms(glob, cfg.data.imgsz))
                if c:
                    lat["c"].append(latency_ms(c, cfg.data.imgsz))
    print(f"\n{Path(args.scenario).stem}, {args.rounds} rounds, {cfg.data.imgsz} px; val mAP50 per camera")
    print(f"{'camera':<8}{'fp32 own':>9}{'(a) glob':>10}{'(b) cam':>9}{'(c) own':>9}{'(c)/fp32':>9}{'runs':>7}"
          f"{'server s':>9}{'KB up':>8}  reason")
    for cam, f, a, b, c, runs, secs, up, why in rows:
        print(f"{cam:<8}{f:>9.3f}{a:>10.3f}{b:>9.3f}{c:>9.3f}{c / f if f else float('nan'):>9.1%}{runs:>7.3f}"
              f"{secs:>9.1f}{up / 1024:>8.0f}  {why}")
    mean = lambda i: statistics.fmean(r[i] for r in rows)  # noqa: E731
    print(f"{'mean':<8}{mean(1):>9.3f}{mean(2):>10.3f}{mean(3):>9.3f}{mean(4):>9.3f}{'':>9}{mean(5):>7.3f}")
    if lat["c"]:
        a, c = statistics.median(lat["a"]), statistics.median(lat["c"])
        print(f"latency (1 thread, median of interleaved runs): global {a:.2f} ms, per-camera {c:.2f} ms, "
              f"ratio {c / a:.2f}")
    print(f"goals: (c) >= 98% of fp32 on every camera: {all(r[4] >= 0.98 * r[1] for r in rows)}; "
          f"(c) - (a) mean {mean(4) - mean(2):+.3f}, what the cameras run - (a) {mean(5) - mean(2):+.3f} "
          "(goal >= +0.03)")


if __name__ == "__main__":
    main()
