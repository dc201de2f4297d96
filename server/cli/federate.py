"""`fedcam simulate` and `fedcam baseline`: local federations on Flower's Simulation Engine, with a live view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from server.cli.common import (SetOpt, app, config_from, console, parse_sets, progress_bar, scenario_overrides,
                               train_progress)
from shared.config import load_config
from shared.run_dir import RunDir


@app.command("simulate")
def simulate_cmd(cameras: Optional[int] = typer.Option(None, help="Simulated cameras (one Flower node each)."),
                 rounds: Optional[int] = typer.Option(None), strategy: Optional[str] = typer.Option(None),
                 run_dir: Optional[Path] = typer.Option(None, help="Run folder (events, checkpoints, snapshots)."),
                 scenario: Optional[Path] = typer.Option(None,
                                                         help="Run-config TOML, e.g. simulations/scenarios/*.toml"),
                 resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder."),
                 timeout: float = typer.Option(3600.0, help="Give up (and stop everything) after this many seconds."),
                 dashboard_port: int = typer.Option(8080, help="Live dashboard on 127.0.0.1 during the run (0: off)."),
                 ray_address: str = typer.Option("", help="Run the clients on this existing Ray cluster (HEAD:PORT; "
                                                 "README: Past one machine); empty: a local Ray of this run's own."),
                 sets: Optional[list[str]] = SetOpt):
    """Run a local multi-camera federation on Flower's Simulation Engine (world and base student made if missing)."""
    from rich.live import Live

    from server.local import simulation, warmstart
    from server.cli.live import live_view, rounds_table
    from server.federation.events import EventTail, read_events

    if resume:
        flat = RunDir(resume).overrides()
        cfg = load_config({**flat, "resume": True, **parse_sets(sets)})
    else:
        cfg = config_from(sets, scenario_overrides(scenario), **{"data.cameras": cameras, "fed.rounds": rounds,
                          "fed.strategy": strategy, "run-dir": str(run_dir) if run_dir else None})
    refuse_finished_run(cfg)
    with progress_bar() as bar:
        cfg = warmstart.prepare(cfg, console, lambda name: train_progress(bar, name))
    layout = RunDir(cfg.run_dir)
    events = layout.events
    console.print(f"simulating {cfg.data.cameras} cameras, {cfg.fed.rounds} rounds of {cfg.fed.strategy} "
                  f"in [bold]{cfg.run_dir}[/] (log: {layout.log})")
    server = start_dashboard(layout.root, layout.registry(cfg.snapshot.dir), dashboard_port) if dashboard_port else None
    try:
        tail = EventTail(events)
        view = lambda: live_view(tail.read(), cfg.fed.rounds, time.time())  # noqa: E731
        with Live(view(), console=console, refresh_per_second=1) as live:
            code = simulation.launch(cfg, cfg.data.cameras, timeout=timeout, on_tick=lambda: live.update(view()),
                                     ray_address=ray_address)
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
        console.print(f"[red]simulation ended with code {code}[/]; see {layout.log}")
        raise typer.Exit(1)


def refuse_finished_run(cfg) -> None:
    """Before any work: the ServerApp refuses too, but only after the teacher, the student and Ray have started,
    and the old run's table would then read like this one's."""
    from server.federation.progress import RunExists, resume_point

    try:
        resume_point(cfg)
    except RunExists as err:
        console.print(f"[red]{err}[/] (e.g. make demo DEMO_DIR=runs/demo2)")
        raise typer.Exit(2) from None


def start_dashboard(run_dir: Path, registry: Path, port: int):
    """The dashboard in a background thread while the run goes on; its address is printed."""
    import threading

    import uvicorn

    from server.web.api import create_app

    run_dir.mkdir(parents=True, exist_ok=True)
    server = uvicorn.Server(uvicorn.Config(create_app(registry, run_dir), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    console.print(f"live dashboard: http://127.0.0.1:{port}/")
    return server


@app.command("baseline")
def baseline_cmd(kind: str = typer.Argument(..., help="local (each camera alone) | central (pooled camera data)"),
                 cameras: Optional[int] = typer.Option(None), rounds: Optional[int] = typer.Option(None),
                 run_dir: Optional[Path] = typer.Option(None),
                 scenario: Optional[Path] = typer.Option(None), sets: Optional[list[str]] = SetOpt):
    """Baselines in the federated harness, same local optimizer and budget per round, same event log."""
    from server.local import baselines, warmstart
    from server.cli.live import rounds_table
    from server.federation.events import read_events

    if kind not in ("local", "central"):
        raise typer.BadParameter("kind is 'local' or 'central'")
    cfg = config_from(sets, scenario_overrides(scenario), **{"data.cameras": cameras, "fed.rounds": rounds,
                      "run-dir": str(run_dir) if run_dir else None})
    with progress_bar() as bar:
        cfg = warmstart.prepare(cfg, console, lambda name: train_progress(bar, name))
    (baselines.local_only if kind == "local" else baselines.centralized)(cfg, Path(cfg.model.student_checkpoint))
    console.print(rounds_table(read_events(RunDir(cfg.run_dir).events)))


# Server-side serving commands live beside this module; importing registers them on `app`.
