"""PGD (Madry et al. 2018) on a `Defense`, with three gradient sources and EOT.

    x_{i+1} = project(x_i + step * sign(d_i)),   d_i = the ascent direction at x_i

d_i comes from `eot_gradient` (advpure.attacks.objectives): `classifier` (preprocessor-blind,
the ADP paper's "Classifier PGD"), `bpda` (BPDA+EOT, Athalye et al. 2018, the ADP paper's adaptive attack)
or `full` (exact gradients through every purification step, PGD-EOT as in Lee & Kim 2023).

Arguments (config block `attacks.<name>`, kind `pgd`): iters, eps, step, loss (ce | dlr | cw),
gradient, eot (K purification draws per step), eot_aggregate (mean | vote), random_start,
restarts (k >= 1; k > 1: k runs from independent random starts, whatever random_start says, each
on the images the earlier ones did not break; per sample the first that broke it, else the one
with the highest final loss; `advpure.attacks.restarts`).
Shapes: x (B, C, H, W) in [0, 1], y (B,) int64; returns the last iterate (of the kept restart).

    >>> p = attack_params("pgd", gradient="bpda", iters=40, eot=15)
    >>> run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255).x_adv
    >>> p = attack_params("pgd", gradient="full", loss="cw", iters=100, eot=20, restarts=3)
"""

from __future__ import annotations

from dataclasses import dataclass

from advpure.attacks.base import Attack, AttackParams, AttackResult, Trace, register_attack
from advpure.attacks.objectives import AGGREGATES, GRADIENTS, eot_gradient
from advpure.attacks.projection import project, start_point
from advpure.attacks.restarts import with_restarts
from advpure.core.params import at_least, choice
from advpure.core.rng import RNG


def pgd_attack(
    defense,
    x,
    y,
    rng: RNG,
    p,
    *,
    eps: float,
    step: float,
    random_start: bool | None = None,
    trace: Trace | None = None,
    **hooks,
) -> AttackResult:
    """PGD with parameters `p` (a `PGD.Params`: iters, gradient, eot, eot_aggregate, loss,
    random_start) and sign steps of size `step` in the l_inf ball of radius `eps`; returns the last
    iterate. `random_start` overrides p's (the restarts' runs)."""
    trace = trace or Trace(defense, y, rng, **hooks)  # hooks: track_path, progress, observer
    eot_rng = rng.child("eot")
    kw = dict(gradient=p.gradient, eot=p.eot, aggregate=p.eot_aggregate, loss=p.loss)
    start = p.random_start if random_start is None else random_start
    x_i = start_point(x, eps, rng, start)
    for i in range(p.iters):
        ev = eot_gradient(defense, x_i, y, eot_rng, **kw)
        trace.visit(i, x_i, ev.loss, ev.chains, grad=ev.grad)
        x_i = project(x_i + step * ev.grad.sign(), x, eps)
        trace.step_done(i)
    last = eot_gradient(defense, x_i, y, eot_rng, grad=False, **kw)
    return trace.finish(x_i, last.loss)


def check_vote(p, which: str) -> None:
    """A vote of per-draw sign steps is only defined for BPDA gradients."""
    if p.eot_aggregate == "vote" and which != "bpda":
        raise ValueError(
            f"eot_aggregate 'vote' (a vote of per-draw sign steps) is only defined for bpda gradients, not '{which}'"
        )


@register_attack("pgd")
class PGD(Attack):
    """PGD-EOT with a classifier, BPDA or full gradient (Madry et al. 2018; Athalye et al. 2018)."""

    @dataclass
    class Params(AttackParams):
        kind: str = "pgd"
        gradient: str = choice("bpda", *GRADIENTS)  # classifier (blind) | bpda | full (exact)
        eot: int = at_least(1, 1)  # expectation over transformation: purification draws per step
        eot_aggregate: str = choice("mean", *AGGREGATES)  # vote = per-draw sign steps (original code)
        restarts: int = at_least(1, 1)  # k > 1: k runs from random starts, per-sample best kept

    @classmethod
    def label(cls, p) -> str:
        it, eot = p.iters, p.eot
        return {
            "classifier": f"PGD{it} (classifier, blind)",
            "bpda": f"BPDA{it}+EOT{eot}",
            "full": f"PGD{it}-EOT{eot} (full gradient)",
        }[p.gradient]

    @classmethod
    def check(cls, p, defense) -> None:
        check_vote(p, p.gradient)

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
        def once(x_r, y_r, rng_r, trace_r, rows, random_start):
            return pgd_attack(
                defense, x_r, y_r, rng_r, p, eps=eps, step=step, trace=trace_r, random_start=random_start
            )

        return with_restarts(
            once, defense, x, y, rng, trace, restarts=p.restarts, iters=p.iters, random_start=p.random_start
        )


__all__ = ["PGD", "check_vote", "pgd_attack"]
