"""The jvp step-size probe against ADP's secant probe [probe.*] (`advpure.purify.probe`).

probe.alpha.<field>.<variant>.{median,max}_rel_diff
    |alpha_variant - alpha_secant,fp32| / alpha_secant,fp32 over the rows and steps of an fp32
    secant chain (every probe evaluated at the same iterates x_t), for variant jvp_fp32,
    jvp_bf16 and secant_bf16 (the one bf16 breaks); field = "net" (the default's score net:
    trained weights with `--score`, else random; its shape either way) and "gaussian" (the
    closed-form DSM optimum of N(mu, diag(s^2)) at the screening sigma: f(x) = -sigma (x - mu)
    / (s^2 + sigma^2), evaluated in bf16 by rounding its input and output). Goal: jvp_fp32
    median <= 1 % (issue 22).
probe.steps_equal.<variant>
    fraction of rows whose number of steps (tau = the experiment's) equals the fp32 secant
    chain's, same screened images. Goal: jvp_fp32 >= 0.99.
probe.speedup_bf16_jvp_vs_fp32_secant.<layout>
    fp32-secant purification time / bf16-jvp purification time, same images, S x T, tau = 0,
    paired, for the 28x28 default (ngf 16) and the 32x32 official layout (3 channels, ngf 32).
    Goal >= 1.5 at 32x32 (issue 22). Beside it: fp32 jvp / fp32 secant (the probe's own cost),
    the bf16 forward's speed-up alone, and the bf16 dual pass (f and J v) / bf16 forward.
"""

from __future__ import annotations

import torch

from advpure.perf.harness import Ctx, Sizes, grng, images, make_nets, section
from advpure.perf.peak import autocast
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med, paired_ratio
from advpure.purify.adp import adp_chain as probe_chain
from advpure.purify.adp import adp_step, step_size
from advpure.purify.base import screened_rows
from advpure.purify.probe import adp_step_jvp, jvp_field, step_size_jvp

VARIANTS = ("jvp_fp32", "jvp_bf16", "secant_bf16")


class GaussianScore(torch.nn.Module):
    """The DSM optimum for data N(mu, diag(s^2)) at noise sigma, in ADP's scaling f ~ sigma grad
    log p_sigma: f(x) = -sigma (x - mu) / (s^2 + sigma^2). Linear, so the secant is exact in exact
    arithmetic: what differs is rounding (fp32) and resolution (bf16: input and output rounded)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, sigma: float):
        super().__init__()
        self.mu, self.c = mu, sigma / (s.square() + sigma**2)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # "bf16 evaluation": round input and output
            return (-self.c * (x.bfloat16().float() - self.mu)).bfloat16()
        return -self.c.to(x.dtype) * (x - self.mu.to(x.dtype))


def _alphas(fn, x: torch.Tensor, lam: float, delta: float, device) -> dict[str, torch.Tensor]:
    """alpha (R,) of every probe at the same points x."""
    out = {}
    with torch.no_grad():
        for dt in ("fp32", "bf16"):
            with autocast(device, dt):
                g = fn(x)
                out[f"secant_{dt}"] = step_size(g, fn(x + delta * g.to(x.dtype)), lam, delta)
                out[f"jvp_{dt}"] = step_size_jvp(g, jvp_field(fn, x, g)[1], lam)
    return out


def alpha_agreement(ctx: Ctx, fn, x0: torch.Tensor, field: str, steps: int) -> None:
    """Every probe's alpha along an fp32 secant chain from x0 (tau = 0), against the fp32 secant."""
    e, rep, dev = ctx.exp, ctx.report, ctx.device
    acc: dict[str, list[torch.Tensor]] = {}
    x = x0
    for _ in range(steps):
        for k, v in _alphas(fn, x, e.lam, e.delta, dev).items():
            acc.setdefault(k, []).append(v)
        with torch.no_grad():
            x = adp_step(x, fn, e.lam, e.delta)[0]
    a = {k: torch.cat(v) for k, v in acc.items()}
    ref = a["secant_fp32"]
    clamped = ((ref <= 1e-5) | (ref >= 1e-1)).float().mean().item()
    for var in VARIANTS:
        rel = (a[var] - ref).abs() / ref
        goal = ("<=", 0.01) if var == "jvp_fp32" else None
        rep.add(
            f"probe.alpha.{field}.{var}.median_rel_diff",
            rel.median().item(),
            "rel. diff",
            goal,
            note=f"vs fp32 secant, {ref.numel()} alphas ({steps} steps x {x0.shape[0]} rows), "
            f"{100 * clamped:.0f}% at a clamp",
        )
        rep.add(f"probe.alpha.{field}.{var}.max_rel_diff", rel.max().item(), "rel. diff")


def steps_agreement(ctx: Ctx, fn, x0: torch.Tensor) -> None:
    """Steps taken (tau = the experiment's, T = its steps) by each probe vs the fp32 secant."""
    e = ctx.exp
    runs = {}
    with torch.no_grad():
        for name, probe, dt in (
            ("secant_fp32", "secant", "fp32"),
            *((v, v.split("_")[0], v.split("_")[1]) for v in VARIANTS),
        ):
            with autocast(ctx.device, dt):
                runs[name] = probe_chain(
                    x0, fn, lam=e.lam, delta=e.delta, tau=e.tau, steps=e.steps, probe=probe
                ).steps
    ref = runs["secant_fp32"]
    for var in VARIANTS:
        ctx.report.add(
            f"probe.steps_equal.{var}",
            (runs[var] == ref).float().mean().item(),
            "fraction",
            (">=", 0.99) if var == "jvp_fp32" else None,
            note=f"tau={e.tau:g}, T={e.steps}, {ref.numel()} rows; fp32 secant mean steps "
            f"{ref.float().mean().item():.3g}, {var} {runs[var].float().mean().item():.3g}",
        )


def _default_net(ctx: Ctx):
    """The default's score net: trained weights (`ctx.score_weights`) when given and of the
    suite's shape, else the random net of that shape (with a note)."""
    sz = ctx.sz
    if ctx.score_weights:
        from advpure.api import load_net

        net = load_net(ctx.score_weights).to(ctx.device)
        if (getattr(net, "image_size", None), getattr(net, "in_channels", None)) == (
            sz.image_size,
            sz.channels,
        ):
            return net, f"trained ({ctx.score_weights})"
        ctx.report.note(f"--score {ctx.score_weights} is not a {sz.image_size}x{sz.image_size} score net")
    ctx.report.note("probe alpha figures on a random-weight net: most alphas sit at a clamp (pass --score)")
    return make_nets(sz, ctx.device)[0], "random weights"


@section("probe", order=16)
def probe_figures(ctx: Ctx) -> None:
    """alpha agreement (net, closed-form Gaussian), steps agreement, and the bf16-jvp speed-up."""
    dev, sz, e = ctx.device, ctx.sz, ctx.exp
    net, what = _default_net(ctx)
    x, _ = images(sz.batch, sz, dev)
    x0 = screened_rows(x, grng(13, dev), sz.replicas, e.sigma)
    print(
        f"  [probe] alpha of each probe along fp32 secant chains: {what} net, {x0.shape[0]} rows", flush=True
    )
    alpha_agreement(ctx, net, x0, "net", e.steps)
    g = torch.Generator().manual_seed(7)
    shape = (1, sz.channels, sz.image_size, sz.image_size)
    mu = (0.2 + 0.6 * torch.rand(shape, generator=g)).to(dev)
    s = (0.05 + 0.25 * torch.rand(shape, generator=g)).to(dev)
    gauss = GaussianScore(mu, s, e.sigma)
    xg = (mu + s * torch.randn((x0.shape[0], *shape[1:]), generator=g).to(dev)).clamp(0, 1)
    alpha_agreement(ctx, gauss, screened_rows(xg, grng(14, dev), 1, e.sigma), "gaussian", e.steps)
    steps_agreement(ctx, net, x0)
    speedup(
        ctx, "28x28_ngf16", Sizes(ngf=sz.ngf, channels=sz.channels, image_size=sz.image_size), sz.probe_batch
    )
    speedup(
        ctx,
        f"32x32_ngf{sz.probe_ngf32}",
        Sizes(ngf=sz.probe_ngf32, channels=3, image_size=32),
        sz.probe_batch32,
    )


def speedup(ctx: Ctx, layout: str, net_sz: Sizes, batch: int) -> None:
    """bf16-jvp vs fp32-secant purification (S x T, tau = 0) of the same images, paired."""
    dev, rep, sz, e = ctx.device, ctx.report, ctx.sz, ctx.exp
    score, _ = make_nets(net_sz, dev)
    x, _ = images(batch, net_sz, dev)
    x0 = screened_rows(x, grng(15, dev), sz.replicas, e.sigma)
    v = torch.randn_like(x0)

    def chain(probe, dt):
        def go():
            with torch.no_grad(), autocast(dev, dt):
                return probe_chain(
                    x0, score, lam=e.lam, delta=e.delta, tau=0.0, steps=sz.probe_steps, probe=probe
                ).x

        return go

    def one(fn, dt):
        def go():
            with torch.no_grad(), autocast(dev, dt):
                return fn()

        return go

    fns = {
        "secant_fp32": chain("secant", "fp32"),
        "jvp_fp32": chain("jvp", "fp32"),
        "jvp_bf16": chain("jvp", "bf16"),
        "fwd_fp32": one(lambda: score(x0), "fp32"),
        "fwd_bf16": one(lambda: score(x0), "bf16"),
        "dual_bf16": one(lambda: jvp_field(score, x0, v), "bf16"),
    }
    print(
        f"  [probe] purification {layout}: S={sz.replicas} x T={sz.probe_steps}, B={batch} "
        f"({x0.shape[0]} rows), tau=0; {ctx.slow_repeats} repeat(s) ...",
        flush=True,
    )
    fl: dict[str, int] = {}
    times, first = interleaved(fns, dev, ctx.slow_repeats, flops=fl)
    conv = (score, x0, f"ncsnv2-{net_sz.image_size}-ngf{net_sz.ngf}")

    def r(k):
        return ctx.rate(fl[k], med(times[k]), k.rsplit("_", 1)[1], conv)

    key = f"probe.speedup_bf16_jvp_vs_fp32_secant.{layout}"
    met = rep.add(
        key,
        paired_ratio(times["secant_fp32"], times["jvp_bf16"]),
        "x",
        (">=", 1.5) if layout.startswith("32") else None,
        note=f"fp32 secant {fmt(med(times['secant_fp32']))} s, bf16 jvp {fmt(med(times['jvp_bf16']))} s",
        rate=r("jvp_bf16"),
    )
    rep.add(f"probe.fp32_secant_seconds.{layout}", med(times["secant_fp32"]), "s", rate=r("secant_fp32"))
    rep.add(
        f"probe.ratio_fp32_jvp_vs_fp32_secant.{layout}",
        paired_ratio(times["jvp_fp32"], times["secant_fp32"]),
        "time ratio",
        note="the jvp probe's own cost in fp32",
        rate=r("jvp_fp32"),
    )
    rep.add(
        f"probe.bf16_forward_speedup.{layout}",
        paired_ratio(times["fwd_fp32"], times["fwd_bf16"]),
        "x",
        note=f"one forward of {x0.shape[0]} rows, fp32 / bf16",
        rate=r("fwd_bf16"),
    )
    rep.add(
        f"probe.dual_pass_vs_forward_bf16.{layout}",
        paired_ratio(times["dual_bf16"], times["fwd_bf16"]),
        "time ratio",
        note="f(x) and J v by forward-mode AD (fast tangents) / one forward, bf16; the secant's probe costs 1",
        rate=r("dual_bf16"),
    )
    diff = (first["jvp_bf16"].float() - first["secant_fp32"]).abs().max().item()
    rep.note(f"{layout}: bf16-jvp vs fp32-secant purified rows, max |diff| {diff:.3g} (tau=0, random net)")
    if met is False and ctx.profile:

        def step(fn, dt):
            def go():
                with torch.no_grad(), autocast(dev, dt):
                    return fn()

            return go

        rep.profile(
            f"probe.{layout}.secant_fp32_step",
            step(lambda: adp_step(x0, score, e.lam, e.delta), "fp32"),
            dev,
            "speed-up goal missed; one fp32 secant step (2 forwards)",
        )
        rep.profile(
            f"probe.{layout}.jvp_bf16_step",
            step(lambda: adp_step_jvp(x0, score, e.lam), "bf16"),
            dev,
            "one bf16 jvp step (forward + dual pass)",
            versus=f"probe.{layout}.secant_fp32_step",
        )
