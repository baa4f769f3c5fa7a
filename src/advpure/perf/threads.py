"""Threads [threads.*]: the score-net forward with 1 vs 2 intra-op threads (CPU only; skipped on a
machine with one core).
"""

from __future__ import annotations

import os

import torch

from advpure.perf.harness import Ctx, images, make_nets, section
from advpure.perf.timing import interleaved, med, paired_ratio


@section("threads", order=90)
def thread_scaling(ctx: Ctx) -> None:
    """Paired timings of the score forward (`sz.format_rows` rows, no grad) with 1 and 2 threads."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    if dev.type != "cpu" or (os.cpu_count() or 1) < 2:
        return
    score, _ = make_nets(sz, dev)
    x = images(sz.format_rows, sz, dev)[0]
    before = torch.get_num_threads()

    def with_threads(n):
        def go():
            torch.set_num_threads(n)
            try:
                with torch.no_grad():
                    return score(x)
            finally:
                torch.set_num_threads(before)

        return go

    fl: dict[str, int] = {}
    times, _ = interleaved({"t1": with_threads(1), "t2": with_threads(2)}, dev, ctx.repeats, flops=fl)
    rep.add(
        "threads.fwd_2_vs_1",
        paired_ratio(times["t2"], times["t1"]),
        "time ratio",
        note=f"score forward {sz.format_rows} rows; < 1: 2 threads faster; load avg {os.getloadavg()[0]:.2f}",
        rate=ctx.rate(fl["t2"], med(times["t2"]), conv=(score, x, f"ncsnv2-{sz.image_size}-ngf{sz.ngf}")),
    )
