"""SQLite store of a run (runs, rounds, per-client results, snapshots, per-camera snapshots), fed by the same round events as the log."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, ended REAL, status TEXT, config TEXT,
                                 resumed_from INTEGER);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, started REAL, ended REAL, sampled INTEGER,
    accepted INTEGER, failed INTEGER, loss REAL, map50 REAL, map REAL, cam_map50 REAL, cam_map REAL,
    bytes_up INTEGER, bytes_down INTEGER, seconds REAL, epsilon REAL, dp_delta REAL);
CREATE TABLE IF NOT EXISTS clients (round INTEGER, node_id TEXT, ok INTEGER, reason TEXT, seconds REAL,
    examples INTEGER, loss REAL, update_norm REAL, bytes_up INTEGER, bytes_down INTEGER, time REAL,
    global_map50 REAL, camera_map50 REAL, PRIMARY KEY (round, node_id));
CREATE TABLE IF NOT EXISTS snapshots (version TEXT PRIMARY KEY, round INTEGER, published INTEGER, reason TEXT,
    map50_fp32 REAL, map50_int8 REAL, size INTEGER, latency_ms REAL, int8_convs INTEGER, time REAL);
CREATE TABLE IF NOT EXISTS camera_snapshots (camera TEXT, node_id TEXT, base TEXT, version TEXT, published INTEGER,
    reason TEXT, map50_fp32 REAL, map50_int8 REAL, reply_bytes INTEGER, server_seconds REAL, round INTEGER,
    time REAL, PRIMARY KEY (node_id, base));
"""


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")  # the dashboard reads while the server writes
    return db


class RunStore:
    """Event hook: one row per run, round, client result and snapshot; INSERT OR REPLACE keeps resumes clean."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.path)) as db, db:
            db.executescript(SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(clients)")}
            for column in ("global_map50", "camera_map50"):  # a store from before these columns: resume keeps it
                if column not in have:
                    db.execute(f"ALTER TABLE clients ADD COLUMN {column} REAL")
            have = {row["name"] for row in db.execute("PRAGMA table_info(rounds)")}
            for column in ("epsilon", "dp_delta"):
                if column not in have:
                    db.execute(f"ALTER TABLE rounds ADD COLUMN {column} REAL")

    def __call__(self, event, arrays=None) -> None:
        d, r, t = event.data, event.round, event.time
        with closing(connect(self.path)) as db, db:
            if event.kind == "run_start":
                db.execute("INSERT INTO runs (started, status, config, resumed_from) VALUES (?, 'running', ?, ?)",
                           (t, json.dumps(d.get("config", {})), d.get("resumed_from", 0)))
            elif event.kind in ("run_end", "run_error"):
                status = "finished" if event.kind == "run_end" else f"failed: {d.get('error', '')}"
                if d.get("stopped"):  # e.g. the privacy budget: the rounds so far stand
                    status = f"stopped: {d['stopped']}"
                db.execute("UPDATE runs SET ended = ?, status = ? WHERE id = (SELECT MAX(id) FROM runs)", (t, status))
            elif event.kind == "round_start":
                db.execute("INSERT OR REPLACE INTO rounds (round, started, sampled) VALUES (?, ?, ?)",
                           (r, t, len(d.get("sampled", []))))
            elif event.kind == "train_result":
                self._train(db, r, t, d)
            elif event.kind == "round_end":
                c = d.get("central", {})
                db.execute("INSERT INTO rounds (round, ended, map50, map, cam_map50, cam_map) VALUES (?,?,?,?,?,?)"
                           " ON CONFLICT(round) DO UPDATE SET ended=excluded.ended, map50=excluded.map50,"
                           " map=excluded.map, cam_map50=excluded.cam_map50, cam_map=excluded.cam_map",
                           (r, t, c.get("map50"), c.get("map"), c.get("cam-map50"), c.get("cam-map")))
            elif event.kind == "snapshot":
                db.execute("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (d["version"], r, int(d["published"]), d.get("reason", ""), d.get("map50_fp32"),
                            d.get("map50_int8"), d.get("size"), d.get("latency_ms"), d.get("int8_convs"), t))
            elif event.kind == "camera_snapshot":
                db.execute("INSERT OR REPLACE INTO camera_snapshots VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                           (d.get("camera", ""), str(d["node"]), d.get("base", ""), d.get("version", ""),
                            int(d["published"]), d.get("reason", ""), d.get("map50_fp32"), d.get("map50_int8"),
                            d.get("reply_bytes"), d.get("server_seconds"), r, t))

    @staticmethod
    def _train(db, r, t, d) -> None:
        clients = d.get("clients", [])
        up = sum(int(c["metrics"].get("bytes-up", 0)) for c in clients)
        down = sum(int(c["metrics"].get("bytes-down", 0)) for c in clients)
        privacy = d.get("privacy") or {}
        db.execute("UPDATE rounds SET accepted=?, failed=?, loss=?, bytes_up=?, bytes_down=?, seconds=?, epsilon=?,"
                   " dp_delta=? WHERE round=?",
                   (d.get("accepted"), sum(not c["ok"] for c in clients), d.get("metrics", {}).get("loss"), up,
                    down, d.get("seconds"), privacy.get("epsilon"), privacy.get("delta"), r))
        for c in clients:
            m = c.get("metrics", {})
            # The camera's score of the model it received: the global one, and with its personal part what it
            # runs (fed.personal; without one the two are the same model).
            own = m.get("own-map50", m.get("global-map50"))
            db.execute("INSERT OR REPLACE INTO clients (round, node_id, ok, reason, seconds, examples, loss,"
                       " update_norm, bytes_up, bytes_down, time, global_map50, camera_map50)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (r, str(c["node_id"]), int(c["ok"]), c.get("reason", ""), m.get("seconds"),
                        m.get("num-examples"), m.get("loss"), m.get("update-norm"), m.get("bytes-up"),
                        m.get("bytes-down"), t, m.get("global-map50"), own))


def query(path: Path | str, sql: str, args: tuple = ()) -> list[dict]:
    with closing(connect(Path(path))) as db:
        return [dict(row) for row in db.execute(sql, args)]
