"""The server's end of fed.compress: the copy of the global model up-to-date cameras hold (compressed downloads are
deltas from it), which camera holds which, decoding of compressed uploads, and message bytes as they travel."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from shared import compress
from shared.arrays import UpdateError, pack, to_record


class ServerWire:
    """Downloads: the server keeps one replica R, the model every up-to-date camera holds. Each round it sends
    those cameras C(G - R) and sets R += decode(C); every other camera gets R whole. The delta is always taken
    against R, so what one round leaves unsent is in the next round's delta: error feedback for free, and the
    cameras train from R, the model they really hold (no drift between the ends)."""

    def __init__(self, up: str, down: str, topk: float, seed: int):
        self.up, self.down, self.topk, self.seed = up, down, topk, seed
        self.replica: ArrayRecord | None = None  # packed
        self.version = ""
        self.holds: dict[int, str] = {}  # node id -> replica version it confirmed (by checksum)
        self.crc = 0.0
        self._base: tuple[OrderedDict, ArrayRecord] | None = None

    def downlink(self, arrays: ArrayRecord, rnd: int) -> tuple[ArrayRecord, ArrayRecord | None, str]:
        """(R whole, C(G - R) or None, the version the delta is from) for round `rnd`; R is what cameras train from."""
        wire = pack(arrays)
        if self.down == "none":
            return wire, None, ""
        base, delta = self.version, None
        if self.replica is None:
            self.replica = wire
        else:
            rng = np.random.default_rng([self.seed, rnd, 0xD0])
            delta, _ = compress.encode(wire, self.replica, self.down, self.topk, rng)
            self.replica = compress.decode(delta, self.replica)
        self.version, self.crc = str(rnd), compress.checksum(self.replica)
        return self.replica, delta, base

    def address(self, messages: list[Message], arrays: ArrayRecord, delta: ArrayRecord | None, base: str) -> None:
        """Each message gets the delta if its camera holds the replica it is from, else the replica whole."""
        for m in messages:
            config = dict(m.content["config"])
            if self.down != "none":
                config["down-version"] = self.version
            holds = delta is not None and self.holds.get(m.metadata.dst_node_id) == base
            if holds:
                config["down-base"] = base
            m.content = RecordDict({"arrays": delta if holds else arrays, "config": ConfigRecord(config)})

    def decode_up(self, record: ArrayRecord, reference: OrderedDict, personal: frozenset[str]) -> ArrayRecord:
        """A camera's upload as the packed model it stands for (its delta is from the shared part of `reference`,
        the model the cameras trained from); UpdateError if it is not what the run agreed on."""
        if compress.is_compressed(record) != (self.up != "none"):
            raise UpdateError(f"reply is {'compressed' if compress.is_compressed(record) else 'not compressed'} "
                              f"but the run's fed.compress is '{self.up}'")
        if self.up == "none":
            return record
        if compress.mode_of(record) != self.up:
            raise UpdateError(f"reply is compressed as '{compress.mode_of(record)}', the run uses '{self.up}'")
        if self._base is None or self._base[0] is not reference:  # once per round, not per reply
            self._base = (reference, shared_base(reference, personal))
        return compress.decode(record, self._base[1])

    def confirm(self, node: int, metrics: dict[str, float]) -> None:
        """After an accepted update: the camera holds the replica if its checksum says so."""
        if self.down == "none":
            return
        if metrics.get("replica-crc") == self.crc:
            self.holds[node] = self.version
        else:  # it did not apply what was sent (or lost it): it gets the whole model next time
            self.holds.pop(node, None)


def shared_base(reference: OrderedDict, personal: frozenset[str]) -> ArrayRecord:
    """The packed shared part of the model the cameras trained from: what their deltas are taken against."""
    return pack(to_record(OrderedDict((k, v) for k, v in reference.items() if k not in personal)))
