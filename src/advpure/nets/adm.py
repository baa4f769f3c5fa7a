"""guided-diffusion's ADM U-Net (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS
2021), the 256x256 unconditional ImageNet model DiffPure (Nie et al. 2022) purifies ImageNet with.

Module tree, state-dict keys and forward are those of openai/guided-diffusion ``guided_diffusion/unet.py``
(class ``UNetModel``, ``ResBlock``, ``AttentionBlock``, ``QKVAttentionLegacy``, ``Upsample``, ``Downsample``)
and ``guided_diffusion/nn.py`` (``GroupNorm32``: 32 groups, eps 1e-5; ``timestep_embedding``), without class
conditioning and with the legacy attention order (``use_new_attention_order=False``):

  time_embed.{0,2}           Linear mc -> 4 mc, SiLU, Linear 4 mc -> 4 mc (sinusoidal embedding of the step)
  input_blocks.0.0           conv3x3 in_channels -> mc
  input_blocks.{i}.0         ResBlock (+ .1 AttentionBlock where the downsampling rate is in
                             attention_resolutions); after each level but the last, a ResBlock(down=True)
                             (resblock_updown) or a Downsample (conv stride 2 / average pool)
  middle_block.{0,1,2}       ResBlock, AttentionBlock, ResBlock
  output_blocks.{i}.{0,1,2}  ResBlock on [h, skip] (+ AttentionBlock) (+ ResBlock(up=True) / Upsample ending a
                             level)
  out.{0,2}                  GroupNorm, SiLU, conv3x3 mc * channel_mult[0] -> out_channels
ResBlock: in_layers (GroupNorm .0, SiLU, conv3x3 .2), emb_layers (SiLU, Linear .1 -> 2 out with scale-shift
norm), out_layers (GroupNorm .0, SiLU, Dropout, conv3x3 .3), skip_connection (1x1 conv when the width changes);
with up/down the input is resampled (nearest x2 / 2x2 average) after in_layers' SiLU, before its conv.
AttentionBlock: norm, qkv (Conv1d C -> 3C), proj_out (Conv1d C -> C); heads of num_head_channels channels.

The published ``256x256_diffusion_uncond.pt`` (``create_model`` with image_size 256, num_channels 256,
num_res_blocks 2, attention_resolutions "32,16,8" (rates 8, 16, 32), num_head_channels 64, channel_mult
(1, 1, 2, 2, 4, 4), resblock_updown, use_scale_shift_norm, learn_sigma (6 output channels), dropout 0):
552,814,086 parameters. The original runs the torso in float16 (``convert_to_fp16``); this net runs in the
parameters' dtype (float32 here). Its GroupNorm and softmax upcast float16 / bfloat16 inputs to float32 as
the original does.

Time: the net takes the step index i (0 .. 999) of the linear-beta chain (beta 1e-4 -> 0.02, T = 1000),
t = (i + 1) / T. Output channels [0, C) are eps, [C, 2C) the learned-variance interpolation v in [-1, 1]
(``LEARNED_RANGE``): forward(u, t) returns eps only; `ADMUNet.eps_and_variance` returns both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpure.nets.diffusion import DiffusionNet, time_batch, timestep_embedding
from advpure.nets.schedules import DiscreteSchedule

__all__ = ["ADM_CONFIGS", "GroupNorm32", "ADMResBlock", "ADMAttentionBlock", "ADMUNet", "build_adm"]

ADM_CONFIGS: dict[str, dict] = {
    # guided-diffusion 256x256_diffusion_uncond.pt as DiffPure's configs/imagenet.yml creates it
    "adm_imagenet256_uncond": dict(
        image_size=256,
        in_channels=3,
        model_channels=256,
        num_res_blocks=2,
        attention_resolutions=(8, 16, 32),
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_head_channels=64,
        learn_sigma=True,
    ),
    # the same code at 28x28 (MNIST / Fashion-MNIST): 28 -> 14 -> 7, attention at 14x14 (rate 2)
    "adm_28": dict(
        image_size=28,
        in_channels=1,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        learn_sigma=True,
    ),
}

_HALF = (torch.float16, torch.bfloat16)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups (eps 1e-5) computed in float32 for half-precision inputs."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype) if x.dtype in _HALF else super().forward(x)


class _Resample(nn.Module):
    """Nearest x2 upsampling or 2x2 average pooling, with an optional conv (the official Upsample /
    Downsample; parameter key ``conv`` (up) or ``op`` (down, the conv itself))."""

    def __init__(self, channels: int, use_conv: bool, up: bool):
        super().__init__()
        self.up, self.use_conv = up, use_conv
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2)


class ADMResBlock(nn.Module):
    """x (N, C, H, W), emb (N, E) -> (N, out, H', W'). h = in_conv(resample(SiLU(GN(x)))); with scale-shift
    norm: (scale, shift) = emb_layers(emb), h = out_conv(Dropout(SiLU(GN(h) (1 + scale) + shift))); otherwise
    h = out_layers(h + emb_layers(emb)); out = skip(resample(x)) + h."""

    def __init__(
        self, channels, emb_channels, dropout, out_channels=None, scale_shift=True, up=False, down=False
    ):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.updown = up or down
        if self.updown:
            self.h_upd = _Resample(channels, False, up)
            self.x_upd = _Resample(channels, False, up)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)
        self.scale_shift = scale_shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class ADMAttentionBlock(nn.Module):
    """Multi-head self-attention over the H W positions, legacy head order: qkv (N, 3C, T) is split into
    heads first, each head's rows being [q, k, v] of ch = C / heads channels; weights softmax_s(q_t . k_s / sqrt(ch))
    (q and k each scaled by ch^(-1/4)); out = x + proj_out(heads of sum_s w_ts v_s). (N, C, H, W) in and out."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels {num_head_channels}"
                )
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)
        qkv = self.qkv(self.norm(x))
        length, ch = qkv.shape[-1], c // self.num_heads
        q, k, v = qkv.reshape(n * self.num_heads, 3 * ch, length).split(ch, dim=1)
        s = ch**-0.25
        w = torch.einsum("bct,bcs->bts", q * s, k * s)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype) if w.dtype in _HALF else torch.softmax(w, dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(n, c, length)
        return (x + self.proj_out(a)).reshape(n, c, *spatial)


class _Seq(nn.Sequential):
    """The official TimestepEmbedSequential: passes the embedding to the ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            x = m(x, emb) if isinstance(m, ADMResBlock) else m(x)
        return x


class ADMUNet(DiffusionNet):
    """guided-diffusion's UNetModel, unconditional (see the module docstring for the layout and keys).

    forward(u, t) -> eps (R, in_channels, H, W) for u in [-1, 1] and t (R,) in [0, 1]; ``net_forward(u, label)``
    is the official ``UNetModel.forward(x, timesteps)`` (all out_channels). `attention_resolutions` are
    downsampling rates as in ``UNetModel`` (``create_model`` turns "32,16,8" at 256 into 8, 16, 32).
    Defaults are the 256x256 unconditional ImageNet model (``ADM_CONFIGS["adm_imagenet256_uncond"]``).
    """

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 256,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 16, 32),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        conv_resample: bool = True,
        num_heads: int = 4,
        num_head_channels: int = 64,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        learn_sigma: bool = True,
        steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["attention_resolutions"] = tuple(attention_resolutions)
        self.config["channel_mult"] = tuple(channel_mult)
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.model_channels, self.learn_sigma = int(model_channels), bool(learn_sigma)
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.schedule = DiscreteSchedule(steps, beta_start, beta_end)
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))

        def res(cin, cout=None, **kw):
            return ADMResBlock(cin, emb, dropout, cout, use_scale_shift_norm, **kw)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(ADMAttentionBlock(ch, num_heads, num_head_channels))
                self.input_blocks.append(_Seq(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else _Resample(ch, conv_resample, up=False)
                self.input_blocks.append(_Seq(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = _Seq(res(ch), ADMAttentionBlock(ch, num_heads, num_head_channels), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(ADMAttentionBlock(ch, heads_up, num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else _Resample(ch, conv_resample, up=True)
                    )
                    ds //= 2
                self.output_blocks.append(_Seq(*layers))
        assert not skips
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, self.out_channels, 3, padding=1)
        )
        self._zero_init()

    def _zero_init(self) -> None:
        """guided-diffusion's ``zero_module``: the last conv of every ResBlock, every attention's proj_out and
        the output conv start at zero."""
        zero = [self.out[2]]
        for m in self.modules():
            if isinstance(m, ADMResBlock):
                zero.append(m.out_layers[3])
            elif isinstance(m, ADMAttentionBlock):
                zero.append(m.proj_out)
        with torch.no_grad():
            for m in zero:
                for p in m.parameters():
                    p.zero_()

    def net_forward(self, u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The official forward: u (R, C, H, W) in [-1, 1], label (R,) = step index -> (R, out_channels, H, W)."""
        emb = self.time_embed(timestep_embedding(label, self.model_channels, style="adm").to(u.dtype))
        hs, h = [], u
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.in_channels
        return (out[:, :c], out[:, c:]) if self.learn_sigma else (out, None)

    def eps_and_variance(self, u: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v): eps (R, C, H, W) and the learned-variance channels v (R, C, H, W) in the net's [-1, 1]
        interpolation units (None without learn_sigma); see `learned_log_variance`."""
        return self.split_output(self.output(u, t))

    def learned_log_variance(self, v: torch.Tensor, t) -> torch.Tensor:
        """log Sigma_theta of the reverse step at t from v (guided-diffusion ``gaussian_diffusion.py``,
        ``LEARNED_RANGE``, Nichol & Dhariwal 2021 Eq. 15): with frac = (v + 1) / 2,
        log Sigma = frac log beta_i + (1 - frac) log beta~_i, beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
        (its value at i = 1 standing in for i = 0, the clipped log). v (R, C, H, W), t (R,) -> (R, C, H, W)."""
        sch = self.schedule
        i = sch.index(time_batch(t, v.shape[0], v).double())
        ab = sch.alpha_bars
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post = sch.betas * (1 - ab_prev) / (1 - ab)
        post_log = torch.log(torch.cat([post[1:2], post[1:]]))
        lo, hi = post_log[i].to(v), torch.log(sch.betas)[i].to(v)
        frac = (v + 1) / 2
        return frac * hi[:, None, None, None] + (1 - frac) * lo[:, None, None, None]


def build_adm(name_or_config: str | dict) -> ADMUNet:
    """An `ADMUNet` from a name in `ADM_CONFIGS` or a dict of its constructor arguments."""
    config = ADM_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    return ADMUNet(**config)
