"""Formats [formats.*]: the score-net forward in fp32 NCHW / channels-last / bf16 autocast, and
`torch.compile` of the score net (in a subprocess with a time limit; skipped with a note when it
fails or cannot run).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from torch import nn

from advpure.perf.harness import Ctx, images, make_nets, section
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med, paired_ratio


def nchw_forward(net, x: torch.Tensor) -> torch.Tensor:
    """NCSNv2.forward without its conversion to channels-last (activations stay NCHW)."""
    h = net.begin_conv(2.0 * x - 1.0)
    h1 = net.res1(h)
    h2 = net.res2(h1)
    h3 = net.res3(h2)
    h4 = net.res4(h3)
    r = net.refine1([h4])
    r = net.refine2([h3, r])
    r = net.refine3([h2, r])
    r = net.refine4([h1, r])
    return net.end_conv(nn.functional.elu(net.normalizer(r))).contiguous()


@section("formats", order=80)
def formats(ctx: Ctx) -> None:
    """Score-net forward (no grad) in fp32 NCHW (weights and activations), channels-last (both),
    channels-last activations with NCHW weights, the net as shipped, and bf16 autocast; ratios of
    medians of paired timings, NCHW fp32 the baseline."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    shipped, _ = make_nets(sz, dev)
    nchw = copy.deepcopy(shipped).to(memory_format=torch.contiguous_format)
    cl = copy.deepcopy(shipped).to(memory_format=torch.channels_last)
    x = images(sz.format_rows, sz, dev)[0]
    w = shipped.res1[0].conv1.weight  # (ngf, ngf, 3, 3): its layout is unambiguous
    layout = "channels-last" if w.is_contiguous(memory_format=torch.channels_last) else "NCHW"

    def amp():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def run(fn, bf16=False):
        def go():
            with torch.no_grad(), amp() if bf16 else contextlib.nullcontext():
                return fn()

        return go

    fns = {
        "nchw": run(lambda: nchw_forward(nchw, x)),
        "channels_last": run(lambda: cl(x)),
        "cl_act_nchw_weights": run(lambda: nchw(x)),
        "shipped": run(lambda: shipped(x)),
    }
    bf16_ok = True
    try:
        run(lambda: shipped(x[:1]), bf16=True)()
    except Exception as e:  # noqa: BLE001 - an unsupported dtype is a note, not a crash
        bf16_ok = False
        rep.note(f"bf16 autocast unavailable on {dev.type}: {type(e).__name__}: {e}")
    if bf16_ok:
        fns["bf16"] = run(lambda: shipped(x), bf16=True)
        fns["bf16_nchw"] = run(lambda: nchw_forward(nchw, x), bf16=True)
    fl: dict[str, int] = {}
    times, first = interleaved(fns, dev, ctx.repeats, flops=fl)
    base = times["nchw"]
    conv = (shipped, x, f"ncsnv2-{sz.image_size}-ngf{sz.ngf}")

    def r(name: str):
        return ctx.rate(fl[name], med(times[name]), "bf16" if name.startswith("bf16") else "fp32", conv)

    print(
        f"  [formats] score-net forward, {sz.format_rows} rows, ngf={sz.ngf}; shipped = channels-last "
        f"activations, {layout} conv weights; baseline fp32 NCHW {fmt(med(base) * 1e3)} ms",
        flush=True,
    )
    rep.add(
        "formats.channels_last_vs_nchw",
        paired_ratio(times["channels_last"], base),
        "time ratio",
        note="< 1: channels-last faster",
        rate=r("channels_last"),
    )
    rep.add(
        "formats.cl_activations_nchw_weights_vs_nchw",
        paired_ratio(times["cl_act_nchw_weights"], base),
        "time ratio",
        rate=r("cl_act_nchw_weights"),
    )
    rep.add("formats.shipped_vs_nchw", paired_ratio(times["shipped"], base), "time ratio", rate=r("shipped"))
    if bf16_ok:
        rep.add(
            "formats.bf16_autocast_vs_fp32",
            paired_ratio(times["bf16"], times["shipped"]),
            "time ratio",
            note="shipped layout; < 1: bf16 faster",
            rate=r("bf16"),
        )
        rep.add(
            "formats.bf16_autocast_nchw_vs_fp32_nchw",
            paired_ratio(times["bf16_nchw"], base),
            "time ratio",
            rate=r("bf16_nchw"),
        )
        err = (first["bf16"].float() - first["shipped"]).abs().max().item()
        scale = first["shipped"].abs().max().item()
        rep.note(f"bf16 forward: max |diff| {err:.3g} vs output scale {scale:.3g}")
    diff = max((first[k] - first["nchw"]).abs().max().item() for k in ("channels_last", "shipped"))
    rep.check("formats.layouts_agree", diff < 1e-4, max_abs_diff=diff)


COMPILE_SCRIPT = r"""
import json, sys, time, torch
from advpure.nets import build_score_net
torch.set_num_threads({threads})
dev = torch.device("{device}")
torch.manual_seed(0)
net = build_score_net("ncsnv2", in_channels={c}, image_size={s}, ngf={ngf}).to(dev).eval().requires_grad_(False)
x = torch.rand({rows}, {c}, {s}, {s}, device=dev)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize(dev)
def bench(f, n={n}):
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter(); f(x); sync(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
with torch.no_grad():
    net(x)
    cnet = torch.compile(net)
    sync(); t0 = time.perf_counter(); y = cnet(x); sync(); ct = time.perf_counter() - t0
    err = (y - net(x)).abs().max().item()
    e, c = [], []
    for _ in range({n}):
        e.append(bench(net, 1)); c.append(bench(cnet, 1))
print("RESULT " + json.dumps(dict(compile_s=ct, eager_s=sorted(e)[len(e)//2], compiled_s=sorted(c)[len(c)//2],
      ratio=sorted(a / b for a, b in zip(c, e))[len(e)//2], max_abs_diff=err)))
"""


@section("compile", order=85)
def compile_probe(ctx: Ctx, timeout_s: int = 420) -> None:
    """`torch.compile(score net)` in a subprocess with an empty inductor cache (limit `timeout_s`):
    first-call seconds, then compiled / eager forward time. Skipped (a note) in quick/tiny mode,
    without a C++ compiler on CPU, on a timeout or a failure."""
    rep, sz, dev = ctx.report, ctx.sz, ctx.device
    if not ctx.compile:
        rep.note("torch.compile skipped (--quick/--tiny or --no-compile)")
        return
    if dev.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        rep.note("torch.compile skipped: no C++ compiler for inductor on this machine")
        return
    code = COMPILE_SCRIPT.format(
        threads=ctx.threads,
        device=str(dev),
        c=sz.channels,
        s=sz.image_size,
        ngf=sz.ngf,
        rows=sz.format_rows,
        n=max(3, ctx.repeats),
    )
    print(f"  [formats] torch.compile of the score net in a subprocess (limit {timeout_s} s) ...", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="advpure-perf-inductor-") as cache:  # a cold compile
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env
            )
    except subprocess.TimeoutExpired:
        rep.note(f"torch.compile skipped: did not finish within {timeout_s} s")
        return
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        rep.note(f"torch.compile failed on this machine (skipped): {tail[0][:200]}")
        return
    r = json.loads(line[len("RESULT ") :])
    rep.add(
        "formats.compile_seconds",
        r["compile_s"],
        "s",
        note="first call of torch.compile(score net), empty inductor cache",
    )
    rep.add("formats.compiled_vs_eager", r["ratio"], "time ratio", note=f"max |diff| {r['max_abs_diff']:.2g}")
