"""NCSNv2 unconditional RefineNet score network (Song & Ermon, "Improved Techniques for Training
Score-Based Generative Models", NeurIPS 2020).

The 32x32 net (``NCSNv2(in_channels, ngf, 32)``) is the published architecture, at every ``ngf``: module
tree, state-dict key names, tensor shapes and forward computation are those of the reference
implementation (ermongroup/ncsnv2: ``models/ncsnv2.py`` class ``NCSNv2``, ``models/layers.py``,
``models/normalization.py`` class ``InstanceNorm2dPlus``), so the published CIFAR-10 checkpoint loads into
it once DataParallel's ``module.`` prefix and the ``sigmas`` buffer are taken off
(`advpure.importers.ncsnv2`). With ngf=128 and 3 channels it has 29,694,083 parameters in 153 tensors.

The network f_theta takes images x in [0, 1], maps them to [-1, 1] (2x - 1) at the start and returns a
tensor of the input's shape. The output is NOT divided by sigma: the reference NCSNv2 returns
f_theta(x) / sigma_y for a noise label y (its ``sigmas`` buffer); ADP (Yoon, Hwang & Lee 2021) uses the
raw output f_theta(x_tilde) ~ -eps, trained by denoising score matching 1/2 ||f_theta(x + sigma eps) + eps||^2,
and so does this net (it has no labels and no ``sigmas`` buffer).

Layout of the 32x32 net (C = ngf; spatial sizes for 32x32 inputs):
  begin_conv  conv3x3 in_channels -> C                                              32x32
  res1        2 residual blocks C -> C                                             32x32
  res2        block C -> 2C with conv-then-mean-pool (ConvMeanPool), block 2C      16x16
  res3        2 residual blocks 2C, dilation 2; the first has a dilated 3x3 conv
              shortcut (the reference's resample='down' with dilation: no pooling) 16x16
  res4        the same with dilation 4                                             16x16
  refine1(res4) -> refine2(res3, .) -> refine3(res2, .) -> refine4(res1, .)         16, 16, 16, 32
  normalizer (InstanceNorm++) -> ELU -> end_conv conv3x3 C -> in_channels          32x32
Residual block: InstanceNorm++ -> ELU -> conv3x3 -> InstanceNorm++ -> ELU -> conv3x3, plus the shortcut.
RefineBlock: 2 residual conv units (RCUs, 2 bias-free convs each) per input, multi-resolution fusion
(a 3x3 conv per input, bilinear upsampling with align_corners=True to the first input's size, sum),
chained residual pooling (2 stages of 5x5 max-pool -> bias-free conv3x3), output RCUs (1; 3 in refine4).
Activations are ELU throughout.

28x28 (MNIST / Fashion-MNIST, the embedded default) is a lighter layout of the same modules and key
names, a departure from the reference (see LAYOUTS[28]): one residual block per stage, res3 halves the
resolution (28, 14, 7, 7), pooling happens before the first conv of a downsampling block (4x cheaper),
and the refine blocks have fewer RCU / CRP stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advpure.core.errors import ConfigError

__all__ = [
    "SCORE_IMAGE_SIZES",
    "make_score_net",
    "InstanceNormPlusPlus2d",
    "ConvMeanPool",
    "MeanPoolConv",
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
    """InstanceNorm++ without noise conditioning (NCSN, Song & Ermon 2019; reference ``InstanceNorm2dPlus``).

    Input and output (N, C, H, W). With mu_c, s_c^2 the spatial mean and biased variance of channel c,
    m the mean of the C channel means and v their unbiased variance (denominator C - 1; 0 when C = 1):

        y_c = gamma_c * ( (x_c - mu_c) / sqrt(s_c^2 + eps) + alpha_c * (mu_c - m) / sqrt(v + eps) ) + beta_c

    as the reference code computes it (gamma also scales the alpha term, which the NCSN paper's formula
    writes outside). The alpha term re-injects the channel means that instance normalization removes.
    Parameters ``alpha``, ``gamma`` (init N(1, 0.02)) and ``beta`` (init 0; absent if bias=False), in
    the reference's order.
    """

    def __init__(self, channels: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.alpha = nn.Parameter(torch.empty(channels))
        self.gamma = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.alpha, 1.0, 0.02)
        nn.init.normal_(self.gamma, 1.0, 0.02)
        if self.beta is not None:
            nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written as y = x * a + b with per-(sample, channel) a, b: one fused pass over x.
        # (torch.var_mean over the spatial dims is several times slower than these two passes on CPU.)
        mu = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        var = (x - mu).square().mean(dim=(2, 3), keepdim=True)
        m = mu.mean(dim=1, keepdim=True)
        d = mu - m
        v = d.square().sum(dim=1, keepdim=True) / max(self.channels - 1, 1)
        gamma = self.gamma.reshape(1, -1, 1, 1)
        inv = torch.rsqrt(var + self.eps)
        a = gamma * inv
        b = gamma * (self.alpha.reshape(1, -1, 1, 1) * d * torch.rsqrt(v + self.eps) - mu * inv)
        if self.beta is not None:
            b = b + self.beta.reshape(1, -1, 1, 1)
        return torch.addcmul(b, x, a)

    def extra_repr(self) -> str:
        return f"{self.channels}, bias={self.beta is not None}, eps={self.eps}"


def _conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv, stride 1, padding = dilation (keeps the size)."""
    return nn.Conv2d(cin, cout, 3, stride=1, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """conv (kernel k, padding k // 2, bias) then 2x2 mean pooling: (N, cin, H, W) -> (N, cout, H/2, W/2).

    The reference's ``ConvMeanPool`` (its weights are ``conv.weight``, ``conv.bias``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=1, padding=kernel_size // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class MeanPoolConv(nn.Module):
    """2x2 mean pooling then conv (kernel k, padding k // 2, bias). Used by the 28x28 layout only."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=1, padding=kernel_size // 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.avg_pool2d(x, 2))


class ResidualBlock(nn.Module):
    """The reference's ``ResidualBlock`` with InstanceNorm++ and ELU. Input (N, cin, H, W).

    normalize1 -> ELU -> conv1 -> normalize2 -> ELU -> conv2, plus a shortcut (the reference's semantics):
      * resample=None: conv1 cin -> cout, conv2 cout -> cout (dilated if dilation > 1); shortcut identity
        when cin == cout, else a 1x1 conv (dilation 1) or a dilated 3x3 conv. Output (N, cout, H, W).
      * resample="down", dilation 1: conv1 cin -> cin, conv2 = ConvMeanPool cin -> cout (conv, then 2x2
        mean pool), shortcut = ConvMeanPool with a 1x1 conv. Output (N, cout, H/2, W/2).
      * resample="down", dilation > 1: conv1 cin -> cin, conv2 cin -> cout, both dilated, and a dilated 3x3
        conv (with bias) as shortcut; no pooling, as in the reference. Output (N, cout, H, W).
    ``pool_first`` (the 28x28 layout, a departure): a "down" block always halves the resolution, by mean
    pooling right after the first normalize -> ELU (both convs then run at the lower resolution) and a
    MeanPoolConv 1x1 shortcut; 4x cheaper than pooling after conv2.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        resample: str | None = None,
        dilation: int = 1,
        pool_first: bool = False,
    ):
        super().__init__()
        if resample not in (None, "down"):
            raise ValueError(f"ResidualBlock: resample must be None or 'down', got {resample!r}")
        self.cin, self.cout, self.resample, self.dilation = cin, cout, resample, dilation
        down = resample == "down"
        self.pools = down and (dilation == 1 or pool_first)
        self.pool_first = self.pools and pool_first
        mid = cin if down else cout
        # registration order = the reference's state-dict order
        self.conv1 = _conv3x3(cin, mid, dilation)
        self.normalize2 = InstanceNormPlusPlus2d(mid)
        if self.pools and not self.pool_first:
            self.conv2: nn.Module = ConvMeanPool(mid, cout, 3)
        else:
            self.conv2 = _conv3x3(mid, cout, dilation)
        self.shortcut: nn.Module | None
        if self.pools:
            self.shortcut = MeanPoolConv(cin, cout, 1) if self.pool_first else ConvMeanPool(cin, cout, 1)
        elif down or cin != cout:
            self.shortcut = _conv3x3(cin, cout, dilation) if dilation > 1 else nn.Conv2d(cin, cout, 1)
        else:
            self.shortcut = None
        self.normalize1 = InstanceNormPlusPlus2d(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.normalize1(x), inplace=True)
        if self.pool_first:
            h = F.avg_pool2d(h, 2)
        h = self.conv2(F.elu(self.normalize2(self.conv1(h)), inplace=True))
        sc = x if self.shortcut is None else self.shortcut(x)
        return h.add_(sc)  # in place on the fresh conv output (saves an allocation; autograd-safe)

    def extra_repr(self) -> str:
        return f"resample={self.resample}, dilation={self.dilation}, pools={self.pools}, pool_first={self.pool_first}"


class RCUBlock(nn.Module):
    """Residual conv units: `n_blocks` times x <- x + (ELU -> conv3x3, no bias)^n_stages (x). Shape-preserving.

    Convs are named ``{i}_{j}_conv`` (block i, stage j, from 1) as in the reference."""

    def __init__(self, channels: int, n_blocks: int, n_stages: int):
        super().__init__()
        self.n_blocks, self.n_stages = n_blocks, n_stages
        for i in range(n_blocks):
            for j in range(n_stages):
                self.add_module(f"{i + 1}_{j + 1}_conv", _conv3x3(channels, channels, bias=False))
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            res = x
            for j in range(self.n_stages):
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(self.act(x))
            x = x.add_(res)  # x is a fresh conv output here
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: conv3x3 (with bias) each input to `features`, bilinear upsampling
    (align_corners=True) to `size`, sum. Inputs (N, in_planes[i], H_i, W_i) -> (N, features, *size)."""

    def __init__(self, in_planes: list[int], features: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)

    def forward(self, xs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        out = None
        for conv, x in zip(self.convs, xs):
            h = conv(x)
            if tuple(h.shape[-2:]) != tuple(size):  # same size: bilinear with align_corners is the identity
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            out = h if out is None else out.add_(h)
        assert out is not None
        return out


class CRPBlock(nn.Module):
    """Chained residual pooling: x <- ELU(x); path <- conv3x3(maxpool5x5(path)) (no bias); x <- x + path,
    `n_stages` times. Shape-preserving."""

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
    """RefineNet block (Lin et al. 2017, as in NCSNv2): RCUs per input (``adapt_convs``) -> fusion at the
    first input's resolution (``msf``, absent with one input) -> chained residual pooling (``crp``) ->
    output RCUs (``output_convs``). Inputs: a list of (N, in_planes[i], H_i, W_i), the first the largest;
    output (N, features, H_0, W_0)."""

    def __init__(
        self,
        in_planes: list[int],
        features: int,
        adapt_blocks: int = 2,
        crp_stages: int = 2,
        out_blocks: int = 1,
    ):
        super().__init__()
        # registration order = the reference's state-dict order
        self.adapt_convs = nn.ModuleList(RCUBlock(c, adapt_blocks, 2) for c in in_planes)
        self.output_convs = RCUBlock(features, out_blocks, 2)
        if len(in_planes) > 1:
            self.msf: MSFBlock | None = MSFBlock(in_planes, features)
        else:
            if in_planes[0] != features:
                raise ValueError("a single-input RefineBlock keeps its channel count")
            self.msf = None
        self.crp = CRPBlock(features, crp_stages)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        hs = [rcu(x) for rcu, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, tuple(xs[0].shape[-2:])) if self.msf is not None else hs[0]
        return self.output_convs(self.crp(h))


@dataclass(frozen=True)
class _Layout:
    res_blocks: int  # residual blocks per stage
    adapt_blocks: int  # RCUs per RefineBlock input (refine1-3)
    out_blocks: int  # output RCUs of refine1-3
    crp_stages: int
    last_adapt_blocks: int  # the same three for refine4 (full resolution: the costly one)
    last_out_blocks: int
    last_crp_stages: int
    pool_first: bool  # "down" blocks pool before conv1 (res3 then halves the resolution too)
    res4_resample: str | None  # the first block of res4: "down" (reference: dilated 3x3 shortcut) or None


# 32x32: the reference NCSNv2 (CIFAR-10 config: ngf=128, 29,694,083 parameters).
# 28x28 (MNIST / Fashion-MNIST): a lighter layout, as the small grayscale nets must be cheap enough to
# purify with on a CPU (ngf=16: 0.24M parameters): one residual block per stage, pooling first, res3 at
# half resolution (7x7) and res4 without a shortcut conv, one RCU per input and one CRP stage in
# refine1-3, and refine4 (28x28, the costly resolution) reduced to fusion + one CRP stage.
LAYOUTS: dict[int, _Layout] = {
    32: _Layout(
        res_blocks=2,
        adapt_blocks=2,
        out_blocks=1,
        crp_stages=2,
        last_adapt_blocks=2,
        last_out_blocks=3,
        last_crp_stages=2,
        pool_first=False,
        res4_resample="down",
    ),
    28: _Layout(
        res_blocks=1,
        adapt_blocks=1,
        out_blocks=1,
        crp_stages=1,
        last_adapt_blocks=0,
        last_out_blocks=0,
        last_crp_stages=1,
        pool_first=True,
        res4_resample=None,
    ),
}


def _stage(
    n: int, cin: int, cout: int, resample: str | None = None, dilation: int = 1, pool_first: bool = False
) -> nn.Sequential:
    blocks = [ResidualBlock(cin, cout, resample=resample, dilation=dilation, pool_first=pool_first)]
    blocks += [ResidualBlock(cout, cout, dilation=dilation) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class NCSNv2(nn.Module):
    """Unconditional NCSNv2 RefineNet score net (Song & Ermon 2020).

    Input: images in [0, 1] of shape (N, in_channels, S, S), S in {28, 32}; they are mapped to [-1, 1]
    (2x - 1) first. Output: same shape, the raw f_theta(x) ~ -eps (not divided by sigma, unlike the
    reference, whose output is f_theta(x) / sigma_label).
    S = 32: the reference architecture (state-dict keys ``begin_conv.*``, ``normalizer.{alpha,gamma,beta}``,
    ``end_conv.*``, ``res{1-4}.{0,1}.*``, ``refine{1-4}.*``; no ``sigmas`` buffer). S = 28: LAYOUTS[28].
    Computation runs in channels-last memory format (much faster convolutions on CPU; the conv weights
    are stored channels-last as well); the output is returned contiguous (NCHW).

    Raises ConfigError for an unsupported image size or non-positive sizes; ValueError for an input of
    the wrong shape.
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
        n, pf = lay.res_blocks, lay.pool_first
        c, c2 = ngf, 2 * ngf
        # registration order = the reference's state-dict order
        self.begin_conv = _conv3x3(in_channels, c)
        self.normalizer = InstanceNormPlusPlus2d(c)
        self.end_conv = _conv3x3(c, in_channels)
        self.res1 = _stage(n, c, c)
        self.res2 = _stage(n, c, c2, resample="down", pool_first=pf)
        self.res3 = _stage(n, c2, c2, resample="down", dilation=2, pool_first=pf)
        self.res4 = _stage(n, c2, c2, resample=lay.res4_resample, dilation=4)
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
        return self.end_conv(F.elu(self.normalizer(r), inplace=True)).contiguous()


def build_score_net(arch: str, *, in_channels: int, image_size: int, ngf: int) -> nn.Module:
    """The score network f_theta named by `arch` (only "ncsnv2"; see NCSNv2). Raises ConfigError."""
    if arch not in SCORE_ARCHS:
        raise ConfigError(f"score.arch={arch!r} is unknown; allowed: {', '.join(SCORE_ARCHS)}")
    return NCSNv2(in_channels=in_channels, ngf=ngf, image_size=image_size)


def make_score_net(arch: dict) -> nn.Module:
    """The score network of an architecture dict (keys arch, ngf, in_channels, image_size), as stored
    in a weights file: images in [0, 1] -> f of the same shape."""
    return build_score_net(
        arch["arch"], in_channels=arch["in_channels"], image_size=arch["image_size"], ngf=arch["ngf"]
    )
