"""A run folder's layout, in one place: its config, event log, SQLite store, checkpoints, registry and logs."""

from __future__ import annotations

import json
from pathlib import Path


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.config = self.root / "run_config.json"  # flat config overrides: resume, dashboard, `snapshot --run`
        self.events = self.root / "events.jsonl"
        self.manifest = self.root / "run_manifest.json"  # what leaves the cameras: shared/personal keys, fed.dp
        self.store = self.root / "fedcam.sqlite"
        self.checkpoints = self.root / "checkpoints"
        self.log = self.root / "simulation.log"  # the simulation's own output (Flower, Ray, the apps)
        self.flwr_home = self.root / "flwr"
        self.home = self.root / "home"  # HOME of the simulation's processes (Ray's bootstrap config lives there)
        self.personal = self.root / "personal"  # simulated cameras' personal parts (fed.personal), one file each

    def overrides(self) -> dict:
        """The saved flat config; {} for a folder that has none (e.g. a registry-only folder)."""
        return json.loads(self.config.read_text()) if self.config.exists() else {}

    def save_overrides(self, flat: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(flat, indent=1))
        tmp.replace(self.config)  # atomic: a resume never reads half a config

    def registry(self, snapshot_dir: str | None = None) -> Path:
        """The snapshot registry: snapshot.dir when set (given, or from the saved config), else RUN_DIR/snapshots."""
        chosen = snapshot_dir if snapshot_dir is not None else self.overrides().get("snapshot.dir", "")
        return Path(chosen) if chosen else self.root / "snapshots"
