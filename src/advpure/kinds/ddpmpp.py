"""score_sde's NCSN++ in the DDPM++ continuous-VP configuration (Song et al., ICLR 2021), DiffPure's CIFAR-10
model (Nie et al., ICML 2022): an eps-prediction net eps(u, t) on u in [-1, 1], t in [0, 1], on the VP SDE
with beta(t) = 0.1 + 19.9 t (`advpure.nets.ncsnpp.NCSNpp`).

Stage `ddpmpp` (`advpure.training.diffusion.DiffusionModule`: continuous-time DSM with score_sde's recipe);
importer `advpure import-weights score_sde` for the published ``checkpoint_8.pth``
(`advpure.importers.score_sde`). Options: ``conf/ddpmpp/ddpmpp_28.yaml`` (the embedded default, 28x28,
trains on 2 CPU cores in minutes), ``conf/ddpmpp/ddpmpp_cifar10.yaml`` (the official deep configuration
and training recipe). The block's defaults are the official CIFAR-10 ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from advpure.core.params import at_least, between
from advpure.importers.score_sde import read_score_sde_checkpoint
from advpure.kinds.diffusion_common import (
    DiffusionImport,
    EpsKind,
    check_levels,
    plain_arch,
    train_eps_kind,
)
from advpure.nets.ncsnpp import NCSNPP_CONFIGS
from advpure.nets.registry import register_net_kind

# the vp/cifar10_ddpmpp_deep_continuous folder of the score_sde_pytorch README's checkpoint table
SCORE_SDE_DDPMPP_DEEP_URL = "https://drive.google.com/drive/folders/1ZMLBiu9j7-rpdTQu8M2LlHAEQq4xRYrj"


@dataclass
class DdpmppConfig:
    """NCSN++ / DDPM++ continuous VP (score_sde ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` and
    ``configs/default_cifar10_configs.py``): architecture, VP schedule and the training recipe."""

    nf: int = at_least(128, 1)  # base channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # channels per resolution level
    num_res_blocks: int = at_least(8, 1)  # per level (8: the "deep" model)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # pixel sizes with self-attention
    dropout: float = between(0.1, 0.0, 1.0)
    beta_min: float = at_least(0.1, 0.0)  # VP SDE beta(t) = beta_min + t (beta_max - beta_min)
    beta_max: float = at_least(20.0, 0.0, strict=True)
    # training: score_sde's recipe (Adam, linear warmup, gradient clipping, EMA with the num_updates ramp)
    batch_size: int = at_least(128, 1)
    lr: float = at_least(2e-4, 0.0, strict=True)
    beta1: float = between(0.9, 0.0, 1.0)
    beta2: float = between(0.999, 0.0, 1.0)
    adam_eps: float = at_least(1e-8, 0.0, strict=True)
    weight_decay: float = at_least(0.0, 0.0)
    warmup: int = at_least(5000, 0)  # lr * min(step / warmup, 1)
    grad_clip: float | None = at_least(1.0, 0.0, strict=True)  # gradient-norm clip (null: off)
    ema_decay: float = between(0.9999, 0.0, 1.0)
    ema_warmup: bool = True  # score_sde's decay ramp min(decay, (1 + n) / (10 + n))
    t_eps: float = between(1e-5, 0.0, 1.0, strict=True)  # t ~ U(t_eps, 1)
    max_steps: int = at_least(950_000, 1)  # n_iters of the deep continuous config
    ckpt_every_n_steps: int = at_least(10_000, 1)
    val_every_n_steps: int = at_least(10_000, 1)
    val_batches: int = at_least(4, 1)  # batches of the validation split used for val metrics
    val_t_star: float = between(0.1, 0.0, 1.0, strict=True)  # one-step denoising PSNR at this time
    t_buckets: int = at_least(5, 1)  # the DSM loss is logged per bucket of t
    hflip: bool = True  # score_sde's random_flip
    weights: str = "${paths.artifacts}/${data.name}/ddpmpp.pt"


class ScoreSDEImport(DiffusionImport):
    help = "score_sde's DDPM++ deep continuous-VP checkpoint (Song et al. 2021; DiffPure) -> ddpmpp weights"
    description = (
        "Convert score_sde_pytorch's checkpoint_8.pth of vp/cifar10_ddpmpp_deep_continuous (the dict {optimizer, "
        "model, ema, step}) into an advpure ddpmpp weights file (ddpmpp=ddpmpp_cifar10). Reads it with "
        "torch.load(weights_only=True); checks every key and shape of 'model', the 'sigmas' buffer, the EMA list's "
        "length and parameter order, finiteness and the parameter count (106,632,579); takes the EMA weights "
        "unless --no-ema; records the file's SHA-256, step and schedule in the weights' meta."
    )
    example = "advpure import-weights score_sde checkpoint_8.pth artifacts/cifar10/ddpmpp.pt"
    kind = "ddpmpp"
    read = staticmethod(read_score_sde_checkpoint)
    configs = NCSNPP_CONFIGS
    default_config = "ddpmpp_deep_cifar10"
    has_ema = True


@register_net_kind("ddpmpp")
class DDPMppKind(EpsKind):
    """score_sde NCSN++ / DDPM++ continuous VP, eps(u, t) (DiffPure's CIFAR-10 net)."""

    Config = DdpmppConfig
    label = "score_sde DDPM++ (continuous VP)"
    importers = {"score_sde": ScoreSDEImport}

    @classmethod
    def check(cls, block) -> None:
        from advpure.core.errors import ConfigError

        cls.check_lists(block, ("ch_mult", "attn_resolutions"), empty_ok=("attn_resolutions",))
        if block.beta_min >= block.beta_max:
            raise ConfigError(
                f"ddpmpp.beta_min ({block.beta_min}) must be < ddpmpp.beta_max ({block.beta_max})"
            )

    @classmethod
    def arch(cls, block, spec) -> dict:
        check_levels(cls.name, spec.image_size, len(block.ch_mult))
        return {
            "family": "ncsnpp",
            "in_channels": spec.channels,
            "image_size": spec.image_size,
            "nf": block.nf,
            "ch_mult": list(block.ch_mult),
            "num_res_blocks": block.num_res_blocks,
            "attn_resolutions": list(block.attn_resolutions),
            "dropout": block.dropout,
            "skip_rescale": True,
            "beta_min": block.beta_min,
            "beta_max": block.beta_max,
        }

    @classmethod
    def is_official(cls, block) -> bool:
        """The block's architecture is the published CIFAR-10 net's (`NCSNPP_CONFIGS["ddpmpp_deep_cifar10"]`)."""
        ref = NCSNPP_CONFIGS["ddpmpp_deep_cifar10"]
        keys = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions")
        same = all(plain_arch({k: block[k]}) == plain_arch({k: ref[k]}) for k in keys)
        return same and block.dropout == 0.1 and (block.beta_min, block.beta_max) == (0.1, 20.0)

    @classmethod
    def how_to_get(cls, block, path, data_name: str, experiment: str) -> str:
        if data_name == "cifar10" and cls.is_official(block):
            return (
                f"{path}: import score_sde's checkpoint_8.pth ({SCORE_SDE_DDPMPP_DEEP_URL}, folder "
                f"vp/cifar10_ddpmpp_deep_continuous) with `advpure import-weights score_sde checkpoint_8.pth {path}`, "
                f"or train it (`make train EXP={experiment} ARGS='train.stages=[ddpmpp]'`, GPU-days)"
            )
        return f"{path}: train it with `make train EXP={experiment} ARGS='train.stages=[ddpmpp]'`"

    @classmethod
    def train(cls, block, ctx) -> dict:
        """Continuous-time DSM (`advpure.kinds.diffusion_common.train_eps_kind`); exports the EMA weights."""
        return train_eps_kind(cls, block, ctx)


__all__ = ["DDPMppKind", "DdpmppConfig", "SCORE_SDE_DDPMPP_DEEP_URL", "ScoreSDEImport"]
