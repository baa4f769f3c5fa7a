"""guided-diffusion's ADM U-Net (Dhariwal & Nichol, NeurIPS 2021), the 256x256 unconditional ImageNet model
DiffPure purifies ImageNet with: an eps-prediction net eps(u, t) on u in [-1, 1], t in [0, 1] on the T = 1000
step linear chain (`advpure.nets.adm.ADMUNet`; its learned-variance channels via ``eps_and_variance``).

Not trainable here (the published model was trained with the hybrid loss L_simple + L_vlb on 256x256 ImageNet);
importer `advpure import-weights adm` for ``256x256_diffusion_uncond.pt`` (`advpure.importers.adm`). Options:
``conf/adm/adm_imagenet256.yaml`` (the published net; its images are 256x256, so it loads with a 256x256
dataset, or from the file with `advpure.api.load_net`) and ``conf/adm/adm_28.yaml`` (the same code at 28x28).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from advpure.core.errors import ConfigError
from advpure.core.params import at_least, between
from advpure.importers.adm import read_adm_checkpoint
from advpure.kinds.diffusion_common import DiffusionImport, EpsKind, check_levels
from advpure.nets.adm import ADM_CONFIGS
from advpure.nets.registry import register_net_kind

# openai/guided-diffusion README, "Download pre-trained models" (256x256 unconditional ImageNet)
ADM_IMAGENET256_UNCOND_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
)


@dataclass
class AdmConfig:
    """guided-diffusion ``UNetModel`` as ``create_model`` builds it (defaults: 256x256_diffusion_uncond.pt with
    the flags of the guided-diffusion README / DiffPure's ``configs/imagenet.yml``)."""

    image_size: int | None = at_least(256, 1)  # null: the dataset's
    in_channels: int | None = at_least(3, 1)  # null: the dataset's
    model_channels: int = at_least(256, 1)  # num_channels
    num_res_blocks: int = at_least(2, 1)
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])  # pixel sizes, as the flag
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_heads: int = at_least(4, 1)
    num_head_channels: int = at_least(64, -1)  # -1: num_heads heads instead
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True  # 2C output channels: eps, then the learned-variance interpolation
    dropout: float = between(0.0, 0.0, 1.0)
    steps: int = at_least(1000, 1)
    beta_start: float = between(1e-4, 0.0, 1.0, strict=True)
    beta_end: float = between(0.02, 0.0, 1.0, strict=True)
    weights: str = "${paths.artifacts}/${data.name}/adm.pt"


class ADMImport(DiffusionImport):
    help = "guided-diffusion's 256x256_diffusion_uncond.pt (Dhariwal & Nichol 2021; DiffPure ImageNet) -> adm weights"
    description = (
        "Convert guided-diffusion's 256x256 unconditional ImageNet model (a plain UNetModel state dict, float32 or "
        "float16) into an advpure adm weights file (adm=adm_imagenet256). Reads it with torch.load(weights_only="
        "True); checks every key and shape (on a meta-device net: nothing allocated), finiteness and the parameter "
        "count (552,814,086); stores float32; records the file's SHA-256 and float dtypes in the weights' meta."
    )
    example = "advpure import-weights adm 256x256_diffusion_uncond.pt artifacts/imagenet/adm.pt"
    kind = "adm"
    read = staticmethod(read_adm_checkpoint)
    configs = ADM_CONFIGS
    default_config = "adm_imagenet256_uncond"


@register_net_kind("adm")
class ADMKind(EpsKind):
    """guided-diffusion ADM U-Net, eps(u, t) (and learned variances) on the 1000-step linear chain."""

    Config = AdmConfig
    label = "guided-diffusion ADM"
    importers = {"adm": ADMImport}
    resume_free = ("weights",)

    @classmethod
    def check(cls, block) -> None:
        cls.check_lists(block, ("attention_resolutions", "channel_mult"), empty_ok=("attention_resolutions",))
        if block.num_head_channels == 0:
            raise ConfigError("adm.num_head_channels: must be -1 (use num_heads) or >= 1, got 0")
        if block.beta_start > block.beta_end or block.beta_end >= 1:
            raise ConfigError(
                f"adm: need 0 < beta_start <= beta_end < 1, got {block.beta_start}, {block.beta_end}"
            )

    @classmethod
    def arch(cls, block, spec) -> dict:
        """The `ADMUNet` arguments; `attention_resolutions` (pixel sizes, guided-diffusion's flag) become the
        downsampling rates image_size // r that ``UNetModel`` takes. The image size may differ from the
        dataset's (DiffPure's ImageNet setting runs the 256x256 net on 224x224 images resized around the
        chain: `defense.resize`); ConfigError when the channels are not the dataset's."""
        size = spec.image_size if block.image_size is None else int(block.image_size)
        channels = spec.channels if block.in_channels is None else int(block.in_channels)
        if channels != spec.channels:
            raise ConfigError(
                f"adm: the block's nets take {channels}-channel images, the dataset's have {spec.channels}; "
                f"use adm=adm_28 (or set adm.in_channels to null)"
            )
        check_levels(cls.name, size, len(block.channel_mult))
        bad = [r for r in block.attention_resolutions if size % r]
        if bad:
            raise ConfigError(f"adm.attention_resolutions: {bad} do not divide the image size {size}")
        return {
            "family": "adm",
            "image_size": size,
            "in_channels": channels,
            "model_channels": block.model_channels,
            "num_res_blocks": block.num_res_blocks,
            "attention_resolutions": sorted(size // r for r in block.attention_resolutions),
            "dropout": block.dropout,
            "channel_mult": list(block.channel_mult),
            "conv_resample": True,
            "num_heads": block.num_heads,
            "num_head_channels": block.num_head_channels,
            "num_heads_upsample": -1,
            "use_scale_shift_norm": block.use_scale_shift_norm,
            "resblock_updown": block.resblock_updown,
            "learn_sigma": block.learn_sigma,
            "steps": block.steps,
            "beta_start": block.beta_start,
            "beta_end": block.beta_end,
        }

    @classmethod
    def how_to_get(cls, block, path, data_name: str, experiment: str) -> str:
        if block.image_size == 256 and block.model_channels == 256:
            return (
                f"{path}: import guided-diffusion's 256x256_diffusion_uncond.pt ({ADM_IMAGENET256_UNCOND_URL}) with "
                f"`advpure import-weights adm 256x256_diffusion_uncond.pt {path}` (not trainable here)"
            )
        return (
            f"{path}: not trainable here and no public file has this configuration; import a guided-diffusion "
            f"UNetModel state dict with `advpure import-weights adm <file> {path} --config adm_28` (or another name of advpure.nets.adm.ADM_CONFIGS)"
        )


__all__ = ["ADMImport", "ADMKind", "ADM_IMAGENET256_UNCOND_URL", "AdmConfig"]
