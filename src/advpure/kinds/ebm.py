"""The maximum-likelihood energy-based model (Hill, Mitchell & Zhu, ICLR 2021): energy E_phi trained
with persistent short-run Langevin MCMC; purifiers follow its rescaled field c * (-grad E), the "ML"
arm of Fig. 2 of Yoon, Hwang & Lee (ICML 2021). Stage `ebm` (`advpure.training.ebm.EBMModule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advpure.core.params import at_least, between, choice, schema
from advpure.core.rng import mix, stream_id
from advpure.nets.ebm import (
    EBM_ACTIVATIONS,
    EBM_ARCHS,
    energy_net_from_arch,
    estimate_field_scale,
    load_energy_field,
)
from advpure.nets.registry import NetKind, register_net_kind
from advpure.training.mcmc import INITS


@schema
@dataclass
class EBMConfig:
    """Energy-based model trained by maximum likelihood with persistent short-run Langevin MCMC
    (Hill, Mitchell & Zhu, ICLR 2021). Defaults: their CIFAR-10 run (conf/ebm/ebm_cifar10.yaml says
    where each number comes from); pixel units are [0, 1]."""

    arch: str = choice("conv", *EBM_ARCHS)  # Hill et al.'s lightweight conv EBM
    nf: int = at_least(32, 1)  # base channels (Hill et al.: 32)
    activation: str = choice("silu", *EBM_ACTIVATIONS)  # Hill et al.: leaky_relu
    leak: float = at_least(0.05, 0.0)  # negative slope of leaky_relu
    batch_size: int = at_least(100, 1)
    lr: float = at_least(1e-4, 0.0, strict=True)  # Adam
    beta1: float = between(0.9, 0.0, 1.0)
    beta2: float = between(0.999, 0.0, 1.0)
    weight_decay: float = at_least(0.0, 0.0)
    grad_clip: float | None = None  # clip the weight gradient's norm (Trainer gradient_clip_val)
    l2: float = at_least(0.0, 0.0)  # weight of mean(E_data^2 + E_model^2)
    mcmc_steps: int = at_least(100, 0)  # K Langevin steps per training step
    step_size: float = at_least(0.5, 0.0)  # eta in x <- x - eta/2 grad E + noise_std n
    noise_std: float | None = 0.005  # null: sqrt(step_size) (Langevin proper, temperature 1)
    data_noise: float = at_least(0.01, 0.0)  # std of the noise added to data images (positives)
    buffer_size: int = at_least(10000, 0)  # persistent chains (0: fresh short-run chains every step)
    reinit_prob: float = between(0.0, 0.0, 1.0)  # restart probability of a drawn chain
    init: str = choice("uniform", *INITS)  # where restarted chains start
    clamp: bool = False  # clip chains to [0, 1] after every Langevin step
    energy_bound: float = at_least(1e4, 0.0, strict=True)  # stop when max |E| exceeds this
    max_steps: int = at_least(250_000, 1)
    ckpt_every_n_steps: int = at_least(1000, 1)
    sample_every_n_steps: int = at_least(1000, 0)  # grid of MCMC samples (W&B + PNG); 0: never
    scale_sigma: float = at_least(0.25, 0.0, strict=True)  # screening sigma of the field scale
    scale_images: int = at_least(1000, 1)  # training images used to estimate the field scale
    weights: str = "${paths.artifacts}/${data.name}/ebm.pt"


def field_scale_of(block, dm, net, seed: int) -> dict:
    """The EBM field's fixed rescaling (`advpure.nets.ebm.estimate_field_scale`) on the first
    `block.scale_images` training images screened at `block.scale_sigma`, noise keyed by `seed`."""
    dm.setup()
    x = dm.train_x[dm.train_indices[: block.scale_images]].float() / 255
    gen = torch.Generator().manual_seed(mix(seed, stream_id("ebm/field_scale")))
    noise = torch.randn(x.shape, generator=gen)
    return estimate_field_scale(net, x, block.scale_sigma, noise)


@register_net_kind("ebm")
class EnergyModel(NetKind):
    """Maximum-likelihood EBM; purifiers get its rescaled field c * (-grad E) (time-free, like f)."""

    Config = EBMConfig
    signature = "field"
    field = "ebm"
    field_label = "ML-EBM"
    label = "maximum-likelihood EBM (Hill et al. 2021)"
    # a run may be extended (max_steps) or logged differently; the field scale is set at export
    resume_free = (
        "max_steps",
        "ckpt_every_n_steps",
        "sample_every_n_steps",
        "energy_bound",
        "scale_sigma",
        "scale_images",
        "weights",
    )

    @classmethod
    def check(cls, block) -> None:
        from advpure.core.errors import ConfigError

        if block.noise_std is not None and block.noise_std < 0:
            raise ConfigError(
                f"ebm.noise_std: must be >= 0 (or null for sqrt(step_size)), got {block.noise_std}"
            )

    @classmethod
    def arch(cls, block, spec) -> dict:
        return {
            "arch": block.arch,
            "nf": block.nf,
            "activation": block.activation,
            "leak": block.leak,
            "in_channels": spec.channels,
            "image_size": spec.image_size,
        }

    @classmethod
    def build(cls, arch):
        return energy_net_from_arch(dict(arch))

    @classmethod
    def load(cls, block, path, spec):
        """The rescaled field `EnergyField` (with the EBM's own sampler settings as `.langevin`)."""
        from advpure.nets.weights import read_weights

        field = load_energy_field(path, cls.arch(block, spec))
        return field, dict(read_weights(path).get("meta", {}))

    @classmethod
    def train(cls, block, ctx) -> dict:
        """Maximum likelihood with persistent Langevin chains (`EBMModule`); exports the energy net
        with the field scale ("field_scale") and the training sampler's settings in meta."""
        import time
        import warnings

        from advpure.training.ebm import EBMModule

        t0 = time.perf_counter()
        dm = ctx.datamodule(batch_size=block.batch_size, crop_padding=0, hflip=False)
        arch = cls.arch(block, dm.spec)
        module = EBMModule.from_block(
            arch, block, seed=ctx.seed, log_images=ctx.log_images, sample_dir=str(ctx.run_dir / "samples")
        )
        ctx.say(
            f"training a {block.arch} EBM (nf {block.nf}, {block.activation}) by maximum likelihood with "
            f"{block.mcmc_steps}-step persistent Langevin chains for {block.max_steps} steps"
        )
        with warnings.catch_warnings():  # the datamodule serves a val split the EBM stage does not use
            warnings.filterwarnings("ignore", message=".*val_dataloader.*validation_step.*")
            trainer = ctx.fit(
                module,
                dm,
                steps=block.max_steps,
                ckpt_every_n_steps=block.ckpt_every_n_steps,
                gradient_clip_val=block.grad_clip,
                limit_val_batches=0,
            )
        net = module.net.cpu().eval()
        scale = field_scale_of(block, dm, net, ctx.seed)
        meta = {
            "steps": int(trainer.global_step),
            "seconds": time.perf_counter() - t0,
            "dataset": ctx.data.name,
            "field_scale": scale["field_scale"],
            "field_scale_sigma": float(block.scale_sigma),
            "field_target_norm": scale["target_norm"],
            "field_grad_norm": scale["grad_norm"],
            "mcmc_steps": int(block.mcmc_steps),
            "mcmc_step_size": float(block.step_size),
            "mcmc_noise_std": float(module.noise_std),
            "mcmc_clamp": bool(block.clamp),
            **{f"train/{k}": v for k, v in module.last_stats.items()},
        }
        ctx.export(arch, net, meta)
        ctx.say(
            f"{trainer.global_step} steps in {meta['seconds']:.0f} s; field scale {scale['field_scale']:.4g} "
            f"(median ||x - x~||/sigma {scale['target_norm']:.3g}, median ||grad E|| {scale['grad_norm']:.3g} "
            f"at sigma {block.scale_sigma:g})"
        )
        return meta


__all__ = ["EBMConfig", "EnergyModel", "field_scale_of"]
