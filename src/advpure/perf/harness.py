"""The performance suite's harness: the settings read from the fmnist experiment, the sizes of
each mode, the nets and inputs that figures share, the run context, and the section registry.

A figure is a module of `advpure.perf` that registers its sections with `@section(name, order=N)`;
`advpure.perf.run` imports every module of the package, so a new figure needs no other change:

    @section("mine", order=95)
    def my_figure(ctx: Ctx) -> None:
        times, _ = interleaved({"a": fn_a, "b": fn_b}, ctx.device, ctx.repeats)
        ctx.report.add("mine.a_vs_b", paired_ratio(times["a"], times["b"]), "time ratio")
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from advpure.attacks import attack_params
from advpure.config.compose import load as load_config
from advpure.core.rng import GeneratorRNG
from advpure.nets import build_classifier, build_score_net
from advpure.perf.peak import Peaks, Rate, rate
from advpure.perf.report import Report
from advpure.purify import ADPPurifier, Defense
from advpure.purify.defense import build_defense


@dataclass
class Experiment:
    """The settings the suite takes from the fmnist experiment config (read at run time)."""

    eps: float = 0.1  # threat model (conf/data/fmnist.yaml)
    step: float = 0.01
    sigma: float = 0.25  # ADP (conf/defense/adp.yaml)
    lam: float = 0.05
    delta: float = 1e-3
    tau: float = 1e-3
    replicas: int = 10
    steps: int = 10
    ngf: int = 16  # score net (conf/score/ncsnv2_small.yaml)
    dsm_sigma_max: float = 1.0
    dsm_sigma_min: float = 0.01
    dsm_levels: int = 100
    score_lr: float = 1e-3
    ema_decay: float = 0.999
    train_batch: int = 128  # DSM batch (score.batch_size)
    clf_batch: int = 128  # classifier batch (data.batch_size)


# where each setting of `Experiment` lives in an experiment config
CONFIG_KEYS = {
    "eps": "data.eps",
    "step": "data.step",
    "sigma": "defense.sigma",
    "lam": "defense.lam",
    "delta": "defense.delta",
    "tau": "defense.tau",
    "replicas": "defense.replicas",
    "steps": "defense.steps",
    "ngf": "score.ngf",
    "dsm_sigma_max": "score.dsm_sigma_max",
    "dsm_sigma_min": "score.dsm_sigma_min",
    "dsm_levels": "score.dsm_levels",
    "score_lr": "score.lr",
    "ema_decay": "score.ema_decay",
    "train_batch": "score.batch_size",
    "clf_batch": "data.batch_size",
}


def experiment(name: str = "fmnist") -> Experiment:
    """The fmnist experiment's settings (`experiments/<name>.yaml` with its defaults) as the suite
    uses them (`CONFIG_KEYS`: where each lives in the config)."""
    from omegaconf import OmegaConf

    cfg = load_config(name)
    fields = {f.name: type(f.default) for f in dataclasses.fields(Experiment)}
    return Experiment(**{k: fields[k](OmegaConf.select(cfg, path)) for k, path in CONFIG_KEYS.items()})


# --- sizes ----------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """Net, batch and loop sizes of the measurements (defaults: the full run's)."""

    ngf: int = 16  # the fmnist score net (conf/score/ncsnv2_small.yaml)
    channels: int = 1
    image_size: int = 28
    batch: int = 8  # P1 images and defended inference
    replicas: int = 10  # S
    steps: int = 10  # T
    p2_batch: int = 2
    p2_iters: int = 40
    p2_batch_large: int = 16
    eot: int = 15
    p3_batch: int = 4
    p3_eot: int = 4
    p3_steps: tuple[int, ...] = (2, 5, 10, 20)
    train_batch: int = 128
    attack_batch: int = 2
    attack_iters: int = 1
    spsa_samples: int = 4
    format_rows: int = 80
    max_repeats_slow: int = 3  # cap on repeats of the slowest measurements (P2, attacks)
    probe_batch: int = 4  # probe speed-up: images at 28x28 (S * probe_batch rows)
    probe_batch32: int = 2  # ... and at 32x32x3, the official layout with ngf32
    probe_ngf32: int = 32
    probe_steps: int = 10  # T of the probe speed-up chains


def sizes_for(quick: bool, tiny: bool, exp: Experiment | None = None) -> Sizes:
    """The sizes of a mode: `tiny` (tests: the numbers mean nothing), `quick`, or the full run."""
    exp = exp or Experiment()
    if tiny:
        return Sizes(
            ngf=4,
            batch=2,
            replicas=2,
            steps=2,
            p2_batch=2,
            p2_iters=1,
            p2_batch_large=2,
            eot=2,
            p3_batch=1,
            p3_eot=1,
            p3_steps=(2, 4),
            train_batch=8,
            attack_batch=1,
            attack_iters=1,
            spsa_samples=1,
            format_rows=4,
            max_repeats_slow=1,
            probe_batch=1,
            probe_batch32=1,
            probe_ngf32=4,
            probe_steps=2,
        )
    # S = 10 replicas as in the paper (and in P2's goal), whatever the fmnist default trims it to
    base = dict(ngf=exp.ngf, replicas=10, steps=exp.steps, train_batch=exp.train_batch)
    if quick:
        return Sizes(
            **base,
            batch=4,
            p2_batch=2,
            p2_iters=2,
            p2_batch_large=8,
            p3_batch=2,
            p3_eot=4,
            attack_batch=1,
            attack_iters=1,
            spsa_samples=2,
            format_rows=40,
            max_repeats_slow=2,
            probe_batch=2,
            probe_batch32=1,
            probe_steps=3,
        )
    return Sizes(**base)


# --- nets and inputs ------------------------------------------------------------------------------
def make_nets(sz: Sizes, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised (seeded) score net and classifier (small_cnn at 28x28, resnet18 at
    32x32), in eval mode without parameter gradients (how the benchmark uses them). Timing does
    not depend on the weights; the chains are run with tau = 0 so that no sample stops."""
    torch.manual_seed(seed)
    score = build_score_net("ncsnv2", in_channels=sz.channels, image_size=sz.image_size, ngf=sz.ngf)
    clf = build_classifier(
        "small_cnn" if sz.image_size == 28 else "resnet18",
        in_channels=sz.channels,
        image_size=sz.image_size,
        num_classes=10,
        mean=[0.5] * sz.channels,
        std=[0.25] * sz.channels,
    )
    return score.to(device).eval().requires_grad_(False), clf.to(device).eval().requires_grad_(False)


def images(n: int, sz: Sizes, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` uniform random images in [0, 1], (n, C, H, W), and labels in 0..9, (n,), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, sz.channels, sz.image_size, sz.image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def grng(seed: int, device: torch.device) -> GeneratorRNG:
    """A `GeneratorRNG` on `device` seeded with `seed` (the same noise for ours and the reference)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return GeneratorRNG(gen)


def adp_params(exp: Experiment, *, steps: int, replicas: int, tau: float = 0.0) -> ADPPurifier.Params:
    """The typed `defense` block of ADP (Yoon et al. 2021) with the experiment's sigma, lambda and
    delta and the given T (`steps`), S (`replicas`) and tau."""
    return ADPPurifier.Params(
        sigma=exp.sigma, lam=exp.lam, delta=exp.delta, tau=tau, steps=steps, replicas=replicas
    )


def adp_defense(
    score, clf, exp: Experiment, *, steps: int, replicas: int, tau: float = 0.0, checkpointing: bool = True
) -> Defense:
    """ADP defending `clf`, built by the package's own `build_defense` from `adp_params`.
    `checkpointing=False` (P3's comparison) is not a config key: it is set on the built purifier."""
    defense = build_defense(adp_params(exp, steps=steps, replicas=replicas, tau=tau), clf, {"score": score})
    defense.purifier.checkpointing = checkpointing
    return defense


# --- the context ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What every section gets: the device, sizes, repeats, the report and the run's options."""

    device: torch.device
    sz: Sizes
    repeats: int
    report: Report
    profile: bool
    quick: bool
    tiny: bool
    full: bool
    compile: bool
    threads: int
    exp: Experiment
    peaks: Peaks | None = None  # the machine's peaks of this run (`advpure.perf.peak`); None: no rates
    score_weights: str | None = None  # trained score-net weights for the probe figures (None: random)

    def rate(self, flops: float, seconds: float, dtype: str = "fp32", conv=None) -> Rate:
        """Achieved GFLOP/s of `flops` in `seconds` and its % of this run's peaks (`peak.rate`)."""
        return rate(self.peaks, flops, seconds, dtype, conv)

    @property
    def slow_repeats(self) -> int:
        """Repeats of the slowest measurements (P2, attacks): at most `sz.max_repeats_slow`."""
        return max(1, min(self.repeats, self.sz.max_repeats_slow))


def fmnist_attacks(cfg) -> list[tuple[str, object, object]]:
    """(name, config node, Params instance) of every attack of the experiment config `cfg`, in order."""
    from omegaconf import OmegaConf

    out = []
    for name, node in cfg.attacks.items():
        values = OmegaConf.to_container(node, resolve=True)
        out.append((name, node, attack_params(values.pop("kind"), **values)))
    return out


# --- the section registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """One selectable part of the suite (`--only NAME`): `run(ctx)` adds its figures to
    `ctx.report`. Sections run in `order`; a `full` one runs only with `--full`, after all the
    others, under the heading `title` (selected by `--only NAME` as well)."""

    name: str
    run: Callable[[Ctx], None]
    order: int
    full: bool = False
    title: str = ""


SECTIONS: dict[str, Section] = {}
FULL_SECTIONS: dict[str, Section] = {}


def section(name: str, *, order: int, full: bool = False, title: str = "") -> Callable:
    """Decorator: register `fn(ctx)` as the section `name` (or, with `full=True`, as the `--full`
    addition to it). Raises ValueError when another function already has that name."""

    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        table = FULL_SECTIONS if full else SECTIONS
        old = table.get(name)
        if old is not None and (old.run.__module__, old.run.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"perf section {name!r} is registered twice ({old.run.__module__}, {fn.__module__})"
            )
        table[name] = Section(name, fn, order, full, title or name)
        return fn

    return register


def load_sections() -> tuple[list[Section], list[Section]]:
    """Import every module of `advpure.perf` (so that each registers its sections); returns the
    sections and the `--full` sections, each sorted by `order`."""
    import advpure.perf as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return (
        sorted(SECTIONS.values(), key=lambda s: s.order),
        sorted(FULL_SECTIONS.values(), key=lambda s: s.order),
    )
