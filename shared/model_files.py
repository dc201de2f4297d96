"""What kind of model file a path is (checkpoint, round checkpoint, ONNX snapshot) and a predictor to evaluate it."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import models
from shared.data.dataset import DataError
from shared.evaluate import EvalResult, Predictor, TorchPredictor, evaluate
from shared.snapshot.format import MANIFEST_FILE, MODEL_FILE, Manifest, SnapshotError, sha256_file
from shared.run_dir import RunDir
from shared.snapshot.inference import Detector, NmsSettings

EXPECTED = ("a fedcam or Ultralytics .pt checkpoint, a run's checkpoints/global_rNNNN.pt, "
            "a snapshot folder or a detector .onnx")


class ModelFileError(ValueError):
    """A path that is no model fedcam can evaluate; the message (one line) says what it is and what was expected."""


@dataclass
class ModelFile:
    path: Path
    kind: str  # "fedcam checkpoint", "round checkpoint", "Ultralytics checkpoint", "ONNX snapshot", "ONNX model"
    names: list[str]
    imgsz: int | None = None  # fixed input size of an ONNX model; None: the config's data.imgsz
    model: torch.nn.Module | None = None  # the torch detector; None for ONNX
    onnx: Path | None = None

    def predictor(self, settings: NmsSettings, threads: int = 1) -> Predictor:
        if self.model is not None:
            return TorchPredictor(self.model, settings)
        return Detector(self.onnx, settings=settings, threads=threads)

    def check_names(self, names: list[str], data: Path | str) -> None:
        if self.names != list(names):
            raise ModelFileError(f"{self.path}: {self.kind} for classes {self.names}, but {data} has {list(names)} "
                                 "(expected the same classes in the same order)")


def open_model(path: Path | str) -> ModelFile:
    """Recognize `path` and load it (torch weights with weights_only=True); ModelFileError if it is no such model."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ModelFileError(f"{path}: a folder without {MODEL_FILE}; expected a snapshot folder "
                                 f"({MODEL_FILE} + {MANIFEST_FILE}) or a model file")
        return _onnx(path / MODEL_FILE)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; expected {EXPECTED}")
    if path.suffix.lower() == ".onnx":
        return _onnx(path)
    return _torch(path)


def score(mf: ModelFile, data_yaml: Path | str, cfg, split: str = "val") -> EvalResult:
    """mAP on one split of `data_yaml` (whose names must be the model's), at an ONNX model's own input size.
    DataError for a data problem, ModelFileError for names that differ."""
    from shared import task

    names = task.names_of(data_yaml)
    mf.check_names(names, data_yaml)
    if mf.imgsz and mf.imgsz != cfg.data.imgsz:
        cfg = cfg.replace(**{"data.imgsz": mf.imgsz})
    task.set_threads(cfg.train.threads)
    try:
        loader = task.make_loader(data_yaml, split, cfg, False)
    except KeyError as err:  # no such split
        raise DataError(err.args[0]) from None
    return evaluate(mf.predictor(task.nms_settings(cfg), cfg.train.threads), loader, names)


def _torch(path: Path) -> ModelFile:
    try:
        blob = models.read(path)
    except models.CheckpointError as err:
        raise ModelFileError(f"{_first_line(err)}; expected {EXPECTED}") from None
    if _is_state_dict(blob):
        return _old_round_checkpoint(path, blob)
    try:
        model = models.from_blob(blob, path)
    except models.CheckpointError as err:
        raise ModelFileError(f"{_first_line(err)} ({_describe(blob)}); expected {EXPECTED}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:  # broken yaml or names
        raise ModelFileError(f"{path}: a damaged fedcam checkpoint ({type(err).__name__}: {_first_line(err)}); "
                             f"expected {EXPECTED}") from None
    if not models.is_fedcam(blob):
        kind = "Ultralytics checkpoint"
    else:
        meta = blob.get("meta")
        kind = "round checkpoint" if isinstance(meta, dict) and "round" in meta else "fedcam checkpoint"
    return ModelFile(path, kind, [model.names[i] for i in sorted(model.names)], model=model)


def _old_round_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> ModelFile:
    """A round checkpoint from before they described their model: plain weights, architecture from the run."""
    from shared import task
    from shared.config import load_config

    run = RunDir(path.parent.parent)
    run_config = run.config
    if path.parent != run.checkpoints:
        raise ModelFileError(f"{path}: plain weights without a model description; expected {EXPECTED} (an old "
                             "round checkpoint only inside its run folder's checkpoints/)")
    if not run_config.is_file():
        raise ModelFileError(f"{path}: an old round checkpoint (plain weights) without its run's {run_config} "
                             "to rebuild the model from; expected the run folder around it")
    try:
        cfg = load_config({**json.loads(run_config.read_text()), "resume": True})
        start = cfg.model.student_checkpoint
        model = models.load(start) if start else models.build_student(cfg.model,
                                                                      task.names_of(task.base_yaml(cfg)))
        model.load_state_dict(state)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: an old round checkpoint (plain weights) whose model could not be rebuilt "
                             f"from {run_config}: {_first_line(err)}") from None
    return ModelFile(path, "round checkpoint", [model.names[i] for i in sorted(model.names)], model=model)


def _onnx(path: Path) -> ModelFile:
    import onnxruntime as ort

    manifest = _manifest_beside(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors reach the caller as exceptions; no warnings on stderr
    try:  # onnxruntime reads it as evaluation will: what it cannot run is no model here
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(err).__name__}); expected {EXPECTED}") \
            from None
    inputs, outputs = [i.shape for i in session.get_inputs()], [o.shape for o in session.get_outputs()]
    meta = session.get_modelmeta().custom_metadata_map
    names = manifest.names if manifest else _names_from(meta)
    what = f"{path}: an ONNX model with inputs {inputs} and outputs {outputs}"
    detector = (len(inputs) == 1 and len(inputs[0]) == 4 and inputs[0][1] == 3 and len(outputs) == 1
                and len(outputs[0]) == 3 and meta.get("task", "detect") == "detect")
    if not detector:
        raise ModelFileError(f"{what}; expected a detector: images (1, 3, S, S) -> (1, 4 + classes, anchors)")
    if names is None:
        raise ModelFileError(f"{what} but no class names (no {MANIFEST_FILE} beside it, no 'names' metadata); "
                             "expected a fedcam snapshot or an Ultralytics ONNX export")
    if isinstance(outputs[0][1], int) and outputs[0][1] != 4 + len(names):
        raise ModelFileError(f"{what}: {outputs[0][1]} output channels for {len(names)} classes; expected "
                             f"4 + {len(names)}")
    height, width = inputs[0][2:]
    imgsz = height if isinstance(height, int) and height == width else None
    imgsz = imgsz or (manifest.imgsz if manifest else _imgsz_from(meta))
    if not imgsz or (manifest and manifest.imgsz != imgsz):
        raise ModelFileError(f"{what}: input size unknown or not the manifest's ({manifest and manifest.imgsz}); "
                             "expected a square, fixed input size")
    return ModelFile(path, "ONNX snapshot" if manifest else "ONNX model", list(names), imgsz=imgsz, onnx=path)


def _manifest_beside(model: Path) -> Manifest | None:
    file = model.parent / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = Manifest.from_bytes(file.read_bytes())
    except SnapshotError as err:
        raise ModelFileError(f"{file}: {_first_line(err)}; expected a fedcam snapshot manifest") from None
    if model.stat().st_size != manifest.size or sha256_file(model) != manifest.sha256:
        raise ModelFileError(f"{model}: size or sha256 differs from {file}; expected the model that manifest "
                             "describes")
    return manifest


def _names_from(meta: dict[str, str]) -> list[str] | None:
    """Ultralytics' metadata: names as the str() of a dict {0: 'car', ...}."""
    try:
        names = ast.literal_eval(meta["names"])
    except (KeyError, ValueError, SyntaxError):
        return None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        return [str(names[i]) for i in range(len(names))]
    return [str(n) for n in names] if isinstance(names, list) else None


def _imgsz_from(meta: dict[str, str]) -> int | None:
    try:
        size = ast.literal_eval(meta["imgsz"])
    except (KeyError, ValueError, SyntaxError):
        return None
    return size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else None


def _is_state_dict(blob: Any) -> bool:
    return isinstance(blob, dict) and bool(blob) and all(isinstance(v, torch.Tensor) for v in blob.values())


def _describe(blob: Any) -> str:
    if isinstance(blob, dict):
        keys = sorted(map(str, blob))
        return f"a dict with keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
    return f"a {type(blob).__name__}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
