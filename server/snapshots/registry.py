"""Snapshot registry: immutable signed snapshot folders, an atomic `latest` pointer per channel, a SQLite index.

Channels: the global one (`ROOT/global/vNNNN/`) and one per camera (`ROOT/cameras/<camera-id>/vNNNN/`), each with
its own `latest.json` and version numbers. A registry written before the global channel had a folder of its own
(`ROOT/vNNNN/`, `ROOT/latest.json`) is read and continued where it is."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from shared.env import STATE_DIR
from shared.run_dir import RunDir
from shared.snapshot.delta import delta_name, make_delta
from shared.snapshot.packed import PACKED_FILE, pack_model, unpack_model
from shared.snapshot.format import (MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest, load_or_create_key,
                                    public_pem, sign)

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT UNIQUE, round INTEGER, target TEXT,
    status TEXT NOT NULL, reason TEXT, sha256 TEXT, size INTEGER, map50_fp32 REAL, map50_int8 REAL,
    map_fp32 REAL, map_int8 REAL, latency_ms REAL, created TEXT, parent_checkpoint TEXT, extra TEXT
)"""
# Per-camera channels in a table of their own: a registry written before them keeps its table as it is.
CAMERA_SCHEMA = SCHEMA.replace("snapshots (", "camera_snapshots (camera TEXT NOT NULL, ").replace(
    "version TEXT UNIQUE", "version TEXT").replace("extra TEXT\n)", "extra TEXT,\n    UNIQUE (camera, version)\n)")
COLUMNS = ("version, round, target, status, reason, sha256, size, map50_fp32, map50_int8, map_fp32, map_int8,"
           " latency_ms, created, parent_checkpoint, extra")
LATEST, PUBLIC_KEY, CAMERAS, GLOBAL = "latest.json", "server_public_key.pem", "cameras", "global"
CAMERA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def registry_for(cfg) -> "Registry":
    """The registry of a run (`cfg`: a shared.config.Config): its folder and signing key."""
    s = cfg.snapshot
    return Registry(RunDir(cfg.run_dir).registry(s.dir), s.key_path or STATE_DIR / "server_ed25519.pem")


def check_camera_id(camera: str) -> str:
    """A camera id is a folder name and a URL segment: letters, digits, '_', '.', '-' (no path tricks)."""
    if not CAMERA_ID.match(camera) or ".." in camera:
        raise ValueError(f"camera id {camera!r} is not a valid name (letters, digits, _ . -; at most 64)")
    return camera


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
            db.execute(CAMERA_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "registry.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def folder(self, camera: str | None = None) -> Path:
        """The channel's folder: global/ or cameras/<camera-id>/ (the root itself for an older registry's global one)."""
        if camera is None:
            legacy = (self.root / LATEST).exists() and not (self.root / GLOBAL).exists()
            return self.root if legacy else self.root / GLOBAL
        return self.root / CAMERAS / check_camera_id(camera)

    def next_version(self, camera: str | None = None) -> str:
        with closing(self._db()) as db:
            if camera is None:
                (n,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots").fetchone()
            else:
                (n,) = db.execute("SELECT COUNT(*) + 1 FROM camera_snapshots WHERE camera = ?", (camera,)).fetchone()
        return f"v{n:04d}"

    def publish(self, manifest: Manifest, model: Path, camera: str | None = None) -> Path:
        """Write <channel>/<version>/ once (never overwritten), then move the channel's `latest` pointer to it."""
        if self.key is None:
            raise PermissionError("this registry was opened read-only (no signing key)")
        root = self.folder(camera)
        root.mkdir(parents=True, exist_ok=True)
        folder = root / manifest.version
        if folder.exists():
            raise FileExistsError(f"snapshot {manifest.version} already exists; snapshots are immutable")
        tmp = root / f".tmp-{manifest.version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(model, tmp / MODEL_FILE)
        manifest = self._with_packed(self._with_delta(manifest, root, tmp), tmp)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_bytes())
        (tmp / SIGNATURE_FILE).write_bytes(sign(manifest, self.key))
        tmp.rename(folder)  # atomic: a reader sees the whole folder or none
        self._record(manifest, "published", "", camera)
        pointer = {"version": manifest.version, "sha256": manifest.sha256, "round": manifest.round}
        tmp_ptr = root / f".{LATEST}.tmp"
        tmp_ptr.write_text(json.dumps(pointer))
        os.replace(tmp_ptr, root / LATEST)
        return folder

    def _with_delta(self, manifest: Manifest, root: Path, tmp: Path) -> Manifest:
        """A delta from the channel's current version, when it is smaller than the model: named, sized and hashed
        in the manifest, so the signature covers it as well as the model it rebuilds."""
        pointer = self.latest_in(root)
        previous = root / pointer["version"] / MODEL_FILE if pointer else None
        if previous is None or not previous.is_file():
            return manifest
        delta = make_delta(previous.read_bytes(), (tmp / MODEL_FILE).read_bytes())
        if len(delta) >= manifest.size:
            return manifest
        (tmp / delta_name(pointer["version"])).write_bytes(delta)
        extra = {**manifest.extra, "delta": {"from": pointer["version"], "size": len(delta),
                                             "sha256": hashlib.sha256(delta).hexdigest()}}
        return dataclasses.replace(manifest, extra=extra)

    @staticmethod
    def _with_packed(manifest: Manifest, tmp: Path) -> Manifest:
        """A weight-shared model (snapshot.cluster) also as indices + codebooks, checked to rebuild it exactly."""
        if not manifest.extra.get("cluster"):
            return manifest
        model = (tmp / MODEL_FILE).read_bytes()
        packed = pack_model(model)
        if packed is None or unpack_model(packed) != model:
            return manifest
        (tmp / PACKED_FILE).write_bytes(packed)
        extra = {**manifest.extra, "packed": {"size": len(packed), "sha256": hashlib.sha256(packed).hexdigest()}}
        return dataclasses.replace(manifest, extra=extra)

    def reject(self, manifest: Manifest, reason: str, camera: str | None = None) -> None:
        """A gate failure is recorded with its figures; nothing is published."""
        self._record(manifest, "rejected", reason, camera)

    def _record(self, m: Manifest, status: str, reason: str, camera: str | None = None) -> None:
        values = (m.version, m.round, m.target, status, reason, m.sha256, m.size, m.map50_fp32, m.map50_int8,
                  m.map_fp32, m.map_int8, m.latency_ms, m.created, m.parent_checkpoint, json.dumps(m.extra))
        with closing(self._db()) as db, db:
            if camera is None:
                db.execute(f"INSERT INTO snapshots ({COLUMNS}) VALUES ({','.join('?' * 15)})", values)
            else:
                db.execute(f"INSERT INTO camera_snapshots (camera, {COLUMNS}) VALUES ({','.join('?' * 16)})",
                           (camera, *values))

    def rows(self, camera: str | None = None) -> list[dict]:
        with closing(self._db()) as db:
            if camera is None:
                return [dict(r) for r in db.execute("SELECT * FROM snapshots ORDER BY seq")]
            return [dict(r) for r in db.execute("SELECT * FROM camera_snapshots WHERE camera = ? ORDER BY seq",
                                                (camera,))]

    def camera_rows(self) -> list[dict]:
        """Every camera channel's snapshots, oldest first."""
        with closing(self._db()) as db:
            return [dict(r) for r in db.execute("SELECT * FROM camera_snapshots ORDER BY seq")]

    def latest(self, camera: str | None = None) -> dict | None:
        return self.latest_in(self.folder(camera))

    def latest_manifest(self, camera: str | None = None) -> Manifest | None:
        """The manifest of the channel's current version (as the server wrote it; devices verify theirs)."""
        pointer = self.latest(camera)
        path = self.folder(camera) / pointer["version"] / MANIFEST_FILE if pointer else None
        return Manifest.from_bytes(path.read_bytes()) if path is not None and path.is_file() else None

    @staticmethod
    def latest_in(root: Path) -> dict | None:
        p = root / LATEST
        return json.loads(p.read_text()) if p.exists() else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
