"""The fedcam CLI's guards: what it refuses before any work starts."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from server.cli import app
from server.federation.events import Event, EventTail, JsonlLog, read_events


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


def test_the_live_view_reads_only_what_was_appended_and_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    tail, log = EventTail(path), JsonlLog(path)
    assert tail.read() == []  # no log yet
    log(Event(kind="run_start"))
    assert [e["kind"] for e in tail.read()] == ["run_start"]
    with path.open("a") as f:  # a writer caught mid-line
        f.write('{"kind": "round_start", "round"')
    assert [e["kind"] for e in tail.read()] == ["run_start"]
    with path.open("a") as f:
        f.write(': 1, "time": 0, "data": {}}\nnot json\n')
    log(Event(kind="round_end", round=1))
    assert [e["kind"] for e in tail.read()] == ["run_start", "round_start", "round_end"]  # the bad line skipped
    assert tail.read() == read_events(path)


def test_sigterm_unwinds_through_the_finally_that_stops_started_processes():
    """`fedcam simulate` under SIGTERM (systemd, a CI timeout, kill) runs its cleanup instead of dying at once."""
    import os
    import signal
    import subprocess
    import sys

    import pytest

    from server.local.processes import Family, stop_on_sigterm

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exited:
            with stop_on_sigterm():
                try:
                    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
                finally:
                    Family(child).stop(grace=5)
        assert exited.value.code == 128 + signal.SIGTERM
        assert child.wait(timeout=5) is not None
        assert signal.getsignal(signal.SIGTERM) is before  # the handler is only borrowed
    finally:
        child.kill()


def test_a_launch_stops_waiting_once_its_serverapp_recorded_the_end_in_log_and_store(tmp_path, monkeypatch):
    """`launch` stops Flower's processes once this launch's run_end is in the event log and the store (the last hook);
    an earlier launch's end (a resumed run), a half-recorded end and a failed run do not count."""
    from server.federation.events import EventBus
    from server.federation.store import RunStore
    from server.local.simulation import ServerAppDone
    from shared.run_dir import RunDir

    monkeypatch.setattr(ServerAppDone, "GRACE", 0.0)
    layout = RunDir(tmp_path)
    bus = EventBus([JsonlLog(layout.events), RunStore(layout.store)])
    bus.emit("run_start")
    bus.emit("run_end", 1)  # the first launch's
    done = ServerAppDone(layout)  # the resumed launch
    assert not done.settled()
    bus.emit("run_start", 1)
    bus.emit("round_end", 2)
    assert not done.settled()
    JsonlLog(layout.events)(Event(kind="run_end", round=2))  # in the log, not yet in the store
    assert not done.settled()
    RunStore(layout.store)(Event(kind="run_end", round=2))
    assert done.settled()

    failed = RunDir(tmp_path / "failed")
    done = ServerAppDone(failed)  # no run folder content yet: a fresh run
    bus = EventBus([JsonlLog(failed.events), RunStore(failed.store)])
    bus.emit("run_start")
    bus.emit("run_error", 0, error="boom")
    assert not done.settled()  # Flower finishes a failed run itself: its status and traceback reach the log
