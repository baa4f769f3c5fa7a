"""Noise schedules of variance-preserving diffusion models: one convention for every diffusion net.

Time t lies in [0, 1] for every model. A diffusion state of an image u0 in [-1, 1] (u0 = 2x - 1 for
x in [0, 1]) at time t is

    u_t = sqrt(abar(t)) * u0 + sqrt(1 - abar(t)) * eps,   eps ~ N(0, I)

and an eps-prediction net eps_theta(u_t, t) gives the score s(u_t, t) = -eps_theta / sqrt(1 - abar(t)).

* `VPSchedule` — continuous VP SDE (Song et al., ICLR 2021, "Score-Based Generative Modeling through
  SDEs", Eq. 11 and App. B): beta(t) = beta_min + t (beta_max - beta_min),
  abar(t) = exp(-t beta_min - t^2 (beta_max - beta_min) / 2); score_sde's continuous VP nets take the
  time label 999 t.
* `DiscreteSchedule` — the T-step DDPM chain (Ho et al., NeurIPS 2020): beta_i = linspace(1e-4, 0.02, T),
  abar_i = prod_{j <= i} (1 - beta_j), i = 0 .. T-1. Step i sits at time t = (i + 1) / T (so DiffPure's
  "index 1000 t* - 1" is the step of time t*); the net takes the integer label i.

`sigma_image(t)` is the Gaussian noise level in [0, 1] image units that a diffusion state of time t
is equivalent to: x + s n with s = sqrt((1 - abar) / abar) / 2 (t = 0.1 on the VP schedule: 0.170).
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Base class. `steps`: T for a discrete chain, None for continuous time."""

    steps: int | None = None

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar(t) for t (any shape) in [0, 1]; same shape, float64 where t is float64."""
        raise NotImplementedError

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """The continuous-time rate beta(t) (for a discrete chain: T * beta_i at the step of t)."""
        raise NotImplementedError

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the net was trained with (999 t, or the step index i)."""
        raise NotImplementedError

    def sigma_image(self, t: torch.Tensor) -> torch.Tensor:
        """The equivalent Gaussian noise std in [0, 1] image units: sqrt((1 - abar) / abar) / 2."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt() / 2

    def describe(self) -> str:
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """Continuous VP SDE with a linear beta(t) (Song et al. 2021); score_sde's defaults 0.1 -> 20."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-t * self.beta_min - 0.5 * t**2 * (self.beta_max - self.beta_min))

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return 999.0 * t

    def t_of_sigma_image(self, sigma: float) -> float:
        """The time whose equivalent image noise is `sigma` (the inverse of `sigma_image`)."""
        ab = 1.0 / (1.0 + 4.0 * sigma**2)  # sqrt((1 - ab) / ab) / 2 = sigma
        c = -math.log(ab)  # t beta_min + t^2 (beta_max - beta_min) / 2 = c
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        return (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)

    def describe(self) -> str:
        return f"continuous VP, beta(t) = {self.beta_min:g} + {self.beta_max - self.beta_min:g} t"


class DiscreteSchedule(NoiseSchedule):
    """The T-step DDPM chain with linear betas (Ho et al. 2020): beta_i = linspace(beta_1, beta_T, T)."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if steps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"need steps >= 1 and 0 < beta_start <= beta_end < 1, got {steps}, {beta_start}, {beta_end}"
            )
        self.steps, self.beta_start, self.beta_end = int(steps), float(beta_start), float(beta_end)
        # on the CPU even when built under a meta / CUDA default device (nets are described on "meta")
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64, device="cpu")
        self.alpha_bars = torch.cumprod(1.0 - self.betas, 0)

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """The step i of time t = (i + 1) / T (rounded, clamped to 0 .. T-1), int64."""
        return (
            (torch.as_tensor(t, dtype=torch.float64) * self.steps)
            .round()
            .long()
            .sub(1)
            .clamp(0, self.steps - 1)
        )

    def time(self, i: torch.Tensor | int) -> torch.Tensor:
        """The time (i + 1) / T of step i (float64)."""
        return (torch.as_tensor(i, dtype=torch.float64) + 1) / self.steps

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return self.alpha_bars.to(t.device)[self.index(t).to(t.device)].to(
            t.dtype if t.is_floating_point() else torch.float64
        )

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return self.steps * self.betas.to(t.device)[self.index(t).to(t.device)].to(t.dtype)

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return self.index(t).to(torch.as_tensor(t).dtype)

    def describe(self) -> str:
        return f"discrete, T = {self.steps}, beta linear {self.beta_start:g} -> {self.beta_end:g}"


__all__ = ["DiscreteSchedule", "NoiseSchedule", "VPSchedule"]
