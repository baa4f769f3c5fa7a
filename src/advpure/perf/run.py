"""The performance suite: ratios against baselines measured in the same run, medians over repeats.

`python -m advpure.perf [--quick] [--device cuda] [--threads N] [--only P1,P2,...]` runs every
registered section (`advpure.perf.harness.section`) in order, prints each figure as it is
measured and, at the end, a table of all of them with their goals, and writes them as JSON.
One module per figure (figure keys in the JSON in brackets):

  p1_purification   P1 [P1.*]: ADP purification overhead and speed-up over the loop reference
  p2_bpda           P2 [P2.*]: BPDA+EOT attack + defended prediction vs the reference
  p2_score_evals    evals [P2.*score_evals_per_image.*]: score evaluations per image per attack
  p3_full_gradient  P3 [P3.*]: time and peak memory of a full-gradient iteration vs T
  p4_dsm            P4 [P4.*]: DSM training-step overhead
  flops             peak, flops [peak.*, flops.*]: the machine's peaks (dense matmul, the net's convs)
                    and GFLOP/s + % of peak of forward, purification, BPDA and full-gradient steps
  probe_bench       probe [probe.*]: the jvp step-size probe vs the secant (alpha, steps, bf16 speed-up)
  throughput        train, inference, attacks [throughput.*]
  formats           formats, compile [formats.*]: channels-last, bf16, torch.compile
  threads           threads [threads.*]: 1 vs 2 intra-op threads

Every timed figure also carries its achieved GFLOP/s and % of the run's peaks (`advpure.perf.peak`).
Where a goal is missed, the suite prints a torch.profiler summary (top ops by self CPU time) of
that measurement. All timings synchronise CUDA around the measured call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from advpure.core.fsio import write_text_atomic
from advpure.core.runtime import redirect_writes
from advpure.perf.harness import Ctx, experiment, load_sections, sizes_for
from advpure.perf.memory import clean_heap
from advpure.perf.peak import Peaks
from advpure.perf.report import Report, machine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's command line (see `python -m advpure.perf --help`)."""
    sections, _ = load_sections()
    p = argparse.ArgumentParser(prog="python -m advpure.perf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (~2 min on 2 CPU cores)")
    p.add_argument("--full", action="store_true", help="also P1 at CIFAR size (ngf=128, 32x32x3)")
    p.add_argument("--tiny", action="store_true", help="tiny nets and batches (tests)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5, quick 3)")
    p.add_argument("--out", default="runs/perf/perf.json", help="JSON of all figures")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile probe")
    p.add_argument(
        "--score",
        default=None,
        help="trained fmnist score-net weights for the probe figures (default: artifacts/fmnist/score.pt if present)",
    )
    p.add_argument("--no-profile", action="store_true", help="no profiler summaries for missed goals")
    p.add_argument(
        "--only", default="", help=f"comma-separated sections: {','.join(s.name for s in sections)}"
    )
    return p.parse_args(argv)


def default_score_weights() -> str | None:
    """The embedded default's trained score net, where `make train` writes it (the fmnist experiment's
    `paths.artifacts`, relative to the working directory), or None when it is not there."""
    from advpure.config.compose import load

    path = Path(load("fmnist").paths.artifacts) / "fmnist" / "score.pt"
    return str(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 on success, 2 on a bad option (a one-line error on stderr)."""
    args = parse_args(argv)
    # torch.compile's inductor/Triton and CUDA caches and temp files beside the report, not under $HOME
    redirect_writes(Path(args.out).parent / "cache")
    sections, full_sections = load_sections()
    names = [s.name for s in sections]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # LightningModule.log without a Trainer
    repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 5)
    exp = experiment("fmnist")
    score_weights = args.score
    if score_weights is None and not args.tiny:
        score_weights = default_score_weights()
    ctx = Ctx(
        device=device,
        sz=sizes_for(args.quick, args.tiny, exp),
        repeats=max(1, repeats),
        report=Report(),
        profile=not args.no_profile,
        quick=args.quick,
        tiny=args.tiny,
        full=args.full,
        compile=not (args.no_compile or args.quick or args.tiny),
        threads=args.threads,
        exp=exp,
        peaks=Peaks(device, repeats=1 if args.tiny else 3, matmul_n=256 if args.tiny else None),
        score_weights=score_weights,
    )
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in names]
    if unknown:
        print(f"error: unknown section(s) {unknown}; allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    info = machine(device)
    t_start = time.perf_counter()
    mode = "tiny" if args.tiny else "quick" if args.quick else "default"
    print(
        f"advpure perf suite ({mode}) on {info['device_name']} [{device}], torch {info['torch']}, "
        f"{args.threads} thread(s), {ctx.repeats} repeats, load average {info['load_average_1_5_15']}",
        flush=True,
    )
    for sec in sections:
        if only and sec.name not in only:
            continue
        print(f"\n== {sec.title}", flush=True)
        t0 = time.perf_counter()
        sec.run(ctx)
        clean_heap()
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    for sec in full_sections if args.full else ():
        if not only or sec.name in only:
            print(f"\n== {sec.title}", flush=True)
            sec.run(ctx)
    if ctx.report.pending:
        print(
            "\n== profiles of the measurements that missed their goal (run after all measurements)",
            flush=True,
        )
        ctx.report.run_profiles()
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["seconds"] = time.perf_counter() - t_start
    rep = ctx.report
    print("\n" + rep.table(), flush=True)
    missed = [k for k, f in rep.figures.items() if f["met"] is False]
    print(
        f"\ngoals missed: {', '.join(missed) if missed else 'none'}; total {info['seconds']:.0f} s",
        flush=True,
    )
    out = {
        "command": " ".join(["python -m advpure.perf", *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "machine": info,
        "sizes": dataclasses.asdict(ctx.sz),
        "experiment": dataclasses.asdict(exp),
        "repeats": ctx.repeats,
        "figures": rep.figures,
        "checks": rep.checks,
        "profiles": rep.profiles,
        "notes": rep.notes,
        "peaks": {
            "matmul_gflops": ctx.peaks.matmul,
            "conv_gflops": {f"{k[0]}{list(k[1])}.{k[2]}": v for k, v in ctx.peaks.conv.items()},
            "convs": ctx.peaks.records,
        },
    }
    path = write_text_atomic(Path(args.out), json.dumps(out, indent=2, default=str), what="perf report")
    print(f"wrote {path}", flush=True)
    return 0
