"""P3, full-gradient attack vs T [P3.*]: peak memory (`advpure.perf.memory.peak_memory`) and time
of one PGD-full iteration (the exact gradient through T ADP steps, EOT), with per-step activation
checkpointing (ours) and without.
"""

from __future__ import annotations

import torch

from advpure.attacks import eot_gradient, project
from advpure.perf.harness import Ctx, adp_defense, grng, images, make_nets, section
from advpure.perf.memory import clean_heap, cpu_peak_supported, peak_memory
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med, paired_ratio


@section("P3", order=30)
def p3_full_gradient(ctx: Ctx) -> None:
    """Time and peak memory of one PGD-full iteration for each T of `sz.p3_steps`, checkpointed
    and not; memory growth from the smallest to the largest T, and per ADP step."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    score, clf = make_nets(sz, dev)
    b, k = sz.p3_batch, sz.p3_eot
    x, y = images(b, sz, dev)
    if dev.type == "cpu" and not cpu_peak_supported():
        rep.note("CPU peak memory needs glibc mallinfo2; P3 memory figures skipped")
    print(
        f"  [P3] one PGD-full iteration (EOT {k}, B={b}, S={sz.replicas}) vs T; checkpointing (ours) / none",
        flush=True,
    )
    mems: dict[tuple[str, int], int] = {}
    tratio: dict[int, float] = {}
    prof_fn = None
    for t in sz.p3_steps:
        variants = {
            "ckpt": adp_defense(score, clf, ctx.exp, steps=t, replicas=sz.replicas, checkpointing=True),
            "nockpt": adp_defense(score, clf, ctx.exp, steps=t, replicas=sz.replicas, checkpointing=False),
        }

        def one_iter(defense):
            ev = eot_gradient(defense, x, y, grng(5, dev), gradient="full", eot=k)
            return project(x + ctx.exp.step * ev.grad.sign(), x, ctx.exp.eps)

        fns = {name: (lambda d=d: one_iter(d)) for name, d in variants.items()}
        fl: dict[str, int] = {}
        times, first = interleaved(fns, dev, ctx.repeats, flops=fl)
        same = torch.equal(first["ckpt"], first["nockpt"])
        for name, d in variants.items():
            if dev.type == "cuda" or cpu_peak_supported():
                clean_heap()
                mems[(name, t)] = peak_memory(lambda d=d: one_iter(d), dev)
        tratio[t] = paired_ratio(times["ckpt"], times["nockpt"])
        m_c, m_n = mems.get(("ckpt", t), float("nan")), mems.get(("nockpt", t), float("nan"))
        conv = (score, images(b * k * sz.replicas, sz, dev)[0], f"ncsnv2-{sz.image_size}-ngf{sz.ngf}")
        rep.add(
            f"P3.time_ckpt_T{t}",
            med(times["ckpt"]),
            "s/iteration",
            rate=ctx.rate(fl["ckpt"], med(times["ckpt"]), conv=conv),
        )
        rep.add(f"P3.time_ratio_ckpt_vs_nockpt_T{t}", tratio[t], "ratio", ("<=", 1.5))
        rep.add(f"P3.peak_mib_ckpt_T{t}", m_c / 2**20, "MiB")
        rep.add(f"P3.peak_mib_nockpt_T{t}", m_n / 2**20, "MiB")
        if not same:
            rep.check(f"P3.same_step_T{t}", same)
        if t == max(sz.p3_steps):
            prof_fn = fns
    t_lo, t_hi = min(sz.p3_steps), max(sz.p3_steps)
    growth_c = mems.get(("ckpt", t_hi), float("nan")) / mems.get(("ckpt", t_lo), float("nan"))
    growth_n = mems.get(("nockpt", t_hi), float("nan")) / mems.get(("nockpt", t_lo), float("nan"))
    met_m = rep.add(
        "P3.mem_growth_ckpt",
        growth_c,
        "ratio",
        ("<=", 1.5),
        note=f"peak T={t_hi} / T={t_lo}; flat in T; no checkpointing: {fmt(growth_n)}x",
    )
    rep.add("P3.mem_growth_nockpt", growth_n, "ratio", note=f"peak T={t_hi} / T={t_lo}")
    rows = b * k
    for name in ("ckpt", "nockpt"):
        per_step = (mems.get((name, t_hi), float("nan")) - mems.get((name, t_lo), float("nan"))) / (
            t_hi - t_lo
        )
        rep.add(
            f"P3.mem_per_step_kib_{name}",
            per_step / 1024,
            "KiB/step",
            note=f"{fmt(per_step / 1024 / rows)} KiB per row ({rows} rows)",
        )
    worst = max(tratio.values())
    met_t = rep.add("P3.time_ratio_ckpt_vs_nockpt_max", worst, "ratio", ("<=", 1.5), note="worst over T")
    if (met_m is False or met_t is False) and ctx.profile and prof_fn is not None:
        rep.profile(
            "P3.nockpt", prof_fn["nockpt"], dev, f"goal missed; one iteration without checkpointing, T={t_hi}"
        )
        rep.profile(
            "P3.ckpt", prof_fn["ckpt"], dev, f"one checkpointed iteration, T={t_hi}", versus="P3.nockpt"
        )
