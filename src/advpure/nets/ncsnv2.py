"""NCSNv2-style unconditional RefineNet score network (Song & Ermon 2020), written from the paper.

The network f_theta takes images x in [0, 1], maps them to [-1, 1] (2x - 1) at the start, and returns a
tensor of the input's shape. The output is NOT divided by sigma: ADP uses the raw output
f_theta(x_tilde) ~ -eps, trained by denoising score matching 1/2 ||f_theta(x + sigma eps) + eps||^2.

Layout (C = ngf; see LAYOUTS for the per-size block counts):
  begin conv3x3 -> C
  res1: residual blocks, C,    full resolution
  res2: residual blocks, 2C,   downsample x2
  res3: residual blocks, 2C,   downsample x2, dilation 2
  res4: residual blocks, 2C,   no downsampling, dilation 4
  refine1(res4) -> refine2(res3, .) -> refine3(res2, .) -> refine4(res1, .)   (RefineNet cascade)
  InstanceNorm++ -> ELU -> conv3x3 -> in_channels
Spatial sizes: 28 -> 28, 14, 7, 7 and 32 -> 32, 16, 8, 8.

Each RefineBlock: residual conv units (RCUs, 2 convs each) per input, multi-resolution fusion (a 3x3 conv
per input, bilinear upsampling to the finest input's size, sum), chained residual pooling (5x5 max-pool
+ 3x3 conv stages), then output RCUs. Activations are ELU throughout.
32x32 (NCSNv2 CIFAR-10): 2 residual blocks per stage, 2 RCUs per input, 2 CRP stages, 1 output RCU
(3 in refine4). 28x28: the lighter layout described at LAYOUTS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advpure.errors import ConfigError

__all__ = [
    "SCORE_IMAGE_SIZES",
    "InstanceNormPlusPlus2d",
    "ResidualBlock",
    "RCUBlock",
    "CRPBlock",
    "MSFBlock",
    "RefineBlock",
    "LAYOUTS",
    "NCSNv2",
    "max_pool_5x5",
    "build_score_net",
]

SCORE_IMAGE_SIZES = (28, 32)
SCORE_ARCHS = ("ncsnv2",)


class InstanceNormPlusPlus2d(nn.Module):
    """InstanceNorm++ without noise conditioning.

    With mu_c, s_c^2 the spatial mean and (biased) variance of channel c, m = mean_c(mu_c) and
    v = var_c(mu_c) (population variance over channels):

        y_c = gamma_c * (x_c - mu_c) / sqrt(s_c^2 + eps) + beta_c + alpha_c * (mu_c - m) / sqrt(v + eps)

    The last term re-injects the channel means that instance normalization removes.
    """

    def __init__(self, channels: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.empty(channels))
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gamma, 1.0, 0.02)
        nn.init.normal_(self.alpha, 1.0, 0.02)
        if self.beta is not None:
            nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written as y = x * a + b with per-(sample, channel) a, b: one fused pass over x.
        # (torch.var_mean over the spatial dims is several times slower than these two passes on CPU.)
        mu = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        var = (x - mu).square().mean(dim=(2, 3), keepdim=True)
        m = mu.mean(dim=1, keepdim=True)
        v = (mu - m).square().mean(dim=1, keepdim=True)
        gamma = self.gamma.reshape(1, -1, 1, 1)
        a = gamma * torch.rsqrt(var + self.eps)
        b = self.alpha.reshape(1, -1, 1, 1) * (mu - m) * torch.rsqrt(v + self.eps) - a * mu
        if self.beta is not None:
            b = b + self.beta.reshape(1, -1, 1, 1)
        return torch.addcmul(b, x, a)

    def extra_repr(self) -> str:
        return f"{self.channels}, bias={self.beta is not None}, eps={self.eps}"


def _conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=1, padding=dilation, dilation=dilation, bias=bias)


class ResidualBlock(nn.Module):
    """norm -> ELU -> conv3x3 -> norm -> ELU -> conv3x3, plus a shortcut; optionally downsampling by 2.

    Downsampling: a 2x2 mean pool after the first norm -> ELU (both convs then run at the lower
    resolution), and a shortcut mean pool -> 1x1 conv (equal to NCSNv2's 1x1 conv -> mean pool, as both
    are linear). NCSNv2 pools after the second conv instead; pooling first is 4x cheaper.
    `dilation` > 1 makes both 3x3 convs dilated (padding = dilation keeps the size).
    """

    def __init__(self, cin: int, cout: int, downsample: bool = False, dilation: int = 1):
        super().__init__()
        self.downsample = downsample
        self.dilation = dilation
        self.norm1 = InstanceNormPlusPlus2d(cin)
        mid = cin if downsample else cout
        self.conv1 = _conv3x3(cin, mid, dilation)
        self.norm2 = InstanceNormPlusPlus2d(mid)
        self.conv2 = _conv3x3(mid, cout, dilation)
        self.act = nn.ELU()
        self.shortcut = nn.Conv2d(cin, cout, 1) if (cin != cout or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.norm1(x), inplace=True)
        sc = x
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            sc = F.avg_pool2d(sc, 2)
        h = self.conv2(F.elu(self.norm2(self.conv1(h)), inplace=True))
        if self.shortcut is not None:
            sc = self.shortcut(sc)
        return h.add_(sc)  # in place on the fresh conv output (saves an allocation; autograd-safe)


class RCUBlock(nn.Module):
    """Residual conv units: `n_blocks` times x <- x + (ELU -> conv3x3)^n_stages (x)."""

    def __init__(self, channels: int, n_blocks: int, n_stages: int):
        super().__init__()
        self.n_blocks, self.n_stages = n_blocks, n_stages
        self.convs = nn.ModuleList(
            _conv3x3(channels, channels, bias=False) for _ in range(n_blocks * n_stages)
        )
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            res = x
            for j in range(self.n_stages):
                x = self.convs[i * self.n_stages + j](self.act(x))
            x = x.add_(res)  # x is a fresh conv output here
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: conv3x3 each input to `features`, upsample bilinearly, sum."""

    def __init__(self, in_planes: list[int], features: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)

    def forward(self, xs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        out = None
        for conv, x in zip(self.convs, xs):
            h = conv(x)
            if tuple(h.shape[-2:]) != tuple(size):
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            out = h if out is None else out.add_(h)
        assert out is not None
        return out


class CRPBlock(nn.Module):
    """Chained residual pooling: x <- ELU(x); path <- conv3x3(maxpool5x5(path)); x <- x + path, n times."""

    def __init__(self, channels: int, n_stages: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(n_stages))
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(max_pool_5x5(path))
            x = x.add_(path)
        return x


def _max5(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over a window of 5 along `dim` (stride 1, padding 2 with -inf): 3 elementwise maxima."""
    n = x.shape[dim]
    pad = [0, 0, 2, 2] if dim == 2 else [2, 2]
    p = F.pad(x, pad, value=float("-inf"))
    m2 = torch.maximum(p.narrow(dim, 0, n + 3), p.narrow(dim, 1, n + 3))  # windows of 2
    m4 = torch.maximum(m2.narrow(dim, 0, n + 1), m2.narrow(dim, 2, n + 1))  # windows of 4
    return torch.maximum(m4.narrow(dim, 0, n), p.narrow(dim, 4, n))  # windows of 5


def max_pool_5x5(x: torch.Tensor) -> torch.Tensor:
    """Equal to ``F.max_pool2d(x, 5, stride=1, padding=2)``, computed separably (several times faster on
    CPU, notably for channels-last tensors)."""
    return _max5(_max5(x, 2), 3)


class RefineBlock(nn.Module):
    """RefineNet block: RCUs per input -> fusion at the finest input resolution -> CRP -> output RCUs."""

    def __init__(
        self,
        in_planes: list[int],
        features: int,
        adapt_blocks: int = 2,
        crp_stages: int = 2,
        out_blocks: int = 1,
    ):
        super().__init__()
        self.adapt = nn.ModuleList(RCUBlock(c, adapt_blocks, 2) for c in in_planes)
        if len(in_planes) > 1:
            self.msf: MSFBlock | None = MSFBlock(in_planes, features)
        else:
            if in_planes[0] != features:
                raise ValueError("a single-input RefineBlock keeps its channel count")
            self.msf = None
        self.crp = CRPBlock(features, crp_stages)
        self.out = RCUBlock(features, out_blocks, 2)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        hs = [rcu(x) for rcu, x in zip(self.adapt, xs)]
        if self.msf is not None:
            size = tuple(hs[0].shape[-2:])  # the largest input's size (a loop: torch.compile traces it)
            for h in hs[1:]:
                if h.shape[-2] * h.shape[-1] > size[0] * size[1]:
                    size = tuple(h.shape[-2:])
            h = self.msf(hs, size)
        else:
            h = hs[0]
        return self.out(self.crp(h))


@dataclass(frozen=True)
class _Layout:
    res_blocks: int  # residual blocks per stage
    adapt_blocks: int  # RCUs per RefineBlock input (refine1-3)
    out_blocks: int  # output RCUs of refine1-3
    crp_stages: int
    last_adapt_blocks: int  # the same three for refine4 (full resolution: the costly one)
    last_out_blocks: int
    last_crp_stages: int


# 32x32: the NCSNv2 CIFAR-10 layout (ngf=128: 28.6M parameters).
# 28x28 (MNIST / Fashion-MNIST): a lighter layout, as the small grayscale nets must be cheap enough to
# purify with on a CPU (ngf=16: 0.24M parameters): one residual block per stage, one RCU per input and
# one CRP stage in refine1-3, and refine4 (28x28, the costly resolution) reduced to fusion + one CRP stage.
LAYOUTS: dict[int, _Layout] = {
    32: _Layout(
        res_blocks=2,
        adapt_blocks=2,
        out_blocks=1,
        crp_stages=2,
        last_adapt_blocks=2,
        last_out_blocks=3,
        last_crp_stages=2,
    ),
    28: _Layout(
        res_blocks=1,
        adapt_blocks=1,
        out_blocks=1,
        crp_stages=1,
        last_adapt_blocks=0,
        last_out_blocks=0,
        last_crp_stages=1,
    ),
}


def _stage(n: int, cin: int, cout: int, downsample: bool = False, dilation: int = 1) -> nn.Sequential:
    blocks = [ResidualBlock(cin, cout, downsample=downsample, dilation=dilation)]
    blocks += [ResidualBlock(cout, cout, dilation=dilation) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class NCSNv2(nn.Module):
    """Unconditional NCSNv2 RefineNet score net.

    Input: images in [0, 1] of shape (N, in_channels, S, S), S in {28, 32}; they are mapped to [-1, 1]
    (2x - 1) first. Output: same shape, the raw f_theta(x) ~ -eps (not divided by sigma).
    Computation runs in channels-last memory format (much faster convolutions on CPU; the conv weights
    are stored channels-last as well); the output is returned contiguous (NCHW).
    """

    def __init__(self, in_channels: int, ngf: int, image_size: int):
        super().__init__()
        if image_size not in LAYOUTS:
            raise ConfigError(
                f"score net ncsnv2 takes image_size 28 or 32 (allowed: {SCORE_IMAGE_SIZES}), got {image_size}"
            )
        if in_channels < 1 or ngf < 1:
            raise ConfigError(
                f"score net ncsnv2: need in_channels >= 1 and ngf >= 1, got {in_channels}, {ngf}"
            )
        self.in_channels, self.ngf, self.image_size = in_channels, ngf, image_size
        lay = LAYOUTS[image_size]
        n = lay.res_blocks
        c, c2 = ngf, 2 * ngf
        self.begin_conv = _conv3x3(in_channels, c)
        self.res1 = _stage(n, c, c)
        self.res2 = _stage(n, c, c2, downsample=True)
        self.res3 = _stage(n, c2, c2, downsample=True, dilation=2)
        self.res4 = _stage(n, c2, c2, dilation=4)
        kw = {"adapt_blocks": lay.adapt_blocks, "crp_stages": lay.crp_stages, "out_blocks": lay.out_blocks}
        self.refine1 = RefineBlock([c2], c2, **kw)
        self.refine2 = RefineBlock([c2, c2], c2, **kw)
        self.refine3 = RefineBlock([c2, c2], c, **kw)
        self.refine4 = RefineBlock(
            [c, c],
            c,
            adapt_blocks=lay.last_adapt_blocks,
            crp_stages=lay.last_crp_stages,
            out_blocks=lay.last_out_blocks,
        )
        self.norm = InstanceNormPlusPlus2d(c)
        self.act = nn.ELU()
        self.end_conv = _conv3x3(c, in_channels)
        # conv weights in channels-last too: otherwise every call re-lays them out for the CL activations
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"NCSNv2 expects (N, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        h = (2.0 * x - 1.0).contiguous(memory_format=torch.channels_last)
        h = self.begin_conv(h)
        h1 = self.res1(h)
        h2 = self.res2(h1)
        h3 = self.res3(h2)
        h4 = self.res4(h3)
        r = self.refine1([h4])
        r = self.refine2([h3, r])
        r = self.refine3([h2, r])
        r = self.refine4([h1, r])
        return self.end_conv(F.elu(self.norm(r), inplace=True)).contiguous()


def build_score_net(arch: str, *, in_channels: int, image_size: int, ngf: int) -> nn.Module:
    """The score network f_theta named by `arch` (only "ncsnv2")."""
    if arch not in SCORE_ARCHS:
        raise ConfigError(f"score.arch={arch!r} is unknown; allowed: {', '.join(SCORE_ARCHS)}")
    return NCSNv2(in_channels=in_channels, ngf=ngf, image_size=image_size)
