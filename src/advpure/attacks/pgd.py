"""PGD (Madry et al. 2018) on a `Defense`, with three gradient sources and EOT.

    x_{i+1} = project(x_i + step * sign(d_i)),   d_i = the ascent direction at x_i

Gradient sources for d_i (L the per-sample loss, g the classifier, f(.; n_k) a purification draw):

* `classifier` — grad_x L(g(x), y) at x_i: preprocessor-blind; the purifier is ignored, so the
  direction is deterministic and EOT is irrelevant (computed once whatever `eot` says).
* `full`       — grad_x (1/K) sum_k L(g(f(x; n_k)), y) at x_i: exact gradients through every
  purification step of K draws (`Defense.chain_logits(differentiable=True)`; the Defense takes
  the ADP step sizes without gradient and fixes each draw's screening noise).
* `bpda`       — the classifier gradient at the purified points x_k = f(x_i; n_k), applied to x_i
  as if f were the identity (Athalye et al. 2018). EOT over K draws: the mean gradient, or
  `vote` = sign(sum_k sign(grad_k)), the vote of per-draw sign steps of the original ADP code.

Draws are batch rows (draw-major, one Defense call for all K), never a Python loop. For a
deterministic defense (identity purifier) every draw is the same, so K = 1 is used: then bpda and
full reduce exactly to classifier PGD.

This module also holds what every attack shares: `AttackResult`, the objective/gradient
evaluation `eot_gradient`, and `Trace`, which records the objective and the defense's
correctness along the path and calls the progress/observer hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from advpure.attacks.losses import draw_losses
from advpure.attacks.projection import project, start_point
from advpure.purify.defense import MERGE_RULES, correct_by_merge
from advpure.rng import RNG

GRADIENTS = ("classifier", "full", "bpda")
AGGREGATES = ("mean", "vote")

Progress = Callable[[int], None]
Observer = Callable[[int, torch.Tensor], None]


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # (B, C, H, W) final adversarial input (detached)
    losses: torch.Tensor  # (iters + 1, B): the attack's objective at the iterates x_0 .. x_iters
    path_correct: dict[str, torch.Tensor] | None  # {merge rule: (iters, B) bool} at x_0 .. x_{iters-1}


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


def classifier_objective(defense, x, y, loss: str, *, grad: bool = True) -> Evaluation:
    """L(g(x), y) and its input gradient at x itself (no purification)."""
    with _grad_mode(grad):
        xr = x.detach().requires_grad_(grad)
        logits = defense.classify(xr).unsqueeze(0)
        value = draw_losses(loss, logits, y).mean(0)
        g = torch.autograd.grad(value.sum(), xr)[0] if grad else None
    chains = None if defense.stochastic else logits.detach()
    return Evaluation(value.detach(), g, chains)


def full_objective(defense, x, y, rng: RNG, draws: int, loss: str, *, grad: bool = True) -> Evaluation:
    """(1/K) sum_k L(g(f(x; n_k)), y) and its exact input gradient through the purifier."""
    with _grad_mode(grad):
        xr = x.detach().requires_grad_(grad)
        logits, _ = defense.chain_logits(xr, rng, draws, differentiable=grad)
        value = draw_losses(loss, logits, y).mean(0)
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
        per_draw = draw_losses(loss, logits, y)
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
) -> Evaluation:
    """The EOT objective at x and (grad=True) its ascent direction, from gradient source
    `gradient` with K = eot draws in one batched Defense call."""
    k = effective_draws(defense, eot)
    if gradient == "classifier":
        return classifier_objective(defense, x, y, loss, grad=grad)
    if gradient == "full":
        if aggregate != "mean":
            raise ValueError(f"eot_aggregate '{aggregate}' is only defined for bpda gradients, not 'full'")
        return full_objective(defense, x, y, rng, k, loss, grad=grad)
    if gradient == "bpda":
        return bpda_objective(defense, x, y, rng, k, loss, aggregate, grad=grad)
    raise ValueError(f"unknown gradient source '{gradient}'; allowed: {', '.join(GRADIENTS)}")


def path_correct(defense, x, y, chains: torch.Tensor | None, rng: RNG) -> dict[str, torch.Tensor]:
    """{merge rule: (B,) bool}: is the defended prediction (S replicas merged) correct at x?

    Reuses the attack's own chains when it has >= S of them at x (the first S, merged), since
    they are S independent draws of the defense at x; otherwise evaluates the defense with fresh
    draws from `rng`. A deterministic defense needs one classification."""
    if not defense.stochastic:
        if chains is None:
            with torch.no_grad():
                chains = defense.classify(x.detach()).unsqueeze(0)
        grouped = chains[:1].detach().unsqueeze(0)
        out = correct_by_merge(grouped, y)
    elif chains is not None and chains.shape[0] >= defense.replicas:
        out = correct_by_merge(chains[: defense.replicas].detach().unsqueeze(0), y)
    else:
        out = defense.evaluate(x.detach(), y, rng, n=1)
    return {rule: v[0] for rule, v in out.items()}


class Trace:
    """Per-iterate bookkeeping shared by all attacks: the objective at x_0 .. x_iters, the
    defense's correctness at x_0 .. x_{iters-1} (when tracked), and the caller's hooks."""

    def __init__(
        self,
        defense,
        y,
        rng: RNG,
        *,
        track_path: bool = False,
        progress: Progress | None = None,
        observer: Observer | None = None,
    ):
        self.defense, self.y = defense, y
        self.track_path = track_path
        self.progress, self.observer = progress, observer
        self.path_rng = rng.child("path")
        self.losses: list[torch.Tensor] = []
        self.path: dict[str, list[torch.Tensor]] = {rule: [] for rule in MERGE_RULES}

    def visit(self, i: int, x: torch.Tensor, loss: torch.Tensor, chains: torch.Tensor | None = None) -> None:
        """Record iterate x_i (i < iters) before the attack steps away from it."""
        self.losses.append(loss.detach())
        if self.observer is not None:
            self.observer(i, x.detach())
        if self.track_path:
            for rule, v in path_correct(self.defense, x, self.y, chains, self.path_rng).items():
                self.path[rule].append(v)

    def step_done(self, i: int) -> None:
        if self.progress is not None:
            self.progress(i)

    def finish(
        self, x_last: torch.Tensor, loss_last: torch.Tensor, x_adv: torch.Tensor | None = None
    ) -> AttackResult:
        """Record the last iterate x_iters and build the result (x_adv defaults to x_last)."""
        iters = len(self.losses)
        self.losses.append(loss_last.detach())
        if self.observer is not None:
            self.observer(iters, x_last.detach())
        path = {rule: torch.stack(v) for rule, v in self.path.items()} if self.track_path else None
        x_adv = x_last if x_adv is None else x_adv
        return AttackResult(x_adv=x_adv.detach(), losses=torch.stack(self.losses), path_correct=path)


def pgd_attack(
    defense,
    x,
    y,
    rng: RNG,
    *,
    eps: float,
    step: float,
    iters: int,
    gradient: str = "bpda",
    eot: int = 1,
    eot_aggregate: str = "mean",
    loss: str = "ce",
    random_start: bool = False,
    track_path: bool = False,
    progress: Progress | None = None,
    observer: Observer | None = None,
) -> AttackResult:
    """PGD with sign steps of size `step`; returns the last iterate (Madry et al.)."""
    trace = Trace(defense, y, rng, track_path=track_path, progress=progress, observer=observer)
    eot_rng = rng.child("eot")
    kw = dict(gradient=gradient, eot=eot, aggregate=eot_aggregate, loss=loss)
    x_i = start_point(x, eps, rng, random_start)
    for i in range(iters):
        ev = eot_gradient(defense, x_i, y, eot_rng, **kw)
        trace.visit(i, x_i, ev.loss, ev.chains)
        x_i = project(x_i + step * ev.grad.sign(), x, eps)
        trace.step_done(i)
    last = eot_gradient(defense, x_i, y, eot_rng, grad=False, **kw)
    return trace.finish(x_i, last.loss)


__all__ = [
    "AGGREGATES",
    "GRADIENTS",
    "AttackResult",
    "Evaluation",
    "Trace",
    "aggregate_draws",
    "bpda_objective",
    "classifier_objective",
    "effective_draws",
    "eot_gradient",
    "full_objective",
    "path_correct",
    "pgd_attack",
]
