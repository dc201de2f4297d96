"""The server's starting models: a teacher and a distilled student trained on its base domain, cached by recipe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from shared.config import Config, to_flat

if TYPE_CHECKING:  # shared.train imports torch: the CLI process stays small while the run goes on
    from shared.train import Progress

BASE_KEYS = ("seed", "data.classes", "data.imgsz", "data.base-train", "data.base-val")
# The world's camera data never touches the starting models, so only these parts of the config key them;
# the thread count changes speed, not the recipe.
TRAIN_SECTIONS = ("train",)
NOT_RECIPE = ("train.threads",)
DISTILL_RECIPE = ("distill.response", "distill.box", "distill.feature", "distill.attention", "distill.temperature")
ProgressFor = Callable[[str], "Progress"]


def recipe_key(cfg: Config, keys: tuple[str, ...], extra: dict | None = None) -> str:
    """A short hash of everything a cached model depends on, so a changed recipe never reuses a stale one."""
    flat = to_flat(cfg)
    recipe = {k: v for k, v in flat.items()
              if (k in keys or k.split(".")[0] in TRAIN_SECTIONS or k in BASE_KEYS) and k not in NOT_RECIPE}
    return hashlib.sha256(json.dumps({**recipe, **(extra or {})}, sort_keys=True).encode()).hexdigest()[:12]


def models_dir(cfg: Config) -> Path:
    return Path(cfg.data.root) / "models"


def teacher_path(cfg: Config) -> Path:
    return models_dir(cfg) / f"teacher_{recipe_key(cfg, ('model.family', 'model.teacher-scale'))}.pt"


def student_path(cfg: Config, teacher: Path | None) -> Path:
    keys = ("model.family", "model.student-scale", "model.student-width", "model.student-activation")
    if teacher is None:
        return models_dir(cfg) / f"student_base_{recipe_key(cfg, keys)}.pt"
    distill = {k: v for k, v in to_flat(cfg).items() if k in DISTILL_RECIPE}
    return models_dir(cfg) / f"student_kd_{recipe_key(cfg, keys, {**distill, 'teacher': file_hash(teacher)})}.pt"


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def ensure_teacher(cfg: Config, progress: Progress | None = None, say=print) -> Path:
    """model.teacher-checkpoint, or the teacher (model.teacher-scale) trained on the base domain, cached."""
    if cfg.model.teacher_checkpoint:
        return Path(cfg.model.teacher_checkpoint)
    path = teacher_path(cfg)
    if not path.exists():
        from shared import models, task
        from shared.train import TrainSpec

        say(f"training the teacher ({cfg.model.family}{cfg.model.teacher_scale}, {cfg.train.epochs} epochs) -> {path}")
        base = task.base_yaml(cfg)
        teacher = models.build_teacher(cfg.model, task.names_of(base))
        task.fit(teacher, base, cfg, TrainSpec.central(cfg.train), progress=progress)
        models.save(teacher, path, data=str(base), epochs=cfg.train.epochs, role="teacher")
    return path


def ensure_student(cfg: Config, teacher: Path | None, progress: Progress | None = None, say=print) -> Path:
    """The student trained on the base domain, with distillation from `teacher` unless it is None; cached."""
    path = student_path(cfg, teacher)
    if not path.exists():
        from shared import models, task
        from shared.train import TrainSpec

        base = task.base_yaml(cfg)
        student = models.build_student(cfg.model, task.names_of(base))
        spec = TrainSpec.central(cfg.train)
        if teacher is None:
            say(f"training the starting student on the base domain ({cfg.train.epochs} epochs) -> {path}")
            task.fit(student, base, cfg, spec, progress=progress)
        else:
            say(f"distilling the starting student from {teacher} ({cfg.train.epochs} epochs) -> {path}")
            task.distill_fit(student, models.load(teacher), base, cfg, spec, progress=progress)
        models.save(student, path, data=str(base), epochs=cfg.train.epochs, teacher=str(teacher or ""))
    return path


PRUNE_RECIPE = ("model.student-prune", "snapshot.importance", "snapshot.round-to", "snapshot.recover-epochs")


def pruned_student_path(cfg: Config, dense: Path) -> Path:
    key = recipe_key(cfg, PRUNE_RECIPE, {"dense": file_hash(dense)})
    return dense.with_name(f"{dense.stem}_pruned{cfg.model.student_prune:g}_{key}.pt")


def ensure_pruned_student(cfg: Config, dense: Path, progress: Progress | None = None, say=print) -> Path:
    """`dense` with model.student-prune of its channels pruned and recovered on the base domain, cached.
    The rounds then fine-tune the structure the cameras will run: pruned after the rounds instead, recovery on
    the server's frames cannot win back what the rounds taught (README, "Snapshots and devices")."""
    path = pruned_student_path(cfg, dense)
    if not path.exists():
        from server.snapshots.pipeline import pruned_student
        from shared import models

        ratio, epochs = cfg.model.student_prune, cfg.snapshot.recover_epochs
        say(f"pruning {ratio:.0%} of the starting student's channels ({cfg.snapshot.importance}), "
            f"{epochs} recovery epochs -> {path}")
        model = pruned_student(models.load(dense), ratio, cfg, progress=progress)
        models.save(model, path, dense=str(dense), prune_ratio=ratio, recover_epochs=epochs)
    return path


def prepare(cfg: Config, console=None, progress_for: ProgressFor | None = None) -> Config:
    """Make what a run needs and is missing: the camera world, the teacher and the starting student.

    By default (model.start = "distilled") the student starts distilled from the teacher; "base" trains it
    on labels alone; model.student-prune > 0 prunes it before the rounds. A given model.student-checkpoint is
    used as it is.
    """
    from shared.data.world import ensure_world

    say = console.print if console else print
    prog = progress_for or (lambda _name: None)
    say(f"camera world in {cfg.data.root} ({cfg.data.cameras} cameras; generated if missing)")
    ensure_world(cfg)
    if cfg.model.student_checkpoint:
        return cfg
    if cfg.model.start not in ("distilled", "base"):
        raise ValueError(f"model.start is 'distilled' or 'base', not {cfg.model.start!r}")
    teacher = ensure_teacher(cfg, prog("teacher"), say) if cfg.model.start == "distilled" else None
    student = ensure_student(cfg, teacher, prog("student"), say)
    if cfg.model.student_prune > 0:
        student = ensure_pruned_student(cfg, student, prog("pruned student"), say)
    flat = {"model.student-checkpoint": str(student)}
    if teacher is not None:
        flat["model.teacher-checkpoint"] = str(teacher)
    return cfg.replace(**flat)
