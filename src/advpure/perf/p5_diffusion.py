"""Diffusion purification [diffusion.*]: the cost of exact gradients through DiffPure's reverse SDE
(step-wise replay, `advpure.purify.replay`) and of purification itself.

One attack gradient = DiffPure purify (reverse VP-SDE, Euler-Maruyama, keyed noise) + d(sum of the
outputs)/dx, on a small random conv eps-net (`advpure.perf._replay_bench.SmallEps`, 3x32x32 images), at
N = 10 and N = 100 reverse steps (t* = 0.01 and 0.1, dt = 1e-3; tiny mode, for tests: 2 and 6):

* diffusion.mem_ratio_replay: peak memory (`peak_memory`) of one replayed gradient at N = 100 over
  N = 10; goal <= 1.2. The replay keeps N states (R x C x H x W each) and ONE step's graph, so the ratio
  is 1 + 90 states / (the N = 10 peak): close to 1 when a step's graph dwarfs a state (a real U-Net),
  further from it for a tiny net (the note says how much of the growth the stored states are).
  Plain autograd's and per-step checkpointing's ratios are reported beside it.
* diffusion.time_replay_vs_limit: time of the replayed gradient over the limit measured in the same
  run, one graph-free forward + N x (one step forward with graph + its backward) on a given noise;
  goal <= 1.2.
* diffusion.time_checkpoint_vs_replay: per-step `torch.utils.checkpoint` (what other evaluations use)
  over replay; goal >= 1 (replay at least as fast).
* diffusion.purify_overhead: `Defense.purify` (no gradient, B images, S draws as rows) over NFE x one
  batched forward of the same rows; goal <= 1.1, as ADP's P1.

Times on CPU are the process's CPU seconds (`time.process_time`, robust to neighbours on a shared
machine; the suite runs one thread by default); on CUDA, synchronised wall seconds. Each ratio is the
median over interleaved rounds of per-round ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from advpure.core.rng import SampleRNG
from advpure.perf._replay_bench import SmallEps
from advpure.perf.harness import Ctx, section
from advpure.perf.memory import clean_heap, cpu_peak_supported, peak_memory
from advpure.perf.report import fmt
from advpure.perf.timing import med, paired_ratio, sync
from advpure.purify import Defense
from advpure.purify.diffpure import DiffPureChain, DiffPurePurifier


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """CPU seconds of `fn()` on CPU, synchronised wall seconds on CUDA."""
    if device.type == "cuda":
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def rounds(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` interleaved rounds (order reversed every other), after a warm-up."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(seconds(fns[n], device))
    return out


def gradient_fn(net: nn.Module, x: torch.Tensor, t_star: float, mode: str) -> Callable[[], torch.Tensor]:
    """One exact attack gradient through DiffPure at t* by `mode` (replay | checkpoint | autograd)."""
    p = DiffPurePurifier(net.schedule, t_star=t_star, gradient_mode=mode)
    idx = range(x.shape[0])

    def fn() -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        out = p(xx, SampleRNG(0, idx), 1, {"eps": net}, differentiable=True).x
        return torch.autograd.grad(out.sum(), xx)[0]

    return fn


def limit_fn(net: nn.Module, x: torch.Tensor, t_star: float) -> Callable[[], torch.Tensor]:
    """The least work of an exact step-wise gradient: one graph-free pass keeping the states, then per
    step (from the last) one forward with graph and its backward, on a given noise (no RNG work)."""
    p = DiffPurePurifier(net.schedule, t_star=t_star)
    chain = DiffPureChain(net, p.vp, p.times, "sde", p.alpha_bar0)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    class Fixed:
        def normal(self) -> torch.Tensor:
            return z

    def fn() -> torch.Tensor:
        states, u = [], chain.init(x, Fixed())
        with torch.no_grad():
            for k in range(chain.n_steps):
                states.append(u)
                u = chain.step(k, u, x, Fixed())
        g = torch.ones_like(u)
        for k in reversed(range(chain.n_steps)):
            uk = states[k].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(chain.step(k, uk, x, Fixed()), uk, g)
        return g

    return fn


@section("diffusion", order=35)
def diffusion(ctx: Ctx) -> None:
    """The four diffusion figures (see the module docstring)."""
    dev, rep = ctx.device, ctx.report
    batch, width, size = (1, 4, 8) if ctx.tiny else (4, 64, 32)
    steps = (2, 6) if ctx.tiny else (10, 100)
    torch.manual_seed(0)
    net = SmallEps(width).to(dev)
    g = torch.Generator().manual_seed(1)
    x = (0.2 + 0.6 * torch.rand(batch, 3, size, size, generator=g)).to(dev)
    state_mib = x.numel() * x.element_size() / 2**20
    print(f"  [diffusion] B={batch}, 3x{size}x{size}, eps-net width {width}, N = {steps}", flush=True)
    t_of = {n: n * 1e-3 for n in steps}
    modes = ("replay", "checkpoint", "autograd")
    n_lo, n_hi = steps
    fns = {m: gradient_fn(net, x, t_of[n_hi], m) for m in modes} | {"limit": limit_fn(net, x, t_of[n_hi])}
    first = {m: fns[m]() for m in modes}
    err = (first["replay"] - first["autograd"]).abs().max().item()
    rep.check(
        "diffusion.replay_equals_autograd",
        err <= 1e-4 * max(1.0, first["autograd"].abs().max().item()),
        max_abs_diff=err,
    )
    times = rounds(fns, dev, ctx.slow_repeats if not ctx.tiny else 1)
    rep.add(f"diffusion.replay_seconds_N{n_hi}", med(times["replay"]), "s", note="one exact gradient")
    rep.add(
        "diffusion.time_replay_vs_limit",
        paired_ratio(times["replay"], times["limit"]),
        "ratio",
        ("<=", 1.2),
        note=f"N={n_hi}; limit {fmt(med(times['limit']))} s: one graph-free forward + N x (forward with graph + backward)",
    )
    rep.add(
        "diffusion.time_checkpoint_vs_replay",
        paired_ratio(times["checkpoint"], times["replay"]),
        "ratio",
        (">=", 1.0),
        note=f"N={n_hi}; per-step torch.utils.checkpoint; autograd/replay {fmt(paired_ratio(times['autograd'], times['replay']))}",
    )
    if dev.type == "cuda" or cpu_peak_supported():
        peak_memory(fns["limit"], dev)  # the first measurement in a process carries one-time allocations
        peaks = {}
        for m in modes:
            for n in steps:
                clean_heap()
                peaks[(m, n)] = peak_memory(gradient_fn(net, x, t_of[n], m), dev)
        ratio = {m: peaks[(m, n_hi)] / peaks[(m, n_lo)] for m in modes}
        grown = (peaks[("replay", n_hi)] - peaks[("replay", n_lo)]) / 2**20
        rep.add(
            "diffusion.mem_ratio_replay",
            ratio["replay"],
            "ratio",
            ("<=", 1.2),
            note=f"peak N={n_hi} / N={n_lo} ({fmt(peaks[('replay', n_lo)] / 2**20)} -> "
            f"{fmt(peaks[('replay', n_hi)] / 2**20)} MiB; +{fmt(grown)} MiB, of which the {n_hi - n_lo} "
            f"more stored states are {fmt((n_hi - n_lo) * state_mib)} MiB)",
        )
        rep.add(
            "diffusion.mem_ratio_checkpoint", ratio["checkpoint"], "ratio", note=f"peak N={n_hi} / N={n_lo}"
        )
        rep.add("diffusion.mem_ratio_autograd", ratio["autograd"], "ratio", note=f"peak N={n_hi} / N={n_lo}")
    else:
        rep.note("CPU peak memory needs glibc mallinfo2; diffusion memory figures skipped")
    purify_overhead(ctx, net, x)


def purify_overhead(ctx: Ctx, net: nn.Module, x: torch.Tensor) -> None:
    """diffusion.purify_overhead: Defense.purify of DiffPure (S draws as rows, no gradient) over NFE x
    one batched forward of the same number of rows."""
    dev, rep = ctx.device, ctx.report
    draws = 2 if ctx.tiny else 4
    t_star = 0.003 if ctx.tiny else 0.05
    defense = Defense(nn.Flatten(), DiffPurePurifier(net.schedule, t_star=t_star), {"eps": net})
    idx = list(range(x.shape[0]))
    rows = x.repeat(draws, 1, 1, 1) * 2 - 1
    t = torch.full((rows.shape[0],), t_star, device=dev)
    nfe = len(defense.purifier.times) - 1

    def ours():
        with torch.no_grad():
            return defense.purify(x, SampleRNG(3, idx), draws)

    def forward():
        with torch.no_grad():
            for _ in range(nfe):
                out = net(rows, t)
        return out

    times = rounds({"ours": ours, "forward": forward}, dev, ctx.repeats)
    rep.add(
        "diffusion.purify_overhead",
        paired_ratio(times["ours"], times["forward"]),
        "ratio",
        ("<=", 1.1),
        note=f"DiffPure t*={t_star:g}: {nfe} evaluations of {rows.shape[0]} rows (B={x.shape[0]}, {draws} draws)",
    )
