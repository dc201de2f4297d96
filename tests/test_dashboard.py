"""The dashboard over a real tiny run: its API returns what was stored, and a real Chromium renders it cleanly."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.federation.events import read_events
from server.snapshots.registry import Registry

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def dashboard(tiny_run):
    cfg, code, _ = tiny_run
    assert code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "dashboard", cfg.run_dir, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/api/run", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.3)
        yield cfg, url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_api_returns_what_was_stored(dashboard):
    cfg, url = dashboard
    events = read_events(Path(cfg.run_dir) / "events.jsonl")
    rounds = {r["round"]: r for r in httpx.get(url + "/api/rounds").json()}
    for e in (e for e in events if e["kind"] == "round_end"):
        assert rounds[e["round"]]["map50"] == pytest.approx(e["data"]["central"]["map50"])
    for e in (e for e in events if e["kind"] == "train_result"):
        assert rounds[e["round"]]["accepted"] == e["data"]["accepted"]
        assert rounds[e["round"]]["bytes_up"] > 0 and rounds[e["round"]]["bytes_down"] > 0
    clients = httpx.get(url + "/api/clients").json()
    assert len(clients) == 2 and all(c["rounds"] == 2 for c in clients)
    assert sum(c["contribution"] for c in clients) == pytest.approx(1.0)
    # The cameras' own scores of what they received (evaluate-in-train), filed under the round that made it.
    trains = [e for e in events if e["kind"] == "train_result"]
    cams = {c["round"]: c for c in httpx.get(url + "/api/cameras").json()}
    assert set(cams) == {e["round"] - 1 for e in trains}
    for e in trains:
        sent = [c["metrics"]["global-map50"] for c in e["data"]["clients"] if c["ok"]]
        assert cams[e["round"] - 1]["camera_map50"] == pytest.approx(sum(sent) / len(sent))  # fed.personal none
    stored = Registry(Path(cfg.run_dir) / "snapshots").rows()
    assert [s["version"] for s in httpx.get(url + "/api/snapshots").json()] == [s["version"] for s in stored]
    assert httpx.get(url + "/api/run").json()["runs"][-1]["status"] == "finished"


def test_browser_renders_charts_and_snapshot_table(dashboard):
    from playwright.sync_api import sync_playwright

    _, url = dashboard
    problems = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("#chart-map .main-svg", timeout=30_000)
            page.wait_for_selector("#snapshots tbody tr", timeout=30_000)
            assert page.locator("#chart-map .scatterlayer .trace").count() >= 2  # rounds chart has its lines
            assert "v0001" in page.locator("#snapshots").inner_text()
            assert page.locator("#clients tbody tr").count() == 2
            page.screenshot(path=str(Path(dashboard[0].run_dir) / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
