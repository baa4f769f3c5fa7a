"""The `diffusion` base of randomized smoothing (Carlini et al., ICLR 2023): the step whose noise is the
smoothing noise, and the one-shot x^0 equal to the posterior mean on Gaussian data with the exact eps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advpure.certify import BASES, build_base
from advpure.certify.bases import DiffusionBase, diffusion_time
from advpure.core.errors import ConfigError
from advpure.jobs.certify import CertifyPlan
from advpure.nets.schedules import DiscreteSchedule, VPSchedule
from helpers.diffusion_toys import GaussianEps


def gaussian(seed: int = 0):
    """Image data x = (u0 + 1) / 2 with u0 ~ N(mu, Sigma), D = 4 (shape (1, 2, 2)), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.2
    cov = a @ a.T + 0.05 * torch.eye(4, dtype=torch.float64)
    mu = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    return mu, cov


def test_registered_with_its_net_kind_from_the_certify_block():
    assert "diffusion" in BASES
    assert DiffusionBase.nets() == {"eps": "ddpmpp"}
    assert DiffusionBase.nets({"diffusion_net": "adm"}) == {"eps": "adm"}
    plan = CertifyPlan([("denoised", 0.25), ("diffusion", 0.25)], options={"diffusion_net": "toy_eps"})
    assert plan.nets == ["score", "toy_eps"] and plan.params("diffusion") == {"diffusion_net": "toy_eps"}
    from advpure.config import compose as C

    cfg = C.load("fmnist_certify", ["certify.bases=[diffusion]", "certify.diffusion_net=ddpm"])
    assert list(cfg.certify.bases) == ["diffusion"] and cfg.certify.diffusion_net == "ddpm"


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5])
def test_the_step_whose_noise_is_twice_sigma(sigma):
    vp = VPSchedule()
    t = diffusion_time(vp, sigma)
    ab = float(vp.alpha_bar(torch.tensor(t, dtype=torch.float64)))
    assert math.sqrt((1 - ab) / ab) == pytest.approx(2 * sigma, rel=1e-9)  # continuous: solved exactly
    ddpm = DiscreteSchedule()
    t = diffusion_time(ddpm, sigma)
    i = round(t * 1000) - 1
    level = ((1 - ddpm.alpha_bars) / ddpm.alpha_bars).sqrt()
    assert level[i] >= 2 * sigma > level[i - 1]  # discrete: the first step at or above 2 sigma
    with pytest.raises(ConfigError, match="beyond the diffusion net's schedule"):
        diffusion_time(DiscreteSchedule(10), 5.0)


def test_one_shot_denoising_is_the_posterior_mean_with_the_exact_eps():
    """x~ = x + sigma n of Gaussian data: the base's x^ (unclipped) equals E[x | x~] in closed form, and is
    x~ + sigma^2 grad log p_sigma(x~) (Tweedie); to first order in sigma it is x~ itself plus that term."""
    mu, cov = gaussian()
    vp = VPSchedule()
    eps = GaussianEps(mu, cov, (1, 2, 2), vp)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    u0 = mu + torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    x = ((u0 + 1) / 2).reshape(64, 1, 2, 2)
    for sigma in (0.05, 0.25):
        base = build_base("diffusion", clf, sigma, nets={"eps": eps})
        x_noisy = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
        got = base.denoise(x_noisy, clamp=False).reshape(64, 4)
        # image space: x ~ N(m, C), m = (mu + 1) / 2, C = Sigma / 4; x~ = x + sigma n
        m, c = (mu + 1) / 2, cov / 4
        k = c @ torch.linalg.inv(c + sigma**2 * torch.eye(4, dtype=torch.float64))
        post = m + (x_noisy.reshape(64, 4) - m) @ k.T
        assert torch.allclose(got, post, atol=1e-10), (got - post).abs().max()
        assert base.forward(x_noisy).shape == (64, 3)
        assert torch.equal(base.denoise(x_noisy), base.denoise(x_noisy, clamp=False).clamp(0, 1))
    # to first order the correction is sigma^2 grad log p(x): it scales with sigma^2 as sigma -> 0
    shift = [
        (build_base("diffusion", clf, s, nets={"eps": eps}).denoise(x, clamp=False) - x).abs().max().item()
        for s in (1e-3, 2e-3)
    ]
    assert shift[0] > 0 and shift[1] / shift[0] == pytest.approx(4.0, rel=1e-2)
