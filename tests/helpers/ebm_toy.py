"""A 2-D toy for maximum-likelihood EBM training: a Gaussian mixture on the unit square, a small MLP
energy, and a training loop made of the same functions `advpure.training.ebm.EBMModule` calls
(`PersistentChains`, `langevin_sample`, `ml_loss`)."""

from __future__ import annotations

import torch
from torch import nn

from advpure.training.mcmc import PersistentChains, langevin_sample, ml_loss

MEANS = torch.tensor([[0.4, 0.45], [0.6, 0.55]], dtype=torch.float64)
STD = 0.1


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean (2,) and covariance (2, 2) of the equal-weight mixture of N(MEANS[k], STD^2 I)."""
    mean = MEANS.mean(0)
    dev = MEANS - mean
    cov = STD**2 * torch.eye(2, dtype=torch.float64) + dev.T @ dev / len(MEANS)
    return mean, cov


def sample_mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, len(MEANS), (n,), generator=gen)
    return (MEANS[k] + STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()


class MLPEnergy(nn.Module):
    """E(x) for x of shape (N, 2): 2 -> h -> h -> 1 with SiLU; returns (N,)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x).reshape(x.shape[0])


def train_toy(
    steps: int = 400,
    batch: int = 200,
    mcmc_steps: int = 20,
    step_size: float = 1e-4,
    buffer_size: int = 2000,
    reinit_prob: float = 0.05,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[MLPEnergy, PersistentChains, torch.Generator]:
    """Persistent-chain ML training at temperature 1 (noise_std = sqrt(step_size))."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MLPEnergy()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    chains = PersistentChains(buffer_size, (2,), reinit_prob=reinit_prob, init="uniform")
    chains.initialize(gen, "cpu")
    for _ in range(steps):
        x_data = sample_mixture(batch, gen)
        x0, idx = chains.draw(batch, gen, gen, x_data)
        net.requires_grad_(False)
        x_model, _ = langevin_sample(
            net, x0, steps=mcmc_steps, step_size=step_size, noise_std=step_size**0.5, generator=gen
        )
        net.requires_grad_(True)
        chains.put(idx, x_model)
        loss, _ = ml_loss(net(x_data), net(x_model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net, chains, gen
