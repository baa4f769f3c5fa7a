"""ML/MCMC purification baseline (Hill, Mitchell & Zhu, ICLR 2021): stochastic Langevin updates.

    x_0 = clip(x + sigma * n_0, 0, 1)                       (optional screening, sigma may be 0)
    x_{t+1} = clip(x_t + eta/2 * s(x_t) + sqrt(eta) * n_t, 0, 1),   s = f_theta / dsm_sigma

`f_theta ~ sigma * grad log p_sigma` is the DSM-trained net ADP uses; dividing by the DSM noise
level the chain runs at (`dsm_sigma`) gives the score of p at that level. This is the "ML" arm of
Fig. 2 of Yoon et al. 2021 (ADP) (stochastic, many steps) against ADP's "Det" arm (deterministic, adaptive, few
steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from advpure.core.params import at_least, validate
from advpure.core.rng import GeneratorRNG
from advpure.purify.adp import checkpointed
from advpure.purify.base import (
    FieldParams,
    Purifier,
    PurifyResult,
    field_slot,
    register_purifier,
    rows,
    screened_rows,
)

NoiseFn = Callable[[], torch.Tensor]


@dataclass
class LangevinParams(FieldParams):
    """The `defense` block of kind langevin: the common keys, the field, and the chain's own."""

    kind: str = "langevin"
    sigma: float = at_least(0.25, 0.0)  # screening noise std before the chain (0: none)
    steps: int = at_least(100, 1)  # Langevin updates
    # step size and the level of the score s = f / dsm_sigma; null (field=ebm): the EBM's own
    # training sampler x <- x - (step/2) grad E + noise * n (Hill et al. purify with it)
    eta: float | None = at_least(1e-4, 0.0, strict=True)
    dsm_sigma: float | None = at_least(0.05, 0.0, strict=True)


DEFAULTS = LangevinParams()  # the one place the Langevin purifier's default values live


def langevin_chain(
    x0: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    noise_fn: NoiseFn,
    *,
    eta: float = DEFAULTS.eta,
    dsm_sigma: float = DEFAULTS.dsm_sigma,
    steps: int = DEFAULTS.steps,
    differentiable: bool = False,
    checkpointing: bool = True,
) -> PurifyResult:
    """`steps` Langevin updates from x0 (R, C, H, W) in [0, 1]; `noise_fn()` returns a fresh
    standard-normal tensor of x0's shape at every step. eta: step size (image units squared).
    `differentiable`: keep the graph through every step (full-gradient attacks), each step's
    score evaluation checkpointed so memory does not grow with the number of steps.
    Raises ValueError for steps < 1 or non-positive eta / dsm_sigma."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eta <= 0 or dsm_sigma <= 0:
        raise ValueError(f"eta and dsm_sigma must be > 0, got {eta}, {dsm_sigma}")
    x = x0
    grad_mode = differentiable and torch.is_grad_enabled()
    fn = checkpointed(score_fn) if grad_mode and checkpointing else score_fn
    with torch.set_grad_enabled(grad_mode):
        for _ in range(steps):
            s = fn(x).to(x.dtype) / dsm_sigma
            x = (x + 0.5 * eta * s + math.sqrt(eta) * noise_fn()).clamp(0.0, 1.0)
    n = torch.full((x0.shape[0],), steps, dtype=torch.long, device=x0.device)
    return PurifyResult(x=x if differentiable else x.detach(), steps=n, score_evals=n.clone())


@register_purifier("langevin")
class LangevinPurifier(Purifier):
    """Screening (sigma, may be 0), then `steps` Langevin updates (Hill et al. 2021) on the field."""

    Params = LangevinParams

    label = "Langevin"

    @classmethod
    def settings(cls, p) -> str:
        """The header line; a null eta / dsm_sigma says where the value comes from."""
        line = super().settings(p)
        return line.replace("eta=None", "eta=the EBM sampler's").replace(
            "dsm_sigma=None", "dsm_sigma=the EBM sampler's"
        )

    def __init__(self, p: Params | None = None, *, eta: float | None = None, dsm_sigma: float | None = None):
        super().__init__()
        self.p = p if p is not None else self.Params()
        validate(self.p, self.Params, "defense.")  # a bad value through the Python API: one ConfigError
        self.eta = self.p.eta if eta is None else eta
        self.dsm_sigma = self.p.dsm_sigma if dsm_sigma is None else dsm_sigma
        if self.eta is None or self.dsm_sigma is None:
            raise ValueError("defense.eta / defense.dsm_sigma: null needs field=ebm (its sampler's settings)")

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return field_slot(p)

    @classmethod
    def from_params(cls, p, nets) -> LangevinPurifier:
        own = getattr(nets.get("field"), "langevin", None) or {}  # an EBM field's training sampler
        return cls(
            p,
            eta=own.get("eta") if p.eta is None else None,
            dsm_sigma=own.get("dsm_sigma") if p.dsm_sigma is None else None,
        )

    def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult:
        def noise_fn():
            return rng.normal(draws, x).reshape(-1, *x.shape[1:])

        sigma = self.p.sigma
        x0 = screened_rows(x, rng, draws, sigma) if sigma > 0 else rows(x, draws)
        return langevin_chain(
            x0,
            fns["field"],
            noise_fn,
            eta=self.eta,
            dsm_sigma=self.dsm_sigma,
            steps=self.p.steps,
            differentiable=differentiable,
        )


def langevin_purify(
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    **params,
) -> PurifyResult:
    """Screen (when sigma > 0) and run the Langevin chain on (B, C, H, W) images in [0, 1], with
    noise from `generator`: the same path as `LangevinPurifier` with one draw. `params`: the kind's
    (`LangevinPurifier.Params`: sigma, steps, eta, dsm_sigma), the rest at their defaults."""
    rng = GeneratorRNG(generator if generator is not None else torch.default_generator)
    p = LangevinPurifier.Params(**params)
    validate(p, LangevinPurifier.Params, "langevin_purify: ")
    return LangevinPurifier(p)(x, rng, 1, {"field": score_fn})


__all__ = ["LangevinPurifier", "langevin_chain", "langevin_purify"]
