"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), l-infinity, with EOT.

PGD with a fixed step either overshoots or crawls; APGD adapts the step per sample and adds
momentum, which is why it is the standard reliable evaluation. With d_k the ascent direction at
x_k (EOT mean over K draws; gradient source classifier | full | bpda as in `pgd`):

    z_{k+1} = P(x_k + eta * sign(d_k))
    x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1}))       (x_1 = z_1; a = momentum 0.75)

eta starts at 2 eps. Checkpoints w_j = ceil(p_j * iters), p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). At a checkpoint, per sample, eta is halved if

  1. the loss increased in fewer than rho * (w_j - w_{j-1}) of the steps since w_{j-1}, or
  2. eta was not halved at w_{j-1} and the best loss has not improved since w_{j-1};

a halved sample restarts from its best point (with the gradient stored there, momentum reset).
The result is the best point found: the highest EOT loss over all iterates x_0 .. x_iters.
Everything is per sample; only the checkpoint schedule is shared. The budget equals PGD's:
one gradient evaluation per iteration plus one loss evaluation of the last iterate.

Targeted mode (APGD-T, Croce & Hein 2020): `target_rank` t >= 1 attacks, per image, the t-th most
likely class other than the true one, with the targeted form of `loss` (for dlr:
-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), >= 4 classes). Classes are ranked by one
defended prediction at the clean input: the mean logits of S purification chains (stream
`target`; logits as AutoAttack ranks them, since a saturated softmax ties; ties to the lower
class index). Success still means misclassification (any class but y).

Restarts (`restarts` k > 1): k runs from independent random starts on the images not yet broken;
per sample the first that broke it, else the one with the highest objective at its best point
(`advpure.attacks.restarts`). The target classes are ranked once and shared by all restarts.

Arguments (config block `attacks.<name>`, kind `apgd`): iters, eps, loss (ce | dlr | cw),
gradient (full | bpda | classifier), eot, eot_aggregate, rho, momentum, random_start, restarts,
target_rank. `step` is not used. Shapes: x (B, C, H, W) in [0, 1], y (B,) int64.

    >>> p = attack_params("apgd", loss="dlr", iters=100, eot=20, target_rank=1, restarts=2)
    >>> run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255).x_adv
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advpure.attacks.base import Attack, AttackParams, AttackResult, Trace, register_attack
from advpure.attacks.objectives import AGGREGATES, GRADIENTS, eot_gradient
from advpure.attacks.pgd import check_vote
from advpure.attacks.projection import project, start_point
from advpure.attacks.restarts import with_restarts
from advpure.core.params import at_least, between, choice
from advpure.core.rng import RNG


def apgd_checkpoints(iters: int) -> list[int]:
    """Iterations 0 < w_j < iters at which the step size is reviewed."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w = {math.ceil(pj * iters - 1e-9) for pj in p[1:]}  # the tolerance absorbs 0.57 * 100 = 56.99..
    return sorted(c for c in w if 0 < c < iters)


def should_halve(
    increases: torch.Tensor,
    span: int,
    rho: float,
    halved_last: torch.Tensor,
    best: torch.Tensor,
    best_at_last: torch.Tensor,
) -> torch.Tensor:
    """Per sample, at a checkpoint `span` iterations after the previous one: halve the step if
    the loss increased in fewer than rho * span of those steps (condition 1), or if the step
    was not halved at the previous checkpoint and the best loss has not improved since (2)."""
    oscillating = increases < rho * span
    stalled = ~halved_last & (best <= best_at_last)
    return oscillating | stalled


def apgd_attack(
    defense,
    x,
    y,
    rng: RNG,
    p,
    *,
    eps: float,
    random_start: bool | None = None,
    target: torch.Tensor | None = None,
    trace: Trace | None = None,
    **hooks,
) -> AttackResult:
    """APGD-EOT with parameters `p` (an `APGD.Params`: iters, gradient, eot, eot_aggregate, loss,
    rho, momentum, random_start) on x (B, C, H, W) in [0, 1]; returns the best point found (highest
    EOT loss), not the last iterate, and that loss as `loss_adv`. `target` (B,) int64: attack those
    classes with the targeted form of `p.loss` (None: untargeted); `random_start` overrides p's."""
    trace = trace or Trace(defense, y, rng, **hooks)  # hooks: track_path, progress, observer
    eot_rng = rng.child("eot")
    iters, rho, momentum = p.iters, p.rho, p.momentum
    random_start = p.random_start if random_start is None else random_start
    kw = dict(gradient=p.gradient, eot=p.eot, aggregate=p.eot_aggregate, loss=p.loss, target=target)
    checkpoints = set(apgd_checkpoints(iters))
    b = x.shape[0]
    col = (b,) + (1,) * (x.dim() - 1)  # per-sample scalars broadcast over pixels

    def where(mask, a, c):
        return torch.where(mask.view(col) if a.dim() > 1 else mask, a, c)

    eta = torch.full((b,), 2.0 * eps, dtype=x.dtype, device=x.device)
    x_i = start_point(x, eps, rng, random_start)
    x_prev = x_i
    x_best, grad_best = x_i.clone(), torch.zeros_like(x_i)
    best = torch.full((b,), -math.inf, dtype=torch.float32, device=x.device)
    best_at_checkpoint = best.clone()
    loss_prev = best.clone()
    increases = torch.zeros(b, dtype=torch.long, device=x.device)
    halved_last = torch.zeros(b, dtype=torch.bool, device=x.device)
    last_checkpoint = 0

    for i in range(iters):
        ev = eot_gradient(defense, x_i, y, eot_rng, **kw)
        trace.visit(i, x_i, ev.loss, ev.chains, grad=ev.grad)
        value, grad = ev.loss.float(), ev.grad
        if i > 0:
            increases += (value > loss_prev).long()
        improved = value > best
        best = torch.where(improved, value, best)
        x_best, grad_best = where(improved, x_i, x_best), where(improved, grad, grad_best)
        loss_prev = value
        if i == 0:
            best_at_checkpoint = best.clone()
        elif i in checkpoints:
            halve = should_halve(increases, i - last_checkpoint, rho, halved_last, best, best_at_checkpoint)
            eta = torch.where(halve, eta / 2, eta)
            x_i, grad = where(halve, x_best, x_i), where(halve, grad_best, grad)
            x_prev = where(halve, x_best, x_prev)  # restart: no momentum from before the jump
            loss_prev = torch.where(halve, best, loss_prev)
            halved_last, best_at_checkpoint = halve, best.clone()
            increases.zero_()
            last_checkpoint = i
        z = project(x_i + eta.view(col) * grad.sign(), x, eps)
        if i == 0:
            x_next = z
        else:
            x_next = project(x_i + momentum * (z - x_i) + (1.0 - momentum) * (x_i - x_prev), x, eps)
        x_prev, x_i = x_i, x_next
        trace.step_done(i)

    last = eot_gradient(defense, x_i, y, eot_rng, grad=False, **kw)
    last_better = last.loss.float() > best
    x_best = where(last_better, x_i, x_best)
    return trace.finish(x_i, last.loss, x_best, torch.where(last_better, last.loss.float(), best))


def target_classes(defense, x: torch.Tensor, y: torch.Tensor, rng: RNG, n: int) -> torch.Tensor:
    """(B, n) int64: per image the n most likely classes other than y, most likely first, ranked by
    one defended prediction at x (the mean logits of S chains from `rng`; a mean softmax saturates
    and ties on confident nets; ties to the lower index).
    Raises ValueError if there are fewer than n + 1 classes."""
    with torch.no_grad():
        chains, _ = defense.chain_logits(x.detach(), rng, defense.replicas)
    scores = chains.float().mean(0)
    classes = scores.shape[-1]
    if n > classes - 1:
        raise ValueError(f"{n} target classes need at least {n + 1} classes, got {classes}")
    scores = scores.scatter(-1, y[:, None], float("-inf"))  # never the true class
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :n]


def apgd_run(p, defense, x, y, rng: RNG, *, eps: float, trace: Trace, target: torch.Tensor | None = None):
    """APGD with parameters `p` (an `APGD.Params`, restarts included) on x (B, C, H, W), y (B,),
    attacking the classes `target` (B,) (None: untargeted). Returns an AttackResult."""

    def once(x_r, y_r, rng_r, trace_r, rows, random_start):
        t = None if target is None else target[rows]
        return apgd_attack(
            defense, x_r, y_r, rng_r, p, eps=eps, trace=trace_r, random_start=random_start, target=t
        )

    return with_restarts(
        once, defense, x, y, rng, trace, restarts=p.restarts, iters=p.iters, random_start=p.random_start
    )


@register_attack("apgd")
class APGD(Attack):
    """APGD-EOT (Croce & Hein 2020) with a full (default), BPDA or classifier gradient.
    `step` is not used: the step starts at 2 eps and adapts per sample."""

    fixed_step = False

    @dataclass
    class Params(AttackParams):
        kind: str = "apgd"
        gradient: str = choice("full", *GRADIENTS)
        eot: int = at_least(1, 1)
        eot_aggregate: str = choice("mean", *AGGREGATES)
        rho: float = between(0.75, 0.0, 1.0)  # step-halving threshold on the fraction of increases
        momentum: float = between(0.75, 0.0, 1.0)
        restarts: int = at_least(1, 1)  # k > 1: k runs from random starts, per-sample best kept
        target_rank: int = at_least(0, 0)  # 0: untargeted; t: the t-th most likely other class

    @classmethod
    def label(cls, p) -> str:
        src = {"full": "", "bpda": ", BPDA", "classifier": ", classifier"}[p.gradient]
        if p.target_rank:
            return f"APGD-T-{p.loss.upper()}{p.iters}-EOT{p.eot}{src} (target rank {p.target_rank})"
        return f"APGD-{p.loss.upper()}{p.iters}-EOT{p.eot}{src}"

    @classmethod
    def check(cls, p, defense) -> None:
        check_vote(p, p.gradient)

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
        target = None
        if p.target_rank:
            target = target_classes(defense, x, y, rng.child("target"), p.target_rank)[:, -1]
        return apgd_run(p, defense, x, y, rng, eps=eps, trace=trace, target=target)


__all__ = ["APGD", "apgd_attack", "apgd_checkpoints", "apgd_run", "should_halve", "target_classes"]
