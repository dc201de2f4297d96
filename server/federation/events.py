"""Round events of a federated run, and the hooks that consume them (JSON-lines log, checkpoints, ...)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("fedcam.server")


def client_error(reason: str, limit: int = 600) -> str:
    """A ClientApp's error as a person needs it: the exception's own message, not the engine's traceback around it
    (Flower's Simulation Engine wraps it in a Ray traceback and appends it after "Message: ")."""
    text = reason.rsplit("Message: ", 1)[-1].strip().removesuffix("'>").strip() if "Message: " in reason else reason
    return text if len(text) <= limit else text[:limit] + " ..."


@dataclass
class ClientOutcome:
    node_id: int
    ok: bool
    reason: str = ""  # why a client failed or its update was rejected
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Event:
    kind: str  # run_start | round_start | train_result | round_end | snapshot | camera_snapshot | run_end | run_error
    round: int = 0
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)


class Hook(Protocol):
    """Anything that reacts to run events: the event log, checkpoints, snapshots, the dashboard store."""

    def __call__(self, event: Event, arrays: Any | None = None) -> None: ...


class EventBus:
    """Fans events out to hooks; a failing hook is logged and never stops the federation."""

    def __init__(self, hooks: list[Hook] | None = None):
        self.hooks: list[Hook] = list(hooks or [])
        self._lock = threading.RLock()  # the round loop and the snapshot worker's listener both emit

    def add(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def emit(self, kind: str, round: int = 0, arrays: Any | None = None, **data: Any) -> Event:
        event = Event(kind=kind, round=round, data=data)
        with self._lock:
            self._fan_out(event, arrays)
        return event

    def _fan_out(self, event: Event, arrays: Any | None) -> None:
        kind, round = event.kind, event.round
        for hook in self.hooks:
            try:
                hook(event, arrays)
            except Exception:  # noqa: BLE001 - a hook (e.g. snapshot publishing) must not kill training
                log.exception("hook %s failed on %s event of round %d", getattr(hook, "__name__", hook), kind, round)


class JsonlLog:
    """Appends one JSON object per event to RUN_DIR/events.jsonl (flushed, so a crash loses nothing written)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: Event, arrays: Any | None = None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(event), default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_events(path: Path) -> list[dict]:
    """Events of a run; a torn last line (crash mid-write) is skipped, not fatal."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping unreadable event line in %s", path)
    return out


class EventTail:
    """The events of a run that is still being written, read incrementally: each `read()` parses only the lines
    appended since the last one (a live view polls twice a second; rereading the whole log grows with the run)."""

    def __init__(self, path: Path, start: int = 0):
        """`start`: the byte offset to read from (a resumed run's log holds the earlier launches' events before it)."""
        self.path, self.events, self._offset, self._partial = Path(path), [], start, b""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")  # the last piece may be half written
        for line in lines:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping unreadable event line in %s", self.path)
        return self.events
