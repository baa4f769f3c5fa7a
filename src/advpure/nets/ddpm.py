"""Ho et al.'s DDPM U-Net ("Denoising Diffusion Probabilistic Models", NeurIPS 2020), the CIFAR-10 model GDMP
(Wang et al. 2022) purifies with.

Module tree, state-dict keys and forward are those of the PyTorch port pesser/pytorch_diffusion
``pytorch_diffusion/model.py`` (class ``Model``; the same layout as ermongroup/ddim ``models/diffusion.py``),
itself a port of hojonathanho/diffusion ``diffusion_tf/models/unet.py``, which the published converted
checkpoints (``model-790000.ckpt``) load into:

  temb.dense.{0,1}       Linear ch -> 4 ch, Linear 4 ch -> 4 ch (sinusoidal embedding of the step, swish between)
  conv_in                conv3x3 in_channels -> ch
  down.{l}.block.{b}     ResnetBlock (norm1, conv1, temb_proj, norm2, dropout, conv2, nin_shortcut if the width
                         changes); down.{l}.attn.{b} AttnBlock (norm, q, k, v, proj_out: 1x1 convs) at the
                         attention resolutions; down.{l}.downsample.conv (3x3 stride 2 after padding right/bottom
                         by 1) except at the last level
  mid.block_1, mid.attn_1, mid.block_2
  up.{l}.block.{b}       num_res_blocks + 1 ResnetBlocks on [h, skip], each followed by up.{l}.attn.{b} at the
                         attention resolutions; up.{l}.upsample.conv (nearest x2, then conv3x3) except at level 0
  norm_out, conv_out     GroupNorm(32 groups, eps 1e-6), swish, conv3x3 ch -> out_ch

Time: the net takes the integer step i (0 .. 999) of the linear-beta chain (beta 1e-4 -> 0.02, T = 1000;
`advpure.nets.schedules.DiscreteSchedule`), here t = (i + 1) / T; its output is eps.
The CIFAR-10 configuration (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16, dropout 0.1):
35,746,307 parameters in 328 tensors (``temb.dense.0.weight`` ... ``conv_out.bias``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpure.nets.diffusion import DiffusionNet, timestep_embedding
from advpure.nets.schedules import DiscreteSchedule

__all__ = ["DDPM_CONFIGS", "DDPMResnetBlock", "DDPMAttnBlock", "DDPMUNet", "build_ddpm"]

DDPM_CONFIGS: dict[str, dict] = {
    # pytorch_diffusion's "cifar10" config (Ho et al. 2020, App. B); GDMP's CIFAR-10 model
    "ddpm_cifar10": dict(
        in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)
    ),
    # the same code at 28x28 (MNIST / Fashion-MNIST): 28 -> 14 -> 7, attention at 14x14
    "ddpm_28": dict(
        in_channels=1, image_size=28, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,)
    ),
}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class DDPMResnetBlock(nn.Module):
    """x (N, cin, H, W), temb (N, temb_ch) -> (N, cout, H, W):
    h = conv1(swish(norm1(x))) + temb_proj(swish(temb)); h = conv2(dropout(swish(norm2(h))));
    out = nin_shortcut(x) + h (the 1x1 shortcut only when cin != cout)."""

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class DDPMAttnBlock(nn.Module):
    """Single-head spatial self-attention: q, k, v = 1x1 convs of norm(x);
    out = x + proj_out(sum_j softmax_j(q_i . k_j / sqrt(C)) v_j). Input and output (N, C, H, W)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(n, c, hh * ww) for m in (self.q, self.k, self.v))
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        return x + self.proj_out(torch.einsum("bij,bcj->bci", attn, v).reshape(n, c, hh, ww))


class _Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" padding of a stride-2 conv


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DDPMUNet(DiffusionNet):
    """Ho et al.'s DDPM U-Net (see the module docstring for the layout and keys).

    forward(u, t) -> eps (R, in_channels, H, W) for u in [-1, 1] and t (R,) in [0, 1];
    ``net_forward(u, label)`` is the official ``Model.forward(x, t)`` with label the step index i.
    Defaults are the CIFAR-10 model (``DDPM_CONFIGS["ddpm_cifar10"]``); `out_ch` defaults to in_channels.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        out_ch: int | None = None,
        steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__()
        n_levels = len(ch_mult)
        self.in_channels, self.image_size, self.ch = int(in_channels), int(image_size), int(ch)
        self.num_res_blocks = num_res_blocks
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            out_ch=out_ch,
            steps=steps,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self.schedule = DiscreteSchedule(steps, beta_start, beta_end)
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        size = image_size
        self.down = nn.ModuleList()
        skips = [ch]
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            cin = ch * in_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(DDPMResnetBlock(cin, ch * mult, temb_ch, dropout))
                cin = ch * mult
                if size in attn_resolutions:
                    stage.attn.append(DDPMAttnBlock(cin))
                skips.append(cin)
            if level != n_levels - 1:
                stage.downsample = _Downsample(cin)
                size //= 2
                skips.append(cin)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = DDPMResnetBlock(cin, cin, temb_ch, dropout)
        self.mid.attn_1 = DDPMAttnBlock(cin)
        self.mid.block_2 = DDPMResnetBlock(cin, cin, temb_ch, dropout)
        ups: list[nn.Module] = []
        for level in reversed(range(n_levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(DDPMResnetBlock(cin + skips.pop(), ch * ch_mult[level], temb_ch, dropout))
                cin = ch * ch_mult[level]
                if size in attn_resolutions:
                    stage.attn.append(DDPMAttnBlock(cin))
            if level != 0:
                stage.upsample = _Upsample(cin)
                size *= 2
            ups.insert(0, stage)
        assert not skips
        self.up = nn.ModuleList(ups)  # indexed by level, as the official prepends
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_ch or in_channels, 3, padding=1)

    def net_forward(self, u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The official forward: u (R, C, H, W) in [-1, 1], label (R,) = step index -> eps (R, out_ch, H, W)."""
        temb = timestep_embedding(label, self.ch, style="ddpm").to(u.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(u)]
        for stage in self.down:
            for b, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                hs.append(stage.attn[b](h) if len(stage.attn) else h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for stage in reversed(self.up):
            for b, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn):
                    h = stage.attn[b](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_ddpm(name_or_config: str | dict) -> DDPMUNet:
    """A `DDPMUNet` from a name in `DDPM_CONFIGS` or a dict of its constructor arguments."""
    config = DDPM_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    return DDPMUNet(**config)
