"""Per-sample attack objectives (the attacker maximises them).

z are the logits, y the true class, t a target class (targeted attacks only), z_pi the logits
sorted in descending order.

* `ce`  — cross-entropy L(z, y) = -log softmax(z)_y.
          Targeted: log softmax(z)_t (the negated cross-entropy towards t).
* `dlr` — Difference of Logits Ratio (Croce & Hein 2020):
          DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12). Needs >= 3 classes.
          Targeted (APGD-T, Croce & Hein 2020):
          DLR_T(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12). Needs >= 4 classes.
          Both are invariant to shifting and scaling the logits, so they do not saturate like CE
          on over-confident models.
* `cw`  — Carlini–Wagner margin (Carlini & Wagner 2017, their f_6 without the confidence
          clamp): CW(z, y) = max_{i != y} z_i - z_y. Targeted: z_t - z_y. Shift invariant, not
          saturating; the loss Croce et al. (2022) used to re-evaluate ADP.

All three are > 0 exactly when the sample is misclassified (untargeted; for a targeted loss,
when t beats y), and higher is more adversarial. Losses are per row (no reduction): EOT averages
over draws and the attacks keep per-sample state (APGD), so a batch mean would be the wrong
object everywhere here.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOSSES = ("ce", "dlr", "cw")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> z_y (N,) and max_{i != y} z_i (N,)."""
    z_y = logits.gather(-1, y[:, None]).squeeze(-1)
    is_y = F.one_hot(y, logits.shape[-1]).bool()
    return z_y, logits.masked_fill(is_y, float("-inf")).max(-1).values


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N,) DLR loss (higher = more adversarial; > 0 once misclassified).
    Raises ValueError for fewer than 3 classes."""
    if logits.shape[-1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    top = logits.sort(dim=-1, descending=True).values
    z_y, z_other = _true_and_best_other(logits, y)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, K) logits, true classes y (N,), targets t (N,) -> (N,) targeted DLR loss
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (Croce & Hein 2020, APGD-T); > 0 once
    z_t > z_y. Raises ValueError for fewer than 4 classes."""
    if logits.shape[-1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[-1]}")
    top = logits.sort(dim=-1, descending=True).values
    z_y = logits.gather(-1, y[:, None]).squeeze(-1)
    z_t = logits.gather(-1, target[:, None]).squeeze(-1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) logits -> (N,) Carlini–Wagner margin max_{i != y} z_i - z_y (targeted: z_t - z_y);
    in logit units, > 0 once misclassified (once t beats y). Needs >= 2 classes."""
    z_y, z_other = _true_and_best_other(logits, y)
    if target is not None:
        z_other = logits.gather(-1, target[:, None]).squeeze(-1)
    return z_other - z_y


def per_sample_loss(
    name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, K) logits -> (N,) loss `name` (ce | dlr | cw); with `target` (N,) its targeted form
    (targets must differ from y: `target_classes` picks them so). Raises ValueError for an unknown name or too few classes (dlr: 3, targeted dlr: 4)."""
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss '{name}'; allowed: {', '.join(LOSSES)}")
    if name == "ce":
        return cross_entropy(logits, y) if target is None else -cross_entropy(logits, target)
    if name == "dlr":
        return dlr(logits, y) if target is None else dlr_targeted(logits, y, target)
    return cw_margin(logits, y, target)


def draw_losses(
    name: str, chain_logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """(K, B, C) logits of K draws (draw-major) -> (K, B) per-draw losses; y and target (B,)."""
    k, b = chain_logits.shape[:2]
    t = None if target is None else target.repeat(k)
    return per_sample_loss(name, chain_logits.reshape(k * b, -1), y.repeat(k), t).view(k, b)


def defended_loss(name: str, merged: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """Loss of the defended model's merged output (what a black-box attacker observes).

    `merged` is `merge_scores(..., rule)`: probabilities (softmax), mean logits (logits) or vote
    shares (vote). CE is -log D(x)_y with D the defended probabilities (mean logits go through a
    softmax; zero vote shares are clamped at 1e-12). DLR and CW are applied to log D(x): for
    softmax-derived probabilities that equals DLR / CW on logits (both are shift invariant), and
    CW on log D(x) is the log-probability margin log D(x)_j - log D(x)_y of the best other class j.
    """
    if rule == "logits":
        log_p = merged.float().log_softmax(-1)
    else:
        log_p = merged.float().clamp_min(1e-12).log()
    if name == "ce":
        return -log_p.gather(-1, y[:, None]).squeeze(-1)
    return per_sample_loss(name, log_p, y)


__all__ = [
    "LOSSES",
    "cross_entropy",
    "cw_margin",
    "defended_loss",
    "dlr",
    "dlr_targeted",
    "draw_losses",
    "per_sample_loss",
]
