"""P2, score-network evaluations per image [P2.score_evals_per_image.*,
P2.benchmark_score_evals_per_image.*] of every attack of the fmnist experiment, counted by
`defense.score_evals` with cheap stand-in nets: the count depends only on the settings.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from advpure.attacks import run_attack
from advpure.config.compose import attack_eps_step
from advpure.config.compose import load as load_config
from advpure.core.rng import SampleRNG
from advpure.perf.harness import Ctx, Sizes, fmnist_attacks, images, section
from advpure.purify.defense import build_defense


class LinearScore(nn.Module):
    """Stand-in score net f(x) = -(x - 1/2) (a Gaussian's DSM optimum): ADP's step is
    alpha = lambda = 0.05 > tau on every row, so no sample stops and the count is the budget.
    The product with a saved constant makes the checkpointed backward recompute it, as the real
    net's backward does (a net that saves nothing for backward is never recomputed)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("one", torch.ones(()))

    def forward(self, x):
        return (0.5 - x) * self.one


@section("evals", order=25)
def count_score_evals(ctx: Ctx) -> None:
    """Score evaluations per image of each attack of the fmnist experiment, with the experiment's
    defense (S, T, tau) and attack settings, counted by `defense.score_evals` on cheap stand-in
    nets; the count is linear in the iterations, so it is measured at 1 and 2 iterations and
    extrapolated (checked exactly at 3)."""
    rep = ctx.report
    cfg = load_config("fmnist")
    dev = ctx.device
    sz = Sizes()
    clf = nn.Sequential(nn.Flatten(), nn.Linear(sz.image_size * sz.image_size * sz.channels, 10)).to(dev)
    clf.requires_grad_(False)
    defense = build_defense(
        cfg.defense, clf, {"score": LinearScore().to(dev)}, channels=sz.channels, image_size=sz.image_size
    )
    x, y = images(1, sz, dev)
    d = cfg.defense
    print(
        f"  [P2] score evaluations per image, fmnist experiment (S={d.replicas}, T={d.steps}, tau={d.tau:g}; "
        "no sample stops early: the budget)",
        flush=True,
    )

    def count(spec, n, track_path=False):
        sp = dataclasses.replace(spec, iters=n)
        eps, step = attack_eps_step(cfg, cfg.attacks[spec.name])
        e0 = defense.score_evals
        rng = SampleRNG(cfg.seed, [0], stream=spec.name)
        res = run_attack(sp, defense, x, y, rng.child("attack"), eps=eps, step=step, track_path=track_path)
        if track_path:  # the benchmark's final evaluation: worst of N (N defended predictions)
            defense.evaluate(res.x_adv, y, rng.child("evaluate"), n=cfg.benchmark.worst_of_n)
        return defense.score_evals - e0

    for name, _node, spec in fmnist_attacks(cfg):
        for bench in (False, True):
            e1, e2, e3 = (count(spec, n, bench) for n in (1, 2, 3))
            ok = e3 == e2 + (e2 - e1)
            total = e1 + (spec.iters - 1) * (e2 - e1)
            if bench:
                rep.add(
                    f"P2.benchmark_score_evals_per_image.{name}",
                    total,
                    "evals",
                    note="with ever-broken path tracking + worst-of-10 evaluation",
                )
            else:
                rep.add(
                    f"P2.score_evals_per_image.{name}",
                    max(total, 0),
                    "evals",
                    note=f"{spec.iters} iters"
                    + (
                        ", incl. checkpoint recomputation"
                        if getattr(spec, "gradient", None) == "full"
                        else ""
                    ),
                )
            if not ok:
                rep.check(f"P2.evals_linear.{name}.{'bench' if bench else 'attack'}", ok, e1=e1, e2=e2, e3=e3)
