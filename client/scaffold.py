"""A camera's SCAFFOLD control variate c_k (fed.strategy = scaffold): in the node's context.state while it runs and on
its disk across restarts, like its personal part; the server's side is server.federation.scaffold."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from shared import personal
from shared.arrays import to_record, to_state_dict

log = logging.getLogger("fedcam.client")
STATE_KEY = "fedcam-scaffold"


class ControlVariate:
    """c_k of this camera for the shared trainable parameters (a personal part is never corrected: it is the
    camera's own). A camera without one (first round, late joiner, an unusable file) starts from zero."""

    def __init__(self, model, withheld: list[str], server, state, path: Path):
        self.state, self.path = state, path
        self.server = to_state_dict(server) if server is not None else {}  # c, as the train message carried it
        self.update = None  # c_k+ − c_k once this round's fine-tuning is done: what the reply carries
        skip = set(withheld)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and n not in skip]
        shapes = dict(model.named_parameters())
        self.own = self._load() or {}
        if any(n not in self.own or self.own[n].shape != shapes[n].shape for n in self.names):
            self.own = {n: torch.zeros_like(shapes[n], dtype=torch.float32) for n in self.names}

    def correction(self, model) -> list[torch.Tensor]:
        """c − c_k for every trainable parameter of `model`, in its order (zero where the server has no c yet)."""
        c, out = self.server, []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in self.own and name in c:
                if tuple(c[name].shape) != tuple(p.shape):
                    raise ValueError(f"server control '{name}' has shape {tuple(c[name].shape)}, "
                                     f"the model {tuple(p.shape)}")
                out.append((c[name].float() - self.own[name]).to(p.dtype))
            elif name in self.own:
                out.append((-self.own[name]).to(p.dtype))
            else:
                out.append(torch.zeros_like(p))
        return out

    def advance(self, model, mean_grad: list[torch.Tensor]) -> None:
        """c_k ← the mean gradient of this round's local steps (SCAFFOLD's option I, measured where the camera
        trained); keep it, and the update the server adds up, c_k+ − c_k, as an ArrayRecord for the reply."""
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        new = {n: g.detach().float().clone() for n, g in zip(trainable, mean_grad) if n in self.own}
        delta = OrderedDict((n, new[n] - self.own[n]) for n in self.names)
        self.own = new
        personal.save_part(self.path, new)
        self.state[STATE_KEY] = to_record(new)
        self.update = to_record(delta)

    def _load(self) -> dict[str, torch.Tensor] | None:
        if STATE_KEY in self.state:
            return dict(to_state_dict(self.state[STATE_KEY]))
        try:
            return personal.load_part(self.path)
        except personal.PersonalError as err:  # set aside, never overwritten
            aside = self.path.with_suffix(".unusable")
            self.path.replace(aside)
            log.warning("control variate not used (%s); starting from zero, file kept as %s", err, aside)
            return None
