"""One entry point for every attack: validate a spec (an `AttackConfig`), then dispatch.

    check_attack(spec, defense, eps, step)                 one-line ValueError before any work
    run_attack(spec, defense, x, y, rng, eps=..., step=...) -> AttackResult

Random streams (children of the `rng` passed in, so a result is a function of the seed and the
image indices only): `start` (random start), `eot` (purification draws of the gradient and the
objective, also the joint attacks' purifier term), `path` (fresh defense evaluations for path
tracking when the attack's own chains cannot be reused), `spsa` (directions), `spsa_queries`
(the defense's noise for the queries), `eval` (SPSA's objective at each iterate).
"""

from __future__ import annotations

import torch

from advpure.attacks.apgd import apgd_attack
from advpure.attacks.joint import JOINT_GRADS, joint_attack
from advpure.attacks.losses import LOSSES
from advpure.attacks.pgd import AGGREGATES, GRADIENTS, AttackResult, Observer, Progress, pgd_attack
from advpure.attacks.spsa import spsa_attack
from advpure.rng import RNG

KINDS = ("pgd", "apgd", "joint_score", "joint_full", "spsa")


def _uses_bpda(spec) -> bool:
    """Whether the attack's classifier gradient is BPDA (the only place a vote of draws is defined)."""
    if spec.kind in ("pgd", "apgd"):
        return spec.gradient == "bpda"
    if spec.kind in ("joint_score", "joint_full"):
        return spec.joint_grad == "bpda"
    return False


def check_attack(spec, defense, eps: float, step: float) -> None:
    """Raise a one-line ValueError if `spec` cannot run on `defense`; touches no network.
    (DLR with fewer than 3 classes is detected at the first logits.)"""
    name = f"attack '{getattr(spec, 'name', '') or spec.kind}'"

    def bad(msg: str):
        raise ValueError(f"{name}: {msg}")

    if spec.kind not in KINDS:
        bad(f"unknown kind '{spec.kind}'; allowed: {', '.join(KINDS)}")
    if spec.gradient not in GRADIENTS:
        bad(f"unknown gradient '{spec.gradient}'; allowed: {', '.join(GRADIENTS)}")
    if spec.loss not in LOSSES:
        bad(f"unknown loss '{spec.loss}'; allowed: {', '.join(LOSSES)}")
    if spec.eot_aggregate not in AGGREGATES:
        bad(f"unknown eot_aggregate '{spec.eot_aggregate}'; allowed: {', '.join(AGGREGATES)}")
    if spec.joint_grad not in JOINT_GRADS:
        bad(f"unknown joint_grad '{spec.joint_grad}'; allowed: {', '.join(JOINT_GRADS)}")
    if eps is None or eps < 0:
        bad(f"eps must be >= 0, got {eps}")
    if step is None or step <= 0:
        bad(f"step must be > 0, got {step}")
    if spec.iters < 1:
        bad(f"iters must be >= 1, got {spec.iters}")
    if spec.eot < 1:
        bad(f"eot must be >= 1, got {spec.eot}")
    if spec.spsa_samples < 1:
        bad(f"spsa_samples must be >= 1, got {spec.spsa_samples}")
    if spec.spsa_delta <= 0:
        bad(f"spsa_delta must be > 0, got {spec.spsa_delta}")
    for key in ("eps_mix", "apgd_rho", "apgd_momentum"):
        if not 0.0 <= getattr(spec, key) <= 1.0:
            bad(f"{key} must be in [0, 1], got {getattr(spec, key)}")
    if spec.eot_aggregate == "vote" and not _uses_bpda(spec):
        which = spec.gradient if spec.kind in ("pgd", "apgd") else spec.kind
        bad(
            f"eot_aggregate 'vote' (a vote of per-draw sign steps) is only defined for bpda gradients, not '{which}'"
        )
    if spec.kind == "joint_score" and not defense.has_score:
        bad(f"joint_score needs a score network, and defense '{defense.name}' has none")
    if spec.kind == "joint_full" and not defense.stochastic:
        bad(f"joint_full needs a stochastic purifier, and defense '{defense.name}' has none")


def run_attack(
    spec,
    defense,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: RNG,
    *,
    eps: float,
    step: float,
    track_path: bool = False,
    progress: Progress | None = None,
    observer: Observer | None = None,
) -> AttackResult:
    """Attack the batch (x, y) of images in [0, 1] with `spec`; all randomness from `rng`.

    progress(i) is called after each iteration i; observer(i, x_i) (optional, for tests and
    plots) sees every iterate x_0 .. x_iters. `step` is ignored by APGD (its step starts at
    2 eps and adapts). Works when called under `torch.inference_mode()` (Lightning's test loop):
    the inputs are cloned into normal tensors first. The nets' train/eval mode is the caller's.
    """
    check_attack(spec, defense, eps, step)
    defense.check(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    eps, step = float(eps), float(step)
    common = dict(
        eps=eps,
        iters=int(spec.iters),
        loss=spec.loss,
        random_start=bool(spec.random_start),
        track_path=track_path,
        progress=progress,
        observer=observer,
    )
    with torch.inference_mode(False):
        x, y = x.detach().clone(), y.detach().clone()
        if spec.kind == "pgd":
            return pgd_attack(
                defense,
                x,
                y,
                rng,
                step=step,
                gradient=spec.gradient,
                eot=int(spec.eot),
                eot_aggregate=spec.eot_aggregate,
                **common,
            )
        if spec.kind == "apgd":
            return apgd_attack(
                defense,
                x,
                y,
                rng,
                gradient=spec.gradient,
                eot=int(spec.eot),
                eot_aggregate=spec.eot_aggregate,
                rho=float(spec.apgd_rho),
                momentum=float(spec.apgd_momentum),
                **common,
            )
        if spec.kind in ("joint_score", "joint_full"):
            return joint_attack(
                defense,
                x,
                y,
                rng,
                kind=spec.kind.removeprefix("joint_"),
                step=step,
                eps_mix=float(spec.eps_mix),
                joint_grad=spec.joint_grad,
                eot=int(spec.eot),
                eot_aggregate=spec.eot_aggregate,
                **common,
            )
        return spsa_attack(
            defense,
            x,
            y,
            rng,
            step=step,
            samples=int(spec.spsa_samples),
            delta=float(spec.spsa_delta),
            **common,
        )


__all__ = ["KINDS", "check_attack", "run_attack"]
