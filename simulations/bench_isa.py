"""The same ONNX models timed and scored with all of this CPU's instruction sets and with AVX2 alone (isa_mask.py),
in fresh processes taking turns: speed-ups over a baseline and int8 mAP50 as an AVX2 camera or server sees them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
import isa_mask  # noqa: E402 - beside this script
from shared.cpu_isa import isa_summary  # noqa: E402


def measure(spec: dict) -> dict:
    """In this process: each timed model's p50 per thread count (one side-by-side timing round) and each scored
    model's pooled camera-val mAP50 on the run's held-out cameras."""
    from bench_snapshot import latencies, map50
    from shared import task
    from shared.config import load_config
    from shared.run_dir import RunDir

    timed = {n: Path(p) for n, p in spec["timed"].items()}
    out: dict = {"isa": isa_summary(), "p50": {}, "map50": {}}
    for threads in spec["threads"]:
        p50 = latencies(timed, spec["imgsz"], threads, spec["runs"], "steady")
        out["p50"][str(threads)] = {n: p50[n][0] for n in timed}
    if spec["scored"]:
        cfg = load_config({**RunDir(Path(spec["run"])).overrides(), "resume": True})
        held = [task.camera_yaml(cfg, k) for k in task.eval_cameras(cfg)]
        out["map50"] = {n: map50(Path(p), cfg, held, spec["names"]) for n, p in spec["scored"].items()}
    return out


def in_child(spec: dict, level: str) -> dict:
    """measure() in a fresh process: this CPU's own instruction sets ('native') or a masked level ('avx2')."""
    env = None if level == "native" else isa_mask.masked_env(level)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([sys.executable, __file__, "--child", f.name], env=env, capture_output=True, text=True)
    finally:
        Path(f.name).unlink()
    if done.returncode:
        raise RuntimeError(f"measuring under {level} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(spec: dict, baseline: str, levels=("native", "avx2")) -> dict[str, dict]:
    """Both sides, taking turns: each timing round is a fresh process per level, one level after the other, so a
    slower minute of the machine hits both. The ratios over `baseline` are side by side inside each process; a
    model's p50 is the median over the rounds. Models are scored once per level, in its first round."""
    for level in levels:  # once per level, not per turn: the proof costs a PyTorch import
        if level != "native" and (seen := isa_mask.check(isa_mask.masked_env(level))) != level.upper():
            raise RuntimeError(f"the CPUID mask did not hold: PyTorch read {seen} under FEDCAM_CPUID_MASK={level}")
    turns: dict[str, list[dict]] = {level: [] for level in levels}
    for turn in range(spec["rounds"]):
        for level in levels:
            turns[level].append(in_child({**spec, "scored": spec["scored"] if turn == 0 else {}}, level))
    results = {}
    for level, runs in turns.items():
        p50 = {t: {n: float(np.median([r["p50"][t][n] for r in runs])) for n in spec["timed"]} for t in runs[0]["p50"]}
        results[level] = {"isa": runs[0]["isa"], "p50": p50, "map50": runs[0]["map50"]}
        print(f"\n{level}: {runs[0]['isa']}")
        heads = "".join(f"{t + ' thr ms':>12}{'x ' + baseline[:9]:>12}" for t in p50)
        print(f"{'model':<28}{heads}{'mAP50':>8}")
        for name in spec["timed"]:
            cells = "".join(f"{p[name]:>12.2f}{p[baseline] / p[name]:>12.2f}" for p in p50.values())
            score = runs[0]["map50"].get(name)
            print(f"{name:<28}{cells}{'' if score is None else f'{score:>8.3f}'}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # a spec file: measure it here, print JSON
    ap.add_argument("--run", default="", help="the run whose held-out cameras score the models (with --score)")
    ap.add_argument("--time", action="append", default=[], metavar="NAME=ONNX", help="a model to time")
    ap.add_argument("--score", action="append", default=[], metavar="NAME=ONNX", help="a model to score (mAP50)")
    ap.add_argument("--names", default="person,car,bicycle", help="the class names, in order (for --score)")
    ap.add_argument("--baseline", default="", help="the timed model the speed-ups are over (default: the first)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="native,avx2")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(Path(args.child).read_text()))))
        return
    timed = dict(s.split("=", 1) for s in args.time)
    spec = {"run": args.run, "timed": timed, "scored": dict(s.split("=", 1) for s in args.score),
            "names": args.names.split(","), "imgsz": args.imgsz, "runs": args.runs, "rounds": args.rounds,
            "threads": [1, 2]}
    compare(spec, args.baseline or next(iter(timed)), tuple(args.levels.split(",")))


if __name__ == "__main__":
    main()
