"""Gradient-masking check (g), `reaches_eps`: can every fixed-step attack travel the whole eps?

A fixed-step attack (PGD, BPDA, the joint attacks, SPSA: sign steps of size `step`) moves a pixel by
at most iterations x step; below eps it never reaches the boundary of the eps-ball, so the table's
threat model is not what ran (a budget cut without scaling the step). Carlini et al. 2019 ask that
attacks be given enough steps to converge; this is the arithmetic part of that. Adaptive-step
attacks (APGD, whose step starts at 2 eps) are exempt.
"""

from __future__ import annotations

from collections.abc import Mapping

from advpure.results.checks import PASS, SKIP, WARN, Check


def reaches_eps(
    reach: Mapping[str, tuple[int, float, float]], labels: Mapping[str, str] | None = None
) -> Check:
    """reach: {attack key: (iterations, step, eps)} of the fixed-step attacks (step and eps in the
    images' [0, 1] units). Warns for each attack whose iterations x step < eps (it can move a pixel
    by at most that much, so it never reaches the boundary of the eps-ball); skips when empty."""
    if not reach:
        return Check("reaches_eps", SKIP, "no fixed-step attack in this run")
    labels = labels or {}
    short = {}
    for key, (iters, step, eps) in sorted(reach.items()):
        if iters * step < eps * (1 - 1e-9):
            short[key] = (
                f"{labels.get(key, key)}: {iters} x {step:g} = {iters * step:g} < eps {eps:g} "
                f"(at most {100 * iters * step / eps:.0f}% of the radius)"
            )
    if short:
        return Check(
            "reaches_eps",
            WARN,
            "; ".join(short.values())
            + "; raise attacks.<name>.step (or iters): these attacks test a smaller threat model than the table's eps",
        )
    ratios = [
        iters * step / eps for iters, step, eps in reach.values() if eps > 0
    ]  # eps = 0: nothing to reach
    travel = f"; the shortest can travel {min(ratios):.2g} x eps" if ratios else " at eps = 0"
    return Check("reaches_eps", PASS, f"{len(reach)} fixed-step attack(s){travel}")


__all__ = ["reaches_eps"]
