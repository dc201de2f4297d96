"""SCAFFOLD (Karimireddy et al. 2020) on Flower's FedAvg: the server's control variate travels with the model, and
the cameras' control updates come back beside their weights (the camera's side: client.scaffold.ControlVariate)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.train import CONTROL

log = logging.getLogger("fedcam.server")


class Scaffold(FedAvg):
    """FedAvg whose cameras correct every local gradient by c − c_k, so their steps follow the federation's mean
    gradient instead of drifting toward their own optimum (measured cause of FedAvg's slow global model: README,
    "Personalization"). The server keeps c, the mean of every camera's c_k: c += (1/N)·Σ_sampled (c_k+ − c_k),
    N the cameras connected. Weights are averaged as FedAvg does them; c starts empty (zero) and grows a key
    the first time a camera reports it."""

    side_records = frozenset({CONTROL})  # a reply's second ArrayRecord: the screening lets it through

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaffold_c: dict[str, np.ndarray] = {}  # resume puts the saved c here (strategies.STATE_KEYS)
        self._cameras = 0  # N, counted when a round is configured

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._cameras = max(1, len(list(grid.get_node_ids())))
        config["scaffold"] = True
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            msg.content[CONTROL] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in self.scaffold_c.items()))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies, updates = list(replies), []
        for msg in replies:  # FedAvg averages exactly one ArrayRecord per reply: the control one leaves first
            if CONTROL not in msg.content.array_records:
                log.warning("round %d: node %d sent no control update; its weights count, c is not moved",
                            server_round, msg.metadata.src_node_id)
                continue
            record = msg.content.array_records[CONTROL]
            del msg.content[CONTROL]
            try:
                updates.append(self._checked(record))
            except ValueError as err:
                log.warning("round %d: control update from node %d ignored: %s", server_round,
                            msg.metadata.src_node_id, err)
        cameras = self._cameras or max(1, len(replies))  # N: the nodes connected this round
        for update in updates:
            for key, value in update.items():
                self.scaffold_c[key] = self.scaffold_c.get(key, np.zeros_like(value)) + value / cameras
        return super().aggregate_train(server_round, replies)

    def _checked(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """A camera's control update as arrays: float, finite and of the shape c already has for each key."""
        out = {}
        for key, array in record.items():
            value = array.numpy()
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"'{key}' is {value.dtype}, not float")
            if not np.isfinite(value).all():
                raise ValueError(f"'{key}' has non-finite values")
            if key in self.scaffold_c and self.scaffold_c[key].shape != value.shape:
                raise ValueError(f"'{key}' has shape {value.shape}, c has {self.scaffold_c[key].shape}")
            out[key] = value.astype(np.float32)
        return out
