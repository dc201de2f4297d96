"""Flower strategies chosen by config, extended (never copied) with update screening, events and resumable state."""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum)

from server.federation.events import ClientOutcome, EventBus, client_error
from server.federation.privacy import WEIGHT_KEY, CentralDp, Ledger
from server.federation.scaffold import Scaffold
from server.federation.wire import ServerWire
from shared.arrays import UpdateError, check_compatible, check_decodable, is_packed, layout_of, to_state_dict, unpack
from shared.compress import message_bytes
from shared.config import FedConfig
from shared.train import round_seed

log = logging.getLogger("fedcam.server")
STATE_KEYS = ("m_t", "v_t", "momentum_vector", "scaffold_c")  # server state of FedAdam / FedAvgM / SCAFFOLD
LEDGER_KEY = "dp-ledger"  # the privacy accountant's state (JSON)


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than the run needs, within the bounded wait."""


def check_reply_records(msg: Message, side_records: frozenset[str]) -> None:
    """What Flower's aggregation demands of a reply, checked per reply: it raises for the whole round otherwise."""
    records = msg.content.array_records
    if not records:
        raise UpdateError("reply carries no weights")
    extra = [k for k in list(records)[1:] if k not in side_records]
    if extra:
        raise UpdateError(f"reply carries unexpected array records {extra[:3]}")
    if len(msg.content.metric_records) != 1:
        raise UpdateError(f"reply carries {len(msg.content.metric_records)} metric records, expected 1")
    count = next(iter(msg.content.metric_records.values())).get("num-examples")
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not 0 < count < float("inf"):
        raise UpdateError(f"num-examples is {count!r}, not a positive number")


def common_metrics(good: list[Message]) -> list[Message]:
    """Flower averages metrics only when every reply has the same keys: one camera's extra or missing key would
    fail the whole round, so each reply keeps the scalar keys all accepted replies share (events keep them all)."""
    if not good:
        return good
    records = [next(iter(m.content.metric_records.values())) for m in good]
    shared = set.intersection(*({k for k, v in r.items() if isinstance(v, (int, float))} for r in records))
    for record in records:
        for key in [k for k in record.keys() if k not in shared]:
            del record[key]
    return good


class FedcamMixin:
    """Put before a Flower strategy in the bases: screens updates, emits events, offsets rounds for resume."""

    bus: EventBus
    round_offset: int = 0
    seed: int = 0
    max_update_norm: float | None = None
    norm_outlier: float = 0.0  # fed.norm-outlier
    wait_timeout: float = 60.0
    personal: frozenset[str] = frozenset()  # keys the cameras keep (fed.personal): replies leave them out
    wire: ServerWire = ServerWire("none", "none", 0.1, 0)  # fed.compress: how models travel each way
    ledger: Ledger | None = None  # fed.dp: the privacy accountant (None: off)
    round_lr = None  # rnd -> the local lr of that round (FedConfig.round_lr)
    rider = None  # per-camera snapshot steps on the train messages (server/snapshots/rider.py; None: off)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = server_round + self.round_offset
        self._wait_for_nodes(grid)
        if self.ledger is not None:
            self.ledger.check(len(list(grid.get_node_ids())))  # local DP's budget (central: Flower's wrapper checks)
        random.seed(round_seed(self.seed, rnd))  # Flower samples with `random`: make it replayable on resume
        config["seed"] = round_seed(self.seed, rnd)
        if self.round_lr is not None:
            config["lr"] = self.round_lr(rnd)  # fed.lr-decay: this round's local lr
        messages = list(super().configure_train(rnd, arrays, config, grid))
        self._layout = layout_of(arrays)  # one array per dtype on the wire (see shared/arrays)
        # What the cameras train from: the global model, or with compressed downloads the copy they hold of it.
        full, delta, base = self.wire.downlink(arrays, rnd)
        self._reference = to_state_dict(unpack(full, self._layout))
        self.wire.address(messages, full, delta, base)
        if self.rider is not None:
            self.rider.attach(messages)
        self._bytes_down = {m.metadata.dst_node_id: message_bytes(m) for m in messages}  # as they travel
        self._sampled = [m.metadata.dst_node_id for m in messages]
        self._sent = messages  # the Grid gives each its message id in place when it pushes them
        self._round_start = time.time()
        self.bus.emit("round_start", rnd, sampled=self._sampled, available=len(list(grid.get_node_ids())),
                      lr=config.get("lr"))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rnd = server_round + self.round_offset
        replies = list(replies)
        if self.rider is not None:  # its answers off the replies first: what is screened is the update alone
            self.rider.collect(replies)
        good, outcomes = self._screen(replies)
        replied = {o.node_id for o in outcomes}
        # An error reply the SuperLink could not attribute stands for one sampled node we cannot name.
        unnamed = sum(o.node_id not in self._sampled for o in outcomes)
        silent = [n for n in self._sampled if n not in replied][unnamed:]
        outcomes += [ClientOutcome(n, False, "no reply before the round timeout") for n in silent]
        arrays, metrics = super().aggregate_train(rnd, good) if good else (None, None)
        if arrays is not None:
            arrays = self._restore(self._with_withheld(arrays))
        else:
            log.warning("round %d: no valid update; the global model stays as it was", rnd)
        privacy = {}
        if self.ledger is not None:
            self.ledger.released(len(self._sampled))  # local DP: each sampled camera released its noised update
            privacy = self.ledger.spent()
        self.bus.emit("train_result", rnd, clients=[vars(o) for o in outcomes], accepted=len(good),
                      seconds=time.time() - self._round_start,
                      metrics=dict(metrics) if metrics is not None else {}, privacy=privacy)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    # --- helpers ---------------------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> None:
        # Flower's sampler waits forever for nodes; a camera fleet must not hang the server.
        need, deadline = getattr(self, "min_available_nodes", 1), time.monotonic() + self.wait_timeout
        while (have := len(list(grid.get_node_ids()))) < need:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(f"only {have} of {need} required nodes connected after {self.wait_timeout:.0f}s")
            time.sleep(0.5)

    def _screen(self, replies: list[Message]) -> tuple[list[Message], list[ClientOutcome]]:
        good, outcomes = [], []
        # Error replies the SuperLink makes itself ("Node Unavailable") come from node 1, the SuperLink: name
        # the node they stand for through the id of the message they answer.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "_sent", [])}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self._sampled:
                node = sent_to.get(msg.metadata.reply_to_message_id, node)
            if msg.has_error():
                outcomes.append(ClientOutcome(node, False, f"client error: {client_error(msg.error.reason)}"))
                continue
            metrics = {k: float(v) for r in msg.content.metric_records.values() for k, v in r.items()
                       if isinstance(v, (int, float))}
            metrics["bytes-down"] = float(getattr(self, "_bytes_down", {}).get(node, 0))
            metrics["bytes-up"] = float(message_bytes(msg))
            try:
                check_reply_records(msg, getattr(self, "side_records", frozenset()))
                key, record = next(iter(msg.content.array_records.items()))
                check_decodable(record)  # headers that lie about the bytes they carry go no further
                record = self.wire.decode_up(record, self._reference, self.personal)  # screening below sees the decoded update
                if is_packed(record):
                    record = unpack(record, [item for item in self._layout if item[0] not in self.personal])
                if self.ledger is None:
                    record = self._with_global_personal(record)
                    reference = self._reference
                else:  # DP noises what it aggregates: only what cameras release, the rest is filled in after
                    reference = {k: v for k, v in self._reference.items() if k not in self.personal}
                msg.content[key] = record  # Flower's aggregation sees per-tensor arrays again
                metrics["update-norm-server"] = check_compatible(reference, record, self.max_update_norm)
            except UpdateError as err:
                log.warning("round update from node %d rejected: %s", node, err)
                outcomes.append(ClientOutcome(node, False, f"update rejected: {err}", metrics))
                continue
            self.wire.confirm(node, metrics)
            good.append(msg)
            outcomes.append(ClientOutcome(node, True, "", metrics))
        good, outcomes = self._drop_outliers(good, outcomes)
        return common_metrics(good), outcomes

    def _drop_outliers(self, good: list[Message], outcomes: list[ClientOutcome]):
        """fed.norm-outlier: an update far longer than the round's median (a scaled attack, a runaway camera) is
        rejected. An absolute bound cannot do this alone: honest norms follow the local lr and steps."""
        accepted = [o for o in outcomes if o.ok]
        if self.norm_outlier <= 0 or len(accepted) < 3:  # the median of two is their mean: no outlier test
            return good, outcomes
        median = float(np.median([o.metrics["update-norm-server"] for o in accepted]))
        bound, kept = self.norm_outlier * median if median > 0 else float("inf"), []
        for msg, outcome in zip(good, accepted):
            norm = outcome.metrics["update-norm-server"]
            if norm > bound:
                why = f"update norm {norm:.3g} exceeds {self.norm_outlier:g}x the round's median {median:.3g}"
                outcome.ok, outcome.reason = False, f"update rejected: {why}"
                log.warning("round update from node %d rejected: %s", outcome.node_id, why)
            else:
                kept.append(msg)
        return kept, outcomes

    def _with_global_personal(self, record: ArrayRecord) -> ArrayRecord:
        """The full record the strategy aggregates: the personal keys (left out by every camera) hold the
        global model's own values, so any Flower strategy leaves them as they were. A camera that sent one
        anyway is refused: its personal part must not leave it."""
        if not self.personal:
            return record
        sent = self.personal & set(record.keys())
        if sent:
            raise UpdateError(f"reply carries personal keys, e.g. {sorted(sent)[:3]}")
        keys = [key for key, _, _ in self._layout]
        missing = [k for k in keys if k not in self.personal and k not in record]
        extra = set(record.keys()) - set(keys)
        if missing or extra:  # check_compatible's wording: the same defect reads the same either way
            raise UpdateError(f"keys differ: missing {missing[:3]}, unexpected {sorted(extra)[:3]}")
        return ArrayRecord(OrderedDict(
            (k, Array(self._reference[k].numpy()) if k in self.personal else record[k]) for k in keys))

    def _with_withheld(self, arrays: ArrayRecord) -> ArrayRecord:
        """Under fed.dp the aggregate holds the released keys only: the withheld ones keep the global model's values."""
        if self.ledger is None or not self.personal:
            return arrays
        keys = [key for key, _, _ in self._layout]
        return ArrayRecord(OrderedDict(
            (k, Array(self._reference[k].numpy()) if k in self.personal else arrays[k]) for k in keys))

    def _restore(self, arrays: ArrayRecord) -> ArrayRecord:
        """Averaging turns integer buffers into floats and server optimizers can push BN variances below 0."""
        out, dtypes = {}, {k: d for k, _, d in self._layout}
        for key, arr in arrays.items():
            value = arr.numpy()
            if key.endswith("running_var"):
                value = np.maximum(value, 1e-6)
            dtype = np.dtype(dtypes[key])
            value = np.rint(value).astype(dtype) if np.issubdtype(dtype, np.integer) else value.astype(dtype)
            out[key] = Array(np.array(value, order="C"))  # not ascontiguousarray: it turns 0-d into 1-d
        return ArrayRecord(out)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server-optimizer state, flattened for np.savez (resume continues it exactly)."""
        flat = {}
        for name in STATE_KEYS:
            value = getattr(self, name, None)
            if isinstance(value, dict):
                flat.update({f"{name}/{k}": v for k, v in value.items()})
            elif isinstance(value, list):
                flat.update({f"{name}/#{i}": v for i, v in enumerate(value)})
        if self.ledger is not None and self.ledger.state_json():
            flat[LEDGER_KEY] = np.array(self.ledger.state_json())  # a 0-d unicode array: no pickle
        return flat

    def load_state_arrays(self, flat: dict[str, np.ndarray]) -> None:
        if self.ledger is not None and LEDGER_KEY in flat:
            self.ledger.load_json(str(flat[LEDGER_KEY]))
        for name in STATE_KEYS:
            items = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(name + "/")}
            if not items:
                continue
            if all(k.startswith("#") for k in items):
                setattr(self, name, [items[f"#{i}"] for i in range(len(items))])
            else:
                setattr(self, name, items)


BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM, "fedmedian": FedMedian,
         "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "scaffold": Scaffold}


def make_strategy(f: FedConfig, bus: EventBus, seed: int, round_offset: int = 0, personal: Iterable[str] = ()):
    """The Flower strategy named by `fed.strategy`, with fedcam's screening and events mixed in."""
    name = f.strategy.lower()
    if name not in BASES:
        raise ValueError(f"unknown strategy '{f.strategy}' (choose from {', '.join(BASES)})")
    common = dict(fraction_train=f.fraction_train, fraction_evaluate=f.fraction_evaluate,
                  min_train_nodes=f.min_nodes, min_evaluate_nodes=f.min_nodes,
                  min_available_nodes=f.min_nodes)
    extra = {"fedprox": dict(proximal_mu=f.proximal_mu),
             "fedadam": dict(eta=f.adam_eta, eta_l=f.local_lr),  # eta_l only labels Flower's log line
             "fedavgm": dict(server_learning_rate=f.server_lr, server_momentum=f.server_momentum),
             "fedtrimmedavg": dict(beta=f.trim_beta),
             "krum": dict(num_malicious_nodes=f.krum_byzantine)}.get(name, {})
    if f.dp == "central":
        # Order on the server: decode (fed.compress) and screen each update, then Flower's wrapper averages the
        # released keys uniformly and adds the noise, then the withheld keys are filled in. Screening before the
        # noise: a rejected update is never part of a release.
        cls = type(f"FedcamDp{BASES[name].__name__}", (FedcamMixin, CentralDp), {})
        inner = BASES[name](**common, **extra, weighted_by_key=WEIGHT_KEY)
        strategy = cls(inner, f.dp_noise, f.dp_clip, num_sampled_clients=max(f.min_nodes, 1))
        strategy.min_available_nodes = f.min_nodes  # what the mixin's bounded wait reads
    else:
        cls = type(f"Fedcam{BASES[name].__name__}", (FedcamMixin, BASES[name]), {})
        strategy = cls(**common, **extra)
    if f.dp != "off":
        strategy.ledger = Ledger(f)
    strategy.bus, strategy.seed, strategy.round_offset = bus, seed, round_offset
    strategy.max_update_norm = f.max_update_norm if f.max_update_norm > 0 else None
    strategy.norm_outlier = f.norm_outlier
    strategy.round_lr = f.round_lr
    strategy.wait_timeout = f.round_timeout
    strategy.personal = frozenset(personal)
    strategy.wire = ServerWire(f.compress, f.downlink, f.compress_topk, seed)
    return strategy
