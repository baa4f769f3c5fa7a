"""Reverse-VE purification on an NCSNv2 score net: diffuse x + sigma* eps, then walk the net's noise
levels down to sigma_min by the reverse variance-exploding SDE, and denoise by Tweedie.

The net f (slot `score`) is time-free: f(x) ~ sigma grad_x log p_sigma(x) for x in [0, 1] images
carrying Gaussian noise of std sigma (denoising score matching at the geometric levels
sigma_i = sigma_max r^i, i = 0 .. L-1, r = (sigma_min / sigma_max)^(1/(L-1)); Song & Ermon 2020,
ermongroup/ncsnv2 configs/cifar10.yml: 50 -> 0.01, L = 232). So s(x, sigma) = f(x) / sigma.

Derivation. The VE SDE dx = sqrt(d sigma^2 / dt) dw has marginals p_sigma = p_data * N(0, sigma^2 I) and the
reverse-time SDE dx = -(d sigma^2/dt) s(x, sigma) dt + sqrt(d sigma^2/dt) dw_bar (Song et al., ICLR 2021,
Eqs. 6 and 9). Between consecutive levels a > b of the walk, with D = a^2 - b^2 (= a^2 (1 - r^2) on the
grid):
  `em`         Euler-Maruyama:     x <- x + D s(x, a) + sqrt(D) z     = x + a(1 - r^2) f(x) + a sqrt(1 - r^2) z
  `ancestral`  the exact Gaussian posterior of the forward chain x_a = x_b + sqrt(D) n, given
               E[x_0 | x_a] = x_a + a^2 s (Tweedie): mean x + D s(x, a), std b sqrt(D) / a = r a sqrt(1 - r^2)
               (Song et al. 2021, App. F, the SMLD ancestral sampler)
  `ode`        probability flow dx = -(1/2)(d sigma^2/dt) s dt:  x <- x + D s(x, a) / 2 = x + a(1 - r^2) f(x) / 2
  `langevin`   annealed Langevin dynamics (Song & Ermon 2019/2020, ncsnv2 `anneal_Langevin_dynamics`):
               at every level sigma of the walk, `langevin_steps` updates x <- x + alpha s(x, sigma) +
               sqrt(2 alpha) z, alpha = step_lr (sigma / sigma_min)^2 (ncsnv2 CIFAR-10: 6.2e-6, 5 steps)
and at the end (`denoise: true`) Tweedie's formula x <- x + sigma_end^2 s(x, sigma_end) = x + sigma_end f(x).

The walk: sigma* then every grid level strictly below it (every `level_stride`-th, always ending at
sigma_min); sigma* above sigma_max is refused (the net has not seen that noise); sigma* = 0 is the
identity. The output is x (images in [0, 1] up to the solver's overshoot), clipped with `clamp: true`.
Noise: every draw from the RNG passed in, through a `NoiseStream`; gradients by `run_chain`, or with
`gradient_mode: surrogate` (Lee & Kim, ICCV 2023) through a walk of at most `surrogate_steps` levels
(a larger stride), by plain autograd; evaluations run the full walk.

The net's slot holds a time-free field (signature "field"), so `Defense.field` and the joint (score)
attack use it; sigma* is checked against the net's DSM levels before any work (`advpure.purify.ranges`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from advpure.core.params import at_least, choice
from advpure.purify.base import DefenseParams, PurifyResult, register_purifier, rows
from advpure.purify.diffpure import gradient_words
from advpure.purify.replay import NOISE_KEYS, PURIFIER_GRADIENT_MODES, ChainPurifier, NoiseStream

SAMPLERS = ("em", "ancestral", "ode", "langevin")
FieldFn = Callable[[torch.Tensor], torch.Tensor]


def sigma_grid(sigma_max: float, sigma_min: float, levels: int) -> list[float]:
    """The net's DSM levels sigma_max = s_0 > ... > s_{L-1} = sigma_min, geometric, in float64."""
    if not 0 < sigma_min <= sigma_max or levels < 1:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max and levels >= 1, got {sigma_min}, {sigma_max}, {levels}"
        )
    if levels == 1:
        return [float(sigma_max)]
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(hi + (lo - hi) * i / (levels - 1)) for i in range(levels)]


def walk(sigma_star: float, grid: list[float], stride: int = 1) -> list[float]:
    """[sigma*, then every `stride`-th grid level strictly below sigma* (always including the last)].
    Raises ValueError when sigma* exceeds the grid's top level (relative tolerance 1e-6)."""
    if sigma_star > grid[0] * (1 + 1e-6):
        raise ValueError(f"sigma* = {sigma_star:g} is above the score net's largest DSM level {grid[0]:g}")
    below = [s for s in grid if s < sigma_star * (1 - 1e-9)]
    picked = below[stride - 1 :: stride] if below else []
    if below and (not picked or picked[-1] != below[-1]):
        picked.append(below[-1])
    return [float(sigma_star), *picked]


class ReverseVEChain:
    """The reverse-VE walk for `run_chain` (see the module docstring); states x (R, C, H, W) in image
    units. Steps: the transitions between levels (or the Langevin updates), then the Tweedie step."""

    def __init__(
        self,
        field: FieldFn,
        levels: list[float],
        *,
        sampler: str,
        sigma_min: float,
        langevin_steps: int = 5,
        step_lr: float = 6.2e-6,
        denoise: bool = True,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        self.field, self.levels, self.sampler, self.denoise = field, levels, sampler, denoise
        self.sigma_min, self.each, self.step_lr = sigma_min, langevin_steps, step_lr
        self.moves = len(levels) * langevin_steps if sampler == "langevin" else len(levels) - 1
        self.n_steps = self.moves + int(denoise)

    def init(self, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        return xr + self.levels[0] * noise.normal()

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(x).to(x.dtype)

    def step(self, k: int, x: torch.Tensor, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        if k == self.moves:  # Tweedie: x + sigma^2 s(x, sigma) = x + sigma f(x)
            return x + self.levels[-1] * self.f(x)
        if self.sampler == "langevin":
            sigma = self.levels[k // self.each]
            alpha = self.step_lr * (sigma / self.sigma_min) ** 2
            return x + (alpha / sigma) * self.f(x) + math.sqrt(2 * alpha) * noise.normal()
        a, b = self.levels[k], self.levels[k + 1]
        d = a * a - b * b
        if self.sampler == "ode":
            return x + (0.5 * d / a) * self.f(x)
        std = math.sqrt(d) if self.sampler == "em" else b * math.sqrt(d) / a
        return x + (d / a) * self.f(x) + std * noise.normal()


def dsm_levels(net) -> tuple[float, float, int]:
    """(sigma_max, sigma_min, L) of a score net: attributes dsm_sigma_max / dsm_sigma_min / dsm_levels,
    or the same keys of its `meta` dict (what `advpure train` and the NCSNv2 importer write)."""
    meta = getattr(net, "meta", None) or {}
    get = lambda k: getattr(net, k, None) if getattr(net, k, None) is not None else meta.get(k)  # noqa: E731
    hi, lo, n = get("dsm_sigma_max"), get("dsm_sigma_min"), get("dsm_levels")
    if hi is None or lo is None or n is None:
        raise ValueError(
            "the score net's DSM levels are unknown (dsm_sigma_max / dsm_sigma_min / dsm_levels)"
        )
    return float(hi), float(lo), int(n)


@dataclass
class ReverseVEParams(DefenseParams):
    kind: str = "ve"
    net: str = "score"  # registered network kind of the time-free score net f ~ sigma grad log p_sigma
    replicas: int = at_least(1, 1)
    sigma_star: float = at_least(0.25, 0.0)  # diffusion noise std in [0, 1] image units (ADP's 0.25)
    sampler: str = choice("em", *SAMPLERS)  # reverse step: Euler-Maruyama, ancestral, prob. flow, Langevin
    level_stride: int = at_least(1, 1)  # use every n-th DSM level below sigma* (fewer steps)
    langevin_steps: int = at_least(5, 1)  # Langevin updates per level (sampler=langevin; ncsnv2: 5)
    step_lr: float = at_least(6.2e-6, 0.0, strict=True)  # Langevin step at sigma_min (ncsnv2 CIFAR-10)
    denoise: bool = True  # final Tweedie step x + sigma_end f(x)
    clamp: bool = False  # clip the output to [0, 1]
    gradient_mode: str = choice("replay", *PURIFIER_GRADIENT_MODES)  # as DiffPure's
    surrogate_steps: int = at_least(10, 1)  # gradient_mode=surrogate: levels of the walk in the graph
    noise_keys: str = choice("key", *NOISE_KEYS)
    check_replay: bool = False
    offload: bool = False


_D = ReverseVEParams()  # the one place these defaults live


@register_purifier("ve")
class ReverseVEPurifier(ChainPurifier):
    """Reverse-VE purification on a time-free NCSNv2 score net in slot `score` (see the module docstring).

    Raises ValueError for invalid parameters or a sigma* above the net's levels."""

    Params = ReverseVEParams

    label = "Reverse-VE"
    stochastic = True

    def __init__(
        self,
        sigma_max: float,
        sigma_min: float,
        levels: int,
        *,
        sigma_star: float = _D.sigma_star,
        sampler: str = _D.sampler,
        level_stride: int = _D.level_stride,
        langevin_steps: int = _D.langevin_steps,
        step_lr: float = _D.step_lr,
        denoise: bool = _D.denoise,
        clamp: bool = _D.clamp,
        gradient_mode: str = _D.gradient_mode,
        surrogate_steps: int = _D.surrogate_steps,
        noise_keys: str = _D.noise_keys,
        check_replay: bool = _D.check_replay,
        offload: bool = _D.offload,
    ):
        super().__init__()
        if (
            sigma_star < 0
            or surrogate_steps < 1
            or level_stride < 1
            or langevin_steps < 1
            or step_lr <= 0
            or sampler not in SAMPLERS
        ):
            raise ValueError(
                f"invalid sigma_star {sigma_star}, level_stride {level_stride}, langevin_steps {langevin_steps}, "
                f"step_lr {step_lr} or sampler {sampler!r}"
            )
        self.set_gradients(gradient_mode, surrogate_steps, noise_keys, check_replay, offload)
        self.grid = sigma_grid(sigma_max, sigma_min, levels)
        self.sigma_star = float(sigma_star)
        self.levels = walk(sigma_star, self.grid, level_stride) if sigma_star > 0 else [0.0]
        self.surrogate_levels = self.levels
        if sigma_star > 0 and len(self.levels) - 1 > surrogate_steps:
            below = len(walk(sigma_star, self.grid)) - 1
            self.surrogate_levels = walk(sigma_star, self.grid, math.ceil(below / surrogate_steps))
        self.sampler, self.langevin_steps, self.step_lr = sampler, langevin_steps, step_lr
        self.denoise, self.clamp = denoise, clamp
        self.stochastic = sigma_star > 0

    @classmethod
    def is_stochastic(cls, p) -> bool:
        return p.sigma_star > 0

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return {"score": p.net}

    @classmethod
    def from_params(cls, p, nets) -> ReverseVEPurifier:
        keys = ("sigma_star", "sampler", "level_stride", "langevin_steps", "step_lr", "denoise", "clamp")
        keys += ("gradient_mode", "surrogate_steps", "noise_keys", "check_replay", "offload")
        return cls(*dsm_levels(nets["score"]), **{k: getattr(p, k) for k in keys})

    @classmethod
    def describe(cls, p) -> str:
        return f"Reverse-VE σ*={p.sigma_star:g}, {p.sampler}"

    @classmethod
    def settings(cls, p) -> str:
        """E.g. "Reverse-VE σ*=0.25, em: x + σ* n, then the reverse VE SDE down every DSM level ..."."""
        walk_words = "every DSM level" if p.level_stride == 1 else f"every {p.level_stride}th DSM level"
        sampler = {
            "em": "Euler-Maruyama",
            "ancestral": "ancestral",
            "ode": "probability-flow",
            "langevin": f"annealed Langevin ({p.langevin_steps} per level, step_lr {p.step_lr:g})",
        }[p.sampler]
        grad = gradient_words(p.gradient_mode, p.surrogate_steps, "levels")
        return (
            f"{cls.describe(p)}: x + σ* n, then {sampler} steps down {walk_words} below σ* of the score net "
            f"`{p.net}`{', a final Tweedie step' if p.denoise else ''}, output "
            f"{'clipped to [0, 1]' if p.clamp else 'not clipped'}; S={p.replicas} replicas merged by "
            f"{p.merge}; full-gradient attacks: {grad}"
        )

    def chain(self, field: FieldFn, surrogate: bool = False) -> ReverseVEChain:
        return ReverseVEChain(
            field,
            self.surrogate_levels if surrogate else self.levels,
            sampler=self.sampler,
            sigma_min=self.grid[-1],
            langevin_steps=self.langevin_steps,
            step_lr=self.step_lr,
            denoise=self.denoise,
        )

    def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult:
        """x: (B, C, H, W) in [0, 1]; fns["score"](x): (R, C, H, W) -> f(x) of the same shape.
        Returns `draws` purifications per image, draw-major."""
        xr = rows(x, draws)
        if self.sigma_star == 0:
            return self.unchanged(xr, differentiable)
        chain = self.chain(fns["score"], self.surrogate(differentiable))
        out = self.run(chain, xr, x, rng, draws, differentiable)
        out = out.clamp(0.0, 1.0) if self.clamp else out
        n = torch.full((xr.shape[0],), chain.n_steps, dtype=torch.long, device=x.device)
        return PurifyResult(x=out if differentiable else out.detach(), steps=n, score_evals=n.clone())


__all__ = [
    "ReverseVEParams",
    "SAMPLERS",
    "ReverseVEChain",
    "ReverseVEPurifier",
    "dsm_levels",
    "sigma_grid",
    "walk",
]
