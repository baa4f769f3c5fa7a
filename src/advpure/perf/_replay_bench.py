"""Exact-gradient cost of the diffusion purifiers: replay vs per-step checkpointing vs plain autograd.

    PYTHONPATH=src python -m advpure.perf._replay_bench [--batch 4] [--width 64] [--repeats 3] [--threads 1]

One attack gradient = purify (DiffPure, reverse SDE, keyed noise) + d(sum of outputs)/dx, on a small
random conv eps-net on CPU, at N = 10 and N = 100 reverse steps (t* = 0.01 and 0.1, dt = 1e-3):

* peak memory (`advpure.perf.memory.peak_memory`: the glibc heap, read after every aten op) per mode,
  and the ratio N = 100 over N = 10;
* time of the replayed gradient over the LIMIT measured in the same run: one graph-free forward of the
  chain + N x (one step forward with graph + its backward), the work any exact step-wise method does;
* time of per-step `torch.utils.checkpoint` over replay.

Times are the process's CPU seconds (`time.process_time`) with one intra-op thread by default: on a
machine shared with other jobs, wall time measures the neighbours as much as the code. Each figure is
the minimum over `--repeats` interleaved rounds (ratios: of per-round ratios, the median).

Not a perf section itself (the leading underscore keeps `load_sections` from importing it): the
registered section `diffusion` (`advpure.perf.p5_diffusion`) measures the same figures, with its net.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from advpure.core.rng import SampleRNG
from advpure.nets.schedules import VPSchedule
from advpure.perf.memory import clean_heap, cpu_peak_supported, peak_memory
from advpure.purify.diffpure import DiffPureChain, DiffPurePurifier
from advpure.purify.replay import NoiseStream


class SmallEps(nn.Module):
    """Four 3x3 convs (3 -> w -> w -> w -> 3), SiLU, a time embedding added after the first."""

    def __init__(self, width: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(a, b, 3, padding=1)
                for a, b in ((3, width), (width, width), (width, width), (width, 3))
            ]
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.temb = nn.Parameter(torch.randn(width, generator=g) * 0.1)
        self.schedule = VPSchedule()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, u, t):
        h = self.convs[0](u) + t.view(-1, 1, 1, 1) * self.temb.view(1, -1, 1, 1)
        for c in self.convs[1:]:
            h = c(torch.nn.functional.silu(h))
        return h


def cpu_times(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Process CPU seconds of each fn over `repeats` interleaved rounds (order reversed every other
    round), after one warm-up call each; and each fn's first output."""
    first = {n: fn() for n, fn in fns.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.process_time()
            fns[n]()
            times[n].append(time.process_time() - t0)
    return times, first


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    net = SmallEps(args.width)
    x = 0.2 + 0.6 * torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    state_mb = x.numel() * 4 / 2**20
    print(
        f"batch {args.batch}, 3x32x32, eps-net width {args.width}; one state = {state_mb:.3f} MiB", flush=True
    )

    def gradient(t_star: float, mode: str):
        p = DiffPurePurifier(net.schedule, t_star=t_star, gradient_mode=mode)

        def fn():
            xx = x.clone().requires_grad_(True)
            out = p(xx, SampleRNG(0, range(args.batch)), 1, {"eps": net}, differentiable=True).x
            return torch.autograd.grad(out.sum(), xx)[0]

        return fn

    def limit(t_star: float):
        """One graph-free forward + N x (one step forward with graph + its backward)."""
        p = DiffPurePurifier(net.schedule, t_star=t_star)
        chain = DiffPureChain(net, p.vp, p.times, "sde", p.alpha_bar0)

        def fn():
            noise = NoiseStream(SampleRNG(0, range(args.batch)), 1, x)
            with torch.no_grad():
                u = chain.init(x, noise)
                states = []
                for k in range(chain.n_steps):
                    states.append(u)
                    u = chain.step(k, u, x, noise)
            g = torch.ones_like(u)
            fixed = NoiseStream(SampleRNG(1, range(args.batch)), 1, x)
            z = fixed.normal()
            fixed.normal = lambda: z  # the step's noise as a given tensor: no RNG work in the limit
            for k in reversed(range(chain.n_steps)):
                uk = states[k].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(chain.step(k, uk, x, fixed), uk, g)
            return g

        return fn

    modes = ("replay", "checkpoint", "autograd")
    for t_star, n in ((0.01, 10), (0.1, 100)):
        fns = {m: gradient(t_star, m) for m in modes} | {"limit": limit(t_star)}
        times, first = cpu_times(fns, args.repeats)
        err = (first["replay"] - first["autograd"]).abs().max().item()
        best = {k: min(v) for k, v in times.items()}
        print(
            f"N={n:3d}: CPU s replay {best['replay']:.3f}, checkpoint {best['checkpoint']:.3f}, "
            f"autograd {best['autograd']:.3f}, limit {best['limit']:.3f}; "
            f"replay/limit {ratio(times['replay'], times['limit']):.3f}, "
            f"checkpoint/replay {ratio(times['checkpoint'], times['replay']):.3f}; "
            f"|replay - autograd| {err:.2g}",
            flush=True,
        )
        if cpu_peak_supported():
            peak_memory(fns["limit"], dev)  # the first measurement carries one-time allocations
            for m in modes:
                clean_heap()
                fns[m]()
                clean_heap()
                main.mem[(m, n)] = peak_memory(fns[m], dev)  # type: ignore[attr-defined]
    if cpu_peak_supported():
        for m in modes:
            a, b = main.mem[(m, 10)], main.mem[(m, 100)]  # type: ignore[attr-defined]
            print(
                f"peak memory {m:10s}: N=10 {a / 2**20:7.1f} MiB, N=100 {b / 2**20:7.1f} MiB, ratio {b / a:.2f}"
            )
        print(f"(the replay's stored states at N=100: {100 * state_mb:.1f} MiB)")


main.mem = {}  # type: ignore[attr-defined]

if __name__ == "__main__":
    main()
