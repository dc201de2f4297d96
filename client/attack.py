"""The attack drill's attackers (drill.attack): a ClientApp mod that replaces a camera's honest update with a
sign-flipped, scaled, noise or malformed one on its way out, or crashes. Off unless the run or node config says so."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from shared.fed_config import ATTACKS


def attack_of(node_config: Mapping, run_config: Mapping) -> str:
    """What this camera sends instead of its update: its node config's `attack` (a real SuperNode), or in simulation
    drill.attack when its partition is among the first drill.attackers fraction; 'none' otherwise."""
    own = str(node_config.get("attack", "")) or None
    if own is None:
        own = str(run_config.get("drill.attack", "none"))
        if own == "none" or "partition-id" not in node_config:  # off, or not a simulated camera
            return "none"
        count = round(float(run_config.get("drill.attackers", 0.0)) * int(node_config.get("num-partitions", 0)))
        own = own if int(node_config["partition-id"]) < count else "none"
    if own not in ATTACKS:
        raise ValueError(f"attack '{own}' is not one of {', '.join(ATTACKS)}")
    return own


def poisoned(delta: np.ndarray, mode: str, scale: float, flip: float, rng: np.random.Generator) -> np.ndarray:
    if mode == "signflip":
        return -flip * delta
    if mode == "scale":
        return delta * scale
    # noise: a random direction as long as the honest update, so no norm bound can tell it apart
    noise = rng.standard_normal(delta.shape)
    return (noise * (np.linalg.norm(delta) / max(np.linalg.norm(noise), 1e-12))).astype(delta.dtype)


def lying(record: ArrayRecord) -> ArrayRecord:
    """The record with its first array's header lying: it declares the whole tensor, its bytes hold half of it."""
    out = OrderedDict(record.items())
    key, arr = next(iter(record.items()))
    half = Array(arr.numpy().reshape(-1)[: arr.numpy().size // 2].copy())
    out[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=half.stype, data=half.data)
    return ArrayRecord(out)


def malformed(reply: Message) -> Message:
    """A reply whose weights' header lies, with a metric key no other camera sends: what a broken or hostile
    device's serializer might produce."""
    reply.content["arrays"] = lying(reply.content["arrays"])
    reply.content["metrics"]["malformed"] = 1.0
    return reply


def attack_mod(msg: Message, context: Context, call_next) -> Message:
    """Innermost mod: sees the global model as the app received it and the weights the app answered with."""
    mode = attack_of(context.node_config, context.run_config) if msg.metadata.message_type == "train" else "none"
    if mode == "none":
        return call_next(msg, context)
    received = {k: np.array(a.numpy(), copy=True) for k, a in msg.content["arrays"].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sent = reply.content["arrays"]
    if set(sent.keys()) != set(received) or any(sent[k].shape != received[k].shape for k in received):
        # fed.personal leaves keys out of the reply: the packed arrays no longer line up with the download
        raise ValueError(f"attack '{mode}' needs the reply to hold the whole model (fed.personal = none)")
    if mode == "malformed":
        return malformed(reply)
    if mode == "crash":  # drill 1 in simulation: the work is done, the camera dies before it answers
        if int(msg.content["config"].get("server-round", 0)) == int(context.run_config["drill.crash-round"]):
            raise RuntimeError(f"drill: camera {context.node_config.get('partition-id', context.node_id)} crashed "
                               "mid-round")
        return reply
    seed = int(msg.content["config"].get("seed", 0)) * 1009 + int(context.node_config.get("partition-id", 0))
    # The run config carries every drill.* key (defaults from pyproject): no second set of defaults here.
    rng, scale = np.random.default_rng(seed), float(context.run_config["drill.attack-scale"])
    flip = float(context.run_config["drill.flip-scale"])
    out = OrderedDict()
    for key, arr in sent.items():
        value = arr.numpy()
        if value.dtype.kind == "f":  # integer buffers (BatchNorm's batch counters) stay as they are
            value = received[key] + poisoned(value - received[key], mode, scale, flip, rng)
        out[key] = Array(np.array(value, order="C"))
    reply.content["arrays"] = ArrayRecord(out)  # no metric marks it: the drill knows its attackers by partition
    return reply
