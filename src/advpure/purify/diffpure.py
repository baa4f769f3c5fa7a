"""DiffPure (Nie et al., ICML 2022, "Diffusion Models for Adversarial Purification"): diffuse the input
a little along the VP SDE, then solve the reverse-time SDE (or the probability-flow ODE) back to t ~ 0.

On images x in [0, 1] (B, C, H, W), u = 2x - 1 in [-1, 1], with an eps-prediction net eps(u, t):

  1. diffuse     u_{t*} = sqrt(abar) u + sqrt(1 - abar) eps,   eps ~ N(0, I)
                 `diffuse: discrete` (default): abar = prod_{i <= 1000 t* - 1} (1 - beta_i), beta_i =
                 linspace(beta_min / 1000, beta_max / 1000, 1000): what DiffPure's code does
                 (runners/diffpure_sde.py, `image_editing_sample`: `a[total_noise_levels - 1]`);
                 `continuous`: the VP SDE's own abar(t*) = exp(-beta_min t* - (beta_max - beta_min) t*^2 / 2).
                 The default follows the code every published DiffPure number (DiffPure, DiffAttack,
                 DiffBreak, Lee & Kim) was measured with; the two differ little (t* = 0.1: abar 0.8970
                 discrete vs 0.8963 continuous, i.e. image noise sigma 0.1694 vs 0.1701).
  2. reverse     Euler-Maruyama on the reverse VP SDE (Song et al., ICLR 2021, Eq. 6 with Eq. 11),
                 beta(t) = beta_min + t (beta_max - beta_min), s(u, t) = -eps(u, t) / sqrt(1 - abar(t)):
                   `sde`: u <- u + [beta(t) u / 2 + beta(t) s(u, t)] D + sqrt(beta(t) D) z,  z ~ N(0, I)
                   `ode`: u <- u + [beta(t) u / 2 + beta(t) s(u, t) / 2] D     (probability flow, no noise)
                 on DiffPure's time grid: t_k = t* - k dt (k = 0 .. N-1), N = ceil((t* - t_end) / dt),
                 the last step ending at t_end = 1e-5, so D = dt except the last (dt - t_end). Drift and
                 diffusion are evaluated at the start of each step (Ito Euler). This is the grid
                 torchsde's `sdeint(method='euler', dt=1e-3)` takes from reverse time 1 - t* to 1 - 1e-5
                 in DiffPure's `RevGuidedDiffusion` (runners/diffpure_sde.py), and torchdiffeq's fixed-step
                 Euler with step_size 1e-3 from t* to 1e-5 in its ODE runner (runners/diffpure_ode.py):
                 100 steps for t* = 0.1, the score evaluated at t = 0.100, 0.099, ..., 0.001.
  3. back        x = (u + 1) / 2, NOT clipped by default (DiffPure hands the classifier the raw
                 output); `clamp: true` clips to [0, 1] (DiffBreak's choice).

t* = 0 is the identity (no noise, no step): BPDA, PGD and DW-box then coincide exactly.

The net's schedule (`.schedule`) gives beta_min / beta_max: a score_sde `VPSchedule` as it is, a
linear `DiscreteSchedule` by its continuous limit (DiffPure uses beta(t) = 0.1 + 19.9 t for its ADM
net too). Note for the lead: DiffPure feeds ADM nets the label floor(1000 t); the schedules' convention
(`DiscreteSchedule.label`) is round(1000 t) - 1, one step lower.

Noise: every draw from the RNG passed in (`SampleRNG`: keyed per image and draw, one call per step),
through a `NoiseStream`; gradients by `run_chain` (`gradient_mode`: replay | autograd | checkpoint, all
exact), or `surrogate` (Lee & Kim, ICCV 2023): an attack's gradient (and its loss) comes from the same
solver on `surrogate_steps` equal steps from t* to t_end, by plain autograd; evaluations without
gradient always run the full grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advpure.core.params import at_least, between, choice
from advpure.nets.schedules import DiscreteSchedule, NoiseSchedule, VPSchedule
from advpure.purify.base import DefenseParams, PurifyResult, register_purifier, rows
from advpure.purify.replay import NOISE_KEYS, PURIFIER_GRADIENT_MODES, ChainPurifier, NoiseStream
from advpure.purify.resize import purify_resized
from advpure.purify.vp import (
    EpsFn,
    continuous_vp,
    score_from_eps,
    time_rows,
    to_diffusion,
    to_image,
)

MODES = ("sde", "ode")
DIFFUSE = ("discrete", "continuous")


def diffpure_times(t_star: float, dt: float = 1e-3, t_end: float = 1e-5) -> list[float]:
    """DiffPure's time grid [t_0 = t*, t* - dt, ..., t* - (N-1) dt, t_N = t_end], N = ceil((t* - t_end)/dt)
    (a last, shorter step ends at t_end); [t*] (no step) when t* <= t_end. Raises ValueError for dt <= 0."""
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    if t_star <= t_end:
        return [float(t_star)]
    n = math.ceil((t_star - t_end) / dt - 1e-9)
    return [t_star - k * dt for k in range(n)] + [float(t_end)]


def diffusion_alpha_bar(vp: VPSchedule, t_star: float, diffuse: str = "discrete") -> float:
    """abar of the initial diffusion to t*: DiffPure's discrete DDPM value (`discrete`: T = 1000 betas
    linspace(beta_min/1000, beta_max/1000), index round(1000 t*) - 1) or the VP SDE's abar(t*)."""
    if t_star == 0:
        return 1.0
    t = torch.tensor(float(t_star), dtype=torch.float64)
    if diffuse == "discrete":
        return float(DiscreteSchedule(1000, vp.beta_min / 1000, vp.beta_max / 1000).alpha_bar(t))
    if diffuse == "continuous":
        return float(vp.alpha_bar(t))
    raise ValueError(f"unknown diffuse {diffuse!r}; allowed: {', '.join(DIFFUSE)}")


class DiffPureChain:
    """The DiffPure chain for `run_chain`: init = the diffusion to t*, step k = one Euler(-Maruyama)
    step of the reverse VP SDE / probability-flow ODE from times[k] to times[k+1]. States u (R, C, H, W)
    in diffusion space ([-1, 1] plus noise)."""

    def __init__(self, eps: EpsFn, vp: VPSchedule, times: list[float], mode: str, alpha_bar0: float):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        self.eps, self.vp, self.times, self.mode = eps, vp, times, mode
        self.n_steps = len(times) - 1
        self.a0, self.s0 = math.sqrt(alpha_bar0), math.sqrt(1.0 - alpha_bar0)
        t = torch.tensor(times[:-1], dtype=torch.float64)
        self.betas = vp.beta(t).tolist()
        self.alpha_bars = vp.alpha_bar(t).tolist()

    def init(self, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        return self.a0 * to_diffusion(xr) + self.s0 * noise.normal()

    def drift(self, k: int, u: torch.Tensor) -> torch.Tensor:
        """beta u / 2 + w beta s(u, t_k): the reverse-time drift (w = 1 SDE, 1/2 ODE)."""
        beta = self.betas[k]
        s = score_from_eps(self.eps(u, time_rows(self.times[k], u)).to(u.dtype), self.alpha_bars[k])
        return 0.5 * beta * u + (beta if self.mode == "sde" else 0.5 * beta) * s

    def step(self, k: int, u: torch.Tensor, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        d = self.times[k] - self.times[k + 1]
        out = u + self.drift(k, u) * d
        if self.mode == "sde":
            out = out + math.sqrt(self.betas[k] * d) * noise.normal()
        return out


@dataclass
class DiffPureParams(DefenseParams):
    kind: str = "diffpure"
    net: str = "ddpmpp"  # registered network kind of the eps-prediction net
    replicas: int = at_least(1, 1)  # DiffPure classifies one purification
    t_star: float = between(0.1, 0.0, 1.0)  # diffusion time (0.1 CIFAR-10 linf, 0.075 l2, 0.15 ImageNet)
    mode: str = choice("sde", *MODES)  # reverse SDE (Euler-Maruyama) or probability-flow ODE (Euler)
    dt: float = at_least(1e-3, 0.0, strict=True)  # solver step (DiffPure: 1e-3)
    t_end: float = at_least(1e-5, 0.0)  # where the reverse solve stops (DiffPure: 1e-5)
    diffuse: str = choice("discrete", *DIFFUSE)  # abar of the initial diffusion (see the docstring)
    clamp: bool = False  # clip the purified image to [0, 1] (DiffBreak) instead of DiffPure's raw output
    # how full-gradient attacks differentiate: replay | autograd | checkpoint (exact), surrogate
    gradient_mode: str = choice("replay", *PURIFIER_GRADIENT_MODES)
    surrogate_steps: int = at_least(10, 1)  # gradient_mode=surrogate: solver steps in the attack's graph
    noise_keys: str = choice("key", *NOISE_KEYS)  # replay noise from RNG keys or stored tensors
    check_replay: bool = False  # check every replayed step bit for bit (slow on GPU; tests)
    offload: bool = False  # keep the replay's stored states on the CPU
    # purify at resize x resize (DiffPure's ImageNet: 224 -> 256 -> 224, bilinear); null: the image's own size
    resize: int | None = at_least(None, 1)


_D = DiffPureParams()  # the one place these defaults live


@register_purifier("diffpure")
class DiffPurePurifier(ChainPurifier):
    """DiffPure (see the module docstring) with an eps-prediction net in slot `eps`.

    Raises ValueError for invalid parameters."""

    Params = DiffPureParams

    label = "DiffPure"
    stochastic = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        t_star: float = _D.t_star,
        mode: str = _D.mode,
        dt: float = _D.dt,
        t_end: float = _D.t_end,
        diffuse: str = _D.diffuse,
        clamp: bool = _D.clamp,
        gradient_mode: str = _D.gradient_mode,
        surrogate_steps: int = _D.surrogate_steps,
        noise_keys: str = _D.noise_keys,
        check_replay: bool = _D.check_replay,
        offload: bool = _D.offload,
        resize: int | None = _D.resize,
    ):
        super().__init__()
        if not 0 <= t_star <= 1 or dt <= 0 or t_end < 0 or surrogate_steps < 1:
            raise ValueError(
                f"need 0 <= t_star <= 1, dt > 0, t_end >= 0, surrogate_steps >= 1; "
                f"got {t_star}, {dt}, {t_end}, {surrogate_steps}"
            )
        if mode not in MODES or diffuse not in DIFFUSE:
            raise ValueError(f"mode must be one of {MODES}, diffuse one of {DIFFUSE}; got {mode}, {diffuse}")
        self.vp = continuous_vp(schedule)
        self.t_star, self.mode, self.clamp = float(t_star), mode, clamp
        self.times = diffpure_times(t_star, dt, t_end) if t_star > 0 else [0.0]
        span, short = max(t_star - t_end, 0.0), surrogate_steps < len(self.times) - 1
        self.surrogate_times = diffpure_times(t_star, span / surrogate_steps, t_end) if short else self.times
        self.alpha_bar0 = diffusion_alpha_bar(self.vp, t_star, diffuse)
        self.set_gradients(gradient_mode, surrogate_steps, noise_keys, check_replay, offload)
        self.stochastic = t_star > 0
        self.resize = resize

    @classmethod
    def is_stochastic(cls, p) -> bool:
        return p.t_star > 0

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return {"eps": p.net}

    @classmethod
    def from_params(cls, p, nets) -> DiffPurePurifier:
        keys = ("t_star", "mode", "dt", "t_end", "diffuse", "clamp", "gradient_mode", "surrogate_steps")
        kw = {k: getattr(p, k) for k in (*keys, "noise_keys", "check_replay", "offload", "resize")}
        purifier = cls(nets["eps"].schedule, **kw)
        purifier.net_size = getattr(nets["eps"], "image_size", None)
        return purifier

    @classmethod
    def describe(cls, p) -> str:
        return f"DiffPure t*={p.t_star:g}" + (", ODE" if p.mode == "ode" else "")

    @classmethod
    def settings(cls, p) -> str:
        """E.g. "DiffPure t*=0.1: reverse VP-SDE (Euler-Maruyama), 100 steps of dt=0.001 to t=1e-05 ..."."""
        steps = len(diffpure_times(p.t_star, p.dt, p.t_end)) - 1 if p.t_star > 0 else 0
        solver = "reverse VP-SDE (Euler-Maruyama)" if p.mode == "sde" else "probability-flow ODE (Euler)"
        grad = gradient_words(p.gradient_mode, p.surrogate_steps, "solver steps")
        return (
            f"{cls.describe(p)}: {p.diffuse} diffusion to t*, then {solver}, {steps} steps of dt={p.dt:g} "
            f"to t={p.t_end:g}, eps net `{p.net}`, output {'clipped to [0, 1]' if p.clamp else 'not clipped'}; "
            f"S={p.replicas} replicas merged by {p.merge}; full-gradient attacks: {grad}"
        )

    def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult:
        """x: (B, C, H, W) in [0, 1]; fns["eps"](u, t): u (R, C, H, W) in diffusion space, t (R,) in
        [0, 1] -> eps (R, C, H, W). Returns `draws` purifications per image, draw-major, in [0, 1]
        (up to the unclipped solver output unless `clamp`), at x's size (purified at `resize` when set)."""
        return purify_resized(lambda z: self._purify(z, rng, draws, fns, differentiable), x, self.resize)

    net_size: int | None = None  # the eps net's image size, when known (`from_params`)

    def _purify(self, x, rng, draws, fns, differentiable) -> PurifyResult:
        if self.net_size is not None and tuple(x.shape[-2:]) != (self.net_size, self.net_size):
            raise ValueError(
                f"DiffPure: the eps net takes {self.net_size}x{self.net_size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}; set defense.resize: {self.net_size}"
            )
        xr = rows(x, draws)
        if self.t_star == 0:
            return self.unchanged(xr, differentiable, len(self.times) - 1)
        times = self.surrogate_times if self.surrogate(differentiable) else self.times
        chain = DiffPureChain(fns["eps"], self.vp, times, self.mode, self.alpha_bar0)
        n = torch.full((xr.shape[0],), chain.n_steps, dtype=torch.long, device=x.device)
        out = to_image(self.run(chain, xr, x, rng, draws, differentiable), self.clamp)
        return PurifyResult(x=out if differentiable else out.detach(), steps=n, score_evals=n.clone())


def gradient_words(mode: str, surrogate_steps: int, unit: str) -> str:
    """How a purifier's full-gradient attacks differentiate, in a few words (its `settings` line)."""
    if mode == "surrogate":
        return f"surrogate gradients through {surrogate_steps} {unit} (Lee & Kim 2023; approximate)"
    return {
        "replay": "exact, step-wise replay (memory flat in the steps)",
        "checkpoint": "exact, per-step checkpointing",
        "autograd": "exact, plain autograd",
    }[mode]


__all__ = [
    "DiffPureParams",
    "DIFFUSE",
    "MODES",
    "DiffPureChain",
    "DiffPurePurifier",
    "diffpure_times",
    "diffusion_alpha_bar",
    "gradient_words",
]
