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

from advpure.core.params import at_least
from advpure.core.rng import GeneratorRNG
from advpure.purify.adp import checkpointed
from advpure.purify.base import DefenseParams, Purifier, PurifyResult, register_purifier, rows, screened_rows

NoiseFn = Callable[[], torch.Tensor]


def langevin_chain(
    x0: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    noise_fn: NoiseFn,
    *,
    eta: float = 1e-4,
    dsm_sigma: float = 0.05,
    steps: int = 100,
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
    """Screening (sigma, may be 0), then `steps` Langevin updates (Hill et al. 2021)."""

    @dataclass
    class Params(DefenseParams):
        kind: str = "langevin"
        sigma: float = at_least(0.25, 0.0)  # screening noise std before the chain (0: none)
        steps: int = at_least(100, 1)  # Langevin updates
        # step size and the level of the score s = f / dsm_sigma; null (field=ebm): the EBM's own
        # training sampler x <- x - (step/2) grad E + noise * n (Hill et al. purify with it)
        eta: float | None = at_least(1e-4, 0.0, strict=True)
        dsm_sigma: float | None = at_least(0.05, 0.0, strict=True)

    label = "Langevin"

    @classmethod
    def settings(cls, p) -> str:
        """The header line; a null eta / dsm_sigma says where the value comes from."""
        line = super().settings(p)
        return line.replace("eta=None", "eta=the EBM sampler's").replace(
            "dsm_sigma=None", "dsm_sigma=the EBM sampler's"
        )

    def __init__(self, score_net: torch.nn.Module, *, sigma=0.25, eta=1e-4, dsm_sigma=0.05, steps=100):
        super().__init__()
        if sigma < 0 or steps < 1:
            raise ValueError(f"need sigma >= 0 and steps >= 1, got {sigma}, {steps}")
        self.score_net = score_net
        self.sigma, self.eta, self.dsm_sigma, self.steps = sigma, eta, dsm_sigma, steps

    @classmethod
    def from_params(cls, p, nets) -> LangevinPurifier:
        eta, dsm_sigma = p.eta, p.dsm_sigma
        if eta is None or dsm_sigma is None:
            own = getattr(nets["score"], "langevin", None)  # an EBM field's training sampler
            if own is None:
                raise ValueError(
                    "defense.eta / defense.dsm_sigma: null needs field=ebm (its sampler's settings)"
                )
            eta = own["eta"] if eta is None else eta
            dsm_sigma = own["dsm_sigma"] if dsm_sigma is None else dsm_sigma
        return cls(nets["score"], sigma=p.sigma, eta=eta, dsm_sigma=dsm_sigma, steps=p.steps)

    def forward(self, x, rng, draws, score_fn, differentiable=False) -> PurifyResult:
        def noise_fn():
            return rng.normal(draws, x).reshape(-1, *x.shape[1:])

        x0 = screened_rows(x, rng, draws, self.sigma) if self.sigma > 0 else rows(x, draws)
        return langevin_chain(
            x0,
            score_fn,
            noise_fn,
            eta=self.eta,
            dsm_sigma=self.dsm_sigma,
            steps=self.steps,
            differentiable=differentiable,
        )


def langevin_purify(
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    sigma: float = 0.0,
    eta: float = 1e-4,
    dsm_sigma: float = 0.05,
    steps: int = 100,
    generator: torch.Generator | None = None,
) -> PurifyResult:
    """Screen (when sigma > 0) and run the Langevin chain on (B, C, H, W) images in [0, 1], with
    noise from `generator`: the same path as `LangevinPurifier` with one draw."""
    rng = GeneratorRNG(generator if generator is not None else torch.default_generator)
    return LangevinPurifier(torch.nn.Identity(), sigma=sigma, eta=eta, dsm_sigma=dsm_sigma, steps=steps)(
        x, rng, 1, score_fn
    )


__all__ = ["LangevinPurifier", "langevin_chain", "langevin_purify"]
