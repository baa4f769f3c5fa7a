"""PGD-l2 against a smoothed classifier (Monte-Carlo estimate), for checking certificates empirically.

The smoothed classifier's soft version is estimated by m noise draws, and PGD ascends the
cross-entropy of that estimate (the SmoothAdv objective of Salman et al., NeurIPS 2019):

    L(x') = -log( 1/m sum_j softmax(h(x' + sigma n_j))[y] ),   ||x' - x||_2 <= eps,  x' in [0, 1]^D

Each step draws m fresh noise samples per image (keyed by seed, image index and step, so an image
gets the same noise in any batch) and moves by
`step_size` along the l2-normalized gradient, then projects onto the l2 ball and the box (the box
clip only shrinks |x' - x| coordinate-wise, so the result stays in both). A prediction that this
attack flips inside a certified radius would be a broken certificate (or an alpha-level failure).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advpure.certify.noise import KeyedNormal


def project_l2(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Scale each row of delta (B, ...) down to l2 norm <= eps (a float or a (B,) tensor)."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (torch.as_tensor(eps, dtype=norm.dtype, device=norm.device) / norm).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def smoothed_pgd_l2(
    base: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    sigma: float,
    eps: float | torch.Tensor,
    steps: int = 20,
    samples: int = 16,
    step_size: float | torch.Tensor | None = None,
    seed: int = 0,
    idx: Sequence[int] | None = None,
) -> torch.Tensor:
    """Untargeted PGD-l2 on the Monte-Carlo smoothed classifier of `base` at noise `sigma`.

    base: noisy rows (rows, C, H, W) -> logits (rows, K), differentiable (e.g. a `build_base` module);
    x: (B, C, H, W) images in [0, 1]; target: (B,) class to move away from (the certified c_A);
    eps: l2 budget, a float or a (B,) tensor (per-image, e.g. each certified radius);
    step_size: defaults to 2.5 * eps / steps (Madry et al. 2018); samples: noise draws per step
    (memory: samples * B rows in one forward and backward); idx: the images' dataset indices, which
    key their noise (default 0..B-1).
    Returns the adversarial images (B, C, H, W) in [0, 1] with ||x_adv - x||_2 <= eps per image.
    """
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got {steps}, {samples}")
    b = x.shape[0]
    view = (-1, *([1] * (x.dim() - 1)))
    keyed = KeyedNormal(seed, device=x.device, block=samples)
    idx = list(range(b)) if idx is None else [int(i) for i in idx]
    if len(idx) != b:
        raise ValueError(f"idx has {len(idx)} entries for {b} images")
    # works when called under inference mode too: the clones below are ordinary tensors
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(b).clone()
        step_t = (
            2.5 * eps_t / steps
            if step_size is None
            else torch.as_tensor(step_size, dtype=x.dtype, device=x.device).expand(b).clone()
        )
        target = torch.as_tensor(target, device=x.device).long().clone()
        delta = torch.zeros_like(x)
        for t in range(steps):
            noise = torch.stack([keyed.draw(i, f"attack{t}", 0, samples, tuple(x.shape[1:])) for i in idx], 1)
            noise = noise.to(x.dtype)  # (samples, B, C, H, W)
            xa = (x + delta).requires_grad_(True)
            rows = (xa.unsqueeze(0) + sigma * noise).flatten(0, 1)  # sample-major: row j*B + i
            probs = base(rows).float().softmax(-1).view(samples, b, -1).mean(0)
            loss = -probs.gather(1, target[:, None]).clamp_min(1e-12).log().sum()
            (grad,) = torch.autograd.grad(loss, xa)
            unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta = project_l2(delta + step_t.view(view) * unit, eps_t)
            delta = ((x + delta).clamp(0.0, 1.0) - x).detach()
    return (x + delta).detach()
