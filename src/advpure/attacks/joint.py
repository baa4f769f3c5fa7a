"""Joint attacks of the ADP paper (seed Table 1): push the input where the purifier points while
also ascending the classifier loss, so that purification carries it towards the wrong class.

    joint (score): x_{i+1} = project(x_i + step * (m * sign(s(x_i))           + (1 - m) * sign(d_i)))
    joint (full):  x_{i+1} = project(x_i + step * (m * sign(mean_k f(x_i; n_k) - x_i) + (1 - m) * sign(d_i)))

m = eps_mix, s the raw score network, f(.; n_k) K = eot purification draws, and d_i the
classifier term: grad_x L(g(x), y) at x_i (`joint_grad=input`, the seed's formula), or the
BPDA+EOT direction at purified points (`joint_grad=bpda`, the original code's variant; for joint
(full) it uses the same K draws as the purifier term). The objective recorded per iterate is the
classifier term's loss (L(g(x_i), y), or its EOT mean at the purified points for bpda).
"""

from __future__ import annotations

import torch

from advpure.attacks.pgd import (
    AttackResult,
    Observer,
    Progress,
    Trace,
    bpda_objective,
    classifier_objective,
    effective_draws,
)
from advpure.attacks.projection import project, start_point
from advpure.rng import RNG

JOINT_KINDS = ("score", "full")
JOINT_GRADS = ("input", "bpda")


def joint_attack(
    defense,
    x,
    y,
    rng: RNG,
    *,
    kind: str,
    eps: float,
    step: float,
    iters: int,
    eps_mix: float = 0.5,
    joint_grad: str = "input",
    eot: int = 1,
    eot_aggregate: str = "mean",
    loss: str = "ce",
    random_start: bool = False,
    track_path: bool = False,
    progress: Progress | None = None,
    observer: Observer | None = None,
) -> AttackResult:
    """Joint attack `kind` (score | full); returns the last iterate."""
    if kind not in JOINT_KINDS:
        raise ValueError(f"unknown joint attack '{kind}'; allowed: {', '.join(JOINT_KINDS)}")
    if joint_grad not in JOINT_GRADS:
        raise ValueError(f"unknown joint_grad '{joint_grad}'; allowed: {', '.join(JOINT_GRADS)}")
    trace = Trace(defense, y, rng, track_path=track_path, progress=progress, observer=observer)
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
                purifier_dir = defense.score(x_i).sign()
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
        trace.visit(i, x_i, ev.loss, chains)
        direction = eps_mix * purifier_dir + (1.0 - eps_mix) * ev.grad.sign()
        x_i = project(x_i + step * direction, x, eps)
        trace.step_done(i)
    return trace.finish(x_i, classifier_term(x_i, grad=False).loss)


__all__ = ["JOINT_GRADS", "JOINT_KINDS", "joint_attack"]
