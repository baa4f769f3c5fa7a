"""Attack objectives and their EOT gradients on a `Defense` (Athalye et al. 2018, EOT and BPDA).

Gradient sources for the ascent direction d at x (L the per-sample loss, g the classifier,
f(.; n_k) a purification draw):

* `classifier` — grad_x L(g(x), y) at x: preprocessor-blind; the purifier is ignored, so the
  direction is deterministic and EOT is irrelevant (computed once whatever `eot` says).
* `full`       — grad_x (1/K) sum_k L(g(f(x; n_k)), y) at x: exact gradients through every
  purification step of K draws (`Defense.chain_logits(differentiable=True)`; the Defense takes
  the ADP step sizes without gradient and fixes each draw's screening noise).
* `bpda`       — the classifier gradient at the purified points x_k = f(x; n_k), applied to x
  as if f were the identity (Athalye et al. 2018). EOT over K draws: the mean gradient, or
  `vote` = sign(sum_k sign(grad_k)), the vote of per-draw sign steps of the original ADP code.

Draws are batch rows (draw-major, one Defense call for all K), never a Python loop. For a
deterministic defense (identity purifier) every draw is the same, so K = 1 is used: then bpda and
full reduce exactly to classifier PGD. Non-finite losses or gradients raise `NonFiniteError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advpure.attacks.losses import draw_losses
from advpure.core.errors import check_finite
from advpure.core.rng import RNG

GRADIENTS = ("classifier", "full", "bpda")
AGGREGATES = ("mean", "vote")


@dataclass
class Evaluation:
    """The attack objective at one point, for one batch."""

    loss: torch.Tensor  # (B,) objective: the loss averaged over the K draws
    grad: torch.Tensor | None  # (B, ...) ascent direction (mean gradient or vote); None if not asked
    chains: torch.Tensor | None  # (K, B, classes) detached logits of the defended model's chains at
    # this point (the purified draws, or the bare classifier for a deterministic defense); None
    # when the attack did not compute them (classifier gradient on a stochastic defense)


def _grad_mode(grad: bool):
    return torch.enable_grad() if grad else torch.no_grad()


def aggregate_draws(grads: torch.Tensor, how: str) -> torch.Tensor:
    """(K, B, ...) per-draw gradients -> (B, ...): `mean`, or `vote` = sign(sum_k sign(grad_k))."""
    if how == "mean":
        return grads.mean(0)
    if how == "vote":
        return grads.sign().sum(0).sign()
    raise ValueError(f"unknown EOT aggregate '{how}'; allowed: {', '.join(AGGREGATES)}")


def effective_draws(defense, eot: int) -> int:
    """K purification draws per evaluation: `eot` for a stochastic defense, 1 otherwise."""
    return eot if defense.stochastic else 1


def classifier_objective(defense, x, y, loss: str, *, grad: bool = True, target=None) -> Evaluation:
    """L(g(x), y) and its input gradient at x itself (no purification). `target` (B,) or None:
    the target classes of a targeted loss (`advpure.attacks.losses`)."""
    with _grad_mode(grad):
        xr = x.detach().requires_grad_(grad)
        logits = defense.classify(xr).unsqueeze(0)
        value = draw_losses(loss, logits, y, target).mean(0)
        g = torch.autograd.grad(value.sum(), xr)[0] if grad else None
    chains = None if defense.stochastic else logits.detach()
    return Evaluation(value.detach(), g, chains)


def full_objective(
    defense, x, y, rng: RNG, draws: int, loss: str, *, grad: bool = True, target=None
) -> Evaluation:
    """(1/K) sum_k L(g(f(x; n_k)), y) and its exact input gradient through the purifier."""
    with _grad_mode(grad):
        xr = x.detach().requires_grad_(grad)
        logits, _ = defense.chain_logits(xr, rng, draws, differentiable=grad)
        value = draw_losses(loss, logits, y, target).mean(0)
        g = torch.autograd.grad(value.sum(), xr)[0] if grad else None
    return Evaluation(value.detach(), g, logits.detach())


def bpda_objective(
    defense,
    x,
    y,
    rng: RNG,
    draws: int,
    loss: str,
    aggregate: str = "mean",
    *,
    grad: bool = True,
    purified: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> Evaluation:
    """BPDA: classifier gradients at K purified points (purified without gradient), aggregated
    over the draws and used as the gradient at x. `purified` (K*B rows, draw-major) lets a caller
    that has already purified x (joint attack, full variant) share those draws."""
    if purified is None:
        with torch.no_grad():
            purified = defense.purify(x.detach(), rng, draws).x
    with _grad_mode(grad):
        xp = purified.detach().requires_grad_(grad)
        logits = defense.classify(xp).view(draws, x.shape[0], -1)
        per_draw = draw_losses(loss, logits, y, target)
        g_rows = torch.autograd.grad(per_draw.sum(), xp)[0] if grad else None
    g = aggregate_draws(g_rows.view(draws, *x.shape), aggregate) if grad else None
    return Evaluation(per_draw.mean(0).detach(), g, logits.detach())


def eot_gradient(
    defense,
    x,
    y,
    rng: RNG,
    *,
    gradient: str,
    eot: int = 1,
    aggregate: str = "mean",
    loss: str = "ce",
    grad: bool = True,
    target: torch.Tensor | None = None,
) -> Evaluation:
    """The EOT objective at x (B, C, H, W) and (grad=True) its ascent direction, from gradient
    source `gradient` with K = eot draws in one batched Defense call; `target` (B,) int64 makes
    `loss` its targeted form (None: untargeted). Raises ValueError for an unknown source or a vote
    of full gradients, NonFiniteError for a NaN/inf loss or gradient."""
    k = effective_draws(defense, eot)
    if gradient == "classifier":
        ev = classifier_objective(defense, x, y, loss, grad=grad, target=target)
    elif gradient == "full":
        if aggregate != "mean":
            raise ValueError(f"eot_aggregate '{aggregate}' is only defined for bpda gradients, not 'full'")
        ev = full_objective(defense, x, y, rng, k, loss, grad=grad, target=target)
    elif gradient == "bpda":
        ev = bpda_objective(defense, x, y, rng, k, loss, aggregate, grad=grad, target=target)
    else:
        raise ValueError(f"unknown gradient source '{gradient}'; allowed: {', '.join(GRADIENTS)}")
    check_finite(ev.loss, f"the attack loss ({loss}, {gradient} gradient)")
    if ev.grad is not None:
        check_finite(ev.grad, f"the attack gradient ({loss}, {gradient} gradient)")
    return ev


__all__ = [
    "AGGREGATES",
    "GRADIENTS",
    "Evaluation",
    "aggregate_draws",
    "bpda_objective",
    "classifier_objective",
    "effective_draws",
    "eot_gradient",
    "full_objective",
]
