"""Running a purifier at its diffusion net's resolution: DiffPure's 224 -> 256 -> 224 on ImageNet.

DiffPure (Nie et al., ICML 2022; NVlabs/DiffPure eval_sde_adv.py, ``SDE_Adv_Model.forward``) feeds
the 256 x 256 guided-diffusion net (Dhariwal & Nichol 2021) ImageNet images cropped to 224 x 224:

    x (B, 3, 224, 224) in [0, 1] -> F.interpolate(x, (256, 256), mode="bilinear", align_corners=False)
    -> purify (diffuse, reverse SDE) -> F.interpolate(x_re, (224, 224), same mode) -> classifier

torch's bilinear interpolation with align_corners=False and no antialiasing, both ways. Bilinear
weights sum to one, so resizing commutes with the affine map to diffusion space (2x - 1): resizing
before or after it is the same. Everything is differentiable (exact gradients flow through both
resizes); the attack's eps-ball stays in the 224 x 224 image space.

Purifier-independent: `purify_resized(purify, x, size)` wraps any purifier's forward, e.g. a
`resize: 256` option of the `diffpure` defense kind:

    def forward(self, x, rng, draws, fns, differentiable=False):
        if self.resize:
            return purify_resized(lambda z: self._purify(z, rng, draws, fns, differentiable), x, self.resize)
        return self._purify(x, rng, draws, fns, differentiable)

Per-image noise keys (`SampleRNG`) are unaffected: the purifier draws its noise at the resized shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from advpure.purify.base import PurifyResult


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, size) by torch's bilinear interpolation (align_corners=False, no
    antialiasing: DiffPure's); `x` itself when it already has that size. `size`: an int (square)
    or (height, width). Differentiable. Raises ValueError for x that is not 4-d or a size < 1."""
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=False)


def purify_resized(
    purify: Callable[[torch.Tensor], PurifyResult | torch.Tensor], x: torch.Tensor, size: int | None
) -> PurifyResult | torch.Tensor:
    """`purify` run at `size` x `size`: x (B, C, H, W) is resized to it, purified, and the purified
    rows (R, C, size, size) resized back to (R, C, H, W). `purify` returns a `PurifyResult` (its
    `steps` / `score_evals` are kept) or a tensor. `size` None, or equal to the input's: `purify(x)`."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return purify(x)
    out = purify(resize_images(x, size))
    if isinstance(out, PurifyResult):
        return dataclasses.replace(out, x=resize_images(out.x, tuple(x.shape[-2:])))
    return resize_images(out, tuple(x.shape[-2:]))


__all__ = ["purify_resized", "resize_images"]
