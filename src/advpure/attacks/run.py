"""One entry point for every registered attack: validate its parameters, then run it.

    check_attack(p, defense, eps, step)                   one-line ValueError before any work
    run_attack(p, defense, x, y, rng, eps=..., step=...)  -> AttackResult

`p` is an attack's parameters: a typed config block (an `attacks.<name>` block) or a Params instance
(`attack_params("pgd", gradient="bpda", iters=40, eot=15)`).

Random streams (children of the `rng` passed in, so a result is a function of the seed and the
image indices only): `start` (random start), `eot` (purification draws of the gradient and the
objective, also the joint attacks' purifier term), `path` (fresh defense evaluations for path
tracking when the attack's own chains cannot be reused), `spsa` (directions), `spsa_queries`
(the defense's noise for the queries), `eval` (SPSA's objective at each iterate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advpure.attacks.base import AttackResult, Observer, Progress, Trace, attack_class
from advpure.core.errors import ConfigError
from advpure.core.params import validate
from advpure.core.rng import RNG


def check_attack(p, defense, eps: float | None, step: float | None) -> None:
    """Raise a one-line ValueError if `p` cannot run on `defense` at (eps, step); touches no
    network. (DLR with fewer than 3 classes is detected at the first logits.)"""
    name = f"attack '{getattr(p, 'name', '') or p.kind}'"
    try:
        cls = attack_class(p.kind)
        validate(p, cls.Params, "")
    except ConfigError as e:
        raise ValueError(f"{name}: {e}") from None
    if eps is None or not 0.0 <= eps <= 1.0:
        raise ValueError(
            f"{name}: eps must be in [0, 1], got {eps} (images are in [0, 1]; did you mean 8/255?)"
        )
    if step is None or not 0.0 < step <= 1.0:
        raise ValueError(f"{name}: step must be in (0, 1], got {step}")
    try:
        cls.check(p, defense)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def run_attack(
    p,
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
    protocols: Sequence[str] | None = None,
    draws: int = 1,
) -> AttackResult:
    """Attack the batch (x (B, C, H, W) in [0, 1], y (B,) labels) with `p`; all randomness from `rng`.

    progress(i) is called after each iteration i; observer(i, x_i) (optional, for tests and
    plots) sees every iterate x_0 .. x_iters. Works when called under `torch.inference_mode()`
    (Lightning's test loop): the inputs are cloned into normal tensors first. The defense's nets
    are in eval mode (a `Defense` keeps them there).

    `protocols` (names, as `benchmark.protocols`) and `draws` (N of worst-of-N / mean-of-N,
    `benchmark.worst_of_n`) tell attacks made of stages which images the reported protocols still
    count robust (`standard_rand` with continue_on=any_protocol attacks those in its later stages);
    other attacks ignore them. None: only the single draw (AutoAttack's rule).
    Raises ValueError for draws < 1.
    """
    if int(draws) < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    check_attack(p, defense, eps, step)
    defense.check(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    cls = attack_class(p.kind)
    with torch.inference_mode(False):
        x, y = x.detach().clone(), y.detach().clone()
        trace = Trace(
            defense,
            y,
            rng,
            track_path=track_path,
            progress=progress,
            observer=observer,
            protocols=tuple(protocols) if protocols else None,
            draws=draws,
        )
        return cls.run(p, defense, x, y, rng, eps=float(eps), step=float(step), trace=trace)


__all__ = ["check_attack", "run_attack"]
