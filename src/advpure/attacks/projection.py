"""The l-infinity threat model: every iterate lies in B_inf(x_orig, eps) ∩ [0, 1]^D."""

from __future__ import annotations

import torch

from advpure.core.rng import RNG


def project(x: torch.Tensor, x_orig: torch.Tensor, eps: float) -> torch.Tensor:
    """Closest point of B_inf(x_orig, eps) ∩ [0, 1]^D to x (the two boxes intersect because
    x_orig is in [0, 1]; clipping coordinate-wise to both is the exact projection)."""
    return torch.minimum(torch.maximum(x, x_orig - eps), x_orig + eps).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, rng: RNG) -> torch.Tensor:
    """x_0 = project(x + eps * u), u uniform in [-1, 1]^D (one draw per image from `rng`)."""
    u = rng.uniform(1, x)[0]
    return project(x + eps * u, x, eps)


def start_point(x: torch.Tensor, eps: float, rng: RNG, enabled: bool) -> torch.Tensor:
    """The attack's first iterate: the clean input, or a random start in the ball."""
    return random_start(x, eps, rng.child("start")) if enabled else x.clone()


__all__ = ["project", "random_start", "start_point"]
