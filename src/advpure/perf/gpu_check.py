"""One-command check of a machine with one GPU: `python -m advpure.perf.gpu_check [--size tiny|full]
[--out FILE.json]` (`make gpu-check`). No network, no trained weights, no omegaconf / wandb.

Random-weight official-layout CIFAR-10 nets (NCSNv2, ngf 128: 29,694,083 parameters; WRN-28-10:
36,479,194) on synthetic 32x32 images. Parts (each records ok / error / skipped-with-reason):
  peak        dense fp32 / bf16 matmul and the score net's conv mix (`advpure.perf.peak`)
  unit        per-row times of the score net (forward; jvp dual pass; forward + input backward) and
              the classifier (forward; forward + input backward), fp32 and bf16 autocast
  train       one DSM step (score net, Adam) and one CE step (WRN, SGD), fp32 and bf16
  purify      ADP S x T purification: fp32 secant, fp32 jvp, bf16 jvp; the bf16 secant refused;
              each probe's curvature against the fp32 jvp's (`advpure.purify.probe`)
  attack      one BPDA+EOT and one exact-gradient APGD iteration (`run_attack`), fp32 and bf16
  ddp         a tiny Lightning fit with strategy ddp, devices=1: is a process group initialised?
  compile     `advpure.nets.compiled.compile_net` of the score net, checked against eager
  certify     CERTIFY (Cohen et al. 2019) of a few images per base: counts sum to n0 and n
  project     GPU-hours of cifar10_croce2022, cifar10_paper (BPDA40+EOT15, 10k images) and
              cifar10_certify, fp32 and bf16 (`advpure.perf.projection`: formulas there)
Throughput, peak memory (torch.cuda.max_memory_allocated, bytes) and GFLOP/s with % of peak are
printed and written to the JSON (`figures`: {key: {value, unit, note}}, value null when skipped).
`--size tiny` (tiny nets, seconds, also on CPU) skips the CUDA-only parts (ddp, compile) with the
reason in the JSON; `--size full` takes a few minutes on one GPU (budget: 8).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from advpure.nets.classifiers import Normalize, WideResNet
from advpure.nets.ncsnv2 import NCSNv2
from advpure.nets.precision import Precision
from advpure.perf.ddp_check import ddp_check
from advpure.perf.defenses import probe_defense
from advpure.perf.peak import Peaks, autocast, count_flops, rate
from advpure.perf.projection import FORMULA, project
from advpure.perf.timing import sync
from advpure.purify.adp import DEFAULTS as ADP_DEFAULTS
from advpure.purify.base import screened_rows
from advpure.purify.probe import curvature, jvp_field

DTYPES = ("fp32", "bf16")
CUDA_ONLY = "CUDA-only part (needs a GPU); skipped on {device}"


@dataclass(frozen=True)
class Size:
    """Nets and batches of one size."""

    ngf: int = 128  # NCSNv2 width (official CIFAR-10: 128)
    wrn: tuple[int, int] = (28, 10)  # WideResNet depth, widen
    rows: int = 128  # rows of the per-row time measurements
    grad_rows: int = 64  # rows of the forward + backward measurements
    train_batch: int = 128  # score.batch_size / data.batch_size of cifar10_paper
    purify_images: int = 8
    replicas: int = 10  # S
    steps: int = 10  # T
    bpda_images: int = 4
    eot: int = 15
    apgd_images: int = 2
    apgd_eot: int = 8
    certify_images: int = 2
    n0: int = 32
    n: int = 256
    repeats: int = 3  # timed calls per measurement (median); 0: time the FLOP-counting call itself (tiny)
    rates: bool = True  # count FLOPs (GFLOP/s, % of peak) everywhere; False: in the unit part only (tiny)


SIZES = {
    "full": Size(),
    "tiny": Size(
        ngf=4, wrn=(10, 1), rows=2, grad_rows=2, train_batch=2, purify_images=1, replicas=2, steps=1,
        bpda_images=1, eot=1, apgd_images=1, apgd_eot=1, certify_images=1, n0=4, n=8, repeats=0, rates=False,
    ),
}  # fmt: skip
DSM_SIGMAS = (50.0, 0.01, 232)  # conf/score/ncsnv2_cifar10.yaml: dsm_sigma_max, dsm_sigma_min, dsm_levels
ADP = {k: getattr(ADP_DEFAULTS, k) for k in ("sigma", "lam", "delta")}  # ADP's defaults (`ADPParams`)


class Check:
    """Figures and part outcomes of one run, printed as they come."""

    def __init__(self):
        self.figures: dict[str, dict] = {}
        self.parts: dict[str, dict] = {}
        self.projections: dict[str, dict] = {}

    def fig(self, key: str, value, unit: str = "", note: str = "", r=None) -> None:
        rec = {"value": None if value is None else float(value), "unit": unit, "note": note}
        if r is not None:
            rec["rate"] = r.as_dict()
        self.figures[key] = rec
        shown = "-" if value is None else f"{value:.4g}"
        extra = f"  [{r.text()}]" if r is not None else ""
        print(f"  {key:<50} {shown:>12} {unit}{extra}" + (f"  ({note})" if note else ""), flush=True)

    def part(self, name: str, fn: Callable[[], None], skip: str | None = None) -> None:
        print(f"\n== {name}", flush=True)
        if skip:
            self.parts[name] = {"ok": None, "skipped": skip}
            print(f"  skipped: {skip}", flush=True)
            return
        t0 = time.perf_counter()
        try:
            fn()
            self.parts[name] = {"ok": True}
        except Exception as e:  # noqa: BLE001 - a failed part is a finding, the others still run
            self.parts[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
        self.parts[name]["seconds"] = time.perf_counter() - t0


def median_time(fn: Callable[[], object], dev: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median seconds of `repeats` calls (after one warm-up call unless `warmup=False`), synchronised."""
    if warmup:
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_mem(dev: torch.device, fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated by torch during fn() on CUDA (max_memory_allocated); None on CPU (not run)."""
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    sync(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def make_nets(sz: Size, dev: torch.device) -> tuple[nn.Module, nn.Module]:
    """Random-weight (seeded) NCSNv2 (3 x 32 x 32, ngf) and WRN (normalising as the CIFAR one)."""
    torch.manual_seed(0)
    score = NCSNv2(in_channels=3, ngf=sz.ngf, image_size=32)
    wrn = WideResNet(*sz.wrn, dropout=0.0, num_classes=10, in_channels=3)
    clf = nn.Sequential()
    clf.add_module("normalize", Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    clf.add_module("net", wrn)
    return score.to(dev).eval().requires_grad_(False), clf.to(dev).eval().requires_grad_(False)


def run(size: str, dev: torch.device, on_part: Callable[[dict], None] | None = None) -> dict:
    """Every part at `size` on `dev`; returns the JSON document (also passed to `on_part` after
    each part, so that a run cut short still leaves its figures)."""
    sz, c = SIZES[size], Check()
    score, clf = make_nets(sz, dev)
    peaks = Peaks(dev, repeats=1 if size == "tiny" else 3, matmul_n=256 if size == "tiny" else None)
    g = torch.Generator().manual_seed(1)

    def imgs(n: int) -> torch.Tensor:
        return torch.rand(n, 3, 32, 32, generator=g).to(dev)

    x_rows = imgs(sz.rows)
    conv = {dt: (score, x_rows, f"ncsnv2-32-ngf{sz.ngf}") for dt in DTYPES}
    times: dict[str, dict[str, float]] = {dt: {} for dt in DTYPES}
    c.fig("nets.score_params", sum(p.numel() for p in score.parameters()), "parameters")
    c.fig("nets.classifier_params", sum(p.numel() for p in clf.parameters()), "parameters")

    def timed_fig(key, fn, dt, per, unit, note="", conv_ref=None, flops=None):
        """Figure `key` of fn: per/t (unit "x/s") or t/per, with its rate when FLOPs are counted
        (`sz.rates`, or `flops=True`); returns t, the median seconds of a call."""
        count = sz.rates if flops is None else flops
        t0 = time.perf_counter()
        fl = count_flops(fn)[0] if count else fn()  # also the warm-up call
        sync(dev)
        t = median_time(fn, dev, sz.repeats, warmup=False) if sz.repeats else time.perf_counter() - t0
        r = rate(peaks, fl, t, dt, conv_ref) if count else None
        c.fig(key, per / t if unit.endswith("/s") else t / per, unit, note, r)
        return t

    def part_peak():
        for dt in DTYPES:
            c.fig(f"peak.matmul_gflops.{dt}", peaks.matmul_peak(dt), "GFLOP/s")
            gf = peaks.conv_peak(score, x_rows, dt, conv[dt][2])
            c.fig(f"peak.conv_gflops.{dt}", gf, "GFLOP/s", f"score net convs alone, {sz.rows} rows")

    def part_unit():
        xg, v = imgs(sz.grad_rows), torch.randn_like(x_rows)

        def fwd_bwd(net, x):
            def go():
                xr = x.detach().requires_grad_(True)
                return torch.autograd.grad(net(xr).float().square().sum(), xr)[0]

            return go

        for dt in DTYPES:
            units = {
                "t_s": (lambda: score(x_rows), sz.rows, torch.no_grad),
                "t_dual": (lambda: jvp_field(score, x_rows, v), sz.rows, torch.no_grad),
                "t_sfb": (fwd_bwd(score, xg), sz.grad_rows, torch.enable_grad),
                "t_c": (lambda: clf(x_rows), sz.rows, torch.no_grad),
                "t_cfb": (fwd_bwd(clf, xg), sz.grad_rows, torch.enable_grad),
            }
            for name, (fn, n, mode) in units.items():

                def call(fn=fn, mode=mode, dt=dt, score_net=name != "t_c" and name != "t_cfb"):
                    # the score net in fp32 without TF32, as purification runs it (advpure.nets.precision.Precision)
                    strict = (
                        Precision("fp32", dev) if score_net and dt == "fp32" else contextlib.nullcontext()
                    )
                    with mode(), autocast(dev, dt), strict:
                        return fn()

                ref = conv[dt] if name.startswith("t_s") or name == "t_dual" else None
                key = f"unit.{name}.{dt}"
                times[dt][name] = timed_fig(key, call, dt, n, "s/row", f"{n} rows", ref, flops=True) / n

    def part_train():
        from advpure.training.losses import dsm_loss, geometric_sigmas

        sig = geometric_sigmas(*DSM_SIGMAS).to(dev)
        x, y = imgs(sz.train_batch), torch.randint(0, 10, (sz.train_batch,), generator=g).to(dev)
        for dt in DTYPES:
            snet, cnet = make_nets(sz, dev)
            snet.train().requires_grad_(True)
            cnet.train().requires_grad_(True)
            sopt = torch.optim.Adam(snet.parameters(), lr=1e-4)
            copt = torch.optim.SGD(cnet.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

            def dsm(snet=snet, sopt=sopt, dt=dt):
                with autocast(dev, dt):
                    loss = dsm_loss(snet, x, sig[torch.randint(0, len(sig), (x.shape[0],), device=dev)])
                sopt.zero_grad(set_to_none=True)
                loss.backward()
                sopt.step()

            def ce(cnet=cnet, copt=copt, dt=dt):
                with autocast(dev, dt):
                    loss = nn.functional.cross_entropy(cnet(x).float(), y)
                copt.zero_grad(set_to_none=True)
                loss.backward()
                copt.step()

            for name, fn, net in (("dsm", dsm, snet), ("ce", ce, None)):
                ref = (net, x, f"ncsnv2-32-ngf{sz.ngf}-train") if net is not None else None
                timed_fig(f"train.{name}.{dt}.images_per_s", fn, dt, sz.train_batch, "images/s", "", ref)
                c.fig(f"train.{name}.{dt}.peak_mem_bytes", peak_mem(dev, fn), "bytes")

    def defense(probe, dt, steps=None):
        return probe_defense(score, clf, **ADP, tau=0.0, steps=steps or sz.steps, replicas=sz.replicas,
                             probe=probe, dtype=dt)  # fmt: skip

    def part_purify():
        from advpure.core.rng import GeneratorRNG

        x = imgs(sz.purify_images)
        variants = {
            "secant_fp32": ("secant", "fp32"),
            "jvp_fp32": ("jvp", "fp32"),
            "jvp_bf16": ("jvp", "bf16"),
        }
        secs = {}
        for name, (probe, dt) in variants.items():
            d = defense(probe, dt)

            def go(d=d):
                with torch.no_grad():
                    return d.purify(x, GeneratorRNG(torch.Generator(device=dev).manual_seed(3)), sz.replicas)

            note = f"S={sz.replicas} x T={sz.steps}, tau=0, {sz.purify_images} images"
            secs[name] = timed_fig(f"purify.{name}.images_per_s", go, dt, sz.purify_images, "images/s", note,
                                   (score, imgs(sz.purify_images * sz.replicas), "purify-rows"))  # fmt: skip
            c.fig(f"purify.{name}.peak_mem_bytes", peak_mem(dev, go), "bytes")
        c.fig("purify.speedup_bf16_jvp_vs_fp32_secant", secs["secant_fp32"] / secs["jvp_bf16"], "x")
        try:
            defense("secant", "bf16")
            refused = False
        except ValueError:
            refused = True
        c.fig(
            "purify.secant_bf16_refused",
            float(refused),
            "bool",
            "bf16 purification with the secant probe is refused (ConfigError)",
        )
        if not refused:
            raise RuntimeError("bf16 purification with the secant probe was not refused")
        # each probe's curvature against the fp32 jvp's, in units of |J g| / |g| (random weights)
        x0 = screened_rows(
            x, GeneratorRNG(torch.Generator(device=dev).manual_seed(4)), sz.replicas, ADP["sigma"]
        )
        k, scale = {}, None
        with torch.no_grad():
            for dt in DTYPES:
                with autocast(dev, dt):
                    gx = score(x0)
                    _, jg = jvp_field(score, x0, gx)
                    gd = score(x0 + ADP["delta"] * gx.float())
                gw, gdw = gx.float().flatten(1), gd.float().flatten(1)
                k[f"jvp_{dt}"] = curvature(gx, jg)
                k[f"secant_{dt}"] = (1 - (gw * gdw).sum(1) / (gw * gw).sum(1)) / ADP["delta"]
                if dt == "fp32":
                    scale = jg.float().flatten(1).norm(dim=1) / gw.norm(dim=1)
        for name in ("secant_fp32", "jvp_bf16", "secant_bf16"):
            err = ((k[name] - k["jvp_fp32"]).abs() / scale).median().item()
            c.fig(f"purify.curvature_err.{name}.median", err, "of |Jg|/|g|", "vs the fp32 jvp")

    def part_attack():
        from advpure.attacks import attack_params, run_attack
        from advpure.core.rng import SampleRNG

        specs = {
            "bpda_eot": (attack_params("pgd", gradient="bpda", iters=1, eot=sz.eot), sz.bpda_images, sz.eot),
            "apgd_full": (attack_params("apgd", gradient="full", iters=1, eot=sz.apgd_eot, loss="cw"),
                          sz.apgd_images, sz.apgd_eot),
        }  # fmt: skip
        for dt in DTYPES:
            d = defense("secant" if dt == "fp32" else "jvp", dt)
            for name, (spec, b, k) in specs.items():
                x, y = imgs(b), torch.randint(0, 10, (b,), generator=g).to(dev)

                def go(spec=spec, x=x, y=y, d=d, b=b):
                    return run_attack(spec, d, x, y, SampleRNG(0, list(range(b))), eps=8 / 255, step=2 / 255)

                t = timed_fig(f"attack.{name}.{dt}.seconds_per_image", go, dt, b, "s/image",
                              f"1 iteration (2 objective evaluations), EOT {k}, S={sz.replicas}, T={sz.steps}",
                              (score, imgs(b * k), f"attack-rows-{b * k}"))  # fmt: skip
                c.fig(f"attack.{name}.{dt}.peak_mem_bytes", peak_mem(dev, go), "bytes")
                if times[dt]:  # the projection's formula for this run: 2 evaluations, no final prediction
                    from advpure.perf.projection import step_times

                    step, step_grad = step_times(times[dt], dt)
                    per = (step_grad if name == "apgd_full" else step) * sz.steps + times[dt]["t_cfb"]
                    c.fig(f"attack.{name}.{dt}.measured_over_formula", t / b / (2 * k * per), "ratio",
                          "checks the projection's per-row model")  # fmt: skip

    def part_ddp():
        c.fig(
            "ddp.process_group_initialized",
            float(ddp_check(dev)),
            "bool",
            "Lightning fit, strategy ddp, devices=1",
        )

    def part_compile():
        from advpure.nets.compiled import compile_net, eager_of, warm_up

        compiled = compile_net(score)
        c.fig(
            "compile.first_call_seconds",
            warm_up(compiled, x_rows),
            "s",
            "compile + 1 evaluation, checked vs eager",
        )
        with torch.no_grad():
            te = median_time(lambda: eager_of(compiled)(x_rows), dev, max(1, sz.repeats))
            tc = median_time(lambda: compiled(x_rows), dev, max(1, sz.repeats))
        c.fig("compile.speedup_vs_eager", te / tc, "x", f"score forward, {sz.rows} rows, fp32")

    def part_certify():
        from advpure.certify import SmoothedClassifier, build_base

        x = imgs(sz.certify_images)
        idx = list(range(sz.certify_images))
        ok = True
        for base_name in ("noisy", "denoised", "adp"):
            params = {"steps": sz.steps} if base_name == "adp" else {}
            base = build_base(
                base_name, clf, 0.25, score_net=score if base_name != "noisy" else None, **params
            )
            sc = SmoothedClassifier(base, 0.25, 10, seed=0, max_batch=512)
            t0 = time.perf_counter()
            res = sc.certify(x, idx, n0=sz.n0, n=sz.n, alpha=0.001)
            sync(dev)
            secs = time.perf_counter() - t0
            good = all(sum(r.counts0) == sz.n0 and sum(r.counts) == sz.n for r in res) and len(res) == len(
                idx
            )
            ok = ok and good
            rows = sz.certify_images * (sz.n0 + sz.n)
            c.fig(f"certify.{base_name}.rows_per_s", rows / secs, "rows/s", f"counts sum to n0, n: {good}")
        c.fig("certify.counts_ok", float(ok), "bool", f"n0={sz.n0}, n={sz.n}, {sz.certify_images} images")
        if not ok:
            raise RuntimeError("certification counts do not sum to n0 and n")

    def part_project():
        if not all(times[dt] for dt in DTYPES):
            raise RuntimeError("the unit part did not run: no per-row times to project from")
        proj = project(times)
        for name, rec in proj.items():
            for dt, h in rec["gpu_hours"].items():
                c.fig(
                    f"project.{name}.{dt}.gpu_hours",
                    h,
                    "GPU-hours",
                    ", ".join(f"{k} {v:.3g}" for k, v in rec["per_attack_hours"][dt].items()),
                )
        c.projections = proj

    cuda_skip = None if dev.type == "cuda" else CUDA_ONLY.format(device=dev.type)
    for name, fn, skip in (
        ("peak", part_peak, None),
        ("unit", part_unit, None),
        ("train", part_train, None),
        ("purify", part_purify, None),
        ("attack", part_attack, None),
        ("ddp", part_ddp, cuda_skip),
        ("certify", part_certify, None),
        ("project", part_project, None),
        ("compile", part_compile, cuda_skip),  # last: a cold inductor compile of the big net takes minutes
    ):
        c.part(name, fn, skip)
        if skip:  # the figure keys exist either way (value null)
            for key in SKIPPED_KEYS[name]:
                c.figures.setdefault(key, {"value": None, "unit": "", "note": skip})
        doc = {"figures": c.figures, "parts": c.parts, "projections": c.projections, "formula": FORMULA}
        if on_part is not None:
            on_part(doc)
    return doc


SKIPPED_KEYS = {
    "ddp": ["ddp.process_group_initialized"],
    "compile": ["compile.first_call_seconds", "compile.speedup_vs_eager"],
}


def main(argv: list[str] | None = None) -> int:
    """The command line; 0 when every part that ran passed, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m advpure.perf.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="runs/perf/gpu_check.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"advpure gpu-check ({args.size}) on {name} [{dev}], torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(doc: dict) -> None:
        doc.update(
            size=args.size, device=str(dev), device_name=name, torch=torch.__version__,
            cuda=torch.version.cuda, python=platform.python_version(), seconds=time.perf_counter() - t0,
        )  # fmt: skip
        out.write_text(json.dumps(doc, indent=2, default=str))

    doc = run(args.size, dev, on_part=write)
    write(doc)
    failed = [k for k, v in doc["parts"].items() if v.get("ok") is False]
    print(f"\nparts failed: {', '.join(failed) or 'none'}; {doc['seconds']:.0f} s; wrote {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
