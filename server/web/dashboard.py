"""Dashboard routes on the server's HTTP app: run overview, per-round charts, client table, snapshot history."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from server.federation.store import query
from shared.run_dir import RunDir

PAGE = Path(__file__).parent / "static" / "dashboard.html"


def plotly_js() -> Path:
    """Plotly's own bundled JavaScript from the installed package: nothing third-party is copied into the repo."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


CLIENTS_SQL = """
SELECT node_id, MAX(time) AS last_seen, COUNT(*) AS rounds, SUM(ok = 0) AS failures,
       SUM(CASE WHEN ok THEN examples ELSE 0 END) AS examples, AVG(CASE WHEN ok THEN loss END) AS mean_loss,
       AVG(CASE WHEN ok THEN seconds END) AS mean_seconds, SUM(COALESCE(bytes_up, 0)) AS bytes_up,
       (SELECT reason FROM clients c2 WHERE c2.node_id = c.node_id AND c2.ok = 0 ORDER BY round DESC LIMIT 1)
           AS last_failure
FROM clients c GROUP BY node_id ORDER BY node_id"""


def add_dashboard(app: FastAPI, run_dir: Path | str) -> None:
    db = RunDir(run_dir).store

    def rows(sql: str) -> list[dict]:
        if not db.exists():
            raise HTTPException(404, f"no run store at {db} yet")
        return query(db, sql)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/static/plotly.min.js")
    def plotly_file() -> FileResponse:
        return FileResponse(plotly_js(), media_type="application/javascript")

    @app.get("/api/run")
    def run() -> dict:
        runs = rows("SELECT * FROM runs ORDER BY id")
        for r in runs:
            r["config"] = json.loads(r["config"] or "{}")
        done = rows("SELECT MAX(round) AS r FROM rounds WHERE ended IS NOT NULL")[0]["r"]
        return {"run_dir": str(run_dir), "runs": runs, "rounds_done": done or 0}

    @app.get("/api/rounds")
    def rounds() -> list[dict]:
        return rows("SELECT * FROM rounds ORDER BY round")

    @app.get("/api/clients")
    def clients() -> list[dict]:
        out = rows(CLIENTS_SQL)
        total = sum(c["examples"] or 0 for c in out) or 1
        for c in out:
            c["contribution"] = (c["examples"] or 0) / total  # share of examples averaged into the model
        return out

    @app.get("/api/cameras")
    def cameras() -> list[dict]:
        """Per round, the cameras' own scores of the model they received (the previous round's global model):
        as sent, and with each camera's personal part, i.e. what the camera runs."""
        return rows("SELECT round - 1 AS round, AVG(global_map50) AS global_map50, AVG(camera_map50) AS camera_map50,"
                    " COUNT(camera_map50) AS cameras FROM clients WHERE ok AND camera_map50 IS NOT NULL"
                    " GROUP BY round ORDER BY round")

    @app.get("/api/run-snapshots")
    def run_snapshots() -> list[dict]:
        return rows("SELECT * FROM snapshots ORDER BY time")

    @app.get("/api/run-camera-snapshots")
    def run_camera_snapshots() -> list[dict]:
        return rows("SELECT * FROM camera_snapshots ORDER BY time, camera")
