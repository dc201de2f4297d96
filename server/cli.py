"""The `fedcam` command line: data, training, evaluation, and (from the server) federation and snapshots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import shared  # noqa: F401  (offline environment before any library import)
from shared.config import Config, load_config

app = typer.Typer(help="fedcam: federated learning of object detectors for smart cameras.", no_args_is_help=True)
data_app = typer.Typer(help="Camera-world data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
teacher_app = typer.Typer(help="The teacher model.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
console = Console()

# "\\[" : typer renders help as rich markup, which would swallow the bracketed table name.
SetOpt = typer.Option(None, "--set",
                      help="Config override KEY=VALUE (keys as in pyproject's \\[tool.flwr.app.config]).")


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def config_from(sets: list[str] | None, base: dict | None = None, **flat) -> Config:
    """Defaults < base (e.g. a scenario file) < explicit options that were given < --set."""
    return load_config({**(base or {}), **{k: v for k, v in flat.items() if v is not None}, **parse_sets(sets)})


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)


def train_progress(bar: Progress, description: str):
    task = bar.add_task(description, total=None, info="")

    def update(step: int, total: int, loss: float) -> None:
        bar.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

    return update


def print_eval(title: str, result) -> None:
    table = Table(title=title)
    for col in ("class", "mAP50", "mAP50-95"):
        table.add_column(col)
    for name, (m50, m) in result.per_class.items():
        table.add_row(name, f"{m50:.3f}", f"{m:.3f}")
    table.add_row("[bold]all", f"[bold]{result.map50:.3f}", f"[bold]{result.map:.3f}")
    console.print(table)


@data_app.command("make")
def data_make(out: Path = typer.Option(..., help="Output folder (e.g. data/world)."),
              cameras: Optional[int] = typer.Option(None, help="Number of camera domains."),
              seed: Optional[int] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Generate the procedural camera world: a labelled base domain and N camera domains."""
    from shared import task

    cfg = config_from(sets, **{"data.cameras": cameras, "seed": seed, "data.root": str(out)})
    with progress_bar() as bar:
        job = bar.add_task("generating", total=None, info="")
        world = task.ensure_world(cfg, progress=lambda i, n: bar.update(job, completed=i, total=n))
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


def main() -> None:
    app()


@app.command("simulate")
def simulate_cmd(cameras: Optional[int] = typer.Option(None, help="Simulated cameras (one Flower node each)."),
                 rounds: Optional[int] = typer.Option(None), strategy: Optional[str] = typer.Option(None),
                 run_dir: Optional[Path] = typer.Option(None, help="Run folder (events, checkpoints, snapshots)."),
                 scenario: Optional[Path] = typer.Option(None,
                                                         help="Run-config TOML, e.g. simulations/scenarios/*.toml"),
                 resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder."),
                 timeout: float = typer.Option(3600.0, help="Give up (and stop everything) after this many seconds."),
                 dashboard_port: int = typer.Option(8080, help="Live dashboard on 127.0.0.1 during the run (0: off)."),
                 sets: Optional[list[str]] = SetOpt):
    """Run a local multi-camera federation on Flower's Simulation Engine (world and base student made if missing)."""
    from rich.live import Live

    from server import simulation, warmstart
    from server.cli_live import live_view, rounds_table
    from server.events import read_events

    if resume:
        flat = json.loads((resume / "run_config.json").read_text())
        cfg = load_config({**flat, "resume": True, **parse_sets(sets)})
    else:
        cfg = config_from(sets, scenario_overrides(scenario), **{"data.cameras": cameras, "fed.rounds": rounds,
                          "fed.strategy": strategy, "run-dir": str(run_dir) if run_dir else None})
    refuse_finished_run(cfg)
    with progress_bar() as bar:
        cfg = warmstart.prepare(cfg, console, lambda name: train_progress(bar, name))
    events = Path(cfg.run_dir) / "events.jsonl"
    console.print(f"simulating {cfg.data.cameras} cameras, {cfg.fed.rounds} rounds of {cfg.fed.strategy} "
                  f"in [bold]{cfg.run_dir}[/] (log: {Path(cfg.run_dir) / 'simulation.log'})")
    registry = Path(cfg.snapshot.dir or Path(cfg.run_dir) / "snapshots")
    server = start_dashboard(Path(cfg.run_dir), registry, dashboard_port) if dashboard_port else None
    try:
        view = lambda: live_view(read_events(events), cfg.fed.rounds, time.time())  # noqa: E731
        with Live(view(), console=console, refresh_per_second=1) as live:
            code = simulation.launch(cfg, cfg.data.cameras, timeout=timeout, on_tick=lambda: live.update(view()))
            live.update(rounds_table(read_events(events)))
    finally:
        if server:
            server.should_exit = True
    snaps = [e for e in read_events(events) if e["kind"] == "snapshot"]
    for e in snaps:
        d = e["data"]
        state = "[green]published[/]" if d["published"] else "[red]rejected[/]"
        state += f" ({d['reason']})" if d.get("reason") else ""  # e.g. published unpruned: the pruned one failed
        console.print(f"snapshot {d['version']} of round {e['round']}: {state}; mAP50 int8 {d['map50_int8']:.3f} vs "
                      f"fp32 {d['map50_fp32']:.3f}, {d['size'] / 1e6:.2f} MB, {d['latency_ms']:.1f} ms")
    console.print(f"dashboard of this run: fedcam dashboard {cfg.run_dir}  (then http://127.0.0.1:8080/)")
    if code != 0:
        console.print(f"[red]simulation ended with code {code}[/]; see {Path(cfg.run_dir) / 'simulation.log'}")
        raise typer.Exit(1)


def refuse_finished_run(cfg) -> None:
    """Before any work: the ServerApp refuses too, but only after the teacher, the student and Ray have started,
    and the old run's table would then read like this one's."""
    from server.run import RunExists, resume_point

    try:
        resume_point(cfg)
    except RunExists as err:
        console.print(f"[red]{err}[/] (e.g. make demo DEMO_DIR=runs/demo2)")
        raise typer.Exit(2) from None


def start_dashboard(run_dir: Path, registry: Path, port: int):
    """The dashboard in a background thread while the run goes on; its address is printed."""
    import threading

    import uvicorn

    from server.api import create_app

    run_dir.mkdir(parents=True, exist_ok=True)
    server = uvicorn.Server(uvicorn.Config(create_app(registry, run_dir), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    console.print(f"live dashboard: http://127.0.0.1:{port}/")
    return server


def scenario_overrides(path: Path | None) -> dict:
    if path is None:
        return {}
    import tomllib

    from shared.config import _flatten

    return _flatten(tomllib.loads(path.read_text()))


@app.command("baseline")
def baseline_cmd(kind: str = typer.Argument(..., help="local (each camera alone) | central (pooled camera data)"),
                 cameras: Optional[int] = typer.Option(None), rounds: Optional[int] = typer.Option(None),
                 run_dir: Optional[Path] = typer.Option(None),
                 scenario: Optional[Path] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Baselines in the federated harness, same local optimizer and budget per round, same event log."""
    from server import baselines, warmstart
    from server.cli_live import rounds_table
    from server.events import read_events

    if kind not in ("local", "central"):
        raise typer.BadParameter("kind is 'local' or 'central'")
    cfg = config_from(sets, scenario_overrides(scenario), **{"data.cameras": cameras, "fed.rounds": rounds,
                      "run-dir": str(run_dir) if run_dir else None})
    with progress_bar() as bar:
        cfg = warmstart.prepare(cfg, console, lambda name: train_progress(bar, name))
    (baselines.local_only if kind == "local" else baselines.centralized)(cfg, Path(cfg.model.student_checkpoint))
    console.print(rounds_table(read_events(Path(cfg.run_dir) / "events.jsonl")))


# Server-side serving commands live beside this module; importing registers them on `app`.
from server import cli_serve  # noqa: E402,F401


if __name__ == "__main__":
    # Run the imported module's app: `python -m` makes this file __main__, a second copy cli_serve never saw.
    from server.cli import app as registered_app

    registered_app()
