"""The camera's answers in the per-camera snapshot exchange (its personal part, its activation ranges, its scores),
asked by query messages after the rounds or carried by train messages during them (`ride`)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord

from client import calibration, camera
from shared.arrays import pack, to_record
from shared.config import Config
from shared.snapshot.calibration import to_lists
from shared.snapshot.exchange import RIDE, RIDE_ARRAYS


def personal_part(model, config, context: Context, cfg: Config) -> camera.PersonalPart:
    """The camera's kept part for the run's plan (the server's `personal`, keep-finetuned, Ditto)."""
    mode = str(config.get("personal", "none"))  # the server's plan (shared.train.local_plan)
    path = camera.personal_file(context.node_config, cfg, model.yaml, mode)
    finetuned = bool(config.get("keep-finetuned", False)) or float(config.get("ditto-lambda", 0.0)) > 0
    kept = camera.personal_file(context.node_config, cfg, model.yaml, "finetuned") if finetuned else None
    return camera.PersonalPart(model, mode, context.state, path, finetuned, kept)


def own(arrays, config, context: Context, cfg: Config) -> tuple[ArrayRecord, list[str]]:
    """The tensors of what this camera runs that differ from the model in `arrays`, packed in the model's own key
    order, and their names: the server rebuilds the layout from those names and its copy of the model."""
    model = camera.global_model(arrays, config)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    source = personal_part(model, config, context, cfg).runs(model)  # 'global': none kept for this structure
    mine = calibration.personal_params(model, received) if source != "global" else {}
    return (pack(to_record(mine)) if mine else to_record({})), list(mine)


def ranges(graph: bytes, context: Context, cfg: Config) -> tuple[ConfigRecord, MetricRecord]:
    """Activation ranges of the sent fp32 graph over this camera's frames, and that graph's score on its val split."""
    data = camera.node_data(context.node_config, cfg)
    found, frames = calibration.calibrate(graph, data, cfg)
    fp32 = calibration.onnx_score(graph, data, cfg)
    stats = ConfigRecord({"camera-id": ident(context), **to_lists(found)})
    return stats, MetricRecord({"frames": frames, "num-examples": fp32["num-examples"], "map50-fp32": fp32["map50"],
                                "map-fp32": fp32["map"]})


def score(graph: bytes, context: Context, cfg: Config, against: bytes | None = None) -> MetricRecord:
    """The int8 candidate's score on this camera's val split and, beside it, the global snapshot's (`against`, what
    the camera runs otherwise): the figures the server gates it on."""
    data = camera.node_data(context.node_config, cfg)
    got = calibration.onnx_score(graph, data, cfg)
    out = {"num-examples": got["num-examples"], "map50-int8": got["map50"], "map-int8": got["map"]}
    if against is not None:
        ref = calibration.onnx_score(against, data, cfg)
        out.update({"map50-global": ref["map50"], "map-global": ref["map"]})
    return MetricRecord(out)


def ident(context: Context) -> str:
    return calibration.camera_id(context.node_config, context.node_id)


def ride(asked: ConfigRecord, arrays, config, context: Context, cfg: Config) -> dict:
    """A train message's exchange step (after fine-tuning, so the personal part is this round's): the records to add
    to the reply. Only the step's own answer: no frames, no tensors but the personal part."""
    step, answer = str(asked["step"]), {"step": str(asked["step"]), "base": str(asked["base"]),
                                          "camera-id": ident(context)}
    try:
        return _step(step, answer, asked, arrays, config, context, cfg)
    except Exception as err:  # noqa: BLE001 - this round's update still goes; the server names the culprit
        return {RIDE: ConfigRecord({**answer, "error": f"{type(err).__name__}: {err}"})}


def _step(step: str, answer: dict, asked: ConfigRecord, arrays, config, context: Context, cfg: Config) -> dict:
    if step == "personal":
        record, keys = own(arrays, config, context, cfg)
        return {RIDE: ConfigRecord({**answer, "keys": keys}), RIDE_ARRAYS: record}
    if step == "calibrate":
        stats, metrics = ranges(bytes(asked["onnx"]), context, cfg)
        return {RIDE: ConfigRecord({**answer, **dict(stats), **{f"metric-{k}": v for k, v in metrics.items()}})}
    if step == "score":
        metrics = score(bytes(asked["onnx"]), context, cfg, bytes(asked["global"]) if "global" in asked else None)
        return {RIDE: ConfigRecord({**answer, **{f"metric-{k}": v for k, v in metrics.items()}})}
    raise ValueError(f"exchange step {step!r} is not one of personal, calibrate, score")
