"""Flower ClientApp: thin Message adapters around client.camera (fine-tune and evaluate on this camera's data)."""

from __future__ import annotations

import time

import psutil
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    from client import camera  # torch/Ultralytics load on first message, not at import
    from shared.arrays import is_packed, pack, to_record
    from shared.config import load_config

    imported = time.time()
    cfg = load_config(context.run_config)
    config = msg.content["config"]
    model = camera.global_model(msg.content["arrays"], config)
    data = camera.node_data(context.node_config, cfg)
    # The received global model's score on this camera: Flower's evaluate stage without a second message.
    before = camera.local_evaluate(model, data, cfg) if config.get("evaluate-first", False) else {}
    metrics = camera.local_finetune(model, data, cfg, config,
                                   teacher=camera.teacher_path(context.node_config, cfg))
    metrics.update({f"global-{k}": v for k, v in before.items()})
    metrics["seconds"] = time.time() - started
    # Where a message's time goes outside training: the process' age when the message arrived (a fresh
    # ClientApp process per message under a SuperNode; a long-lived worker in simulation) and the task imports.
    metrics["process-age"] = started - psutil.Process().create_time()
    metrics["import-seconds"] = imported - started
    reply = to_record(model)
    reply = pack(reply) if is_packed(msg.content["arrays"]) else reply  # answer in the format it came in
    return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import camera
    from shared.config import load_config

    cfg = load_config(context.run_config)
    model = camera.global_model(msg.content["arrays"], msg.content["config"])
    metrics = camera.local_evaluate(model, camera.node_data(context.node_config, cfg), cfg)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
