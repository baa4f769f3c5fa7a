"""Energy-based models E_phi(x) and their field -grad_x E_phi, a score source for the purifiers.

An EBM defines the density p_phi(x) ∝ exp(-E_phi(x)); trained by maximum likelihood with Langevin
MCMC (Nijkamp, Hill, Zhu & Wu, NeurIPS 2019 "Learning non-convergent non-persistent short-run MCMC
toward energy-based model" / AAAI 2020 "On the anatomy of MCMC-based maximum likelihood learning of
energy-based models"; Hill, Mitchell & Zhu, ICLR 2021 "Stochastic Security"; see `advpure.training.mcmc`),
its field -grad_x E_phi(x) plays the role of the DSM score net f_theta ~ sigma * grad log p_sigma in
the purifiers (ADP's deterministic updates, Langevin purification).

The network (`ConvEnergy`) is the "lightweight EBM" of Hill et al. 2021 (the VanillaNet of
Nijkamp et al. 2020; layer facts read from github.com/point0bar1/ebm-defense `nets.py`):

    conv3x3/1 (C -> nf) - act - conv4x4/2 (nf -> 2nf) - act - conv4x4/2 (2nf -> 4nf) - act
    - conv4x4/2 (4nf -> 8nf) - act - conv kxk/1, no padding (8nf -> 1)

with nf = 32 for CIFAR-10 (0.69M parameters). Spatial sizes 32 -> 32, 16, 8, 4 -> 1 (k = 4) and,
for 28x28, 28 -> 28, 14, 7, 3 -> 1 (k = 3). No normalisation layers: each image's energy depends
on that image only, so grad_x of the batch sum is the per-image gradient (chunking is exact).

Activation (a departure from Hill et al., on purpose): they use LeakyReLU(0.05). With it the net is
piecewise linear in x, so grad_x E is piecewise constant and its Jacobian (the Hessian of E)
is exactly zero almost everywhere. Two things break: (1) a full-gradient attack differentiates
through the field (double backward) and would see only the identity part of each purification
step, a masked gradient; (2) ADP's step-size probe z = <g, g(x + delta g)> / <g, g> is exactly 1
inside a linear region (1 - z = 0, alpha hits its clamp). The default here is SiLU (x * sigmoid(x),
smooth with a second derivative that vanishes only at isolated points); "leaky_relu" remains
available to reproduce Hill et al., and tests/test_ebm.py measures both facts.

Images are in [0, 1] and mapped to [-1, 1] (2x - 1) inside, like the score net, so gradients are
with respect to the [0, 1] pixels (twice the gradient with respect to the [-1, 1] ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from advpure.core.errors import ConfigError

__all__ = [
    "EBM_ACTIVATIONS",
    "EBM_ARCHS",
    "EBM_IMAGE_SIZES",
    "ConvEnergy",
    "EnergyField",
    "build_energy_net",
    "energy_net_from_arch",
    "energy_field",
    "estimate_field_scale",
    "langevin_settings",
    "load_energy_field",
]

EBM_ARCHS = ("conv",)
EBM_IMAGE_SIZES = (28, 32)
EBM_ACTIVATIONS = ("silu", "softplus", "elu", "leaky_relu")


def _activation(name: str, leak: float) -> nn.Module:
    if name == "silu":
        return nn.SiLU()
    if name == "softplus":
        return nn.Softplus()
    if name == "elu":
        return nn.ELU()
    if name == "leaky_relu":
        return nn.LeakyReLU(leak)
    raise ConfigError(f"ebm.activation={name!r} is unknown; allowed: {', '.join(EBM_ACTIVATIONS)}")


class ConvEnergy(nn.Module):
    """Hill et al. (2021)'s lightweight conv EBM (layout in the module docstring).

    Input: images in [0, 1], shape (N, in_channels, S, S), S in {28, 32}. Output: energies (N,)
    (float, unbounded; lower = more likely). `nf` is the base width (Hill et al.: 32).
    """

    def __init__(
        self, in_channels: int, image_size: int, nf: int = 32, activation: str = "silu", leak: float = 0.05
    ):
        super().__init__()
        if image_size not in EBM_IMAGE_SIZES:
            raise ConfigError(
                f"ebm net 'conv' takes image_size 28 or 32 (allowed: {EBM_IMAGE_SIZES}), got {image_size}"
            )
        if in_channels < 1 or nf < 1:
            raise ConfigError(f"ebm net 'conv': need in_channels >= 1 and nf >= 1, got {in_channels}, {nf}")
        self.in_channels, self.image_size, self.nf = in_channels, image_size, nf
        last = {32: 4, 28: 3}[image_size]  # spatial size after three stride-2 4x4 convs
        act = lambda: _activation(activation, leak)  # noqa: E731
        self.f = nn.Sequential(
            nn.Conv2d(in_channels, nf, 3, 1, 1),
            act(),
            nn.Conv2d(nf, 2 * nf, 4, 2, 1),
            act(),
            nn.Conv2d(2 * nf, 4 * nf, 4, 2, 1),
            act(),
            nn.Conv2d(4 * nf, 8 * nf, 4, 2, 1),
            act(),
            nn.Conv2d(8 * nf, 1, last, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"ConvEnergy expects (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        return self.f(2.0 * x - 1.0).reshape(x.shape[0])


def build_energy_net(
    arch: str, *, in_channels: int, image_size: int, nf: int, activation: str = "silu", leak: float = 0.05
) -> nn.Module:
    """The energy network E_phi named by `arch` (only "conv"). Raises ConfigError for unknown names."""
    if arch not in EBM_ARCHS:
        raise ConfigError(f"ebm.arch={arch!r} is unknown; allowed: {', '.join(EBM_ARCHS)}")
    return ConvEnergy(in_channels, image_size, nf=nf, activation=activation, leak=leak)


def energy_field(
    ebm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """-grad_x E(x), a tensor of x's shape (per-sample gradients: E must not mix samples).

    Works under `torch.no_grad()` (the gradient is taken under an inner `enable_grad`). With
    `create_graph=True` the result is itself differentiable (w.r.t. x when x requires grad, and
    w.r.t. E's parameters): double backward, for attacks that differentiate through the field.
    With `create_graph=False` the result is detached from x.
    """
    with torch.enable_grad():
        xx = x if x.requires_grad else x.detach().requires_grad_(True)
        energy = ebm(xx)
        if energy.shape != (x.shape[0],):
            raise ValueError(f"energy net must return shape ({x.shape[0]},), got {tuple(energy.shape)}")
        (grad,) = torch.autograd.grad(energy.sum(), xx, create_graph=create_graph)
    return -grad


class EnergyField(nn.Module):
    """x -> scale * (-grad_x E(x)), shaped like x: an EBM that behaves like the DSM score net f_theta.

    Purifiers call it as `score_fn(x)`. The graph is kept (create_graph) exactly when autograd may
    need it: grad mode is on and x or one of E's parameters requires grad. So:
      * under `torch.no_grad()` (ordinary purification) it still computes grad_x E through an inner
        `enable_grad` and returns a detached field (no graph kept, no memory growth along a chain);
      * under `torch.enable_grad()` with an x that requires grad (full-gradient attacks), the field
        is differentiable in x: backprop through it is a Hessian-vector product of E (double
        backward), like backprop through a score net.
    `scale` is the fixed rescaling c of the field (see `estimate_field_scale`); it is a constant,
    stored in the exported weights' meta as "field_scale".
    """

    is_gradient = True  # the field is itself a gradient: a jvp of it is a Hessian-vector product

    def __init__(self, ebm: nn.Module, scale: float = 1.0):
        super().__init__()
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"field scale must be a finite number > 0, got {scale}")
        self.ebm = ebm
        self.scale = float(scale)

    def _needs_graph(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.ebm.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * energy_field(self.ebm, x, create_graph=self._needs_graph(x))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


@torch.no_grad()
def estimate_field_scale(
    ebm: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    noise: torch.Tensor,
    max_rows: int = 256,
) -> dict[str, float]:
    """The fixed rescaling c of -grad E that puts the EBM field on the DSM net's scale.

    Rule: with screened images x~ = clip(x + sigma * n, 0, 1) (ADP's screening, n ~ N(0, I)), the
    ideal DSM field at x~ is (E[x | x~] - x~) / sigma ~ (x - x~) / sigma (Tweedie's formula, the
    denoised image being the clean one for sigma small against the distance between images), so
        c = median_i ||x_i - x~_i|| / sigma  /  median_i ||grad_x E(x~_i)||.
    Then ||c * grad E|| has the DSM field's typical norm at the screening level, and ADP's step
    alpha = lam * delta / (1 - z) lands in the same range as with the DSM net (for a field that
    points linearly to the clean image, alpha = lam * sigma; for E(x) = ||x - mu||^2 / (2 s^2) and
    data at mu, c * (-grad E) IS the ideal DSM field and c = s^2 / sigma). To first order ADP's step
    alpha * g does not depend on c, but alpha's clamp [1e-5, 1e-1] and the stop threshold tau do.

    x: clean images in [0, 1], (N, C, H, W); noise: standard normal of x's shape; sigma > 0.
    Returns {"field_scale": c, "target_norm": median ||x - x~|| / sigma,
    "grad_norm": median ||grad E(x~)||}. Raises ValueError when sigma <= 0 or the gradient is zero.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    x_tilde = (x + sigma * noise).clamp(0.0, 1.0)
    target = ((x - x_tilde).flatten(1).norm(dim=1) / sigma).median().item()
    grads = torch.cat([energy_field(ebm, c).flatten(1).norm(dim=1) for c in x_tilde.split(max_rows)])
    grad = grads.median().item()
    if not (math.isfinite(grad) and grad > 0):
        raise ValueError(f"median ||grad E|| is {grad}: the energy is flat or broken, no scale can be set")
    return {"field_scale": target / grad, "target_norm": target, "grad_norm": grad}


def langevin_settings(field_scale: float, step_size: float, noise_std: float) -> dict[str, float]:
    """Arguments of `advpure.purify.langevin.langevin_chain` (eta, dsm_sigma) that make it run the
    EBM's own training sampler x <- x - (step_size/2) grad E(x) + noise_std * n (Hill et al. 2021
    purify with that sampler) when its score_fn is `EnergyField(ebm, field_scale)`.

    langevin_chain updates x <- x + (eta/2) * score_fn(x) / dsm_sigma + sqrt(eta) * n, so
    eta = noise_std^2 and dsm_sigma = noise_std^2 * field_scale / step_size. The values of an
    exported EBM are in its weights' meta: field_scale, mcmc_step_size, mcmc_noise_std.
    """
    if field_scale <= 0 or step_size <= 0 or noise_std <= 0:
        raise ValueError(
            f"field_scale, step_size and noise_std must be > 0, got {field_scale}, {step_size}, {noise_std}"
        )
    eta = noise_std**2
    return {"eta": eta, "dsm_sigma": eta * field_scale / step_size}


def energy_net_from_arch(arch: dict) -> nn.Module:
    """`build_energy_net` from an architecture dict as stored in a weights file's `arch`
    (keys arch, in_channels, image_size, nf, activation, leak)."""
    return build_energy_net(
        arch["arch"],
        in_channels=arch["in_channels"],
        image_size=arch["image_size"],
        nf=arch["nf"],
        activation=arch["activation"],
        leak=arch.get("leak", 0.05),
    )


def load_energy_field(path: str | Path, arch: dict | None = None) -> EnergyField:
    """An `EnergyField` from an exported weights file (kind "ebm"), with the stored field scale.

    `arch` (the config's architecture dict) is checked against the file when given; otherwise the
    file's own is used. The net is in eval mode with frozen parameters. Raises CheckpointError.
    """
    from advpure.core.errors import CheckpointError
    from advpure.nets.weights import load_weights, read_weights

    if arch is None:
        arch = read_weights(path)["arch"]
    net = energy_net_from_arch(arch)
    meta = load_weights(path, "ebm", arch, net)
    if "field_scale" not in meta:
        raise CheckpointError(f"{path} has no field_scale in its meta; re-export it with `advpure train`")
    field = EnergyField(net.eval().requires_grad_(False), float(meta["field_scale"]))
    if meta.get("mcmc_step_size") and meta.get("mcmc_noise_std"):
        # the EBM's own sampler, for a Langevin purifier left to follow it (defense.eta: null)
        field.langevin = langevin_settings(
            field.scale, float(meta["mcmc_step_size"]), float(meta["mcmc_noise_std"])
        )
    return field
