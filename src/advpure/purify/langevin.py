"""ML/MCMC purification baseline (Hill, Mitchell & Zhu, ICLR 2021): stochastic Langevin updates.

    x_0 = clip(x + sigma * n_0, 0, 1)                       (optional screening, sigma may be 0)
    x_{t+1} = clip(x_t + eta/2 * s(x_t) + sqrt(eta) * n_t, 0, 1),   s = f_theta / sigma_s

`f_theta ~ sigma * grad log p_sigma` is the DSM-trained net ADP uses; dividing by the noise level
the chain runs at (`sigma_s`) gives the score. This is the "ML" arm of the seed's Fig. 2
(stochastic, many steps) against ADP's "Det" arm (deterministic, adaptive, few steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from advpure.purify.adp import PurifyResult, screen

NoiseFn = Callable[[], torch.Tensor]


def langevin_chain(
    x0: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    noise_fn: NoiseFn,
    *,
    eta: float = 1e-4,
    score_sigma: float = 0.05,
    steps: int = 100,
    differentiable: bool = False,
) -> PurifyResult:
    """`noise_fn()` returns a fresh standard-normal tensor of x0's shape at every step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eta <= 0 or score_sigma <= 0:
        raise ValueError(f"eta and score_sigma must be > 0, got {eta}, {score_sigma}")
    x = x0
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for _ in range(steps):
            s = score_fn(x).to(x.dtype) / score_sigma
            x = (x + 0.5 * eta * s + math.sqrt(eta) * noise_fn()).clamp(0.0, 1.0)
    rows = x0.shape[0]
    n = torch.full((rows,), steps, dtype=torch.long, device=x0.device)
    return PurifyResult(x=x if differentiable else x.detach(), steps=n, score_evals=n.clone())


def langevin_purify(
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    sigma: float = 0.0,
    eta: float = 1e-4,
    score_sigma: float = 0.05,
    steps: int = 100,
    generator: torch.Generator | None = None,
) -> PurifyResult:
    """Screen (when sigma > 0) and run the Langevin chain, with noise from `generator`."""

    def noise_fn() -> torch.Tensor:
        return torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)

    x0 = screen(x, sigma, noise_fn()) if sigma > 0 else x
    return langevin_chain(x0, score_fn, noise_fn, eta=eta, score_sigma=score_sigma, steps=steps)
