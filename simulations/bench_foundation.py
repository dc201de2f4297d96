"""Foundation benchmark: teacher/student size and train speed, and the base -> camera domain gap."""

from __future__ import annotations

import argparse
import copy
import time

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from shared.data.world import ensure_world
from shared import models, task
from shared.config import load_config
from shared.train import TrainSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", default="data/bench_world")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30, help="base-domain epochs of the student")
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--teacher-steps", type=int, default=10, help="steps timed to estimate a teacher epoch")
    args = ap.parse_args()

    cfg = load_config({"data.root": args.world, "data.cameras": args.cameras, "train.epochs": args.epochs,
                       "train.threads": 2})
    d = cfg.data
    t0 = time.perf_counter()
    ensure_world(cfg)
    print(f"world: {d.cameras} cameras, imgsz {d.imgsz}, made/checked in {time.perf_counter() - t0:.1f}s")
    base = task.base_yaml(cfg)
    names = task.names_of(base)
    student, teacher = models.build_student(cfg.model, names), models.build_teacher(cfg.model, names)

    steps_per_epoch = len(task.make_loader(base, "train", cfg, True))
    print(f"\n{'model':<10}{'params':>12}{'GFLOPs@' + str(d.imgsz):>14}{'train s/epoch':>16}")
    for name, net in (("teacher", teacher), ("student", student)):
        probe = copy.deepcopy(net)
        res = task.fit(probe, base, cfg, TrainSpec.central(cfg.train, epochs=1, max_steps=args.teacher_steps))
        per_epoch = res.seconds / res.steps * steps_per_epoch
        print(f"{name:<10}{models.count_params(net):>12,}{models.gflops(net, d.imgsz):>14.2f}{per_epoch:>15.1f}*")
    print(f"* from {args.teacher_steps} timed steps x {steps_per_epoch} steps/epoch (batch {cfg.train.batch})")

    t0 = time.perf_counter()
    task.fit(student, base, cfg, TrainSpec.central(cfg.train))
    print(f"\nstudent trained on base for {args.epochs} epochs in {time.perf_counter() - t0:.0f}s; "
          f"base val mAP50 {task.score(student, base, cfg).map50:.3f}")
    print(f"\n{'camera':<8}{'base-only mAP50':>17}{'fine-tuned mAP50':>18}{'base-only mAP':>15}{'fine-tuned mAP':>16}")
    for k in range(d.cameras):
        cam = task.camera_yaml(cfg, k)
        before = task.score(student, cam, cfg)
        tuned = copy.deepcopy(student)
        task.fit(tuned, cam, cfg, TrainSpec.central(cfg.train, epochs=args.finetune_epochs, lr=cfg.train.lr / 2,
                                                    warmup_steps=0))
        after = task.score(tuned, cam, cfg)
        print(f"cam{k:02d}   {before.map50:>17.3f}{after.map50:>18.3f}{before.map:>15.3f}{after.map:>16.3f}")


if __name__ == "__main__":
    main()
