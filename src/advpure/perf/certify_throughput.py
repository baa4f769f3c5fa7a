"""Certification throughput against its physical limit (randomized smoothing, Cohen et al. 2019).

CERTIFY on N images costs N * (n0 + n) forwards of the base classifier h (denoiser + classifier
for the denoised and ADP bases); everything else (keyed noise generation, copying noisy rows into
the batch buffer, on-device counting, the binomial bounds) is overhead. This script measures, in
one run and on the same machine:

  limit   the base classifier alone on exactly the rows CERTIFY evaluates (the same keyed noisy
          images, pre-generated, in the same `max_batch` chunks): rows/s, and the images/s it
          allows, rows/s / (n0 + n);
  ours    `SmoothedClassifier.certify` on the same images: images/s;

interleaved over repeats (order reversed every other round), and reports the median over repeats
of the paired ratio time(ours) / time(limit) (goal <= 1.10) per base and `max_batch`.

    python -m advpure.perf.certify_throughput                         # small 28x28 nets, CPU
    python -m advpure.perf.certify_throughput --device cuda --n 20000 --max-batch 1024,4096,16384
    python -m advpure.perf.certify_throughput --experiment fmnist_certify   # its trained nets and images

The nets have the embedded default's shapes (small CNN; NCSNv2 with ngf 16 on 28x28 grey images),
randomly initialised unless `--classifier` / `--score` give weights files: the cost of a forward
does not depend on the weights (except ADP's early stopping, which both sides share row by row).
`--experiment NAME [--set key=value ...]` takes the experiment's trained nets, its ADP parameters
(`defense`) and its certified test images (every `certify.skip`-th) instead, so ADP stops early as
it does in `advpure certify`; the run mode itself reports the same ratio per (base, sigma) in its
results table, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from advpure.api import load_net_with_meta
from advpure.certify import SmoothedClassifier, build_base
from advpure.certify.noise import KeyedNormal
from advpure.core.fsio import write_text_atomic
from advpure.nets import build_classifier, build_score_net

GOAL = 1.10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def experiment_setup(args, device: torch.device):
    """(classifier, score net, images (B, C, H, W) in [0, 1], their test indices, classes, ADP parameters)
    of an experiment: its trained weights and its certified test images."""
    from advpure.config import compose as C
    from advpure.data import ImageDataModule
    from advpure.data.augment import to_unit
    from advpure.jobs.artifacts import Artifacts

    cfg = C.load(args.experiment, args.set)
    artifacts = Artifacts.from_config(cfg)
    spec = artifacts.spec
    clf, score = artifacts.load("classifier")[0], artifacts.load("score")[0]
    dm = ImageDataModule(cfg.data, cfg.paths, seed=cfg.seed)
    dm.setup("test")
    idx = list(range(0, len(dm.test_x), cfg.certify.skip))[: args.images]
    x = to_unit(dm.test_x[idx]).to(device)
    adp = {k: cfg.defense[k] for k in ("lam", "delta", "tau", "steps")} if cfg.defense.kind == "adp" else {}
    return clf.to(device), score.to(device), x, idx, spec.num_classes, adp


def make_nets(args, device: torch.device):
    """(classifier, score net): from weights files when given, else random 28x28 nets of the embedded default."""
    torch.manual_seed(0)
    if args.classifier:
        clf, arch, _ = load_net_with_meta(args.classifier, "classifier")
        shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
        classes = arch["num_classes"]
    else:
        clf = build_classifier(
            "small_cnn", in_channels=1, image_size=28, num_classes=10, mean=[0.286], std=[0.353]
        )
        shape, classes = (1, 28, 28), 10
    if args.score:
        score, _, _ = load_net_with_meta(args.score, "score")
    else:
        score = build_score_net("ncsnv2", in_channels=shape[0], image_size=shape[1], ngf=args.ngf)
    return (
        clf.to(device).eval().requires_grad_(False),
        score.to(device).eval().requires_grad_(False),
        shape,
        classes,
    )


def noisy_rows(x: torch.Tensor, idx: list[int], sigma: float, n0: int, n: int, seed: int) -> torch.Tensor:
    """Exactly the rows `certify` sends through the base, in its order (image-major, select then estimate)."""
    gen = KeyedNormal(seed, x.device)
    parts = []
    for i, key in enumerate(idx):
        for stream, num in (("select", n0), ("estimate", n)):
            parts.append(x[i] + sigma * gen.samples(key, stream, num, tuple(x.shape[1:])))
    return torch.cat(parts)


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    adp = {}
    if args.experiment:
        clf, score, x, idx, classes, adp = experiment_setup(args, device)
    else:
        clf, score, shape, classes = make_nets(args, device)
        gen = torch.Generator().manual_seed(1)
        x = torch.rand((args.images, *shape), generator=gen).to(device)
        idx = list(range(args.images))
    if args.adp_steps is not None:
        adp["steps"] = args.adp_steps
    rows = noisy_rows(x, idx, args.sigma, args.n0, args.n, args.seed)
    out = []
    for name in args.bases:
        params = (adp or {"steps": 10}) if name == "adp" else {}
        base = build_base(name, clf, args.sigma, score_net=score, **params)
        for mb in args.max_batch:
            smooth = SmoothedClassifier(base, args.sigma, classes, seed=args.seed, max_batch=mb)

            @torch.inference_mode()
            def limit(base=base, mb=mb):
                for chunk in rows.split(mb):
                    base(chunk).argmax(-1)

            def ours(smooth=smooth):
                smooth.certify(x, idx, n0=args.n0, n=args.n, alpha=args.alpha)

            limit()  # warm-up (allocator, oneDNN / cuDNN plans)
            ours()
            t_lim, t_ours = [], []
            for r in range(args.repeats):
                pair = [("limit", limit), ("ours", ours)]
                for which, fn in pair if r % 2 == 0 else pair[::-1]:
                    (t_lim if which == "limit" else t_ours).append(timed(fn, device))
            ratio = statistics.median(o / li for o, li in zip(t_ours, t_lim))
            rows_per_s = rows.shape[0] / statistics.median(t_lim)
            rec = {
                "base": name,
                "max_batch": mb,
                "rows_per_s": rows_per_s,
                "limit_images_per_s": rows_per_s / (args.n0 + args.n),
                "images_per_s": args.images / statistics.median(t_ours),
                "overhead": ratio,
                "goal_met": ratio <= GOAL,
                "t_limit": t_lim,
                "t_ours": t_ours,
            }
            out.append(rec)
            print(
                f"{name:9s} max_batch {mb:6d}: (n0 + n) x forward rate: {rows_per_s:9.0f} rows/s / {args.n0 + args.n} "
                f"= {rec['limit_images_per_s']:8.3f} img/s; certify {rec['images_per_s']:8.3f} img/s; overhead {ratio:.3f} "
                f"({'ok' if rec['goal_met'] else 'MISSED'}, goal <= {GOAL})",
                flush=True,
            )
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m advpure.perf.certify_throughput", description=__doc__.splitlines()[0]
    )
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--bases", type=lambda s: s.split(","), default=["noisy", "denoised", "adp"])
    p.add_argument("--max-batch", type=ints, default=[256, 1024, 4096])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument(
        "--adp-steps", type=int, default=None, help="ADP updates T (default 10, or the experiment's)"
    )
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--classifier", help="classifier weights file (default: random small CNN)")
    p.add_argument("--score", help="score-net weights file (default: random NCSNv2, ngf --ngf)")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--experiment", help="use this experiment's trained nets, ADP parameters and test images")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of --experiment's config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if torch.device(args.device).type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"certify throughput: {args.images} images x (n0 {args.n0} + n {args.n}) rows, sigma {args.sigma}, "
        f"device {args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats",
        flush=True,
    )
    out = measure(args)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps({"args": vars(args), "results": out}, indent=2))
    return 0 if all(r["goal_met"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
