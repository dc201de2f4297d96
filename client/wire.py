"""A camera's end of fed.compress: the copy of the global model it holds for compressed downloads, and what its
top-k uploads left unsent (error feedback), in the node's context.state while it runs and on its disk across restarts."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

log = logging.getLogger("fedcam.client")
REPLICA, RESIDUAL, META = "fedcam-wire-replica", "fedcam-wire-residual", "fedcam-wire"


class WireError(ValueError):
    """A compressed download this camera cannot apply (it does not hold the model the delta is from)."""


def compression_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower ClientApp mod for train messages: a compressed download becomes the whole global model before the
    app sees it, and the app's reply leaves as a compressed delta from it (fed.compress). Everything else passes."""
    config = msg.content["config"] if msg.has_content() and "config" in msg.content.config_records else {}
    mode = str(config.get("compress", "none"))
    if msg.metadata.message_type != "train" or (mode == "none" and "down-version" not in config):
        return call_next(msg, context)
    from client.camera import wire_file  # torch and the codec load with the first compressed message
    from shared import compress
    from shared.config import load_config

    model_yaml = json.loads(str(config["model-yaml"]))
    wire = CameraWire(context.state, wire_file(context.node_config, load_config(context.run_config), model_yaml))
    received = wire.receive(msg.content["arrays"], config)  # an error here is the message's error reply
    msg.content["arrays"] = received
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if "down-version" in config:  # the copy this camera now holds: the server checks it holds the same
        reply.content["metrics"]["replica-crc"] = compress.checksum(received)
    if mode != "none":
        seed, topk = int(config.get("seed", 0)), float(config.get("compress-topk", 0.1))
        base = shared_part(received, model_yaml, list(config["names"]), config, context)
        # Central DP: the privacy mod inside clipped the update; what the server decodes is held to the same bound.
        bound = float(config.get("dp-clip", 0.0)) if str(config.get("dp", "off")) == "central" else None
        reply.content["arrays"] = wire.send(reply.content["arrays"], base, mode, topk, seed, bound)
    return reply


def shared_part(received: ArrayRecord, model_yaml, names: list[str], config, context: Context) -> ArrayRecord:
    """The packed received model without the keys the camera's reply leaves out (fed.personal, and fed.dp's
    withheld keys): what the reply's delta is from."""
    from client.privacy import released_layout
    from shared.arrays import pack, unpack
    from shared.config import load_config

    layout, _, released = released_layout(model_yaml, names, config, load_config(context.run_config))
    full = unpack(received, layout)
    return pack(ArrayRecord(OrderedDict((k, full[k]) for k in released)))


class CameraWire:
    def __init__(self, state: RecordDict, path: Path):
        self.state, self.path = state, path

    def receive(self, arrays: ArrayRecord, config: Mapping[str, Any]) -> ArrayRecord:
        """The packed global model from what was sent: the model itself, or a delta from the copy this camera holds."""
        from shared import compress

        version, base = str(config.get("down-version", "")), str(config.get("down-base", ""))
        if compress.is_compressed(arrays):
            held, held_version = self._replica()
            if held is None or held_version != base:
                raise WireError(f"the server sent a delta from global model v{base}, but this camera holds "
                                f"{'v' + held_version if held is not None else 'none'} ({self.path})")
            arrays = compress.decode(arrays, held)
        if version:  # compressed downloads are on: keep what the next delta will be taken from
            self._keep(REPLICA, arrays, version)
        return arrays

    def send(self, reply: ArrayRecord, base: ArrayRecord, mode: str, topk: float, seed: int,
             bound: float | None = None) -> ArrayRecord:
        """`reply` as a compressed delta from `base`; topk adds what earlier messages left unsent. With `bound`
        (central DP) the payload decodes to a delta of at most that L2 norm; what the bound cuts is not fed back."""
        from shared import compress

        if mode == "none":
            return reply
        residual = None
        if mode == "topk" and RESIDUAL in self._loaded():
            residual = self.state[RESIDUAL]["r"].numpy()
            if residual.shape != reply[compress.FLOAT].shape:  # another layout (mode, model): start afresh
                log.warning("unsent remainder of %d values does not fit this reply; dropped", residual.size)
                residual = None
        rng = np.random.default_rng([seed, 0xC0DE])  # replayable rounding: a resumed run sends the same bytes
        payload, left = compress.encode(reply, base, mode, topk, rng, residual)
        if left is not None:
            self._keep(RESIDUAL, ArrayRecord({"r": Array(left)}), None)
        if bound is not None:
            payload, factor = compress.limit_norm(payload, bound)
            if factor < 1:
                log.info("compressed update scaled by %.4f to stay within the clipping norm %.3g", factor, bound)
        return payload

    # --- state and disk ---------------------------------------------------------------------------------
    def _replica(self) -> tuple[ArrayRecord | None, str]:
        loaded = self._loaded()
        if REPLICA not in loaded:
            return None, ""
        return loaded[REPLICA], str(loaded[META]["version"])

    def _loaded(self) -> RecordDict:
        """context.state, filled from disk the first time this node process looks (a restarted SuperNode)."""
        if META not in self.state and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as saved:
                    groups = {k: saved[k] for k in saved.files}
                self.state[META] = ConfigRecord({"version": str(groups.pop("meta.version"))})
                for name in (REPLICA, RESIDUAL):
                    items = {k.split("/", 1)[1]: Array(v) for k, v in groups.items() if k.startswith(name + "/")}
                    if items:
                        self.state[name] = ArrayRecord(items)
            except Exception as err:  # a damaged file: set aside, never overwritten; the server sends in full
                aside = self.path.with_suffix(".unusable")
                self.path.replace(aside)
                log.warning("wire state %s not used (%s); kept as %s", self.path, type(err).__name__, aside)
        return self.state

    def _keep(self, name: str, record: ArrayRecord, version: str | None) -> None:
        self.state[name] = record
        meta = dict(self.state[META]) if META in self.state else {"version": ""}
        if version is not None:
            meta["version"] = version
        self.state[META] = ConfigRecord(meta)
        groups = {f"{n}/{k}": self.state[n][k].numpy() for n in (REPLICA, RESIDUAL) if n in self.state
                  for k in self.state[n]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **groups, **{"meta.version": np.array(meta["version"])})
        tmp.replace(self.path)  # atomic: a crash mid-write keeps the previous state
