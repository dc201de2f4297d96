"""Run-folder checkpoints: the global model and strategy state after each round, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from server.federation.progress import RoundsDone, read_progress
from shared.arrays import to_record, to_state_dict
from shared.models import checkpoint_blob, is_fedcam
from shared.run_dir import RunDir


class RunCheckpoints:
    """RUN_DIR/checkpoints/: global_rNNNN.pt (a fedcam checkpoint: weights, model yaml and names, so `fedcam eval`
    and models.load read it alone), state_rNNNN.npz, and progress.json last."""

    def __init__(self, run_dir: Path | str):
        self.dir = RunDir(run_dir).checkpoints

    def save(self, rnd: int, arrays: ArrayRecord, state: dict[str, np.ndarray], progress: RoundsDone,
             model_yaml: dict, names: list[str], **meta) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = self.weights(rnd)
        blob = checkpoint_blob(model_yaml, names, dict(to_state_dict(arrays)), round=rnd, strategy=progress.strategy,
                               **meta)
        _atomic(weights, lambda p: torch.save(blob, p))
        _atomic(self.dir / f"state_r{rnd:04d}.npz", lambda p: np.savez(p, **state), suffix=".npz")
        # progress.json is written last: a crash before it leaves the previous round as the resume point.
        _atomic(self.dir / "progress.json", lambda p: p.write_text(json.dumps(vars(progress))))
        return weights

    def progress(self) -> RoundsDone | None:
        return read_progress(self.dir.parent)

    def load(self, rnd: int) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
        weights = self.weights(rnd)
        if not weights.exists():
            raise FileNotFoundError(f"checkpoint of round {rnd} missing: {weights}")
        blob = torch.load(weights, map_location="cpu", weights_only=True)
        state_dict = blob["state_dict"] if is_fedcam(blob) else blob  # before the format: plain tensors
        with np.load(self.dir / f"state_r{rnd:04d}.npz", allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        return to_record(state_dict), state

    def weights(self, rnd: int) -> Path:
        """The global model's file of round `rnd` (it may not exist)."""
        return self.dir / f"global_r{rnd:04d}.pt"

    def latest_weights(self) -> Path | None:
        p = self.progress()
        return self.weights(p.round) if p else None


def _atomic(path: Path, write, suffix: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp" + suffix)
    write(tmp)
    os.replace(tmp, path)
