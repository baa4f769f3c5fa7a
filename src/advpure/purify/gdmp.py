"""GDMP (Wang, Lyu, Lin, Dai & Fu 2022, "Guided Diffusion Model for Adversarial Purification",
arXiv 2205.14969): rounds of "diffuse a little, then guided ancestral DDPM steps back".

On images x in [0, 1] (B, C, H, W), u = 2x - 1, u_in = 2x - 1 the (attacked) input, a T-step DDPM
chain abar_i (i = 0 .. T-1; step i sits at time (i + 1) / T) and an eps-prediction net eps(u, t):

  for each of `rounds` rounds (m = 4 on CIFAR-10), from u = u_in:
    diffuse   u <- sqrt(abar_d) u + sqrt(1 - abar_d) eps,  d = k (GDMP's CIFAR-10 code,
              purification/diff_purify.py: `diffuse_t_steps(x, 36)` then `denoise` from step 35; one step
              noisier than the first reverse step assumes) or d = k - 1 (`diffuse_extra_step: false`,
              consistent; GDMP's ImageNet code, purification/purify_imagenet.py)
    for the reverse steps j = n-1 .. 0 over the kept steps S_0 = 0 < ... < S_{n-1} = k - 1
    (n = k, or `respace` evenly spaced as guided_diffusion's `space_timesteps`), abar'_j = abar_{S_j}:
      x0   = clip(sqrt(1/abar'_j) u - sqrt(1/abar'_j - 1) eps(u, t_j), -1, 1)          (pred-x0)
      mean = c1_j x0 + c2_j u        (the posterior q(u_{j-1} | u_j, x0) of the respaced chain)
      mean += exp(logvar_j) * s_j * grad_u G(u, u_in,j) / guide_batch                   (guidance)
      u    = mean + [j > 0] exp(logvar_j / 2) z
    with beta'_j = 1 - abar'_j / abar'_{j-1} (abar'_{-1} = 1), c1 = beta' sqrt(abar'_{j-1}) / (1 - abar'_j),
    c2 = (1 - abar'_{j-1}) sqrt(1 - beta'_j) / (1 - abar'_j), posterior variance
    v_j = beta'_j (1 - abar'_{j-1}) / (1 - abar'_j), logvar_j = log beta'_j (`var: large`, Ho et al.'s
    CIFAR-10 "fixedlarge"; log v_1 at j = 0) or log v_j (`small`; log v_1 at j = 0)
    (pytorch_diffusion/diffusion.py `denoising_step`, guided_diffusion/gaussian_diffusion.py
    `condition_mean`).
  output x = clip((u + 1) / 2, 0, 1) (GDMP clips; `clamp: false` keeps the raw value).

Guidance: u_in,j = sqrt(abar'_j) u_in + sqrt(1 - abar'_j) eps' is the INPUT diffused to step j with
fresh noise eps' at every step; G = -MSE(u, u_in,j) (`guide: mse`, scale 60000) or SSIM(u, u_in,j)
(`ssim`, scale 70000: 11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, zero padding, as
pytorch_ssim); s_j = sqrt(1 - abar'_j) / (m' sqrt(abar'_j)), m' = ptb * 2/255 / 3 / scale (ptb = 8).
G is computed PER IMAGE (the mean over one image's C*H*W entries). GDMP takes one mean over the whole
batch, so its guidance per image is 1/B of ours at batch size B: its strength depends on the batch an
image happens to be in. `guide_batch` divides the per-image gradient by a FIXED number instead: 100
reproduces GDMP's CIFAR-10 configs (configs/cifar10_MSE.yml: bsize 100) without the dependence.
grad_u G is taken by autograd (`create_graph=True` when u requires grad), so exact-gradient attacks
differentiate through it: a second-order path.

`steps = 0` or `rounds = 0` is the identity. Noise: every draw from the RNG passed in, through a
`NoiseStream` (per round: the diffusion; per reverse step: the guidance target's eps', then z).
`gradient_mode: surrogate` (Lee & Kim, ICCV 2023): an attack's gradient comes from the same rounds with
each respaced to `surrogate_steps` reverse steps, by plain autograd (evaluations run the full chain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advpure.core.params import at_least, choice
from advpure.nets.schedules import NoiseSchedule
from advpure.purify.base import DefenseParams, PurifyResult, register_purifier, rows
from advpure.purify.diffpure import gradient_words
from advpure.purify.replay import NOISE_KEYS, PURIFIER_GRADIENT_MODES, ChainPurifier, NoiseStream
from advpure.purify.vp import EpsFn, discrete_alpha_bars, time_rows, to_diffusion, to_image

GUIDES = ("mse", "ssim", "none")
GUIDE_SCALES = {"mse": 60000.0, "ssim": 70000.0}
VARIANCES = ("large", "small")


def respaced_steps(k: int, n: int | None = None) -> list[int]:
    """The kept steps of the first k, ascending: all (n = None or n >= k) or n evenly spaced
    round(i (k-1)/(n-1)), i = 0 .. n-1 (guided_diffusion/respace.py `space_timesteps`, one section).
    Raises ValueError for n < 1."""
    if n is None or n >= k:
        return list(range(k))
    if n < 1:
        raise ValueError(f"respace must be >= 1, got {n}")
    if n == 1:
        return [k - 1]
    return sorted({round(i * (k - 1) / (n - 1)) for i in range(n)})


def ddpm_coefficients(
    alpha_bars: torch.Tensor, kept: list[int], var: str = "large"
) -> dict[str, list[float]]:
    """Per kept step j (ascending): abar, c1, c2 (posterior mean coefficients of x0 and u), logvar of
    the (respaced) DDPM chain over `kept` indices of the float64 `alpha_bars` (see the module docstring)."""
    ab = alpha_bars[kept].to(torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / prev
    post = beta * (1 - prev) / (1 - ab)
    c1 = beta * prev.sqrt() / (1 - ab)
    c2 = (1 - prev) * (1 - beta).sqrt() / (1 - ab)
    first = post[1] if len(kept) > 1 else beta[0]  # the j = 0 variance (its noise is never added)
    if var == "large":
        v = torch.cat([first.view(1), beta[1:]])
    elif var == "small":
        v = torch.cat([first.view(1), post[1:]])
    else:
        raise ValueError(f"unknown var {var!r}; allowed: {', '.join(VARIANCES)}")
    return {"abar": ab.tolist(), "c1": c1.tolist(), "c2": c2.tolist(), "logvar": v.log().tolist()}


def _gauss_window(channels: int, like: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).to(like.dtype).to(like.device)
    return w.expand(channels, 1, size, size).contiguous()


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(R,) mean SSIM of each row pair (R, C, H, W) (Wang et al. 2004; pytorch_ssim's constants and
    11x11 sigma-1.5 Gaussian window, zero padding, per channel)."""
    c = a.shape[1]
    w = _gauss_window(c, a)
    pad = w.shape[-1] // 2

    def blur(t):
        return F.conv2d(t, w, padding=pad, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def guidance_gradient(u: torch.Tensor, target: torch.Tensor, guide: str) -> torch.Tensor:
    """grad_u of the per-image objective summed over rows: -MSE(u_r, target_r) or SSIM(u_r, target_r)
    (u, target: (R, C, H, W)); so row r's gradient depends on row r only. Differentiable (built with
    create_graph) when grad mode is on and u or target requires grad; else computed on detached copies."""
    graph = torch.is_grad_enabled() and (u.requires_grad or target.requires_grad)
    with torch.enable_grad():
        ui = u if graph and u.requires_grad else u.detach().requires_grad_(True)
        tg = target if graph else target.detach()
        if guide == "mse":
            obj = -((ui - tg) ** 2).flatten(1).mean(1).sum()
        elif guide == "ssim":
            obj = ssim_per_image(ui, tg).sum()
        else:
            raise ValueError(f"unknown guide {guide!r}; allowed: {', '.join(GUIDES)}")
        (g,) = torch.autograd.grad(obj, ui, create_graph=graph)
    return g


class GDMPChain:
    """GDMP's rounds for `run_chain`: init u = 2x - 1; per round one diffusion step then n reverse steps
    (step index k: round k // (n + 1), position k % (n + 1); position 0 diffuses)."""

    def __init__(
        self,
        eps: EpsFn,
        alpha_bars: torch.Tensor,
        *,
        rounds: int,
        steps: int,
        respace: int | None,
        guide: str,
        scale: float,
        ptb: float,
        guide_batch: int,
        var: str,
        extra_step: bool,
    ):
        self.eps, self.rounds, self.guide, self.guide_batch = eps, rounds, guide, guide_batch
        self.T = alpha_bars.shape[0]
        self.kept = respaced_steps(steps, respace)
        self.n = len(self.kept)
        self.co = ddpm_coefficients(alpha_bars, self.kept, var)
        d = steps if extra_step else self.kept[-1]
        self.ab_diffuse = float(alpha_bars[d])
        m = ptb * 2 / 255 / 3 / scale if guide != "none" else 1.0
        self.guide_scale = [math.sqrt(1 - a) / (m * math.sqrt(a)) for a in self.co["abar"]]
        self.n_steps = rounds * (self.n + 1)

    def init(self, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        return to_diffusion(xr)

    def step(self, k: int, u: torch.Tensor, xr: torch.Tensor, noise: NoiseStream) -> torch.Tensor:
        pos = k % (self.n + 1)
        if pos == 0:
            a = self.ab_diffuse
            return math.sqrt(a) * u + math.sqrt(1 - a) * noise.normal()
        j = self.n - pos  # reverse steps j = n-1 .. 0
        co = self.co
        ab = co["abar"][j]
        t = (self.kept[j] + 1) / self.T
        e = self.eps(u, time_rows(t, u)).to(u.dtype)
        x0 = (math.sqrt(1 / ab) * u - math.sqrt(1 / ab - 1) * e).clamp(-1.0, 1.0)
        mean = co["c1"][j] * x0 + co["c2"][j] * u
        var = math.exp(co["logvar"][j])
        if self.guide != "none":
            target = math.sqrt(ab) * to_diffusion(xr) + math.sqrt(1 - ab) * noise.normal()
            g = guidance_gradient(u, target, self.guide)
            mean = mean + (var * self.guide_scale[j] / self.guide_batch) * g
        if j > 0:
            mean = mean + math.sqrt(var) * noise.normal()
        return mean


@dataclass
class GDMPParams(DefenseParams):
    kind: str = "gdmp"
    net: str = "ddpmpp"  # registered network kind of the eps-prediction net (GDMP's CIFAR-10: ddpm)
    replicas: int = at_least(1, 1)
    rounds: int = at_least(4, 0)  # m: diffuse-and-denoise rounds (4 on CIFAR-10)
    steps: int = at_least(36, 0)  # k: diffusion steps per round (36 on CIFAR-10)
    respace: int | None = at_least(None, 1)  # reverse steps per round (null: all k)
    guide: str = choice("mse", *GUIDES)  # guidance objective
    guide_scale: float | None = at_least(None, 0.0, strict=True)  # null: 60000 (mse), 70000 (ssim)
    ptb: float = at_least(8.0, 0.0, strict=True)  # the perturbation budget in pixel units (x/255)
    guide_batch: int = at_least(
        100, 1
    )  # each image's guidance divided by this fixed number: GDMP's batch (100)
    var: str = choice("large", *VARIANCES)  # reverse-step variance (Ho et al. CIFAR-10: fixedlarge)
    diffuse_extra_step: bool = True  # diffuse to step k, denoise from k-1 (GDMP's CIFAR-10 code)
    clamp: bool = True  # clip the output to [0, 1] (GDMP does)
    gradient_mode: str = choice("replay", *PURIFIER_GRADIENT_MODES)  # as DiffPure's
    surrogate_steps: int = at_least(4, 1)  # gradient_mode=surrogate: reverse steps per round in the graph
    noise_keys: str = choice("key", *NOISE_KEYS)
    check_replay: bool = False
    offload: bool = False


_D = GDMPParams()  # the one place these defaults live


@register_purifier("gdmp")
class GDMPPurifier(ChainPurifier):
    """GDMP (see the module docstring) with an eps-prediction DDPM net in slot `eps`.

    Raises ValueError for invalid parameters."""

    Params = GDMPParams

    label = "GDMP"
    stochastic = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        rounds: int = _D.rounds,
        steps: int = _D.steps,
        respace: int | None = _D.respace,
        guide: str = _D.guide,
        guide_scale: float | None = _D.guide_scale,
        ptb: float = _D.ptb,
        guide_batch: int = _D.guide_batch,
        var: str = _D.var,
        diffuse_extra_step: bool = _D.diffuse_extra_step,
        clamp: bool = _D.clamp,
        gradient_mode: str = _D.gradient_mode,
        surrogate_steps: int = _D.surrogate_steps,
        noise_keys: str = _D.noise_keys,
        check_replay: bool = _D.check_replay,
        offload: bool = _D.offload,
    ):
        super().__init__()
        self.alpha_bars = discrete_alpha_bars(schedule)
        T = self.alpha_bars.shape[0]
        if rounds < 0 or not 0 <= steps < T or (respace is not None and respace < 1):
            raise ValueError(
                f"need rounds >= 0, 0 <= steps < {T}, respace >= 1; got {rounds}, {steps}, {respace}"
            )
        if guide not in GUIDES or var not in VARIANCES or ptb <= 0 or guide_batch < 1:
            raise ValueError(f"invalid guide {guide!r}, var {var!r}, ptb {ptb} or guide_batch {guide_batch}")
        self.set_gradients(gradient_mode, surrogate_steps, noise_keys, check_replay, offload)
        self.rounds, self.steps, self.respace = rounds, steps, respace
        self.guide, self.ptb, self.guide_batch, self.var = guide, ptb, guide_batch, var
        self.scale = guide_scale if guide_scale is not None else GUIDE_SCALES.get(guide, 1.0)
        self.extra_step, self.clamp = diffuse_extra_step, clamp
        self.stochastic = rounds > 0 and steps > 0

    @classmethod
    def is_stochastic(cls, p) -> bool:
        return p.rounds > 0 and p.steps > 0

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return {"eps": p.net}

    @classmethod
    def from_params(cls, p, nets) -> GDMPPurifier:
        keys = ("rounds", "steps", "respace", "guide", "guide_scale", "ptb", "guide_batch", "var")
        keys += ("diffuse_extra_step", "clamp", "gradient_mode", "surrogate_steps", "noise_keys")
        keys += ("check_replay", "offload")
        return cls(nets["eps"].schedule, **{k: getattr(p, k) for k in keys})

    @classmethod
    def describe(cls, p) -> str:
        return f"GDMP {p.rounds}x{p.steps}" + (f", {p.guide.upper()} guidance" if p.guide != "none" else "")

    @classmethod
    def settings(cls, p) -> str:
        """E.g. "GDMP 4x36, MSE guidance: 4 rounds of diffusing to step 36 and 36 guided DDPM steps ..."."""
        reverse = min(p.respace, p.steps) if p.respace else p.steps
        guide = (
            f"{p.guide.upper()} guidance (scale {p.guide_scale or GUIDE_SCALES[p.guide]:g}, ptb {p.ptb:g}/255, "
            f"per image / {p.guide_batch})"
            if p.guide != "none"
            else "no guidance"
        )
        grad = gradient_words(p.gradient_mode, p.surrogate_steps, "reverse steps per round")
        return (
            f"{cls.describe(p)}: {p.rounds} rounds of diffusing to step {p.steps} and {reverse} ancestral "
            f"DDPM steps (var {p.var}), {guide}, eps net `{p.net}`, output "
            f"{'clipped to [0, 1]' if p.clamp else 'not clipped'}; S={p.replicas} replicas merged by "
            f"{p.merge}; full-gradient attacks: {grad}"
        )

    def chain(self, eps: EpsFn, surrogate: bool = False) -> GDMPChain:
        respace = self.respace
        if surrogate:
            respace = min(self.surrogate_steps, respace or self.steps)
        return GDMPChain(
            eps,
            self.alpha_bars,
            rounds=self.rounds,
            steps=self.steps,
            respace=respace,
            guide=self.guide,
            scale=self.scale,
            ptb=self.ptb,
            guide_batch=self.guide_batch,
            var=self.var,
            extra_step=self.extra_step,
        )

    def forward(self, x, rng, draws, fns, differentiable=False) -> PurifyResult:
        """x: (B, C, H, W) in [0, 1]; fns["eps"](u, t) as for DiffPure. Returns `draws` purifications
        per image, draw-major, in [0, 1] (clipped unless `clamp: false`)."""
        xr = rows(x, draws)
        if not self.stochastic:
            return self.unchanged(xr, differentiable)
        chain = self.chain(fns["eps"], self.surrogate(differentiable))
        out = to_image(self.run(chain, xr, x, rng, draws, differentiable), self.clamp)
        evals = torch.full((xr.shape[0],), self.rounds * chain.n, dtype=torch.long, device=x.device)
        steps = torch.full_like(evals, chain.n_steps)
        return PurifyResult(x=out if differentiable else out.detach(), steps=steps, score_evals=evals)


__all__ = [
    "GDMPParams",
    "GUIDES",
    "GUIDE_SCALES",
    "VARIANCES",
    "GDMPChain",
    "GDMPPurifier",
    "ddpm_coefficients",
    "guidance_gradient",
    "respaced_steps",
    "ssim_per_image",
]
