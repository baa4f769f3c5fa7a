"""Batch-level augmentation that runs on the device where the batch already is.

The data stay uint8 in host memory and are converted and augmented after the transfer, on whole
batches at once: per-sample Python loops (or per-sample CPU transforms in loader workers) would
dominate the step time of the small networks used here.

The random draws come from `generator` when given (its device decides where they are drawn),
otherwise from torch's default generator of the batch's device, which `seed_everything` seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_unit expects uint8 images, got {x.dtype}")
    return x.to(torch.float32).div_(255.0)


def _draw_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def crop_at(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad `x` (B, C, H, W) by `padding` and take the H x W window at (top[b], left[b]) per sample.

    Offsets are in padded coordinates, in [0, 2 * padding]; `top = left = padding` is the identity.
    One advanced-indexing gather does the whole batch.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top.to(x.device).long()[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left.to(x.device).long()[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-crop augmentation: zero pad by `padding`, crop back to H x W at a random offset per sample.

    `padding == 0` returns `x` unchanged (and draws nothing).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    b = x.shape[0]
    dev = _draw_device(x, generator)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=dev)
    return crop_at(x, padding, offsets[0], offsets[1])


def hflip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (last axis) the samples of `x` (B, C, H, W) where the bool `mask` (B,) is true."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample independently with probability `p` (a per-sample coin flip)."""
    mask = torch.rand(x.shape[0], generator=generator, device=_draw_device(x, generator)) < p
    return hflip_where(x, mask)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + std * n with n ~ N(0, I) drawn per pixel on the batch's device (`generator`'s, when given).

    Not clipped to [0, 1]: randomized smoothing classifies x + sigma * n unclipped, so a classifier
    trained for it sees the same inputs (Gaussian data augmentation, Cohen et al. 2019, Section 4).
    `std == 0` returns `x` unchanged (and draws nothing). Raises ValueError for std < 0.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return x
    n = torch.randn(x.shape, generator=generator, device=_draw_device(x, generator), dtype=x.dtype)
    return x + std * n.to(x.device)
