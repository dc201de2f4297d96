"""Snapshot registry: immutable signed snapshot folders, an atomic `latest` pointer, and a SQLite index."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from shared.snapshot.format import (MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest, load_or_create_key,
                                    public_pem, sign)

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT UNIQUE, round INTEGER, target TEXT,
    status TEXT NOT NULL, reason TEXT, sha256 TEXT, size INTEGER, map50_fp32 REAL, map50_int8 REAL,
    map_fp32 REAL, map_int8 REAL, latency_ms REAL, created TEXT, parent_checkpoint TEXT, extra TEXT
)"""
LATEST, PUBLIC_KEY = "latest.json", "server_public_key.pem"


class Registry:
    """Publishing side when given the signing key; read-only (for the HTTP API and dashboard) without it."""

    def __init__(self, root: Path | str, key_path: Path | str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = None
        if key_path is not None:
            self.key = load_or_create_key(Path(key_path))
            (self.root / PUBLIC_KEY).write_bytes(public_pem(self.key))
        with closing(self._db()) as db, db:
            db.execute(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "registry.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def next_version(self) -> str:
        with closing(self._db()) as db:
            (n,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots").fetchone()
        return f"v{n:04d}"

    def publish(self, manifest: Manifest, model: Path) -> Path:
        """Write snapshots/<version>/ once (never overwritten), then move the `latest` pointer to it."""
        if self.key is None:
            raise PermissionError("this registry was opened read-only (no signing key)")
        folder = self.root / manifest.version
        if folder.exists():
            raise FileExistsError(f"snapshot {manifest.version} already exists; snapshots are immutable")
        tmp = self.root / f".tmp-{manifest.version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(model, tmp / MODEL_FILE)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_bytes())
        (tmp / SIGNATURE_FILE).write_bytes(sign(manifest, self.key))
        tmp.rename(folder)  # atomic: a reader sees the whole folder or none
        self._record(manifest, "published", "")
        pointer = {"version": manifest.version, "sha256": manifest.sha256, "round": manifest.round}
        tmp_ptr = self.root / f".{LATEST}.tmp"
        tmp_ptr.write_text(json.dumps(pointer))
        os.replace(tmp_ptr, self.root / LATEST)
        return folder

    def reject(self, manifest: Manifest, reason: str) -> None:
        """A gate failure is recorded with its figures; nothing is published."""
        self._record(manifest, "rejected", reason)

    def _record(self, m: Manifest, status: str, reason: str) -> None:
        with closing(self._db()) as db, db:
            db.execute("INSERT INTO snapshots (version, round, target, status, reason, sha256, size, map50_fp32,"
                       " map50_int8, map_fp32, map_int8, latency_ms, created, parent_checkpoint, extra)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (m.version, m.round, m.target, status, reason, m.sha256, m.size, m.map50_fp32,
                        m.map50_int8, m.map_fp32, m.map_int8, m.latency_ms, m.created, m.parent_checkpoint,
                        json.dumps(m.extra)))

    def rows(self) -> list[dict]:
        with closing(self._db()) as db:
            return [dict(r) for r in db.execute("SELECT * FROM snapshots ORDER BY seq")]

    def latest(self) -> dict | None:
        p = self.root / LATEST
        return json.loads(p.read_text()) if p.exists() else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
