"""Ho et al.'s DDPM U-Net (NeurIPS 2020), GDMP's CIFAR-10 model (Wang et al. 2022): an eps-prediction net
eps(u, t) on u in [-1, 1], t in [0, 1] on the T = 1000 step chain with beta linear 1e-4 -> 0.02 (step i at
t = (i + 1) / T; `advpure.nets.ddpm.DDPMUNet`, the module tree and keys of pesser/pytorch_diffusion).

Stage `ddpm` (`advpure.training.diffusion.DiffusionModule`; on this discrete chain the continuous-time DSM
loss with i ~ U{0..T-1} is Ho et al.'s L_simple, Algorithm 1); importer `advpure import-weights ddpm` for the
converted ``model-790000.ckpt`` (`advpure.importers.ddpm`). Options: ``conf/ddpm/ddpm_28.yaml`` (28x28, small)
and ``conf/ddpm/ddpm_cifar10.yaml`` (the published net and Ho et al.'s recipe). The block's defaults are the
CIFAR-10 ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from advpure.core.params import at_least, between
from advpure.importers.ddpm import read_ddpm_checkpoint
from advpure.kinds.diffusion_common import (
    DiffusionImport,
    EpsKind,
    check_levels,
    plain_arch,
    train_eps_kind,
)
from advpure.nets.ddpm import DDPM_CONFIGS
from advpure.nets.registry import register_net_kind

# pesser/pytorch_diffusion README ("converted pytorch checkpoints are provided for download") and
# pytorch_diffusion/ckpt_util.py URL_MAP["ema_cifar10"] (MD5 1fa350b952534ae442b1d5235cce5cd3)
PYTORCH_DIFFUSION_FOLDER = "https://heibox.uni-heidelberg.de/d/01207c3f6b8441779abf/"
PYTORCH_DIFFUSION_EMA_CIFAR10 = "https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1"


@dataclass
class DdpmConfig:
    """Ho et al.'s DDPM (pytorch_diffusion ``Model``; ``diffusion_tf`` ``scripts/run_cifar.py``): architecture,
    the discrete linear-beta chain and the training recipe."""

    ch: int = at_least(128, 1)  # base channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = at_least(2, 1)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # pixel sizes with self-attention
    dropout: float = between(0.1, 0.0, 1.0)
    steps: int = at_least(1000, 1)  # T
    beta_start: float = between(1e-4, 0.0, 1.0, strict=True)
    beta_end: float = between(0.02, 0.0, 1.0, strict=True)
    # training: Ho et al.'s recipe (Adam 2e-4, warmup 5000, clip 1, EMA 0.9999 without a ramp, flips)
    batch_size: int = at_least(128, 1)
    lr: float = at_least(2e-4, 0.0, strict=True)
    beta1: float = between(0.9, 0.0, 1.0)
    beta2: float = between(0.999, 0.0, 1.0)
    adam_eps: float = at_least(1e-8, 0.0, strict=True)
    weight_decay: float = at_least(0.0, 0.0)
    warmup: int = at_least(5000, 0)
    grad_clip: float | None = at_least(1.0, 0.0, strict=True)
    ema_decay: float = between(0.9999, 0.0, 1.0)
    ema_warmup: bool = False  # diffusion_tf's EMA has no num_updates ramp
    t_eps: float = between(1e-5, 0.0, 1.0, strict=True)  # unused on a discrete chain (i ~ U{0..T-1})
    max_steps: int = at_least(800_000, 1)  # Ho et al. App. B (the published file is step 790000)
    ckpt_every_n_steps: int = at_least(10_000, 1)
    val_every_n_steps: int = at_least(10_000, 1)
    val_batches: int = at_least(4, 1)
    val_t_star: float = between(0.1, 0.0, 1.0, strict=True)
    t_buckets: int = at_least(5, 1)
    hflip: bool = True
    weights: str = "${paths.artifacts}/${data.name}/ddpm.pt"


class DDPMImport(DiffusionImport):
    help = "Ho et al.'s DDPM CIFAR-10 model-790000.ckpt (pytorch_diffusion conversion; GDMP) -> ddpm weights"
    description = (
        "Convert pesser/pytorch_diffusion's model-790000.ckpt (a plain state dict: ema_diffusion_cifar10_model/ for "
        "the EMA weights, diffusion_cifar10_model/ for the raw ones) into an advpure ddpm weights file "
        "(ddpm=ddpm_cifar10). Reads it with torch.load(weights_only=True); checks every key and shape, finiteness "
        "and the parameter count (35,746,307); compares the file's MD5 with the two pytorch_diffusion publishes to "
        "record whether it holds the EMA or the raw weights. The diffusers copy (google/ddpm-cifar10-32) is "
        "another layout, not read here."
    )
    example = "advpure import-weights ddpm model-790000.ckpt artifacts/cifar10/ddpm.pt"
    kind = "ddpm"
    read = staticmethod(read_ddpm_checkpoint)
    configs = DDPM_CONFIGS
    default_config = "ddpm_cifar10"


@register_net_kind("ddpm")
class DDPMKind(EpsKind):
    """Ho et al.'s DDPM U-Net, eps(u, t) on the 1000-step linear chain (GDMP's CIFAR-10 net)."""

    Config = DdpmConfig
    label = "Ho et al. DDPM"
    importers = {"ddpm": DDPMImport}

    @classmethod
    def check(cls, block) -> None:
        from advpure.core.errors import ConfigError

        cls.check_lists(block, ("ch_mult", "attn_resolutions"), empty_ok=("attn_resolutions",))
        if block.beta_start > block.beta_end or block.beta_end >= 1:
            raise ConfigError(
                f"ddpm: need 0 < beta_start <= beta_end < 1, got {block.beta_start}, {block.beta_end}"
            )

    @classmethod
    def arch(cls, block, spec) -> dict:
        check_levels(cls.name, spec.image_size, len(block.ch_mult))
        return {
            "family": "ddpm",
            "in_channels": spec.channels,
            "image_size": spec.image_size,
            "ch": block.ch,
            "ch_mult": list(block.ch_mult),
            "num_res_blocks": block.num_res_blocks,
            "attn_resolutions": list(block.attn_resolutions),
            "dropout": block.dropout,
            "out_ch": None,
            "steps": block.steps,
            "beta_start": block.beta_start,
            "beta_end": block.beta_end,
        }

    @classmethod
    def is_official(cls, block) -> bool:
        """The block's architecture and chain are the published CIFAR-10 net's."""
        ref = DDPM_CONFIGS["ddpm_cifar10"]
        keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")
        same = all(plain_arch({k: block[k]}) == plain_arch({k: ref[k]}) for k in keys)
        return (
            same
            and block.dropout == 0.1
            and (block.steps, block.beta_start, block.beta_end) == (1000, 1e-4, 0.02)
        )

    @classmethod
    def how_to_get(cls, block, path, data_name: str, experiment: str) -> str:
        if data_name == "cifar10" and cls.is_official(block):
            return (
                f"{path}: import Ho et al.'s CIFAR-10 weights as converted by pesser/pytorch_diffusion "
                f"(ema_diffusion_cifar10_model/model-790000.ckpt, {PYTORCH_DIFFUSION_EMA_CIFAR10}) with "
                f"`advpure import-weights ddpm model-790000.ckpt {path}`, or train it "
                f"(`make train EXP={experiment} ARGS='train.stages=[ddpm]'`, GPU-days)"
            )
        return f"{path}: train it with `make train EXP={experiment} ARGS='train.stages=[ddpm]'`"

    @classmethod
    def train(cls, block, ctx) -> dict:
        """Ho et al.'s L_simple (`advpure.kinds.diffusion_common.train_eps_kind`); exports the EMA weights."""
        return train_eps_kind(cls, block, ctx)


__all__ = [
    "DDPMImport",
    "DDPMKind",
    "DdpmConfig",
    "PYTORCH_DIFFUSION_EMA_CIFAR10",
    "PYTORCH_DIFFUSION_FOLDER",
]
