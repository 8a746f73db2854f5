"""The learning-rate schedule and the weight EMA shared by the RSUNet and classifier trainers."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["lr_factor", "EMA", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a ``torch.compile`` wrapper (the module itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so
    early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        src = unwrap(model)
        for e, p in zip(self.model.parameters(), src.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for e, b in zip(self.model.buffers(), src.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
