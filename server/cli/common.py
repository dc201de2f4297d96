"""What every `fedcam` command shares: the typer app, the console, --set overrides, progress bars, result tables."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from shared.config import Config, load_config  # noqa: E402

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


def scenario_overrides(path: Path | None) -> dict:
    if path is None:
        return {}
    import tomllib

    from shared.config import _flatten

    return _flatten(tomllib.loads(path.read_text()))
