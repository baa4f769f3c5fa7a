"""ADP: Adaptive Denoising Purification (Yoon, Hwang & Lee, ICML 2021), as plain torch.

One chain on a batch `x` in [0, 1] with a score net `f` trained by denoising score matching,
`f(x + sigma * eps) ~ -eps` (so f ~ sigma * grad log p_sigma; ADP uses the raw output):

  1. screening     x_0 = clip(x + sigma * n, 0, 1),  n ~ N(0, I)  (or Rademacher * sqrt(2/pi))
  2. for t < T:    g = f(x_t),  g_d = f(x_t + delta * g)
                   z = <g, g_d> / <g, g>                                   (per sample)
                   alpha = clamp(lambda * delta / (1 - z), 1e-5, 1e-1)     (per sample)
                   active <- active and (alpha > tau)        (a stopped sample stays stopped)
                   x_{t+1} = clip(x_t + alpha * active * g, 0, 1)
  3. classify x_T.

`alpha` is a secant estimate of the step along g that would reach the mode of a locally
Gaussian density: for f(x) = -c (x - mu), z = 1 - c*delta and alpha = lambda / c, so each step
shrinks x - mu by (1 - lambda). `1 - z` is of order delta/sigma (~4e-3), below bf16's resolution:
`Defense` runs the score net in fp32 for purification even under bf16 autocast, and the probe's
inner products here are taken in fp32 (or the input's wider dtype).

Departure from the official code, on purpose: it rescales images to the pixel grid
(x * 255/256 + 1/512) inconsistently at every step; we do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

ScoreFn = Callable[[torch.Tensor], torch.Tensor]

ALPHA_MIN, ALPHA_MAX = 1e-5, 1e-1


@dataclass
class PurifyResult:
    x: torch.Tensor  # purified images, same shape as the input rows
    steps: torch.Tensor  # (rows,) number of updates each row took
    score_evals: torch.Tensor  # (rows,) score-network evaluations spent on each row


def check_images(x: torch.Tensor, channels: int | None = None, size: int | None = None) -> None:
    """Inputs must be image batches in [0, 1] of the nets' shape (one-line errors)."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"expected {channels} channel(s), got images of shape {tuple(x.shape)}")
    if size is not None and (x.shape[2] != size or x.shape[3] != size):
        raise ValueError(f"expected {size}x{size} images, got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]"
        )


def screen(x: torch.Tensor, sigma: float, noise: torch.Tensor, kind: str = "gaussian") -> torch.Tensor:
    """Noise screening: x_0 = clip(x + sigma * n). `noise` is a standard normal sample (gaussian)
    or a +-1 sample (rademacher, scaled by sqrt(2/pi) to match the Gaussian's mean |n|)."""
    if kind == "gaussian":
        n = noise
    elif kind == "rademacher":
        n = noise.sign() * math.sqrt(2.0 / math.pi)
    else:
        raise ValueError(f"unknown noise type '{kind}'; allowed: gaussian, rademacher")
    return (x + sigma * n).clamp(0.0, 1.0)


def step_size(g: torch.Tensor, g_delta: torch.Tensor, lam: float, delta: float) -> torch.Tensor:
    """Per-sample alpha = clamp(lam * delta / (1 - <g, g_d>/<g, g>), 1e-5, 1e-1), in >= fp32."""
    wide = torch.promote_types(g.dtype, torch.float32)
    g = g.detach().flatten(1).to(wide)
    g_delta = g_delta.detach().flatten(1).to(wide)
    gg = (g * g).sum(1).clamp_min(torch.finfo(wide).tiny)
    z = (g * g_delta).sum(1) / gg
    # 1 - z <= 0 (curvature pointing the wrong way) gives a negative or infinite ratio; the clamp
    # maps it to the smallest step (then the sample stops) or the largest one, as the formula says.
    return (lam * delta / (1.0 - z)).nan_to_num(nan=ALPHA_MIN).clamp(ALPHA_MIN, ALPHA_MAX)


def adp_chain(
    x0: torch.Tensor,
    score_fn: ScoreFn,
    *,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
    differentiable: bool = False,
    checkpointing: bool = True,
) -> PurifyResult:
    """The adaptive deterministic updates (step 2) from the screened images `x0`.

    Only the rows still active are sent through the score net, so stopped samples cost nothing.
    `differentiable=True` keeps the graph through every step for full-gradient attacks: alpha
    and the probe f(x + delta g) are taken without gradient (as in the attack's definition),
    and each step's score evaluation is checkpointed so memory does not grow with T.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rows = x0.shape[0]
    x = x0
    active = torch.ones(rows, dtype=torch.bool, device=x0.device)
    n_steps = torch.zeros(rows, dtype=torch.long, device=x0.device)
    evals = torch.zeros(rows, dtype=torch.long, device=x0.device)
    for _ in range(steps):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        all_rows = idx.numel() == rows
        xa = x if all_rows else x.index_select(0, idx)
        if differentiable and torch.is_grad_enabled() and checkpointing:
            g = checkpoint(score_fn, xa, use_reentrant=False)
        elif differentiable:
            g = score_fn(xa)
        else:
            with torch.no_grad():
                g = score_fn(xa)
        with torch.no_grad():
            g_delta = score_fn(xa.detach() + delta * g.detach().to(xa.dtype))
            alpha = step_size(g, g_delta, lam, delta)
            still = alpha > tau
        evals[idx] += 2
        move = (alpha * still).to(xa.dtype).view(-1, *([1] * (xa.dim() - 1)))
        xa_next = (xa + move * g.to(xa.dtype)).clamp(0.0, 1.0)
        if not differentiable:
            xa_next = xa_next.detach()
        x = xa_next if all_rows else x.index_copy(0, idx, xa_next)
        n_steps[idx] += still.long()
        active[idx] = still
    return PurifyResult(x=x, steps=n_steps, score_evals=evals)


def adp_purify(
    x: torch.Tensor,
    score_fn: ScoreFn,
    *,
    sigma: float = 0.25,
    lam: float = 0.05,
    delta: float = 1e-3,
    tau: float = 1e-3,
    steps: int = 10,
    noise: str = "gaussian",
    generator: torch.Generator | None = None,
    noise_sample: torch.Tensor | None = None,
    differentiable: bool = False,
) -> PurifyResult:
    """Screen and purify a batch: the whole ADP chain in one call.

    Usage without Lightning:
        >>> out = adp_purify(x, score_net, sigma=0.25, generator=torch.Generator().manual_seed(0))
        >>> logits = classifier(out.x)
    Pass `noise_sample` (a standard-normal tensor of x's shape) to fix the screening noise.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if noise_sample is None:
        if noise == "rademacher":
            bits = torch.randint(
                0, 2, x.shape, generator=generator, device=x.device if generator is None else generator.device
            )
            noise_sample = (bits * 2 - 1).to(device=x.device, dtype=x.dtype)
        else:
            noise_sample = torch.randn(
                x.shape, generator=generator, device=x.device if generator is None else generator.device
            ).to(device=x.device, dtype=x.dtype)
    x0 = screen(x, sigma, noise_sample, noise)
    return adp_chain(x0, score_fn, lam=lam, delta=delta, tau=tau, steps=steps, differentiable=differentiable)
