"""One federated run on the server: its folder, starting model, resume point, central evaluation and hooks."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from server.federation.checkpoint import RoundsDone, RunCheckpoints
from server.federation.progress import RunExists, resume_point  # noqa: F401  (RunExists: the ServerApp's refusal)
from server.federation.events import EventBus, JsonlLog
from server.federation.store import RunStore
from server.snapshots.worker import snapshot_round
from shared import models, task
from shared.arrays import to_record, to_state_dict
from shared.config import Config, to_flat
from shared.run_dir import RunDir
from shared.train import local_plan

log = logging.getLogger("fedcam.server")


class FederatedRun:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        progress = resume_point(cfg)  # before anything is written into the folder
        self.checkpoints = RunCheckpoints(self.dir)
        layout = RunDir(self.dir)
        self.bus = EventBus([JsonlLog(layout.events), RunStore(layout.store)])
        self.done, self.state = 0, {}
        self.layout = layout
        self.model = self._initial_model()
        self.arrays = to_record(self.model)
        if progress:  # resume from the last completed round
            self.done = progress.round
            self.arrays, self.state = self.checkpoints.load(progress.round)
        self.last = self.done  # the newest completed round
        self.names = [self.model.names[i] for i in sorted(self.model.names)]
        from server.snapshots.worker import SnapshotHook  # after the event log: a snapshot of round N follows its round_end

        self.snapshots = SnapshotHook(cfg).attach(self.bus)

    def _initial_model(self):
        ckpt = self.cfg.model.student_checkpoint
        if ckpt:
            return models.load(ckpt)
        return models.build_student(self.cfg.model, task.names_of(task.base_yaml(self.cfg)))

    @property
    def remaining(self) -> int:
        return max(0, self.cfg.fed.rounds - self.done)

    def train_config(self) -> ConfigRecord:
        """What every client needs to rebuild the global model and train it this round."""
        f = self.cfg.fed
        return ConfigRecord({"model-yaml": json.dumps(self.model.yaml), "names": self.names, **local_plan(f),
                             "evaluate-first": f.evaluate_in_train})

    def evaluate_config(self) -> ConfigRecord:
        return ConfigRecord({"model-yaml": json.dumps(self.model.yaml), "names": self.names,
                             "personal": self.cfg.fed.personal, "keep-finetuned": self.cfg.fed.runs_own_model})

    def personal_keys(self) -> list[str]:
        """The keys every camera's reply leaves out: its personal part (fed.personal) and, under fed.dp, what local
        training does not change (shared/personal.py: withheld_keys)."""
        from shared.personal import withheld_keys

        f = self.cfg.fed
        return withheld_keys(self.model, f.personal, f.dp, bn_stats_train=not f.freeze_bn or f.adabn)

    def last_round(self) -> int:
        return self.last

    def snapshot_last(self) -> None:
        """A run stopped early (the privacy budget): its last completed round gets the snapshot the last round would."""
        progress, path = self.checkpoints.progress(), self.checkpoints.latest_weights()
        if progress is not None and progress.round > 0 and not snapshot_round(self.cfg, progress.round):
            self.snapshots.submit(progress.round, str(path))

    def central_evaluate(self, strategy):
        """Flower's evaluate_fn: score the global model on held-out camera val data, then close the round."""

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            rnd, f = server_round + self.done, self.cfg.fed
            started, last = time.time(), rnd == f.rounds
            self.model.load_state_dict(to_state_dict(arrays))
            # Scoring every round is the server's biggest cost at many cameras: fed.central-every thins it out.
            scored = server_round == 0 or last or (f.central_every > 0 and rnd % f.central_every == 0)
            metrics = task.score_cameras(self.model, self.cfg) if scored else {}
            if server_round == 0 and self.done:  # resumed: round `done` was already evaluated and saved
                return MetricRecord(metrics)
            self.last = max(self.last, rnd)
            privacy = strategy.ledger.spent() if strategy.ledger is not None else {}
            saved = ""
            # Snapshot rounds are always saved: the snapshot worker makes its snapshot from that file.
            # Under a privacy budget every round is saved: the run may stop after any of them (snapshot_last).
            budget = f.dp != "off" and f.dp_max_epsilon > 0
            if server_round > 0 and (last or budget or rnd % max(f.checkpoint_every, 1) == 0
                                     or snapshot_round(self.cfg, rnd)):
                saved = str(self.checkpoints.save(rnd, arrays, strategy.state_arrays(),
                                                  RoundsDone(rnd, self.cfg.fed.rounds, self.cfg.fed.strategy),
                                                  self.model.yaml, self.names, privacy=privacy))
            self.bus.emit("round_end", rnd, arrays=arrays, central=metrics, eval_seconds=time.time() - started,
                          checkpoint=saved)
            return MetricRecord(metrics)

        return evaluate_fn

    def start_event(self, strategy) -> None:
        manifest = self.manifest(strategy)
        tmp = self.layout.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.layout.manifest)
        self.bus.emit("run_start", self.done, config=to_flat(self.cfg), resumed_from=self.done,
                      params=models.count_params(self.model), manifest=manifest)

    def manifest(self, strategy) -> dict:
        """What leaves the cameras: the keys they send, the personal keys they keep, what else they withhold (fed.dp),
        and the privacy parameters with the epsilon spent so far."""
        from shared.personal import personal_keys

        f = self.cfg.fed
        keys = list(self.model.state_dict())
        personal = personal_keys(self.model, f.personal) if f.personal != "none" else []
        withheld = set(self.personal_keys())
        return {"shared_keys": [k for k in keys if k not in withheld], "personal_keys": personal,
                "withheld_keys": [k for k in keys if k in withheld and k not in personal],
                "dp": strategy.ledger.spent() if strategy.ledger is not None else {"mode": "off"},
                "strategy": f.strategy, "compress": {"up": f.compress, "down": f.downlink},
                "secure_aggregation": f.secure_aggregation}
