"""An arm64 snapshot run by the device runtime on this machine and on an emulated aarch64 root, compared in steps."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
import onnx  # noqa: E402
import yaml  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from server.federation.checkpoint import RunCheckpoints  # noqa: E402
from server.snapshots.pipeline import make_snapshot  # noqa: E402
from server.snapshots.registry import PUBLIC_KEY, Registry  # noqa: E402
from shared import model_files, task  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402
from shared.snapshot.format import MODEL_FILE  # noqa: E402


def boundary_probe(model: Path, out: Path) -> dict[str, float]:
    """The model with every int8 -> float boundary as an extra output, and each boundary's quantization step: a
    DequantizeLinear of an activation feeding an op that stays float (its outputs reach no QuantizeLinear), where
    the two CPUs' int8 kernels hand over to float. Only those: a probe inside an int8 chain would stop onnxruntime
    fusing it into integer kernels, and the probed model would no longer compute what the snapshot does."""
    proto = onnx.load(str(model))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def stays_float(node) -> bool:
        return node.op_type != "QuantizeLinear" and not any(
            c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, []))

    steps = {}
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue  # weights are the same bytes on both sides
        if any(stays_float(c) for c in consumers.get(n.output[0], [])) and n.input[1] in inits:
            scale = numpy_helper.to_array(inits[n.input[1]])
            if scale.size == 1:
                steps[n.output[0]] = float(scale)
    for name in steps:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(out))
    return steps


def run_check(cmd: list[str], snapshot: Path, key: Path, frames: Path, probe: Path, out: Path, env=None,
              timeout: float = 1800, extra: tuple[str, ...] = ()) -> float:
    t0 = time.perf_counter()
    subprocess.run([*cmd, "-m", "client.runtime.cli", "check", "--snapshot", str(snapshot), "--key", str(key),
                    "--source", str(frames), "--probe", str(probe), "--out", str(out), "--conf", "0.25", *extra],
                   check=True, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], 1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def compare(x86: dict, arm: dict, steps: dict[str, float], frames: int) -> dict:
    worst_steps, beyond_1, total, worst_raw, dets, same, worst_iou = 0.0, 0, 0, 0.0, [0, 0], 0, 1.0
    for i in range(frames):
        for name, step in steps.items():
            d = np.abs(x86[f"{i}/tensor/{name}"] - arm[f"{i}/tensor/{name}"]) / step
            worst_steps, beyond_1, total = max(worst_steps, float(d.max())), beyond_1 + int((d > 1.01).sum()), \
                total + d.size
        worst_raw = max(worst_raw, float(np.abs(x86[f"{i}/raw"] - arm[f"{i}/raw"]).max()))
        a, b = x86[f"{i}/boxes"], arm[f"{i}/boxes"]
        dets[0], dets[1] = dets[0] + len(a), dets[1] + len(b)
        if len(a) == len(b) and (x86[f"{i}/classes"] == arm[f"{i}/classes"]).all():
            same += 1
            if len(a):
                worst_iou = min(worst_iou, float(np.diag(iou(a, b)).min()))
    return {"boundaries": len(steps), "worst_steps": worst_steps, "values_beyond_1_step": beyond_1, "values": total,
            "worst_raw_abs": worst_raw, "detections_x86": dets[0], "detections_arm": dets[1],
            "frames_same_detections": same, "worst_iou_of_matched": worst_iou}


def x86_levels(levels: list[str], folder: Path, key: Path, frames: Path, work: Path, steps: dict) -> None:
    """This CPU's int8 kernels, as they are and with instruction sets hidden, against the graph as written."""
    import isa_mask  # beside this script

    run_check([sys.executable], folder, key, frames, work / "probe.onnx", work / "ref.npz", extra=("--unoptimized",))
    ref = dict(np.load(work / "ref.npz"))
    n = len({k.split("/")[0] for k in ref})
    for level in ["native", *levels]:
        env = None if level == "native" else isa_mask.masked_env(level)
        run_check([sys.executable], folder, key, frames, work / "probe.onnx", work / f"{level}.npz", env=env)
        vs = compare(ref, dict(np.load(work / f"{level}.npz")), steps, n)
        print(f"x86 {level} vs the float-evaluated QDQ graph: worst {vs['worst_steps']:.2f} steps, "
              f"{vs['values_beyond_1_step']} of {vs['values']} values beyond 1 step, raw output worst |diff| "
              f"{vs['worst_raw_abs']:.4f}, {vs['frames_same_detections']}/{n} frames with the same detections",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/demo", help="a finished run: its last global student is used")
    ap.add_argument("--root", default="/opt/fedcam-arm64", help="the aarch64 root (deploy/arm64/build-root.sh)")
    ap.add_argument("--cpu", default="cortex-a72", help="qemu's CPU model (a NEON-only camera core)")
    ap.add_argument("--frames", type=int, default=16, help="held-out camera val frames compared")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--x86-isa", default="", help="instead of the aarch64 side: this CPU's x86 kernels as they are "
                    "and under these CPUID-masked levels (isa_mask.py, e.g. avx2), each against the graph as written")
    args = ap.parse_args()
    root, qemu = Path(args.root), shutil.which("qemu-aarch64-static")
    if not args.x86_isa and (qemu is None or not (root / "usr/bin/python3.11").exists()):
        raise SystemExit(f"no aarch64 root at {root} or no qemu-aarch64-static: run deploy/arm64/build-root.sh")
    other = f"x86 levels: native, {args.x86_isa}" if args.x86_isa else f"emulated: aarch64 {args.cpu} (qemu-user)"
    print(f"host instruction sets: {isa_summary()}; {other}", flush=True)
    run = Path(args.run)
    # Pruning off (one unpruned candidate; float layers chosen as the server does): what is checked is the int8
    # arithmetic of the two CPUs on one signed snapshot, not the search; the arm64 target is gated as x86 is.
    cfg = load_config({**RunDir(run).overrides(), "resume": True, "snapshot.target": "arm64",
                       "snapshot.prune-ratio": "0", "snapshot.float-layers": "auto",
                       **dict(s.split("=", 1) for s in args.set)})
    task.set_threads(cfg.train.threads)
    student = model_files.open_model(RunCheckpoints(run).latest_weights()).model
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reg = Registry(work / "reg", work / "key.pem")
        result = make_snapshot(student, cfg, 0, "arm64-check", reg)
        m = result.manifest
        print(f"arm64 snapshot {m.version}: target {m.target}, published {result.published} (gate: int8 mAP50 "
              f"{m.map50_int8:.3f} vs fp32 {m.map50_fp32:.3f}, tolerance {cfg.snapshot.tolerance:.0%}), "
              f"{result.int8_convs} int8 convs, float layers {m.extra['float_layers']}", flush=True)
        if not result.published:
            raise SystemExit(f"the arm64 snapshot failed its gate: {result.reason}")
        folder = reg.folder() / m.version
        data = yaml.safe_load(task.camera_yaml(cfg, task.eval_cameras(cfg)[0]).read_text())
        frames = work / "frames"
        frames.mkdir()
        for p in sorted((Path(data["path"]) / data["val"]).iterdir())[:args.frames]:
            shutil.copyfile(p, frames / p.name)
        steps = boundary_probe(folder / MODEL_FILE, work / "probe.onnx")
        key = reg.root / PUBLIC_KEY
        if args.x86_isa:
            return x86_levels(args.x86_isa.split(","), folder, key, frames, work, steps)
        host_s = run_check([sys.executable], folder, key, frames, work / "probe.onnx", work / "x86.npz")
        env = {**os.environ, "PYTHONPATH": str(root / "opt/site"), "PYTHONNOUSERSITE": "1"}
        arm_s = run_check([qemu, "-cpu", args.cpu, "-L", str(root), str(root / "usr/bin/python3.11")], folder, key,
                          frames, work / "probe.onnx", work / "arm.npz", env)
        # The reference: the same QDQ graph as written, in float arithmetic (what the quantizer defines), to tell
        # which CPU's integer kernels depart from it when the two disagree.
        run_check([sys.executable], folder, key, frames, work / "probe.onnx", work / "ref.npz", extra=("--unoptimized",))
        x86, arm, ref = (dict(np.load(work / f"{k}.npz")) for k in ("x86", "arm", "ref"))
        n = len({k.split("/")[0] for k in x86})
        r = compare(x86, arm, steps, n)
        for side, got in (("x86", x86), ("aarch64", arm)):
            vs = compare(ref, got, steps, n)
            print(f"{side} vs the float-evaluated QDQ graph: worst {vs['worst_steps']:.2f} steps, "
                  f"{vs['values_beyond_1_step']} of {vs['values']} values beyond 1 step, raw output worst |diff| "
                  f"{vs['worst_raw_abs']:.4f}, {vs['frames_same_detections']}/{n} frames with the same detections")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}))
    print(f"{n} frames; {r['boundaries']} int8->float boundaries: worst difference {r['worst_steps']:.2f} "
          f"quantization steps ({r['values_beyond_1_step']} of {r['values']} values beyond 1 step); raw output worst "
          f"|diff| {r['worst_raw_abs']:.4f}; detections x86 {r['detections_x86']} / aarch64 {r['detections_arm']}, "
          f"{r['frames_same_detections']}/{n} frames identical in count and class, worst IoU {r['worst_iou_of_matched']:.4f}; "
          f"wall time host {host_s:.1f} s, emulated {arm_s:.1f} s (emulation: not a speed figure)")
    ok = r["worst_steps"] <= 2.0
    print("PASS: within 2 quantization steps" if ok else "FAIL: beyond 2 quantization steps")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
