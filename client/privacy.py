"""A camera's end of fed.dp: Flower's fixedclipping_mod (central DP) or LocalDpMod (local DP), applied to the keys the
camera releases, as one ClientApp mod that shows them the per-tensor update they expect."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, Context, Message

log = logging.getLogger("fedcam.client")


def bn_stats_train(config, cfg) -> bool:
    """Whether local training changes BatchNorm statistics (then they are released, with noise, under DP)."""
    return not cfg.fed.freeze_bn or bool(config.get("adabn", False))


def released_layout(model_yaml, names: list[str], config, cfg):
    """(layout of the whole model, layout of the reply the app makes, the keys this camera releases under DP)."""
    from shared import models, personal
    from shared.arrays import layout_of, to_record

    model = models.build(model_yaml, names)  # the layout only: the server built the model from the same yaml
    layout = layout_of(to_record(model))
    mode, dp = str(config.get("personal", "none")), str(config.get("dp", "off"))
    own = set(personal.personal_keys(model, mode)) if mode != "none" else set()
    withheld = set(personal.withheld_keys(model, mode, dp, bn_stats_train(config, cfg)))
    return layout, [i for i in layout if i[0] not in own], [k for k, _, _ in layout if k not in withheld]


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower ClientApp mod for train messages under fed.dp. Order on the camera: this mod runs inside the compression
    mod, so the update is clipped (and, local DP, noised) before it is compressed; the compression mod then limits
    what the server will decode to the same bound (client/wire.py). Every other message passes."""
    config = msg.content["config"] if msg.has_content() and "config" in msg.content.config_records else {}
    mode = str(config.get("dp", "off"))
    if msg.metadata.message_type != "train" or mode == "off":
        return call_next(msg, context)
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

    from shared.arrays import is_packed, pack, unpack
    from shared.config import load_config

    cfg, full = load_config(context.run_config), msg.content["arrays"]
    layout, reply_layout, released = released_layout(json.loads(str(config["model-yaml"])), list(config["names"]),
                                                     config, cfg)
    packed = is_packed(full)
    view = _subset(unpack(full, layout) if packed else full, released)
    before = {}

    def app(inner: Message, ctx: Context) -> Message:
        inner.content["arrays"] = full  # the app trains the whole model, as without DP
        reply = call_next(inner, ctx)
        if reply.has_error():
            return reply
        got = reply.content["arrays"]
        reply.content["arrays"] = _subset(unpack(got, reply_layout) if is_packed(got) else got, released)
        before["norm"] = _norm(reply.content["arrays"], view)
        # LocalDpMod draws its noise from numpy's global generator: reseed it from the OS, so no seed the server
        # knows (the round seed) can have fixed it.
        np.random.seed(None)
        return reply

    msg.content["arrays"] = view  # what Flower's mods clip against: the released keys, one array each
    clip, noise, delta = (float(config.get(k, d)) for k, d in (("dp-clip", 1.0), ("dp-noise", 1.0), ("dp-delta", 1e-5)))
    dp = fixedclipping_mod if mode == "central" else LocalDpMod(clip, clip, local_epsilon(noise, delta), delta)
    reply = dp(msg, context, app)
    if reply.has_error():
        return reply
    arrays = reply.content["arrays"]
    metrics = reply.content["metrics"]
    metrics["dp-norm"] = before["norm"]  # before clipping: what a fitting fed.dp-clip is read from (README)
    metrics["dp-clipped"] = float(before["norm"] > clip)
    reply.content["arrays"] = pack(arrays) if packed else arrays
    return reply


def local_epsilon(noise: float, delta: float) -> float:
    """The per-release epsilon that makes LocalDpMod (std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, with the
    clipping norm as sensitivity) add noise of std noise * clip: one noise multiplier for both modes. The run's
    epsilon is the accountant's (server/federation/privacy.py), not this classic bound."""
    return float(np.sqrt(2 * np.log(1.25 / delta)) / noise)


def _subset(record, keys: list[str]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, record[k]) for k in keys))


def _norm(new: ArrayRecord, old: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((new[k].numpy().astype(np.float64) - old[k].numpy()) ** 2) for k in old)))
