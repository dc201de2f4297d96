"""A camera's end of fed.secure-aggregation: Flower's secaggplus_mod, with the one SecAgg+ stage that trains translated
from Flower's legacy fit layout to the Message layout the task code speaks and back; only the masked update leaves."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

FIT_ARRAYS, FIT_CONFIG = "fitins.parameters", "fitins.config"  # the legacy FitIns' records (Flower's compat layout)


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower ClientApp mod, outermost: a SecAgg+ message goes to Flower's secaggplus_mod (its key setup, share and
    unmask stages answer there); every other message passes untouched."""
    if msg.metadata.message_type != "train" or not msg.has_content() or \
            RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda inner, ctx: _fit(inner, ctx, call_next))


def _fit(msg: Message, context: Context, call_next) -> Message:
    """The masked-vector stage: the global model in Flower's FitIns becomes the task code's train message; its
    reply becomes a FitRes whose parameters are the update (trained - received) of the summed keys, which
    secaggplus_mod quantizes and masks. Every camera counts once (weight 1): the mean is uniform."""
    config = msg.content.config_records[FIT_CONFIG]
    received = msg.content.array_records[FIT_ARRAYS]
    keys, summed = list(config["keys"]), list(config["summed"])
    arrays = ArrayRecord(OrderedDict((k, Array(a.numpy())) for k, a in zip(keys, received.values(), strict=True)))
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    got = reply.content["arrays"]
    missing = [k for k in summed if k not in got]
    if missing:
        raise ValueError(f"fed.secure-aggregation: the trained model lacks keys the run sums, e.g. {missing[:3]}")
    update = [(got[k].numpy().astype(np.float64) - arrays[k].numpy()).astype(np.float32) for k in summed]
    metrics = {k: v for k, v in reply.content["metrics"].items() if isinstance(v, (int, float))}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
