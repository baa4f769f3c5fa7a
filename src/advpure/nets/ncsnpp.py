"""score_sde's NCSN++ network as configured for DDPM++ (Song et al., "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021), the continuous VP model DiffPure (Nie et al. 2022) purifies with.

Module tree, state-dict keys, parameter order and forward are those of yang-song/score_sde_pytorch
``models/ncsnpp.py`` (class ``NCSNpp``), ``models/layerspp.py`` (``ResnetBlockBigGANpp``, ``AttnBlockpp``),
``models/layers.py`` (``NIN``, ``get_timestep_embedding``, ``default_init``) and
``models/up_or_down_sampling.py`` (``naive_upsample_2d`` / ``naive_downsample_2d``), restricted to the branch
that ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` selects: BigGAN residual blocks (which also do the
up/down-sampling, so ``resamp_with_conv`` builds nothing), ``fir`` off (no ``upfirdn2d``), ``skip_rescale``
(every residual sum divided by sqrt 2), no progressive input/output paths, DDPM attention, a positional
(sinusoidal) time embedding followed by two dense layers (``conditional``), GroupNorm (min(C // 4, 32) groups,
eps 1e-6) and swish, centered data (the net takes u in [-1, 1]), output not divided by sigma.

The official modules form one ``nn.ModuleList`` ``all_modules`` (keys ``all_modules.{i}.<name>``):
  0, 1   Linear nf -> 4 nf, Linear 4 nf -> 4 nf    (time embedding MLP, swish between)
  2      conv3x3 in_channels -> nf
  down   per level: num_res_blocks x [ResBlock (+ AttnBlock at attention resolutions)], then (except at the
         last level) a ResBlock(down=True)
  mid    ResBlock, AttnBlock, ResBlock
  up     per level (reversed): (num_res_blocks + 1) x ResBlock on [h, skip] (+ one AttnBlock after them at
         attention resolutions), then (except at level 0) a ResBlock(up=True)
  end    GroupNorm, conv3x3 nf -> in_channels
ResBlock (``ResnetBlockBigGANpp``): GroupNorm_0, Conv_0, Dense_0 (4 nf -> out), GroupNorm_1, Dropout_0, Conv_1,
Conv_2 (1x1 shortcut, when the width changes or the block resamples). AttnBlock (``AttnBlockpp``): GroupNorm_0
and four ``NIN`` (1x1 linear maps with parameters ``W`` (in, out) and ``b``).

The official net also registers a buffer ``sigmas`` (1000 geometric VE noise levels 50 -> 0.01 from
``utils.get_sigmas``); the VP configuration never uses it (``scale_by_sigma`` is False), so this net does not
carry it: the importer (`advpure.importers.score_sde`) checks it and records it in the weights' meta.

Time: the net's label is 999 t (``get_score_fn`` for continuous VP models) on the VP SDE with beta(t) from
0.1 to 20 (`advpure.nets.schedules.VPSchedule`); its output is eps (``losses.py``: ``score * std + z``).
The official DDPM++ deep configuration (CIFAR-10, 32x32): 106,632,579 parameters in 956 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advpure.nets.diffusion import DiffusionNet, timestep_embedding
from advpure.nets.schedules import VPSchedule

__all__ = ["NCSNPP_CONFIGS", "NIN", "AttnBlockpp", "ResnetBlockBigGANpp", "NCSNpp", "build_ncsnpp"]

NCSNPP_CONFIGS: dict[str, dict] = {
    # configs/vp/cifar10_ddpmpp_deep_continuous.py + configs/default_cifar10_configs.py (DiffPure's CIFAR-10 net)
    "ddpmpp_deep_cifar10": dict(
        in_channels=3, image_size=32, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,)
    ),
    # the same code at 28x28 (MNIST / Fashion-MNIST): 28 -> 14 -> 7, attention at 14x14
    "ddpmpp_28": dict(
        in_channels=1, image_size=28, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,)
    ),
}


def default_init_(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """score_sde's ``default_init`` (DDPM's TF initializer): variance scaling, fan_avg, uniform, in place.
    fan_in / fan_out are dims 1 / 0 times the receptive field; scale 0 means 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    receptive = w[0, 0].numel() if w.ndim > 2 else 1
    fan_avg = (w.shape[0] + w.shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return w.uniform_(-bound, bound)


def _conv(cin: int, cout: int, k: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(cin: int, cout: int) -> nn.Linear:
    lin = nn.Linear(cin, cout)
    default_init_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)


class NIN(nn.Module):
    """score_sde's ``NIN``: a 1x1 linear map y[b, d, h, w] = sum_c x[b, c, h, w] W[c, d] + b[d].
    Parameters ``W`` (in_dim, num_units) -- note: not transposed like a conv weight -- and ``b``."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[:, None, None]


class AttnBlockpp(nn.Module):
    """Single-head spatial self-attention (DDPM's attention block as in score_sde ``AttnBlockpp``):
    h = GroupNorm(x); q, k, v = NIN_0..2(h); A = softmax_j(q_i . k_j / sqrt(C)); out = x + NIN_3(A v),
    divided by sqrt 2 when `skip_rescale`. Input and output (N, C, H, W)."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (m(h).reshape(n, c, hh * ww) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        h = self.NIN_3(torch.einsum("bij,bcj->bci", attn, v).reshape(n, c, hh, ww))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """score_sde's ``ResnetBlockBigGANpp`` with fir off. x (N, in_ch, H, W), temb (N, temb_dim) ->
    (N, out_ch, H', W') with H' = 2H (up), H / 2 (down) or H:

        h = swish(GN_0(x)); resample h and x (nearest x2 up / 2x2 mean down); h = Conv_0(h) + Dense_0(swish(temb));
        h = Conv_1(Dropout(swish(GN_1(h)))); x = Conv_2(x) (1x1) if the width changes or it resamples;
        out = (x + h) / sqrt 2  (skip_rescale).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up, self.down = up, down
        self.Conv_0 = _conv(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = _conv(in_ch, out_ch, k=1)
        self.skip_rescale = skip_rescale
        self.in_ch, self.out_ch = in_ch, out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class NCSNpp(DiffusionNet):
    """NCSN++ in the DDPM++ continuous-VP configuration (see the module docstring for the layout and keys).

    forward(u, t) -> eps (R, in_channels, image_size, image_size) for u in [-1, 1] and t (R,) in [0, 1];
    ``net_forward(u, label)`` is the official ``NCSNpp.forward(x, time_cond)`` with label = 999 t.
    Defaults are DiffPure's CIFAR-10 model (``NCSNPP_CONFIGS["ddpmpp_deep_cifar10"]``). Input height and
    width must equal `image_size` (attention placement is fixed by it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        skip_rescale: bool = True,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
    ):
        super().__init__()
        n_levels = len(ch_mult)
        if image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size {image_size} cannot be halved {n_levels - 1} times")
        self.in_channels, self.image_size, self.nf = int(in_channels), int(image_size), int(nf)
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            nf=nf,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            skip_rescale=skip_rescale,
            beta_min=beta_min,
            beta_max=beta_max,
        )
        self.schedule = VPSchedule(beta_min, beta_max)
        temb_dim = 4 * nf

        def res(cin, cout=None, **kw):
            return ResnetBlockBigGANpp(cin, cout, temb_dim, dropout=dropout, skip_rescale=skip_rescale, **kw)

        mods: list[nn.Module] = [_dense(nf, temb_dim), _dense(temb_dim, temb_dim), _conv(in_channels, nf)]
        # the execution plan: indices into all_modules, so forward needs no running counter
        self._down: list[tuple[list[tuple[int, int | None]], int | None]] = []
        skips = [nf]
        ch = nf
        for level, mult in enumerate(ch_mult):
            size = image_size >> level
            blocks = []
            for _ in range(num_res_blocks):
                mods.append(res(ch, nf * mult))
                ch = nf * mult
                attn = None
                if size in attn_resolutions:
                    mods.append(AttnBlockpp(ch, skip_rescale))
                    attn = len(mods) - 1
                blocks.append((len(mods) - 1 - (attn is not None), attn))
                skips.append(ch)
            down = None
            if level != n_levels - 1:
                mods.append(res(ch, down=True))
                down = len(mods) - 1
                skips.append(ch)
            self._down.append((blocks, down))
        mods += [res(ch), AttnBlockpp(ch, skip_rescale), res(ch)]
        self._mid = (len(mods) - 3, len(mods) - 2, len(mods) - 1)
        self._up: list[tuple[list[int], int | None, int | None]] = []
        for level in reversed(range(n_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                mods.append(res(ch + skips.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                blocks.append(len(mods) - 1)
            attn = None
            if (image_size >> level) in attn_resolutions:
                mods.append(AttnBlockpp(ch, skip_rescale))
                attn = len(mods) - 1
            up = None
            if level != 0:
                mods.append(res(ch, up=True))
                up = len(mods) - 1
            self._up.append((blocks, attn, up))
        assert not skips
        mods += [_group_norm(ch), _conv(ch, in_channels, init_scale=0.0)]
        self.all_modules = nn.ModuleList(mods)

    def net_forward(self, u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The official forward: u (R, C, H, W) in [-1, 1], label (R,) = 999 t -> eps (R, C, H, W)."""
        m = self.all_modules
        temb = timestep_embedding(label, self.nf, style="ddpm").to(u.dtype)
        temb = m[1](F.silu(m[0](temb)))
        hs = [m[2](u)]
        for blocks, down in self._down:
            for r, a in blocks:
                h = m[r](hs[-1], temb)
                hs.append(m[a](h) if a is not None else h)
            if down is not None:
                hs.append(m[down](hs[-1], temb))
        r1, a, r2 = self._mid
        h = m[r2](m[a](m[r1](hs[-1], temb)), temb)
        for blocks, attn, up in self._up:
            for r in blocks:
                h = m[r](torch.cat([h, hs.pop()], dim=1), temb)
            if attn is not None:
                h = m[attn](h)
            if up is not None:
                h = m[up](h, temb)
        return m[-1](F.silu(m[-2](h)))


def build_ncsnpp(name_or_config: str | dict) -> NCSNpp:
    """An `NCSNpp` from a name in `NCSNPP_CONFIGS` or a dict of its constructor arguments."""
    config = NCSNPP_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    return NCSNpp(**config)
