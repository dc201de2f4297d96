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
    from server.snapshots.pipeline import make_snapshot
    from server.snapshots.registry import registry_for
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


TlsCert = typer.Option(None, help="TLS certificate (PEM), e.g. deploy/certs.sh's server.crt; required off loopback.")
TlsKey = typer.Option(None, help="Its private key (PEM).")
Rate = typer.Option(10.0, help="Requests a second per token, on average (with tokens).")
Burst = typer.Option(50, help="Requests per token in a burst (with tokens).")
Tokens = typer.Option(None, help="Token store (SQLite, `fedcam tokens`): every request needs a token; required off "
                                 "loopback.")


def serve_app(web_app, host: str, port: int, tls_cert: Optional[Path], tls_key: Optional[Path],
              tokens: Optional[Path]) -> None:
    """uvicorn, after the exposure check: off loopback only with TLS and tokens."""
    import uvicorn

    from server.web.access import check_exposure

    if (tls_cert is None) != (tls_key is None):
        typer.echo("error: --tls-cert and --tls-key go together", err=True)
        raise typer.Exit(2)
    try:
        check_exposure(host, tls_cert is not None, tokens)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            typer.echo(f"error: {path}: no such file", err=True)
            raise typer.Exit(2)
    scheme = "https" if tls_cert else "http"
    console.print(f"serving on {scheme}://{host}:{port}/" + (" (tokens required)" if tokens else ""))
    uvicorn.run(web_app, host=host, port=port, log_level="warning",
                ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)


@app.command("dashboard")
def dashboard_cmd(run_dir: Path = typer.Argument(..., help="Run folder (finished or running)."),
                  host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless told otherwise."),
                  port: int = typer.Option(8080), tls_cert: Optional[Path] = TlsCert,
                  tls_key: Optional[Path] = TlsKey, tokens: Optional[Path] = Tokens, rate: float = Rate,
                  burst: int = Burst):
    """Serve the run's dashboard and its snapshot registry on one HTTP port."""
    from server.web.api import create_app

    serve_app(create_app(RunDir(run_dir).registry(), run_dir, tokens=tokens, rate=rate, burst=burst), host, port, tls_cert, tls_key, tokens)


@app.command("serve")
def serve_cmd(registry: Path = typer.Option(..., help="Snapshot registry folder (RUN_DIR/snapshots)."),
              host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless told otherwise."),
              port: int = typer.Option(8080), tls_cert: Optional[Path] = TlsCert,
              tls_key: Optional[Path] = TlsKey, tokens: Optional[Path] = Tokens, rate: float = Rate,
              burst: int = Burst):
    """Serve the snapshot registry over HTTP (read-only) for devices."""
    from server.web.api import create_app

    serve_app(create_app(registry, tokens=tokens, rate=rate, burst=burst), host, port, tls_cert, tls_key, tokens)


tokens_app = typer.Typer(help="Registry and dashboard tokens (stored hashed).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
StoreOpt = typer.Option(..., "--store", help="Token store (SQLite), as given to serve/dashboard --tokens.")


@tokens_app.command("create")
def tokens_create(name: str = typer.Argument(..., help="Who holds it, e.g. the camera id or the operator."),
                  role: str = typer.Option("device", help="device (reads the snapshot registry) | operator (all)"),
                  camera: Optional[str] = typer.Option(None, help="Device tokens: the only camera channel it reads."),
                  store: Path = StoreOpt):
    """Create a token and print it once: only its SHA-256 is kept."""
    from server.web.access import TokenStore

    try:
        token = TokenStore(store).create(name, role, camera)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    print(token)


@tokens_app.command("list")
def tokens_list(store: Path = StoreOpt):
    """Every token's name, role, camera and state (never the secret)."""
    import time

    from rich.table import Table

    from server.web.access import TokenStore

    table = Table("name", "role", "camera", "created", "revoked")
    for r in TokenStore(store).rows():
        table.add_row(r["name"], r["role"], r["camera"] or "", time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created"])),
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["revoked"])) if r["revoked"] else "")
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: str = typer.Argument(...), store: Path = StoreOpt):
    """Revoke a token: the running server refuses it from its next request on."""
    from server.web.access import TokenStore

    if not TokenStore(store).revoke(name):
        typer.echo(f"error: no live token named {name!r}", err=True)
        raise typer.Exit(1)
    console.print(f"revoked {name}")
