"""Denoising score matching (Vincent 2011; NCSNv2, Song & Ermon 2020) as used by ADP.

With x~ = x + sigma * eps, the net is trained so that f(x~) ~ -eps, i.e. f ~ sigma * grad log p_sigma
(NCSNv2 divides by sigma to get the score; ADP uses f itself). Per sample:

    l(x, sigma, eps) = 1/2 * || f(x + sigma * eps) + eps ||^2

which equals NCSNv2's sigma^2-weighted loss 1/2 sigma^2 ||s(x~) + eps / sigma||^2 with s = f / sigma.
"""

from __future__ import annotations

import math

import torch


def geometric_sigmas(sigma_max: float, sigma_min: float, num: int) -> torch.Tensor:
    """sigma_max = s_1 > ... > s_L = sigma_min, a geometric sequence (NCSN's noise levels)."""
    if sigma_max <= 0 or sigma_min <= 0:
        raise ValueError(f"sigmas must be > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be <= sigma_max ({sigma_max})")
    if num < 1:
        raise ValueError(f"number of noise levels must be >= 1, got {num}")
    if num == 1:
        return torch.tensor([float(sigma_max)])
    return torch.exp(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), num, dtype=torch.float64)
    ).float()


def dsm_loss(
    net, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor | None = None, reduce: bool = True
) -> torch.Tensor:
    """1/2 ||f(x + sigma eps) + eps||^2 per sample (summed over pixels), averaged over the batch.

    `sigma` is a per-sample tensor (B,) or a scalar; `eps` defaults to a fresh N(0, I) sample.
    """
    if eps is None:
        eps = torch.randn_like(x)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    s = sigma.view(-1, *([1] * (x.dim() - 1))) if sigma.dim() else sigma
    per_sample = 0.5 * (net(x + s * eps).to(x.dtype) + eps).flatten(1).pow(2).sum(1)
    return per_sample.mean() if reduce else per_sample


def one_step_denoise(net, x_noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tweedie-style one-step denoiser x^ = x~ + sigma * f(x~) (f ~ -eps)."""
    return x_noisy + sigma * net(x_noisy).to(x_noisy.dtype)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = (x - ref).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)
