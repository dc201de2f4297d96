"""The personal part of a camera's student (fed.personal): which weights never leave it, and where it keeps them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from shared.config import PERSONAL_MODES as MODES
from shared.env import prepare_ultralytics

prepare_ultralytics()
from ultralytics.nn.modules import Detect  # noqa: E402

STATE_KEY = "fedcam-personal"  # the node's context.state entry while the node runs


class PersonalError(ValueError):
    """A personal part that does not fit the model (another architecture or mode): it is not used."""


def personal_keys(model: nn.Module, mode: str) -> list[str]:
    """State-dict keys that stay on the camera. bn (FedBN, Li et al. 2021): every BatchNorm's statistics and
    affine parameters, since cameras differ in light, noise and blur; head (FedPer, Arivazhagan et al. 2019): the
    head's output convs (box bins and class scores), since cameras differ in class mix and object scale."""
    if mode not in MODES:
        raise ValueError(f"config key 'fed.personal': '{mode}' is not one of {', '.join(MODES)}")
    prefixes: list[str] = []
    if "bn" in mode.split("+"):
        prefixes += [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if "head" in mode.split("+"):
        names = {id(m): n for n, m in model.named_modules()}
        for head in (m for m in model.modules() if isinstance(m, Detect)):
            prefixes += [f"{names[id(branch[-1])]}." for branch in (*head.cv2, *head.cv3)]
    return [k for k in model.state_dict() if k.startswith(tuple(prefixes))]


def withheld_keys(model: nn.Module, mode: str, dp: str = "off", bn_stats_train: bool = True) -> list[str]:
    """Keys a camera's reply leaves out: its personal part, and under fed.dp every key local training does not change
    (integer counters; BatchNorm statistics while fed.freeze-bn holds them and AdaBN is off). Differential privacy
    noises every value it releases: released constants would only gain noise, so they stay the server's."""
    keys = set(personal_keys(model, mode)) if mode != "none" else set()
    if dp != "off":
        state = model.state_dict()
        keys |= {k for k, v in state.items() if not v.is_floating_point()}
        if not bn_stats_train:
            keys |= {k for k in state if k.endswith((".running_mean", ".running_var"))}
    return [k for k in model.state_dict() if k in keys]


def part_of(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def apply_part(model: nn.Module, part: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    """Put a camera's personal part into `model`; PersonalError (nothing changed) unless it fits exactly."""
    state = model.state_dict()
    if set(part) != set(keys):
        odd = sorted(set(part) ^ set(keys))[:3]
        raise PersonalError(f"personal part has other keys than the model's personal keys, e.g. {odd}")
    for k in keys:
        if tuple(part[k].shape) != tuple(state[k].shape) or part[k].dtype != state[k].dtype:
            raise PersonalError(f"personal {k}: {tuple(part[k].shape)} {part[k].dtype} does not fit "
                                f"{tuple(state[k].shape)} {state[k].dtype}")
    model.load_state_dict({**state, **part})


def part_file(folder: Path, model_yaml: Mapping, mode: str, camera: str) -> Path:
    """One file per camera, architecture and mode: a part never lands in a model it was not trained for."""
    arch = hashlib.sha256(json.dumps(model_yaml, sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder) / f"personal_{camera}_{mode.replace('+', '-')}_{arch}.pt"


def save_part(path: Path, part: Mapping[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(part), tmp)
    tmp.replace(path)  # atomic: a crash mid-write keeps the previous part


def load_part(path: Path) -> dict[str, torch.Tensor] | None:
    """The camera's saved part, None if it has none yet; PersonalError for a file that is not one."""
    if not path.is_file():
        return None
    try:
        part = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise PersonalError(f"{path}: not a readable personal part ({type(err).__name__})") from None
    if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
        raise PersonalError(f"{path}: not a personal part (expected a dict of tensors)")
    return part
