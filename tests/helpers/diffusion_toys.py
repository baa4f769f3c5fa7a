"""Toy nets for the diffusion purifiers: the exact eps of Gaussian data under the VP SDE, and tiny
random conv nets (eps(u, t) and a time-free field f(x)) for gradient and noise-keying tests."""

from __future__ import annotations

import torch
from torch import nn

from advpure.nets.schedules import VPSchedule


class GaussianEps(nn.Module):
    """The exact eps-prediction of data u0 ~ N(mu, Sigma) (flattened over C*H*W = D) under a VP
    schedule: u_t ~ N(sqrt(abar) mu, Sigma_t), Sigma_t = abar Sigma + (1 - abar) I, so the score is
    s = -Sigma_t^{-1} (u - sqrt(abar) mu) and eps = -sqrt(1 - abar) s."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...], schedule=None):
        super().__init__()
        self.mu, self.cov, self.shape = mu.double(), cov.double(), shape
        self.schedule = schedule or VPSchedule()

    def cov_t(self, t: float) -> tuple[float, torch.Tensor]:
        ab = float(self.schedule.alpha_bar(torch.tensor(t, dtype=torch.float64)))
        return ab, ab * self.cov + (1 - ab) * torch.eye(self.cov.shape[0], dtype=torch.float64)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert torch.all(t == t[0]), "one time per call"
        ab, cov_t = self.cov_t(float(t[0]))
        v = u.reshape(u.shape[0], -1).double() - ab**0.5 * self.mu
        s = -torch.linalg.solve(cov_t, v.T).T
        return (-((1 - ab) ** 0.5) * s).reshape(u.shape).to(u.dtype)

    def flow(self, u: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        """The exact probability-flow map u_{t0} -> u_{t1}: v_t = Sigma_t^{1/2} Sigma_{t0}^{-1/2} v_{t0},
        v_t = u_t - sqrt(abar_t) mu (Sigma_t shares Sigma's eigenvectors)."""
        lam, q = torch.linalg.eigh(self.cov)
        ab0 = float(self.schedule.alpha_bar(torch.tensor(t0, dtype=torch.float64)))
        ab1 = float(self.schedule.alpha_bar(torch.tensor(t1, dtype=torch.float64)))
        scale = ((ab1 * lam + 1 - ab1) / (ab0 * lam + 1 - ab0)).sqrt()
        v = u.reshape(u.shape[0], -1).double() - ab0**0.5 * self.mu
        v1 = (v @ q) * scale @ q.T
        return (v1 + ab1**0.5 * self.mu).reshape(u.shape)


class TinyEps(nn.Module):
    """A small random conv net eps(u, t) with a time input (the shape of a diffusion net's call)."""

    def __init__(self, channels: int = 2, width: int = 8, schedule=None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, channels, 3, padding=1)
        self.temb = nn.Parameter(torch.randn(width, generator=g))
        with torch.no_grad():
            for p in (*self.c1.parameters(), *self.c2.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.schedule = schedule or VPSchedule()
        self.calls = 0

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.c1(u) + (t.view(-1, 1, 1, 1) * self.temb.view(1, -1, 1, 1)).to(u.dtype)
        return self.c2(torch.tanh(h))


class TinyField(nn.Module):
    """A small random time-free conv field f(x) (an NCSNv2 stand-in), with DSM-level metadata."""

    def __init__(self, channels: int = 2, width: int = 8, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, channels, 3, padding=1)
        with torch.no_grad():
            for p in (*self.c1.parameters(), *self.c2.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.dsm_sigma_max, self.dsm_sigma_min, self.dsm_levels = 1.0, 0.01, 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(2 * x - 1)))
