"""Pieces the VP-diffusion purifiers share (DiffPure, GDMP): image <-> diffusion space, the noise
schedules a net's `.schedule` gives, and the score of an eps-prediction net.

Images x in [0, 1] map to u = 2x - 1 in [-1, 1] (every score_sde / DDPM / ADM net works there), and
back by x = (u + 1) / 2. An eps-prediction net eps(u, t) (u: (R, C, H, W), t: (R,) in [0, 1], the
convention of `advpure.nets.schedules`) gives the score s(u, t) = -eps(u, t) / sqrt(1 - abar(t)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advpure.nets.schedules import DiscreteSchedule, NoiseSchedule, VPSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_diffusion(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1]: u = 2x - 1."""
    return 2.0 * x - 1.0


def to_image(u: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """[-1, 1] -> [0, 1] images: x = (u + 1) / 2, clipped to [0, 1] when `clamp`."""
    x = (u + 1.0) / 2.0
    return x.clamp(0.0, 1.0) if clamp else x


def continuous_vp(schedule: NoiseSchedule) -> VPSchedule:
    """The continuous VP SDE a net's schedule belongs to: a `VPSchedule` as it is; a linear
    `DiscreteSchedule` (beta_i = linspace(b0, b1, T)) as its continuous limit beta(t) = T b0 +
    t T (b1 - b0) (DiffPure's mapping: its RevVPSDE takes beta_min = 0.1, beta_max = 20 for the
    T = 1000 DDPM betas linspace(1e-4, 0.02), for score_sde and ADM nets alike). Raises TypeError
    for another schedule."""
    if isinstance(schedule, VPSchedule):
        return schedule
    if isinstance(schedule, DiscreteSchedule):
        return VPSchedule(schedule.beta_start * schedule.steps, schedule.beta_end * schedule.steps)
    raise TypeError(f"no continuous VP SDE known for the schedule {schedule!r}")


def discrete_alpha_bars(schedule: NoiseSchedule, steps: int = 1000) -> torch.Tensor:
    """(T,) float64 abar_i of the DDPM chain: a `DiscreteSchedule`'s own, or a continuous schedule's
    abar at the step times t = (i + 1) / T (i = 0 .. T-1)."""
    if isinstance(schedule, DiscreteSchedule):
        return schedule.alpha_bars.clone()
    t = (torch.arange(steps, dtype=torch.float64) + 1) / steps
    return schedule.alpha_bar(t).to(torch.float64)


def score_from_eps(eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """s = -eps / sqrt(1 - abar) (Song et al. 2021, App. B; Ho et al. 2020, Eq. 11)."""
    return eps * (-1.0 / (1.0 - alpha_bar) ** 0.5)


def time_rows(t: float, like: torch.Tensor) -> torch.Tensor:
    """(R,) tensor of the time t in like's dtype and device: the net's time input."""
    return torch.full((like.shape[0],), float(t), dtype=like.dtype, device=like.device)


__all__ = [
    "EpsFn",
    "continuous_vp",
    "discrete_alpha_bars",
    "score_from_eps",
    "time_rows",
    "to_diffusion",
    "to_image",
]
