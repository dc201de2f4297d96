"""Device runtime benchmark: fedcam-device's detector vs Ultralytics' YOLO(onnx).predict on the same frames and
snapshot (p50/p95 latency, peak RSS, each in its own process), swap time, and registry load with 100 pulls."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.cpu_isa import isa_summary

RUNTIME = """
import json, resource, sys, time, cv2, numpy as np
from pathlib import Path
from shared.snapshot.format import Manifest
from shared.snapshot.inference import Detector, device_settings
folder, frames = Path(sys.argv[1]), sorted(Path(sys.argv[2]).glob("*.jpg"))[:int(sys.argv[3])]
m = Manifest.from_bytes((folder / "manifest.json").read_bytes())
det = Detector(folder / "model.onnx", m.imgsz, device_settings(m, 0.25), threads=1)
imgs = [cv2.imread(str(f)) for f in frames]
det.detect(imgs[0])
t = []
for img in imgs:
    t0 = time.perf_counter(); det.detect(img); t.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"p50": float(np.median(t)), "p95": float(np.percentile(t, 95)),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_loaded": "torch" in sys.modules}))
"""

ULTRA = """
import json, resource, sys, time, numpy as np, cv2, torch
torch.set_num_threads(1)
from shared.env import prepare_ultralytics
prepare_ultralytics()
from pathlib import Path
from ultralytics import YOLO
folder, frames = Path(sys.argv[1]), sorted(Path(sys.argv[2]).glob("*.jpg"))[:int(sys.argv[3])]
imgsz = json.loads((folder / "manifest.json").read_text())["imgsz"]
yolo = YOLO(str(folder / "model.onnx"), task="detect")
imgs = [cv2.imread(str(f)) for f in frames]
yolo.predict(imgs[0], imgsz=imgsz, verbose=False)
t = []
for img in imgs:
    t0 = time.perf_counter(); yolo.predict(img, imgsz=imgsz, verbose=False); t.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"p50": float(np.median(t)), "p95": float(np.percentile(t, 95)),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env=env, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--registry", default="runs/demo/snapshots")
    ap.add_argument("--frames", default="data/world_demo/cam00/images/val")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--pulls", type=int, default=100)
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reg = Path(args.registry)
    channel = reg / "global" if (reg / "global").is_dir() else reg  # the global channel (older registries: the root)
    version = json.loads((channel / "latest.json").read_text())["version"]
    folder = channel / version
    ours, theirs = run(RUNTIME, str(folder), args.frames, str(args.n), env=env), \
        run(ULTRA, str(folder), args.frames, str(args.n), env=env)
    print(f"snapshot {version}, {args.n} frames, 1 thread")
    print(f"{'':<28}{'p50 ms':>8}{'p95 ms':>8}{'peak RSS MB':>13}")
    print(f"{'fedcam-device detector':<28}{ours['p50']:>8.2f}{ours['p95']:>8.2f}{ours['rss_mb']:>13.0f}")
    print(f"{'Ultralytics YOLO().predict':<28}{theirs['p50']:>8.2f}{theirs['p95']:>8.2f}{theirs['rss_mb']:>13.0f}")
    print(f"ratio (Ultralytics / fedcam): p50 {theirs['p50'] / ours['p50']:.2f}x, RSS {theirs['rss_mb'] / ours['rss_mb']:.2f}x;"
          f" torch loaded by the runtime: {ours['torch_loaded']}")

    # swap time: activating a verified snapshot (new onnxruntime session) while serving
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from client.runtime.agent import Agent

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--registry", str(reg), "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            agent = Agent(url, tmp, (reg / "server_public_key.pem").read_bytes())
            t0 = time.perf_counter()
            agent.poll_once()
            pull = time.perf_counter() - t0
            t0 = time.perf_counter()
            agent._activate(version)
            swap = (time.perf_counter() - t0) * 1000
        print(f"pull + verify + smoke test + swap: {pull * 1000:.0f} ms; swap alone (new session): {swap:.0f} ms")

        import urllib.request

        def pull_one(_):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{url}/api/snapshots/{version}/model.onnx", timeout=60) as r:
                    n = len(r.read())
                return time.perf_counter() - t0, n, None
            except Exception as err:  # noqa: BLE001
                return time.perf_counter() - t0, 0, str(err)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.pulls) as pool:
            results = list(pool.map(pull_one, range(args.pulls)))
        wall = time.perf_counter() - t0
        errors = [r[2] for r in results if r[2]]
        mb = sum(r[1] for r in results) / 1e6
        print(f"{args.pulls} concurrent pulls: {len(errors)} errors, {wall:.2f}s wall, {mb / wall:.1f} MB/s, "
              f"p95 {sorted(r[0] for r in results)[int(0.95 * len(results)) - 1] * 1000:.0f} ms")
    finally:
        srv.terminate()
        srv.wait(timeout=20)


if __name__ == "__main__":
    main()
