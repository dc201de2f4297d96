"""The fedcam CLI's guards: what it refuses before any work starts."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from server.cli import app


def test_simulate_refuses_a_finished_run_before_starting_anything(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    progress = {"round": 3, "total_rounds": 3, "strategy": "fedavg"}
    (run / "checkpoints" / "progress.json").write_text(json.dumps(progress))
    world = tmp_path / "world"
    result = CliRunner().invoke(app, ["simulate", "--run-dir", str(run), "--rounds", "1", "--dashboard-port", "0",
                                      "--set", f"data.root={world}"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # rich wraps lines
    assert "already has 3 completed rounds (of 3): resume it (--resume" in said and "pick a new run-dir" in said
    assert not world.exists()  # no world, teacher or simulation was started
    assert json.loads((run / "checkpoints" / "progress.json").read_text()) == progress
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]
