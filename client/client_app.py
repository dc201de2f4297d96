"""Flower ClientApp: thin Message adapters around client.camera (fine-tune, evaluate) and client.exchange (the
per-camera snapshot exchange: query.personal, query.calibrate, query.score, or its steps riding on train)."""

from __future__ import annotations

import contextlib
import copy
import sys
import time

import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from client.attack import attack_mod  # noqa: E402
from client.privacy import privacy_mod  # noqa: E402
from client.secure import secure_mod  # noqa: E402
from client.wire import compression_mod  # noqa: E402

# fed.compress and fed.dp as mods: the task code below sees the whole global model and answers with its own
# weights. The first mod is the outermost: downloads are decompressed before the privacy mod sees them, and
# updates are clipped (and noised, local DP) before they are compressed. Outermost, fed.secure-aggregation's: the
# SecAgg+ stages, and the trained update masked on its way out (the run config refuses it with compression or DP).
# Innermost, the attack drill's (drill.attack, off by default): an attacking camera's update replaced before it leaves.
app = ClientApp(mods=[secure_mod, compression_mod, privacy_mod, attack_mod])


class Stages:
    """Seconds per stage of one message (setup, evaluation, fine-tuning, reply), reported with the metrics: where a
    simulated round's time goes outside training (simulations/bench_scale.py)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@app.train()
def train(msg: Message, context: Context) -> Message:
    started, stage = time.time(), Stages()
    with stage("import"):
        from client import camera  # torch/Ultralytics load on first message, not at import
        from client.exchange import personal_part, ride
        from shared.arrays import is_packed, pack
        from shared.snapshot.exchange import RIDE
        from shared.train import CONTROL
        from shared.config import load_config
    with stage("setup"):  # run config, the global model rebuilt from its yaml, the camera's data and personal part
        cfg = load_config(context.run_config)
        config = msg.content["config"]
        model = camera.global_model(msg.content["arrays"], config)
        data = camera.node_data(context.node_config, cfg)
        part = personal_part(model, config, context, cfg)
    # The received global model's score on this camera: Flower's evaluate stage without a second message.
    first = bool(config.get("evaluate-first", False))
    with stage("eval"):
        before = camera.local_evaluate(model, data, cfg) if first else {}
    source = part.restore(model)
    adabn = bool(config.get("adabn", False))
    if adabn:
        camera.adapt_bn(model, data, cfg)
    ditto = float(config.get("ditto-lambda", 0.0))
    if ditto > 0:  # Ditto: the camera's own model goes on from where it was, pulled toward the global one
        mine, anchor = copy.deepcopy(model), [p.detach().clone() for p in model.parameters()]
        source = part.runs(mine)
    runs_global = first and (part.keys or adabn) and not part.finetuned
    with stage("eval"):
        own = camera.local_evaluate(model, data, cfg) if runs_global else {}  # what it runs
    control = scaffold_control(model, part, msg, context, cfg) if config.get("scaffold", False) else None
    with stage("finetune"):
        metrics = camera.local_finetune(model, data, cfg, config,
                                       teacher=camera.teacher_path(context.node_config, cfg), control=control)
    if adabn:  # statistics of the weights it now has, not the running averages training left behind
        camera.adapt_bn(model, data, cfg)
    runs = model
    if ditto > 0:  # the same budget again, on its own model (Li et al. 2021): twice the local compute
        runs, teacher = mine, camera.teacher_path(context.node_config, cfg)
        with stage("finetune"):
            mine_metrics = camera.local_finetune(mine, data, cfg, config, teacher, anchor=anchor, mu=ditto)
        metrics.update({f"ditto-{k}": mine_metrics[k] for k in ("loss", "train-seconds", "update-norm")})
    if first and part.finetuned:  # it runs what it just fine-tuned
        with stage("eval"):
            own = camera.local_evaluate(runs, data, cfg)
    with stage("reply"):
        part.keep(model, runs)
        reply = part.shared(model)  # the personal part never leaves the camera
        reply = pack(reply) if is_packed(msg.content["arrays"]) else reply  # answer in the format it came in
    content = RecordDict({"arrays": reply})  # the weights first: the server screens the first ArrayRecord
    if control is not None:
        content[CONTROL] = control.update
    if RIDE in msg.content.config_records:  # a step of the per-camera snapshot exchange rides on this round
        with stage("exchange"):
            for name, record in ride(msg.content[RIDE], msg.content["arrays"], config, context, cfg).items():
                content[name] = record
    metrics.update({f"global-{k}": v for k, v in before.items()})
    metrics.update({f"own-{k}": v for k, v in own.items()})
    metrics["personal-kept"] = float(source != "global")  # 0: a first round, a late joiner or a reset part
    if "partition-id" in context.node_config:  # which simulated camera this was (a benchmark redoes its work)
        metrics["partition"] = int(context.node_config["partition-id"])
    if (ray := sys.modules.get("ray")) is not None and ray.is_initialized():  # a Ray worker: on which node
        metrics["ray-node"] = int(ray.get_runtime_context().get_node_id()[:12], 16)  # 48 bits: exact as a float
    metrics.update({f"{k}-seconds": v for k, v in stage.seconds.items()})
    metrics["seconds"] = time.time() - started
    # The process' age when the message arrived: a fresh ClientApp process per message under a SuperNode, a
    # long-lived worker in simulation.
    metrics["process-age"] = started - psutil.Process().create_time()
    metrics["sent-at"] = time.time()  # the server's wall clock on arrival, minus this: the way back (bench_deploy)
    content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def scaffold_control(model, part, msg: Message, context: Context, cfg):
    """fed.strategy = scaffold: this camera's control variate, with the server's c from the train message."""
    from client import camera
    from client.scaffold import ControlVariate
    from shared.train import CONTROL

    path = camera.personal_file(context.node_config, cfg, model.yaml, "scaffold")
    server = msg.content.array_records.get(CONTROL)
    return ControlVariate(model, part.keys, server, context.state, path)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import camera
    from client.exchange import personal_part
    from shared.config import load_config

    cfg = load_config(context.run_config)
    model = camera.global_model(msg.content["arrays"], msg.content["config"])
    personal_part(model, msg.content["config"], context, cfg).runs(model)  # score what this camera runs
    metrics = camera.local_evaluate(model, camera.node_data(context.node_config, cfg), cfg)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("personal")
def personal(msg: Message, context: Context) -> Message:
    """The camera's personal parameters for the snapshot's structure: what it runs, where that differs from it."""
    from client import exchange
    from shared.config import load_config

    record, keys = exchange.own(msg.content["arrays"], msg.content["config"], context, load_config(context.run_config))
    reply = ConfigRecord({"camera-id": exchange.ident(context), "keys": keys})
    return Message(RecordDict({"arrays": record, "config": reply}), reply_to=msg)


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    """Activation ranges of the sent fp32 graph over this camera's frames, and that graph's score on its val split."""
    from client import exchange
    from shared.config import load_config

    stats, metrics = exchange.ranges(bytes(msg.content["config"]["onnx"]), context, load_config(context.run_config))
    return Message(RecordDict({"calibration": stats, "metrics": metrics}), reply_to=msg)


@app.query("score")
def score(msg: Message, context: Context) -> Message:
    """The int8 candidate's score on this camera's val split, and the global snapshot's: the figures the server gates
    it on."""
    from client import exchange
    from shared.config import load_config

    config = msg.content["config"]
    metrics = exchange.score(bytes(config["onnx"]), context, load_config(context.run_config),
                             bytes(config["global"]) if "global" in config else None)
    return Message(RecordDict({"metrics": metrics, "config": ConfigRecord({"camera-id": exchange.ident(context)})}),
                   reply_to=msg)
