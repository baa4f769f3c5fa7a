"""Base classifiers h of the smoothed classifier G(x) = argmax_c P(h(x + sigma n) = c), n ~ N(0, I).

Each base is an `nn.Module` mapping noisy rows x~ = x + sigma * n, shape (rows, C, H, W) with
values outside [0, 1], to logits (rows, classes); the smoothing code counts their argmax.

* `noisy`     h(x~) = g(x~): the bare classifier on the noisy input (Cohen et al. 2019's baseline;
              fair only for a classifier trained with Gaussian noise of that sigma,
              `classifier.noise_sd`).
* `denoised`  h(x~) = g(clip(x~ + sigma f(x~), 0, 1)): Tweedie's one-step denoiser from the DSM
              score net, then the classifier (denoised smoothing: Salman et al., NeurIPS 2020;
              Carlini et al., ICLR 2023). advpure's f is trained so that f(x + s eps) ~ -eps,
              i.e. f ~ s * grad log p_s (not divided by s), so E[x | x~] ~ x~ + sigma f(x~).
* `adp`       h(x~) = g(x_T) with x_T from ADP's deterministic adaptive updates (Yoon, Hwang & Lee,
              ICML 2021) started at x~: the smoothing noise plays the part of ADP's screening noise.
* `diffusion` h(x~) = g(clip((x^0 + 1) / 2, 0, 1)): one-shot denoising with a diffusion eps-net (Carlini
              et al., ICLR 2023, "(Certified!!) Adversarial Robustness for Free!"). In diffusion space
              (u = 2x - 1) the smoothing noise is 2 sigma n, so x~ IS a diffusion state once scaled:
              u_t = sqrt(abar_t) (2 x~ - 1) = sqrt(abar_t) u_0 + sqrt(1 - abar_t) n exactly when
              sqrt((1 - abar_t) / abar_t) = 2 sigma. The step t: that solution on a continuous VP
              schedule, the first step with sqrt((1 - abar_t) / abar_t) >= 2 sigma on a discrete one
              (Carlini et al.'s rule). No extra noise is added; x^0 = (u_t - sqrt(1 - abar_t) eps(u_t, t)) /
              sqrt(abar_t), Tweedie's posterior mean E[u_0 | u_t] for the exact eps. The eps-net's kind is
              `certify.diffusion_net` (`nets(options)`).

The noise is never clipped before the denoiser / chain: the DSM net (and Tweedie's formula) is
fitted to x + sigma n, and a clip would move the input off that distribution. The certificate
itself holds for any deterministic h of x + sigma n, so the clip of `denoised` and the per-step
clips of `adp` are simply part of h.

A score net only denoises noise levels it was trained on: `check_sigma_covered` refuses a sigma
outside its DSM range (use `score_sigma_range` to read that range from the weights' meta or config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advpure.core.errors import ConfigError
from advpure.core.registry import Registry
from advpure.nets.schedules import DiscreteSchedule, NoiseSchedule
from advpure.purify.adp import DEFAULTS as ADP_DEFAULTS
from advpure.purify.adp import adp_chain
from advpure.purify.ranges import SIGMA_RTOL, score_sigma_range
from advpure.purify.ranges import check_sigma_covered as _check_covered

__all__ = [
    "BASES",
    "SIGMA_RTOL",
    "CertifyBase",
    "register_base",
    "ADPBase",
    "DenoisedBase",
    "DiffusionBase",
    "diffusion_time",
    "NoisyBase",
    "build_base",
    "check_sigma_covered",
    "score_sigma_range",
]


class CertifyBase(nn.Module):
    """Base class of registered base classifiers: `nets` names the network kinds the base needs
    besides the classifier ({slot: kind}); `build` makes it. Registered with `@register_base(name)`."""

    name: str = ""  # set by the registry
    params: tuple[str, ...] = ()  # keyword parameters `build` takes (e.g. ADP's lam, delta, tau, steps)

    @classmethod
    def nets(cls, options: Mapping[str, Any] | None = None) -> dict[str, str]:
        """{slot: network kind} the base needs; `options`: the `certify` block's settings (a mapping,
        e.g. {"diffusion_net": "ddpmpp"}) for bases whose net kind is configurable."""
        return {}

    @classmethod
    def build(
        cls, classifier: nn.Module, nets: Mapping[str, nn.Module], sigma: float, **params: Any
    ) -> CertifyBase:
        return cls(classifier, *nets.values(), sigma, **params)


BASES = Registry("base classifier", base=CertifyBase)
register_base = BASES.register


@register_base("noisy")
class NoisyBase(CertifyBase):
    """h(x~) = classifier(x~) (Cohen et al. 2019). Input (rows, C, H, W), output logits (rows, K)."""

    def __init__(self, classifier: nn.Module, sigma: float):
        super().__init__()
        self.classifier, self.sigma = classifier, float(sigma)

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(x_noisy)


@register_base("denoised")
class DenoisedBase(CertifyBase):
    """h(x~) = classifier(clip(x~ + sigma * f(x~), 0, 1)): one-step Tweedie denoising with the DSM net f
    (Salman et al. 2020; Carlini et al. 2023). Input (rows, C, H, W), output logits (rows, K)."""

    @classmethod
    def nets(cls, options=None) -> dict[str, str]:
        return {"field": "score"}

    def __init__(self, classifier: nn.Module, score_net: nn.Module, sigma: float):
        super().__init__()
        self.classifier, self.score_net, self.sigma = classifier, score_net, float(sigma)

    def denoise(self, x_noisy: torch.Tensor) -> torch.Tensor:
        """x^ = clip(x~ + sigma f(x~), 0, 1), images in [0, 1] of the input's shape."""
        return (x_noisy + self.sigma * self.score_net(x_noisy).to(x_noisy.dtype)).clamp(0.0, 1.0)

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoise(x_noisy))


@register_base("adp")
class ADPBase(CertifyBase):
    """h(x~) = classifier(x_T), x_T = ADP's adaptive deterministic updates (`adp_chain`) from x~ with
    step scale `lam`, probe `delta`, stop threshold `tau`, at most `steps` updates (Yoon et al. 2021;
    defaults: `ADPPurifier.Params`). Input (rows, C, H, W), output logits (rows, K). Differentiable
    when gradients are enabled."""

    params = ("lam", "delta", "tau", "steps", "probe")

    @classmethod
    def nets(cls, options=None) -> dict[str, str]:
        return {"field": "score"}

    def __init__(
        self,
        classifier: nn.Module,
        score_net: nn.Module,
        sigma: float,
        *,
        lam: float = ADP_DEFAULTS.lam,
        delta: float = ADP_DEFAULTS.delta,
        tau: float = ADP_DEFAULTS.tau,
        steps: int = ADP_DEFAULTS.steps,
        probe: str = ADP_DEFAULTS.probe,
    ):
        super().__init__()
        self.classifier, self.score_net, self.sigma = classifier, score_net, float(sigma)
        self.lam, self.delta, self.tau, self.steps = float(lam), float(delta), float(tau), int(steps)
        self.probe = probe

    def purify(self, x_noisy: torch.Tensor) -> torch.Tensor:
        out = adp_chain(
            x_noisy,
            self.score_net,
            lam=self.lam,
            delta=self.delta,
            tau=self.tau,
            steps=self.steps,
            probe=self.probe,
            differentiable=torch.is_grad_enabled(),
        )
        return out.x

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x_noisy))


DIFFUSION_NET = "ddpmpp"  # default network kind of the diffusion base (`certify.diffusion_net`)


def diffusion_time(schedule: NoiseSchedule, sigma: float) -> float:
    """The diffusion time t of smoothing noise `sigma` ([0, 1] image units): sqrt((1 - abar_t) / abar_t)
    = 2 sigma solved on a continuous VP schedule (`VPSchedule.t_of_sigma_image`), the first step of a
    discrete one with sqrt((1 - abar_t) / abar_t) >= 2 sigma (t = (i + 1) / T). Raises ConfigError when
    the schedule never reaches that noise."""
    if isinstance(schedule, DiscreteSchedule):
        level = ((1 - schedule.alpha_bars) / schedule.alpha_bars).sqrt()
        reach = (level >= 2 * sigma * (1 - SIGMA_RTOL)).nonzero()
        if reach.numel() == 0:
            raise ConfigError(
                f"certify: sigma={sigma:g} is beyond the diffusion net's schedule (largest image noise "
                f"{float(level[-1]) / 2:g})"
            )
        return float(schedule.time(int(reach[0])))
    top = float(schedule.sigma_image(torch.tensor(1.0, dtype=torch.float64)))
    if sigma > top * (1 + SIGMA_RTOL):
        raise ConfigError(
            f"certify: sigma={sigma:g} is beyond the diffusion net's schedule (image noise {top:g} at t=1)"
        )
    return min(1.0, float(schedule.t_of_sigma_image(sigma)))


@register_base("diffusion")
class DiffusionBase(CertifyBase):
    """h(x~) = classifier(clip((x^0 + 1) / 2, 0, 1)), x^0 the one-shot denoising of x~ by a diffusion
    eps-net at the step of noise 2 sigma (Carlini et al. 2023; see the module docstring). Input
    (rows, C, H, W), output logits (rows, K). `eps_net(u, t)`: u (R, C, H, W) in diffusion space, t (R,)
    in [0, 1], carrying `.schedule`."""

    @classmethod
    def nets(cls, options=None) -> dict[str, str]:
        return {"eps": str((options or {}).get("diffusion_net") or DIFFUSION_NET)}

    def __init__(self, classifier: nn.Module, eps_net: nn.Module, sigma: float):
        super().__init__()
        self.classifier, self.eps_net, self.sigma = classifier, eps_net, float(sigma)
        self.t = diffusion_time(eps_net.schedule, self.sigma)
        self.alpha_bar = float(eps_net.schedule.alpha_bar(torch.tensor(self.t, dtype=torch.float64)))

    def denoise(self, x_noisy: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """x^ = (x^0 + 1) / 2 of the noisy rows (in [0, 1] when `clamp`), of the input's shape."""
        a = self.alpha_bar
        u = a**0.5 * (2 * x_noisy - 1)
        t = torch.full((x_noisy.shape[0],), self.t, dtype=x_noisy.dtype, device=x_noisy.device)
        u0 = (u - (1 - a) ** 0.5 * self.eps_net(u, t).to(u.dtype)) / a**0.5
        x = (u0 + 1) / 2
        return x.clamp(0.0, 1.0) if clamp else x

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoise(x_noisy))


def build_base(
    name: str,
    classifier: nn.Module,
    sigma: float,
    *,
    nets: Mapping[str, nn.Module] | None = None,
    score_net: nn.Module | None = None,
    score_range: tuple[float, float] | None = None,
    options: Mapping[str, Any] | None = None,
    **params: Any,
) -> nn.Module:
    """The base classifier `name` (registered in `BASES`) at smoothing noise `sigma` (> 0, [0, 1]
    image units). `nets`: {slot: net} of the base's `nets(options)` (`score_net` is the "field" slot's
    net); `options`: the certify block's settings the base reads (e.g. `diffusion_net`).

    `params` go to the base (ADP: lam, delta, tau, steps). With `score_range = (sigma_min, sigma_max)`
    a base that uses the score net checks that the range covers sigma.
    Raises ConfigError: unknown name, sigma <= 0, a missing net, sigma outside `score_range`,
    parameters the base does not take.
    """
    cls = BASES.get(name)
    if not sigma > 0:
        raise ConfigError(f"certify: sigma must be > 0, got {sigma}")
    unknown = set(params) - set(cls.params)
    if unknown:
        raise ConfigError(f"certify: base '{name}' takes no parameter(s) {', '.join(sorted(unknown))}")
    nets = dict(nets or {})
    if score_net is not None:
        nets.setdefault("field", score_net)
    slots = cls.nets(options)
    for slot, kind in slots.items():
        if nets.get(slot) is None:
            raise ConfigError(f"certify: base '{name}' needs a {kind} network ({kind}.weights)")
    if "field" in slots and score_range is not None:
        check_sigma_covered(sigma, *score_range)
    return cls.build(classifier, {slot: nets[slot] for slot in slots}, sigma, **params)


def check_sigma_covered(sigma: float, sigma_min: float, sigma_max: float) -> None:
    """Raise ConfigError unless sigma_min <= sigma <= sigma_max (relative tolerance 1e-6): a DSM score
    net does not denoise noise levels it was not trained on (`advpure.purify.ranges`, shared with the
    benchmark's screening sigmas)."""
    _check_covered(sigma, sigma_min, sigma_max, key="certify: sigma", advice="drop this sigma")
