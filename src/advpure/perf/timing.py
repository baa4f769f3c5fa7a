"""Timing and profiling for the performance suite: paired, interleaved repeats and their medians,
and torch.profiler summaries of a measurement (top ops, and where one spends more than another).

Every timed call synchronises CUDA before and after, so a time covers the kernels it launched.
"""

from __future__ import annotations

import statistics
import textwrap
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds of `fn()`, its output), the device synchronised around the call."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: dict[str, Callable[[], object]] | None = None,
    flops: dict[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict]:
    """Time each fn `repeats` times, interleaved (order reversed every other round, so a drift in
    the machine's load hits all alike), after one warm-up call of each (of `warmup`'s fns where
    given; `{}` for none). With a `flops` dict, the warm-up calls run under
    `advpure.perf.flopcount.count_flops` (torch.utils.flop_counter's formulas) and `flops[name]` receives the FLOPs of each (the
    fns themselves when `warmup` is None: their measured work). Returns ({name: [seconds]},
    {name: first output})."""
    for name, fn in (warmup if warmup is not None else fns).items():
        if flops is None:
            fn()
        else:
            from advpure.perf.flopcount import count_flops

            flops[name] = count_flops(fn)[0]
    times: dict[str, list[float]] = {n: [] for n in fns}
    first: dict[str, object] = {}
    names = list(fns)
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t, out = timed(fns[n], device)
            times[n].append(t)
            first.setdefault(n, out)
    return times, first


def med(xs: list[float]) -> float:
    """The median of `xs`."""
    return float(statistics.median(xs))


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a_r / b_r (pairs measured in the same round)."""
    return med([x / y for x, y in zip(a, b)])


def profile_top(
    fn: Callable[[], object], device: torch.device, rows: int = 8
) -> tuple[str, list[dict], dict[str, tuple[int, float]]]:
    """Run fn once under torch.profiler; the top `rows` ops by self CPU time (a printable table and
    its records: op, calls, self_cpu_ms, share in [0, 1]) and every op's (calls, self CPU ms)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    all_ops = {e.key: (int(e.count), e.self_cpu_time_total / 1e3) for e in events}
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    recs = [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in top
    ]
    lines = [f"    {'op':<44} {'calls':>7} {'self CPU ms':>12} {'share':>7}"]
    lines += [
        f"    {r['op'][:44]:<44} {r['calls']:>7} {r['self_cpu_ms']:>12.1f} {100 * r['share']:>6.1f}%"
        for r in recs
    ]
    if device.type == "cuda":
        sort = "self_cuda_time_total"
        try:
            lines.append(textwrap.indent(events.table(sort_by=sort, row_limit=rows), "    "))
        except Exception:  # noqa: BLE001 - older/newer profiler naming; the CPU summary is enough
            pass
    return "\n".join(lines), recs, all_ops


def profile_gap(
    ops: dict[str, tuple[int, float]], base: dict[str, tuple[int, float]], rows: int = 6
) -> tuple[str, list[dict]]:
    """Ops by their extra self CPU time (ms) in `ops` over `base` (both as `profile_top` returns
    them): where the difference goes. Returns a printable table and its records."""
    keys = set(ops) | set(base)
    diff = {k: ops.get(k, (0, 0.0))[1] - base.get(k, (0, 0.0))[1] for k in keys}
    total = sum(v[1] for v in ops.values()) - sum(v[1] for v in base.values())
    top = sorted(keys, key=lambda k: diff[k], reverse=True)[:rows]
    recs = [
        {"op": k, "extra_ms": diff[k], "calls": ops.get(k, (0, 0))[0], "base_calls": base.get(k, (0, 0))[0]}
        for k in top
    ]
    lines = [f"    {'op':<44} {'extra ms':>10} {'calls':>8} {'vs calls':>9}   (total extra {total:.1f} ms)"]
    lines += [
        f"    {r['op'][:44]:<44} {r['extra_ms']:>10.1f} {r['calls']:>8} {r['base_calls']:>9}" for r in recs
    ]
    return "\n".join(lines), recs
