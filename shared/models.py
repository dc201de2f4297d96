"""Teacher and student detectors: built from Ultralytics yaml, saved and loaded without unpickling code."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from shared import pruned
from shared.env import prepare_ultralytics

prepare_ultralytics()
from ultralytics.nn.modules import Conv  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402

# Ultralytics' default loss gains (box, cls, dfl); the loss reads them from model.args.
LOSS_GAINS = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
FORMAT = "fedcam-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model it is loaded into."""


# Activations a model yaml may name. Ultralytics eval()s the yaml's `activation` string, so only these pass.
ACTIVATIONS = {"silu": None, "relu": "nn.ReLU()"}  # None: Ultralytics' default (SiLU)
YAML_ACTIVATIONS = {"nn.ReLU()", "nn.SiLU()", "nn.ReLU6()", "nn.Hardswish()", "nn.LeakyReLU(0.1)", "nn.GELU()"}


def model_yaml(family: str, scale: str, width: float | None = None, activation: str = "silu") -> dict[str, Any]:
    """The Ultralytics model dict for e.g. ('yolov8', 'n'), optionally narrowed to `width` and with another
    activation (ReLU folds into int8 convolutions; SiLU runs as two extra int8 ops per layer)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}' ({', '.join(ACTIVATIONS)})")
    try:
        cfg = copy.deepcopy(yaml_model_load(f"{family}.yaml"))
    except FileNotFoundError:
        raise ValueError(f"unknown model family '{family}' (Ultralytics yaml such as yolov8, yolo11)") from None
    if scale not in cfg.get("scales", {}):
        raise ValueError(f"model family '{family}' has no scale '{scale}' (scales: {sorted(cfg.get('scales', {}))})")
    cfg["scale"] = scale
    if width:
        depth, _, max_ch = cfg["scales"][scale]
        cfg["scales"][scale] = [depth, float(width), max_ch]
    cfg.pop("yaml_file", None)
    if ACTIVATIONS[activation]:
        cfg["activation"] = ACTIVATIONS[activation]
    return cfg


def build(cfg: dict[str, Any], names: list[str]) -> DetectionModel:
    """A fresh detector for `names` from a model dict; quiet, with loss gains set."""
    act = cfg.get("activation")
    if act is not None and act not in YAML_ACTIVATIONS:
        raise CheckpointError(f"model activation {act!r} is not one of {sorted(YAML_ACTIVATIONS)}")
    default_act = Conv.default_act
    try:
        model = DetectionModel(copy.deepcopy(cfg), nc=len(names), verbose=False)
    finally:  # Ultralytics sets a yaml's activation on the Conv class itself: later models must not inherit it
        Conv.default_act = default_act
    if pruned.KEY in cfg:  # a pruned student: narrow the layers to the widths its yaml records
        try:
            pruned.apply(model, cfg[pruned.KEY])
        except pruned.StructureError as err:
            raise CheckpointError(str(err)) from None
    model.names = dict(enumerate(names))
    model.args = LOSS_GAINS
    return model


def build_student(mcfg, names: list[str]) -> DetectionModel:
    return build(model_yaml(mcfg.family, mcfg.student_scale, mcfg.student_width or None, mcfg.student_activation),
                 names)


def build_teacher(mcfg, names: list[str]) -> DetectionModel:
    return build(model_yaml(mcfg.family, mcfg.teacher_scale), names)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: DetectionModel, imgsz: int) -> float:
    """Forward GFLOPs at imgsz×imgsz (thop, as Ultralytics reports them)."""
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(model, imgsz))


def checkpoint_blob(yaml: dict[str, Any], names: list[str], state_dict: dict[str, torch.Tensor],
                    **meta: Any) -> dict[str, Any]:
    """The fedcam checkpoint: weights + model yaml + names, plain tensors and dicts (for student, teacher, rounds)."""
    return {"format": FORMAT, "yaml": yaml, "names": list(names), "state_dict": state_dict, "meta": meta}


def save(model: DetectionModel, path: Path | str, **meta: Any) -> Path:
    """Write weights + model yaml + names as plain tensors and dicts (loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = checkpoint_blob(model.yaml, [model.names[i] for i in sorted(model.names)],
                           {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, **meta)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a truncated checkpoint under the real name
    return path


def load(path: Path | str) -> DetectionModel:
    """Load a fedcam checkpoint or a user's Ultralytics .pt, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return from_blob(read(path), path)


def is_fedcam(blob: Any) -> bool:
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def from_blob(blob: Any, path: Path | str) -> DetectionModel:
    """The detector in what read() returned: a fedcam checkpoint, or an Ultralytics one (its EMA model first)."""
    if is_fedcam(blob):
        model = build(blob["yaml"], blob["names"])
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path}: weights do not fit the checkpoint's own model yaml ({first})") from None
        return model
    src = blob.get("ema") or blob.get("model") if isinstance(blob, dict) else None
    if not isinstance(src, DetectionModel):
        raise CheckpointError(f"{path}: neither a fedcam checkpoint nor an Ultralytics detection checkpoint")
    names = src.names if isinstance(src.names, dict) else dict(enumerate(src.names))
    model = build(src.yaml, [names[i] for i in sorted(names)])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in src.state_dict().items()})
    return model


# Classes an Ultralytics checkpoint pickles: layers, containers and plain namespaces, no callables of
# consequence. weights_only=True still refuses everything outside this allowlist.
_SAFE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.", "ultralytics.utils.", "collections.", "torch.")
_SAFE_NAMES = {"types.SimpleNamespace", "builtins.set", "builtins.frozenset", "pathlib.PosixPath"}


def read(path: Path) -> Any:
    """torch.load(weights_only=True), allowlisting only the layer classes an Ultralytics checkpoint pickles."""
    import importlib
    import pickle
    import zipfile

    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # a pickle (torch's format before zip) starts with its protocol opcode
    if not legacy and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (neither torch's zip format nor a pickle)")
    allowed: list[Any] = []
    for _ in range(200):  # each pass allowlists one more module class the file names
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            name = _unsupported_global(str(err))
            safe = name and (name in _SAFE_NAMES or name.startswith(_SAFE_PREFIXES))
            if not safe or name.startswith(("torch._", "torch.hub", "torch.ops")):
                raise CheckpointError(f"{path}: refused to unpickle {name or 'an unsupported object'}") from None
            module, _, attr = name.rpartition(".")
            obj = importlib.import_module(module)
            allowed.append(getattr(obj, attr))
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    raise CheckpointError(f"{path}: too many distinct classes pickled")


def _unsupported_global(message: str) -> str | None:
    import re

    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None
