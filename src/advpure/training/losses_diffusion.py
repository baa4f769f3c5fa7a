"""Continuous-time denoising score matching for eps-prediction diffusion nets (`advpure.nets.diffusion`).

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021), Eq. 7
with lambda(t) = 1 - abar(t) (score_sde ``losses.py`` ``get_sde_loss_fn`` with ``reduce_mean=True``,
``likelihood_weighting=False``, continuous VP): with s_theta = -eps_theta / sqrt(1 - abar(t)) the weighted
score error is || s_theta sqrt(1 - abar) + z ||^2 = || z - eps_theta ||^2, i.e. Ho et al.'s L_simple in
continuous time:

    u_t = sqrt(abar(t)) u0 + sqrt(1 - abar(t)) z,     loss = mean_i mean_d (eps_theta(u_t, t)_{i,d} - z_{i,d})^2

with t ~ U(eps, 1) (score_sde's eps = 1e-5) and z ~ N(0, I). The loss is a pure function of its inputs
(t and z are arguments), so tests and resumed runs can replay it exactly.
"""

from __future__ import annotations

import torch

from advpure.nets.diffusion import DiffusionNet, diffuse

__all__ = ["VP_T_EPS", "sample_times", "vp_dsm_loss"]

VP_T_EPS = 1e-5  # score_sde losses.py: t = rand * (sde.T - eps) + eps


def sample_times(
    n: int,
    *,
    eps: float = VP_T_EPS,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """n times t ~ U(eps, 1), shape (n,)."""
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (1.0 - eps) + eps


def vp_dsm_loss(
    model: DiffusionNet, u0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """The continuous-time DSM loss for eps-prediction (score_sde ``reduce_mean``).

    model: a `DiffusionNet` (its ``.schedule`` gives abar(t)); u0 (R, C, H, W) clean images in [-1, 1];
    t (R,) times in (0, 1]; noise (R, C, H, W) standard normal. Returns the scalar mean over rows of each
    row's mean squared error (eps_theta(u_t, t) - noise)^2, or with ``reduction="none"`` the (R,) per-row
    losses (for per-t-bucket logging).
    """
    if u0.shape != noise.shape or t.shape != (u0.shape[0],):
        raise ValueError(
            f"need u0, noise of one shape and t of shape (R,), got {u0.shape}, {noise.shape}, {t.shape}"
        )
    u_t = diffuse(u0, t, noise, model.schedule)
    per_row = (model(u_t, t) - noise).square().flatten(1).mean(1)
    if reduction == "none":
        return per_row
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_row.mean()
