"""How far a run folder got (RUN_DIR/checkpoints/progress.json), readable without torch or Flower: the CLI asks
before any work starts and stays small for the rest of the run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.config import Config
from shared.run_dir import RunDir


@dataclass
class RoundsDone:
    round: int  # last completed round
    total_rounds: int
    strategy: str


class RunExists(RuntimeError):
    """The run folder already holds rounds and resume was not asked for: never overwrite them."""


def read_progress(run_dir: Path | str) -> RoundsDone | None:
    path = RunDir(run_dir).checkpoints / "progress.json"
    return RoundsDone(**json.loads(path.read_text())) if path.exists() else None


def resume_point(cfg: Config) -> RoundsDone | None:
    """The run folder's last completed round (None: a fresh folder); RunExists if it has rounds and resume is off.
    The CLI asks before any work starts; the ServerApp asks again, for runs started by other means."""
    progress = read_progress(cfg.run_dir)
    if progress and not cfg.resume:
        raise RunExists(f"{cfg.run_dir} already has {progress.round} completed rounds (of {progress.total_rounds}): "
                        f"resume it (--resume {cfg.run_dir}) or pick a new run-dir")
    return progress
