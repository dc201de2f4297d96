"""Flower ClientApp: thin Message adapters around client.task (fine-tune and evaluate on this camera's data)."""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import shared  # noqa: F401  (offline environment first)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import task as ctask  # torch/Ultralytics load on first message, not at import
    from shared.arrays import to_record
    from shared.config import load_config

    started = time.time()
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    model = ctask.global_model(msg.content["arrays"], config)
    metrics = ctask.local_finetune(model, ctask.node_data(context.node_config, cfg), cfg, config,
                                   teacher=ctask.teacher_path(context.node_config, cfg))
    metrics["seconds"] = time.time() - started
    return Message(RecordDict({"arrays": to_record(model), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import task as ctask
    from shared.config import load_config

    cfg = load_config(context.run_config)
    model = ctask.global_model(msg.content["arrays"], msg.content["config"])
    metrics = ctask.local_evaluate(model, ctask.node_data(context.node_config, cfg), cfg)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
