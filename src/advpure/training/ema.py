"""Exponential moving average of weights (decay 0.999 for NCSNv2/ADP):

    shadow <- decay * shadow + (1 - decay) * param      after every optimizer step

Buffers (e.g. batch-norm statistics) are copied, not averaged. Evaluation, purification and the
exported weights use the shadow copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A shadow copy of `model` (`shadow`, eval mode, frozen) updated by `update(model)` as
    shadow <- decay * shadow + (1 - decay) * param (buffers copied); calling the EMA runs the
    shadow. Saved in checkpoints as a submodule. Raises ValueError for decay outside [0, 1]."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ps = [p for p in self.shadow.parameters()]
        ms = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ps, ms, 1.0 - self.decay)
        for b_s, b_m in zip(self.shadow.buffers(), model.buffers()):
            b_s.copy_(b_m)
        self.updates += 1

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
