"""Achieved FLOP/s against the machine's peak [peak.*, flops.*] (`advpure.perf.peak`).

peak   the dense fp32 / bf16 matmul peak and the conv-mix peak of the fmnist score net at S*B rows,
       measured in this run (the references of every "% of peak" the suite prints).
flops  GFLOP/s and % of peak, fp32 and bf16 (autocast), of four measurements on the fmnist nets:
         forward     one score-net forward of S*B rows (no grad)
         purify      ADP purification, S replicas x T steps of B images, tau = 0; fp32 with the
                     secant probe (the paper's), bf16 with the jvp probe (`advpure.purify.probe`;
                     the secant's is noise in bf16), through `advpure.perf.defenses`
         bpda_step   one BPDA+EOT iteration (`eot_gradient`, gradient "bpda", K = eot draws)
         full_step   one exact-gradient EOT iteration (gradient "full", through the T steps,
                     checkpointed), K = p3_eot draws
       and the bf16 / fp32 speed-up of each, paired in one interleaved run.
FLOPs: `torch.utils.flop_counter`'s formulas (`peak.count_flops`) on the warm-up call (matmuls and convolutions,
forward and backward; the jvp probe's tangent convolutions included).
"""

from __future__ import annotations

import torch

from advpure.attacks import eot_gradient
from advpure.perf.defenses import probe_defense
from advpure.perf.harness import Ctx, grng, images, make_nets, section
from advpure.perf.peak import autocast
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med, paired_ratio

DTYPE_PROBE = {"fp32": "secant", "bf16": "jvp"}


@section("peak", order=5)
def peaks(ctx: Ctx) -> None:
    """The run's peaks: dense matmul per dtype and the fmnist score net's conv mix at S*B rows."""
    sz, dev, rep = ctx.sz, ctx.device, ctx.report
    score, _ = make_nets(sz, dev)
    x = images(sz.replicas * sz.batch, sz, dev)[0]
    n = ctx.peaks.matmul_n or (8192 if dev.type == "cuda" else 2048)
    for dt in ("fp32", "bf16"):
        rep.add(f"peak.matmul_gflops.{dt}", ctx.peaks.matmul_peak(dt), "GFLOP/s", note=f"{n}x{n} @ {n}x{n}")
        label = f"ncsnv2-{sz.image_size}-ngf{sz.ngf}"
        rep.add(
            f"peak.conv_gflops.{dt}",
            ctx.peaks.conv_peak(score, x, dt, label),
            "GFLOP/s",
            note=f"{label} convs alone, {x.shape[0]} rows, best of {ctx.peaks.repeats}",
        )


def _defenses(ctx: Ctx, score, clf) -> dict:
    e, sz = ctx.exp, ctx.sz
    return {
        dt: probe_defense(
            score,
            clf,
            sigma=e.sigma,
            lam=e.lam,
            delta=e.delta,
            tau=0.0,
            steps=sz.steps,
            replicas=sz.replicas,
            probe=DTYPE_PROBE[dt],
            dtype=dt,
        )
        for dt in ("fp32", "bf16")
    }


@section("flops", order=15)
def flops_figures(ctx: Ctx) -> None:
    """GFLOP/s and % of peak of forward, purify, bpda_step and full_step in fp32 and bf16."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    score, clf = make_nets(sz, dev)
    defs = _defenses(ctx, score, clf)
    s, b = sz.replicas, sz.batch
    x, y = images(b, sz, dev)
    rows = images(s * b, sz, dev, seed=3)[0]
    label = f"ncsnv2-{sz.image_size}-ngf{sz.ngf}"
    xb, yb = images(sz.p2_batch, sz, dev, seed=4)
    xf, yf = images(sz.p3_batch, sz, dev, seed=5)

    def forward(dt):
        def go():
            with torch.no_grad(), autocast(dev, dt):
                return score(rows)

        return go

    def purify(dt):
        def go():
            with torch.no_grad():
                return defs[dt].purify(x, grng(11, dev), s)

        return go

    def step(dt, gradient, xx, yy, k):
        def go():
            return eot_gradient(defs[dt], xx, yy, grng(5, dev), gradient=gradient, eot=k).grad

        return go

    kinds = {
        "forward": (forward, f"score forward, {s * b} rows", s * b),
        "purify": (purify, f"ADP S={s} x T={sz.steps}, B={b}, tau=0 (fp32 secant, bf16 jvp)", s * b),
        "bpda_step": (
            lambda dt: step(dt, "bpda", xb, yb, sz.eot),
            f"BPDA+EOT{sz.eot} iteration, B={sz.p2_batch}",
            sz.eot * sz.p2_batch,
        ),
        "full_step": (
            lambda dt: step(dt, "full", xf, yf, sz.p3_eot),
            f"exact-gradient EOT{sz.p3_eot} iteration through T={sz.steps}, B={sz.p3_batch}",
            sz.p3_eot * sz.p3_batch,
        ),
    }
    print(f"  [flops] fmnist nets (ngf={sz.ngf}), fp32 vs bf16 autocast, interleaved", flush=True)
    for kind, (make, what, conv_rows) in kinds.items():
        fns = {dt: make(dt) for dt in ("fp32", "bf16")}
        fl: dict[str, int] = {}
        reps = ctx.repeats if kind in ("forward", "purify") else ctx.slow_repeats
        times, _ = interleaved(fns, dev, reps, flops=fl)
        conv = (score, images(conv_rows, sz, dev, seed=6)[0], label)
        for dt in fns:
            r = ctx.rate(fl[dt], med(times[dt]), dt, conv)
            rep.add(
                f"flops.{kind}.{dt}_gflops",
                r.gflops,
                "GFLOP/s",
                note=f"{what}; {fl[dt] / 1e9:.3g} GFLOP in {fmt(med(times[dt]))} s",
                rate=r,
            )
        rep.add(
            f"flops.{kind}.bf16_speedup",
            paired_ratio(times["fp32"], times["bf16"]),
            "x",
            note="fp32 time / bf16 time, paired",
        )
