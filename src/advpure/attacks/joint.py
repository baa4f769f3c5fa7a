"""Joint attacks of the ADP paper (seed Table 1): push the input where the purifier points while
also ascending the classifier loss, so that purification carries it towards the wrong class.

    joint (score): x_{i+1} = project(x_i + step * (m * sign(s(x_i))           + (1 - m) * sign(d_i)))
    joint (full):  x_{i+1} = project(x_i + step * (m * sign(mean_k f(x_i; n_k) - x_i) + (1 - m) * sign(d_i)))

m = eps_mix, s the raw score network, f(.; n_k) K = eot purification draws, and d_i the
classifier term: grad_x L(g(x), y) at x_i (`joint_grad=input`, the ADP paper's formula), or the
BPDA+EOT direction at purified points (`joint_grad=bpda`, the original code's variant; for joint
(full) it uses the same K draws as the purifier term). The objective recorded per iterate is the
classifier term's loss (L(g(x_i), y), or its EOT mean at the purified points for bpda).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advpure.attacks.base import Attack, AttackParams, AttackResult, Trace, register_attack
from advpure.attacks.objectives import AGGREGATES, bpda_objective, classifier_objective, effective_draws
from advpure.attacks.pgd import check_vote
from advpure.attacks.projection import project, start_point
from advpure.core.params import at_least, between, choice
from advpure.core.rng import RNG

JOINT_KINDS = ("score", "full")
JOINT_GRADS = ("input", "bpda")


def joint_attack(
    defense,
    x,
    y,
    rng: RNG,
    p,
    *,
    kind: str,
    eps: float,
    step: float,
    trace: Trace | None = None,
    **hooks,
) -> AttackResult:
    """Joint attack `kind` (score | full) with parameters `p` (a joint attack's Params: iters,
    eps_mix, joint_grad, eot, eot_aggregate, loss, random_start) on x (B, C, H, W) in [0, 1];
    returns the last iterate. Raises ValueError for an unknown kind or joint_grad."""
    iters, eps_mix, joint_grad, eot = p.iters, p.eps_mix, p.joint_grad, p.eot
    eot_aggregate, loss, random_start = p.eot_aggregate, p.loss, p.random_start
    if kind not in JOINT_KINDS:
        raise ValueError(f"unknown joint attack '{kind}'; allowed: {', '.join(JOINT_KINDS)}")
    if joint_grad not in JOINT_GRADS:
        raise ValueError(f"unknown joint_grad '{joint_grad}'; allowed: {', '.join(JOINT_GRADS)}")
    trace = trace or Trace(defense, y, rng, **hooks)  # hooks: track_path, progress, observer
    eot_rng = rng.child("eot")
    k = effective_draws(defense, eot)
    b = x.shape[0]

    def classifier_term(x_i, purified=None, grad=True):
        if joint_grad == "bpda":
            return bpda_objective(
                defense, x_i, y, eot_rng, k, loss, eot_aggregate, grad=grad, purified=purified
            )
        return classifier_objective(defense, x_i, y, loss, grad=grad)

    x_i = start_point(x, eps, rng, random_start)
    for i in range(iters):
        if kind == "score":
            with torch.no_grad():
                purifier_dir = defense.field(x_i).sign()
            ev = classifier_term(x_i)
            chains = ev.chains
        else:
            with torch.no_grad():
                purified = defense.purify(x_i, eot_rng, k).x
                purifier_dir = (purified.view(k, *x.shape).mean(0) - x_i).sign()
            ev = classifier_term(x_i, purified)
            chains = ev.chains
            if joint_grad == "input" and trace.track_path and k >= defense.replicas:
                # the purified draws are S samples of the defense at x_i: classify them for the path
                with torch.no_grad():
                    chains = defense.classify(purified[: defense.replicas * b]).view(defense.replicas, b, -1)
        trace.visit(i, x_i, ev.loss, chains, grad=ev.grad)
        direction = eps_mix * purifier_dir + (1.0 - eps_mix) * ev.grad.sign()
        x_i = project(x_i + step * direction, x, eps)
        trace.step_done(i)
    return trace.finish(x_i, classifier_term(x_i, grad=False).loss)


class _Joint(Attack):
    """Shared by the two joint attacks of Table 1 of Yoon et al. 2021."""

    variant = "score"

    @dataclass
    class Params(AttackParams):
        eot: int = at_least(1, 1)  # purification draws (joint full's purifier term; bpda's term)
        eot_aggregate: str = choice("mean", *AGGREGATES)
        eps_mix: float = between(0.5, 0.0, 1.0)  # weight of the purifier term
        joint_grad: str = choice("input", *JOINT_GRADS)  # bpda = the original code's variant

    @classmethod
    def label(cls, p) -> str:
        return f"Joint ({cls.variant}) {p.iters}+EOT{p.eot}"

    @classmethod
    def needs_purifier(cls, p) -> bool:
        return True

    @classmethod
    def gradient_source(cls, p) -> None:
        """None: the step mixes the purifier's direction with a classifier gradient, so it is neither
        a white-box nor a black-box attack of the gradient-masking checks."""
        return None

    @classmethod
    def requires(cls, p) -> tuple[str, ...]:
        return ("field",) if cls.variant == "score" else ()

    @classmethod
    def check(cls, p, defense) -> None:
        check_vote(p, "bpda" if p.joint_grad == "bpda" else f"joint_{cls.variant}")
        if cls.variant == "score" and not defense.has_field:
            raise ValueError(
                f"joint_score needs a time-free score field f(x), and defense '{defense.name}' has none"
            )
        if cls.variant == "full" and not defense.stochastic:
            raise ValueError(f"joint_full needs a stochastic purifier, and defense '{defense.name}' has none")

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
        return joint_attack(defense, x, y, rng, p, kind=cls.variant, eps=eps, step=step, trace=trace)


@register_attack("joint_score")
class JointScore(_Joint):
    """Joint (score): eps_mix * sign(s(x)) + (1 - eps_mix) * sign(classifier term)."""

    variant = "score"

    @dataclass
    class Params(_Joint.Params):
        kind: str = "joint_score"


@register_attack("joint_full")
class JointFull(_Joint):
    """Joint (full): eps_mix * sign(mean_k f(x; n_k) - x) + (1 - eps_mix) * sign(classifier term)."""

    variant = "full"

    @dataclass
    class Params(_Joint.Params):
        kind: str = "joint_full"


__all__ = ["JOINT_GRADS", "JOINT_KINDS", "JointFull", "JointScore", "joint_attack"]
