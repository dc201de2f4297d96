"""`fedcam snapshot`, `fedcam dashboard`, `fedcam serve`: the server's publishing and HTTP commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from server.cli.common import SetOpt, app, config_from, console
from shared.run_dir import RunDir


@app.command("snapshot")
def snapshot_cmd(checkpoint: Path = typer.Option(..., help="fedcam/Ultralytics checkpoint, or a run's global_rNNNN.pt"),
                 run: Optional[Path] = typer.Option(None, help="Run folder: its config (snapshot.*, data)."),
                 round_: int = typer.Option(0, "--round", help="Round number to record in the manifest."),
                 sets: Optional[list[str]] = SetOpt):
    """Make a snapshot by hand: prune, recover, export, quantize, gate, sign and publish."""
    from server.snapshots.pipeline import make_snapshot, registry_for
    from shared import model_files

    base = RunDir(run).overrides() if run else {}
    cfg = config_from(sets, {**base, "resume": True} if run else {})
    try:  # round checkpoints describe their model (older ones: rebuilt from their run's run_config.json)
        model = model_files.open_model(checkpoint).model
        if model is None:
            raise model_files.ModelFileError(f"{checkpoint}: an ONNX model; expected torch weights to snapshot")
    except model_files.ModelFileError as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(2) from None
    with console.status("making the snapshot (prune, recover, export, quantize, gate)"):
        result = make_snapshot(model, cfg, round_, str(checkpoint), registry_for(cfg))
    m = result.manifest
    verdict = "[green]published[/]" if result.published else f"[red]rejected[/]: {result.reason}"
    console.print(f"{m.version} {verdict}\n  params {result.params_dense:,} -> {result.params_pruned:,}, "
                  f"{result.int8_convs} int8 / {result.float_convs} float convs, {m.size / 1e6:.2f} MB, "
                  f"{m.latency_ms:.2f} ms\n  mAP50 fp32 {m.map50_fp32:.3f} -> int8 {m.map50_int8:.3f}")


@app.command("dashboard")
def dashboard_cmd(run_dir: Path = typer.Argument(..., help="Run folder (finished or running)."),
                  host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless told otherwise."),
                  port: int = typer.Option(8080)):
    """Serve the run's dashboard and its snapshot registry on one HTTP port."""
    import uvicorn

    from server.web.api import create_app

    console.print(f"dashboard: http://{host}:{port}/")
    uvicorn.run(create_app(RunDir(run_dir).registry(), run_dir), host=host, port=port, log_level="warning")


@app.command("serve")
def serve_cmd(registry: Path = typer.Option(..., help="Snapshot registry folder (RUN_DIR/snapshots)."),
              host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless told otherwise."),
              port: int = typer.Option(8080)):
    """Serve the snapshot registry over HTTP (read-only) for devices."""
    import uvicorn

    from server.web.api import create_app

    uvicorn.run(create_app(registry), host=host, port=port, log_level="warning")
