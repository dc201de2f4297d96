"""Distillation benchmark: each KD term and all terms vs no KD at one budget; pseudo-labels vs labels on few labels."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.events import read_events
from server.local.warmstart import ensure_teacher
from shared.data.world import ensure_world
from shared import models, task
from shared.run_dir import RunDir
from shared.config import load_config
from shared.train import TrainSpec

FEW = Path(__file__).parent / "scenarios" / "few_labels.toml"
TERMS = ("response", "box", "feature", "attention")


def variants(attention: float) -> dict[str, dict[str, float]]:
    """Distillation weights of each arm; 'none' is the detection loss alone."""
    off = {t: 0.0 for t in TERMS}
    one = {t: {**off, t: attention if t == "attention" else 1.0} for t in TERMS}
    return {"none": off, **one, "all": {"response": 1.0, "box": 1.0, "feature": 1.0, "attention": attention}}


def size_row(name: str, net, imgsz: int) -> str:
    mb = sum(p.numel() * p.element_size() for p in net.state_dict().values()) / 2**20
    return f"{name:<10}{models.count_params(net):>12,}{models.gflops(net, imgsz):>10.2f}{mb:>9.2f}"


def central_arms(cfg, teacher_path: Path, epochs: int, attention: float, out: Path,
                 arms: list[str] | None = None) -> dict[str, Path]:
    """Train one student per arm from the same seed and init, same epochs and data; print base and camera mAP."""
    base = task.base_yaml(cfg)
    names = task.names_of(base)
    teacher = models.load(teacher_path)
    cams = [task.camera_yaml(cfg, k) for k in range(cfg.data.cameras)]
    t_base, t_cam = task.score(teacher, base, cfg), task.score(teacher, cams, cfg)
    print(f"\n{'model':<10}{'params':>12}{'GFLOPs':>10}{'MB fp32':>9}")
    print(size_row("teacher", teacher, cfg.data.imgsz))
    print(size_row("student", models.build_student(cfg.model, names), cfg.data.imgsz))
    print(f"\nteacher: base val mAP50 {t_base.map50:.3f} (mAP50-95 {t_base.map:.3f}), "
          f"camera val mAP50 {t_cam.map50:.3f} (mAP50-95 {t_cam.map:.3f})")
    print(f"\nstudents, {epochs} epochs on the base domain each (seed {cfg.seed}):")
    print(f"{'arm':<10}{'base mAP50':>12}{'base mAP':>10}{'cam mAP50':>11}{'cam mAP':>9}{'train s':>9}")
    paths = {}
    for arm, w in variants(attention).items():
        if arms and arm not in arms:
            continue
        acfg = cfg.replace(**{"train.epochs": epochs, **{f"distill.{k}": v for k, v in w.items()}})
        spec = TrainSpec.central(acfg.train)
        student = models.build_student(acfg.model, names)
        t0 = time.perf_counter()
        if arm == "none":
            task.fit(student, base, acfg, spec)
        else:
            task.distill_fit(student, teacher, base, acfg, spec)
        secs = time.perf_counter() - t0
        b, c = task.score(student, base, acfg), task.score(student, cams, acfg)
        print(f"{arm:<10}{b.map50:>12.3f}{b.map:>10.3f}{c.map50:>11.3f}{c.map:>9.3f}{secs:>9.0f}", flush=True)
        paths[arm] = models.save(student, out / f"student_{arm}.pt", arm=arm, epochs=epochs)
    return paths


def fedcam(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "server.cli", *args], check=True, stdout=subprocess.DEVNULL)


def federated_arms(student: Path, teacher: Path, rounds: int, local_epochs: int, out: Path) -> None:
    """Few labels per camera: labels only vs teacher pseudo-labels on the unlabelled pool (+ KD terms)."""
    curves = {}
    for arm, on in (("labels", "false"), ("pseudo", "true")):
        run = out / f"few_{arm}"
        fedcam("simulate", "--scenario", str(FEW), "--rounds", str(rounds), "--run-dir", str(run),
               "--set", f"model.student-checkpoint={student}", "--set", f"model.teacher-checkpoint={teacher}",
               "--set", f"distill.on-clients={on}", "--set", f"fed.local-epochs={local_epochs}",
               "--set", "snapshot.enabled=false")
        ev = read_events(RunDir(run).events)
        curves[arm] = {e["round"]: e["data"]["central"] for e in ev
                       if e["kind"] == "round_end" and "central" in e["data"]}
        pseudo = [c["metrics"].get("pseudo-labelled", 0) for e in ev if e["kind"] == "train_result"
                  for c in e["data"]["clients"]]
        print(f"{arm}: {rounds} rounds in {ev[-1]['time'] - ev[0]['time']:.0f}s; pseudo-labelled frames per "
              f"client update {max(pseudo, default=0)}", flush=True)
    print("\nfew labels (10 per camera, 200 unlabelled), pooled camera-val mAP50 (mAP50-95) by round:")
    print(f"{'arm':<8}" + "".join(f"{'r' + str(r):>15}" for r in range(0, rounds + 1)))
    for arm, c in curves.items():
        print(f"{arm:<8}" + "".join(f"{c[r]['map50']:>8.3f} ({c[r]['map']:.3f})" if r in c else f"{'-':>15}"
                                    for r in range(0, rounds + 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", default="data/bench_world")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15, help="base-domain epochs of every student arm")
    ap.add_argument("--attention", type=float, default=1.0, help="weight of the attention term when it is on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_distill")
    ap.add_argument("--skip-central", action="store_true", help="reuse OUT/student_all.pt")
    ap.add_argument("--arms", default="", help="comma-separated subset of none,response,box,feature,attention,all")
    ap.add_argument("--skip-federated", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config({"data.root": args.world, "data.cameras": 4, "train.epochs": args.teacher_epochs,
                       "train.threads": 2})
    ensure_world(cfg)
    t0 = time.perf_counter()
    teacher = ensure_teacher(cfg).resolve()
    print(f"teacher {teacher} ({args.teacher_epochs} epochs; cached; {time.perf_counter() - t0:.0f}s here)")
    if args.skip_central:
        student = (out / "student_all.pt").resolve()
    else:
        arms = [a for a in args.arms.split(",") if a]
        central_arms(cfg, teacher, args.epochs, args.attention, out, arms)
        student = (out / "student_all.pt").resolve()
    (out / "teacher.json").write_text(json.dumps({"teacher": str(teacher), "student": str(student)}))
    if not args.skip_federated:
        federated_arms(student, teacher, args.rounds, args.local_epochs, out)


if __name__ == "__main__":
    main()
