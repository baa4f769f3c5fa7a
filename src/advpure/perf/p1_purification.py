"""P1, purification overhead [P1.*]: ADP purify (S replicas, T steps, tau = 0) over (score
evaluations made x one batched score forward of the same rows); speed-up of the batched
implementation over the loop-structured reference on the same noise, outputs compared in float64.
With `--full` also at CIFAR size [P1.cifar.*] (ngf=128, 32x32x3).
"""

from __future__ import annotations

import copy

import torch

from advpure.perf.harness import Ctx, Sizes, adp_defense, grng, images, make_nets, section
from advpure.perf.reference import reference_adp_purify
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med, paired_ratio
from advpure.purify.defense import Counted


def reference_purify(ctx: Ctx, x: torch.Tensor, score, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The loop-structured reference ADP purification of `x` (B, C, H, W) with the experiment's
    settings, tau = 0, on the given noise (S, B, C, H, W); returns (S * B, C, H, W)."""
    e = ctx.exp
    return reference_adp_purify(
        x, score, noise, sigma=e.sigma, lam=e.lam, delta=e.delta, tau=0.0, steps=steps
    )


def p1_purification(ctx: Ctx, sz: Sizes, label: str = "") -> None:
    """P1 at sizes `sz`; figure keys `P1.<label>.*` (`P1.*` without a label)."""
    dev, rep = ctx.device, ctx.report
    key = "P1" + (f".{label}" if label else "")
    score, clf = make_nets(sz, dev)
    b, s, t = sz.batch, sz.replicas, sz.steps
    x, _ = images(b, sz, dev)
    defense = adp_defense(score, clf, ctx.exp, steps=t, replicas=s, tau=0.0)
    rows_x = images(s * b, sz, dev, seed=3)[0]
    counted = Counted(score)
    n_fwd = 2 * t  # what a chain that never stops makes; the measured count is checked below

    def ours():
        e0 = defense.score_evals
        out = defense.purify(x, grng(11, dev), s)
        return out.x, defense.score_evals - e0

    def ref():
        r0 = counted.evals
        out = reference_purify(ctx, x, counted, grng(11, dev).normal(s, x), t)
        return out, counted.evals - r0

    def fwd():
        # n_fwd back-to-back forwards of S*B rows (the same count and the same warm caches as
        # the chain's); the per-forward time is this / n_fwd
        with torch.no_grad():
            for _ in range(n_fwd):
                out = score(rows_x)
        return out

    flops: dict[str, int] = {}
    times, first = interleaved(
        {"ours": ours, "reference": ref, "forward": fwd}, dev, ctx.repeats, flops=flops
    )
    conv = (score, rows_x, f"ncsnv2-{sz.image_size}-ngf{sz.ngf}")
    (x_ours, ev_rows), (x_ref, ref_rows) = first["ours"], first["reference"]
    n_evals = ev_rows / (s * b)  # batched evaluations of S*B rows
    per_fwd = [tf / n_fwd for tf in times["forward"]]
    overhead = [to / (n_evals * tf) for to, tf in zip(times["ours"], per_fwd)]
    print(
        f"  [{key}] B={b} images, S={s}, T={t}, tau=0, ngf={sz.ngf}, {sz.image_size}x{sz.image_size}x{sz.channels}; "
        f"ours {fmt(med(times['ours']))} s, reference {fmt(med(times['reference']))} s, "
        f"forward({s * b} rows) {fmt(med(per_fwd) * 1e3)} ms, score evaluations {n_evals:g}",
        flush=True,
    )
    met = rep.add(
        f"{key}.overhead",
        med(overhead),
        "ratio",
        ("<=", 1.10),
        note=f"{n_evals:g} evaluations of {s * b} rows",
        rate=ctx.rate(flops["ours"], med(times["ours"]), conv=conv),
    )
    rep.add(
        f"{key}.speedup_vs_loop",
        paired_ratio(times["reference"], times["ours"]),
        "x",
        note="loop over replicas, same noise",
        rate=ctx.rate(flops["reference"], med(times["reference"]), conv=conv),
    )
    rep.add(
        f"{key}.ours_seconds",
        med(times["ours"]),
        "s",
        rate=ctx.rate(flops["ours"], med(times["ours"]), conv=conv),
    )
    rep.add(
        f"{key}.forward_ms",
        med(per_fwd) * 1e3,
        "ms",
        note=f"one forward of {s * b} rows",
        rate=ctx.rate(flops["forward"], med(times["forward"]), conv=conv),
    )
    rep.add(f"{key}.score_evals_per_chain", n_evals, "evals", note=f"reference: {ref_rows / (s * b):g}")
    # Equality on the same noise, in float64: in fp32 the nets see different batch sizes (S*B rows
    # vs B), convolutions may round differently in the last bit, and the step-size probe divides by
    # 1 - z ~ delta/sigma, which amplifies that; the fp32 difference is reported alongside.
    fp32_diff = (x_ours - x_ref).abs().max().item()
    dt = torch.float64
    score64, x64 = copy.deepcopy(score).to(dt), x[: min(b, 2)].to(dt)
    d64 = adp_defense(score64, clf, ctx.exp, steps=t, replicas=s, tau=0.0)
    ours64 = d64.purify(x64, grng(11, dev), s).x
    ref64 = reference_purify(ctx, x64, score64, grng(11, dev).normal(s, x64), t)
    diff64 = (ours64 - ref64).abs().max().item()
    rep.check(f"{key}.same_output_float64", diff64 <= 1e-9, max_abs_diff=diff64, fp32_max_abs_diff=fp32_diff)
    if met is False and ctx.profile:
        rep.profile(f"{key}.forward", fwd, dev, f"overhead goal missed; the {n_fwd} batched score forwards")
        rep.profile(f"{key}.overhead", ours, dev, "ADP purify", versus=f"{key}.forward")


@section("P1", order=10)
def p1(ctx: Ctx) -> None:
    """P1 at the fmnist sizes."""
    p1_purification(ctx, ctx.sz)


@section("P1", order=10, full=True, title="P1 (CIFAR size)")
def p1_cifar(ctx: Ctx) -> None:
    """P1 with the CIFAR-size score net (ngf=128, 32x32x3; on CPU only B=1, S=2, T=2)."""
    if ctx.device.type == "cuda":
        sz = Sizes(ngf=128, channels=3, image_size=32, batch=16, replicas=10, steps=10)
    else:
        sz = Sizes(ngf=128, channels=3, image_size=32, batch=1, replicas=2, steps=2)
        ctx.report.note("P1.cifar on CPU uses B=1, S=2, T=2 (the ngf=128 net is ~100x the fmnist one)")
    p1_purification(ctx, sz, "cifar")
