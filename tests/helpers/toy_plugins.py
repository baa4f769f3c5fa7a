"""A user's own extensions, outside the package: one purifier, one attack, one protocol, each a
few lines, selected by config as `module.path:Name` (tests/test_plugins.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advpure.attacks import Attack, AttackParams, classifier_objective, project
from advpure.core.params import at_least
from advpure.purify import DefenseParams, Purifier, PurifyResult, rows
from advpure.results import register_protocol


class Quantize(Purifier):
    """Deterministic: round pixels to `levels` grey levels (bit-depth reduction, Xu et al. 2018)."""

    @dataclass
    class Params(DefenseParams):
        levels: int = at_least(4, 2)

    label, stochastic = "Quantize", False

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    @classmethod
    def from_params(cls, p, nets):
        return cls(p.levels)

    @classmethod
    def describe(cls, p):
        return f"Quantize L={p.levels}"

    def forward(self, x, rng, draws, fns=None, differentiable=False):
        q = (x * (self.levels - 1)).round() / (self.levels - 1)
        zeros = torch.zeros(draws * x.shape[0], dtype=torch.long, device=x.device)
        return PurifyResult(rows(q, draws), zeros, zeros.clone())


class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015): one signed classifier-gradient step of size eps."""

    @dataclass
    class Params(AttackParams):
        iters: int = at_least(1, 1)

    @classmethod
    def label(cls, p):
        return "FGSM (toy)"

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace):
        ev = classifier_objective(defense, x, y, p.loss)
        trace.visit(0, x, ev.loss, ev.chains)
        x_adv = project(x + eps * ev.grad.sign(), x, eps)
        return trace.finish(x_adv, classifier_objective(defense, x_adv, y, p.loss, grad=False).loss)


@register_protocol(
    "toy_majority",
    label="Majority-of-N (toy)",
    legend="robust if more than half of the N draws are correct",
    at_most=(),
)
def toy_majority(obs):
    return obs.final.float().mean(0) > 0.5
