"""Exponential moving average of weights (decay 0.999 for NCSNv2/ADP, 0.9999 for the diffusion nets):

    shadow <- d * shadow + (1 - d) * param      after every optimizer step

with d = decay, or with `warmup` (score_sde's ``models/ema.py``, ``use_num_updates=True``; TensorFlow's
``ExponentialMovingAverage(num_updates=...)``) d = min(decay, (1 + n) / (10 + n)) at the n-th update
(n = 1, 2, ...): the average forgets the initial weights within a few hundred steps (d = 0.98 at n = 441)
however close `decay` is to 1, which is what a short run needs.

Buffers (e.g. batch-norm statistics) are copied, not averaged. Evaluation, purification and the
exported weights use the shadow copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A shadow copy of `model` (`shadow`, eval mode, frozen) updated by `update(model)` as
    shadow <- d * shadow + (1 - d) * param (buffers copied), d = `decay` or, with `warmup`, the ramp
    min(decay, (1 + n) / (10 + n)) of the n-th update; calling the EMA runs the shadow. Saved in
    checkpoints as a submodule (the update count `updates` too). Raises ValueError for decay outside [0, 1]."""

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, bool(warmup)
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self, n: int) -> float:
        """The decay d of the n-th update (n >= 1)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ps = [p for p in self.shadow.parameters()]
        ms = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ps, ms, 1.0 - self.current_decay(int(self.updates) + 1))
        for b_s, b_m in zip(self.shadow.buffers(), model.buffers()):
            b_s.copy_(b_m)
        self.updates += 1

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
