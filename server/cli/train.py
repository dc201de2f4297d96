"""`fedcam data make`, `train`, `teacher train`, `distill`, `eval`: data and models, on the server or a workstation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from server.cli.common import (SetOpt, app, config_from, console, data_app, print_eval, progress_bar, teacher_app,
                               train_progress)
from shared.config import Config


@data_app.command("make")
def data_make(out: Path = typer.Option(..., help="Output folder (e.g. data/world)."),
              cameras: Optional[int] = typer.Option(None, help="Number of camera domains."),
              seed: Optional[int] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Generate the procedural camera world: a labelled base domain and N camera domains."""
    from shared.data.world import ensure_world

    cfg = config_from(sets, **{"data.cameras": cameras, "seed": seed, "data.root": str(out)})
    with progress_bar() as bar:
        job = bar.add_task("generating", total=None, info="")
        world = ensure_world(cfg, progress=lambda i, n: bar.update(job, completed=i, total=n), lazy=False)
    console.print(f"world with {cfg.data.cameras} cameras in [bold]{out}[/] (seed {world['seed']})")


@app.command("train")
def train_cmd(data: Path = typer.Option(..., help="data.yaml to train on."),
              out: Path = typer.Option(..., help="Checkpoint to write."),
              model: str = typer.Option("student", help="student | teacher (built from config)."),
              init: Optional[Path] = typer.Option(None, help="Start from this checkpoint (fedcam or Ultralytics .pt)."),
              epochs: Optional[int] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Train a detector with the detection loss, then evaluate it on the val split."""
    from shared import models, task
    from shared.train import TrainSpec

    cfg = config_from(sets, **{"train.epochs": epochs})
    names = task.names_of(data)
    if init:
        net = models.load(init)
    else:
        net = (models.build_teacher if model == "teacher" else models.build_student)(cfg.model, names)
    with progress_bar() as bar:
        result = task.fit(net, data, cfg, TrainSpec.central(cfg.train), progress=train_progress(bar, "training"))
    models.save(net, out, data=str(data), steps=result.steps, seconds=result.seconds)
    console.print(f"{result.steps} steps in {result.seconds:.1f}s, loss {result.losses[0]:.3f} -> "
                  f"{result.losses[-1]:.3f}; saved {out}")
    print_eval(f"{out.name} on {data} (val)", task.score(net, data, cfg))


@teacher_app.command("train")
def teacher_train(data: Path = typer.Option(..., help="data.yaml of the server's labelled base domain."),
                  out: Path = typer.Option(...), epochs: Optional[int] = typer.Option(None),
                  sets: Optional[list[str]] = SetOpt):
    """Train the teacher (model.teacher-scale of model.family) on labelled data."""
    train_cmd(data=data, out=out, model="teacher", init=None, epochs=epochs, sets=sets)


def student_from(spec: str, cfg: Config, names: list[str]):
    """--student: a checkpoint (.pt), an Ultralytics model yaml, or a scale of model.family such as 'n'."""
    from shared import models

    path = Path(spec)
    if path.suffix == ".pt":
        return models.load(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return models.build(yaml.safe_load(path.read_text()), names)
    width = cfg.model.student_width if spec == cfg.model.student_scale else None
    return models.build(models.model_yaml(cfg.model.family, spec, width, cfg.model.student_activation), names)


@app.command("distill")
def distill_cmd(teacher: Path = typer.Option(..., help="Teacher checkpoint (fedcam or Ultralytics .pt)."),
                data: Path = typer.Option(..., help="data.yaml with labelled train and val splits."),
                out: Path = typer.Option(..., help="Distilled student checkpoint to write."),
                student: str = typer.Option("n", help="Student: .pt checkpoint, model .yaml, or a family scale."),
                epochs: Optional[int] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Train the student with its detection loss plus the configured distillation terms (distill.*)."""
    from shared import models, task
    from shared.train import TrainSpec

    cfg = config_from(sets, **{"train.epochs": epochs})
    names = task.names_of(data)
    net, tnet = student_from(student, cfg, names), models.load(teacher)
    with progress_bar() as bar:
        result = task.distill_fit(net, tnet, data, cfg, TrainSpec.central(cfg.train),
                                  progress=train_progress(bar, "distilling"))
    models.save(net, out, data=str(data), teacher=str(teacher), steps=result.steps, distill=str(cfg.distill))
    console.print(f"{result.steps} steps in {result.seconds:.1f}s; saved {out}")
    print_eval(f"{out.name} on {data} (val)", task.score(net, data, cfg))


@app.command("eval")
def eval_cmd(checkpoint: Path = typer.Option(..., help="A .pt (fedcam, Ultralytics, global_rNNNN), snapshot or .onnx."),
             data: Path = typer.Option(...), split: str = typer.Option("val"),
             json_out: bool = typer.Option(False, "--json"), sets: Optional[list[str]] = SetOpt):
    """Evaluate a model file: mAP50 and mAP50-95, overall and per class (ONNX at its own input size)."""
    from shared import model_files

    try:
        model = model_files.open_model(checkpoint)
        result = model_files.score(model, data, config_from(sets), split)  # checks the names against the data
    except (model_files.ModelFileError, model_files.DataError) as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)  # one line, never a traceback
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps({"kind": model.kind, **vars(result)}))  # map50, map, per_class, images, targets
    else:
        print_eval(f"{checkpoint.name} ({model.kind}) on {data} ({split})", result)
