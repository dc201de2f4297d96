"""The device agent's state.json (current, previous, bad snapshots): read and checked, replaced atomically so a power
cut never leaves half of it, and rebuilt from the verified snapshots on disk when it cannot be read."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from shared.snapshot.format import SnapshotError, verify_dir

log = logging.getLogger("fedcam.device")
FRESH = {"current": None, "previous": None, "etag": None, "bad": []}


def load_state(folder: Path, key) -> dict:
    """state.json; one that cannot be read (truncated, garbage, wrong shape) is set aside as state.json.unusable and
    the state rebuilt from the snapshots on disk: the device keeps serving."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_bytes())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        for name in ("current", "previous", "etag"):
            if not isinstance(state.get(name), (str, type(None))):
                raise ValueError(f"'{name}' is {state[name]!r}")
        if not isinstance(state.get("bad", []), list) or not all(isinstance(b, str) for b in state.get("bad", [])):
            raise ValueError("'bad' is not a list of snapshot names")
        return {**FRESH, **state}
    except FileNotFoundError:  # a new device, or a state file lost with snapshots still on disk
        return {**FRESH, **recovered(folder, key)}
    except ValueError as err:  # json's decode errors, bad UTF-8 and the checks above
        aside = path.with_name("state.json.unusable")
        path.replace(aside)
        state = {**FRESH, **recovered(folder, key)}
        log.warning("%s unusable (%s), kept as %s; serving %s, found on disk", path, err, aside.name,
                    state["current"] or "nothing")
        return state


def recovered(folder: Path, key) -> dict:
    """current and previous from the snapshot folders that still verify, newest first (a rolled-back snapshot's
    folder is gone: the agent's rollback removes it)."""
    good = []
    folders = [f for f in (folder / "snapshots").iterdir() if f.is_dir()]
    for snap in sorted(folders, key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            verify_dir(snap, key)
            good.append(snap.name)
        except (SnapshotError, OSError, ValueError) as err:
            log.warning("snapshot folder %s not usable (%s)", snap.name, err)
    return {"current": good[0] if good else None, "previous": good[1] if len(good) > 1 else None}


def save_state(folder: Path, state: dict) -> None:
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / "state.json")
