"""Per-sample attack objectives (the attacker maximises them).

* `ce`  — cross-entropy L(z, y) = -log softmax(z)_y.
* `dlr` — Difference of Logits Ratio (Croce & Hein 2020):
          DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),  z_pi sorted descending.
          Invariant to shifting and scaling the logits, so it does not saturate like CE on
          over-confident models. Needs at least 3 classes.

Losses are per row (no reduction): EOT averages over draws and the attacks keep per-sample
state (APGD), so a batch mean would be the wrong object everywhere here.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOSSES = ("ce", "dlr")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) DLR loss (higher = more adversarial; > 0 once misclassified)."""
    if logits.shape[-1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    top = logits.sort(dim=-1, descending=True).values
    z_y = logits.gather(-1, y[:, None]).squeeze(-1)
    is_y = F.one_hot(y, logits.shape[-1]).bool()
    z_other = logits.masked_fill(is_y, float("-inf")).max(-1).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def per_sample_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) loss `name` (ce | dlr)."""
    if name == "ce":
        return cross_entropy(logits, y)
    if name == "dlr":
        return dlr(logits, y)
    raise ValueError(f"unknown attack loss '{name}'; allowed: {', '.join(LOSSES)}")


def draw_losses(name: str, chain_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, B, C) logits of K draws (draw-major) -> (K, B) per-draw losses."""
    k, b = chain_logits.shape[:2]
    return per_sample_loss(name, chain_logits.reshape(k * b, -1), y.repeat(k)).view(k, b)


def defended_loss(name: str, merged: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """Loss of the defended model's merged output (what a black-box attacker observes).

    `merged` is `merge_scores(..., rule)`: probabilities (softmax), mean logits (logits) or vote
    shares (vote). CE is -log D(x)_y with D the defended probabilities (mean logits go through a
    softmax; zero vote shares are clamped at 1e-12). DLR is applied to log D(x), which for
    softmax-derived probabilities equals DLR on logits (it is shift invariant).
    """
    if rule == "logits":
        log_p = merged.float().log_softmax(-1)
    else:
        log_p = merged.float().clamp_min(1e-12).log()
    if name == "ce":
        return -log_p.gather(-1, y[:, None]).squeeze(-1)
    return per_sample_loss(name, log_p, y)


__all__ = ["LOSSES", "cross_entropy", "defended_loss", "dlr", "draw_losses", "per_sample_loss"]
