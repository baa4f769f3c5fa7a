"""Independent functional references for the three diffusion net families, written from the official code's
equations (not from advpure's modules): each family has a shape listing of the official state dict (key ->
shape, in the official registration order, so also the order of ``parameters()``) and a forward pass on a
state dict with plain functional ops, following the official control flow (a running module index for NCSN++).

* score_sde NCSN++ / DDPM++ (yang-song/score_sde_pytorch models/ncsnpp.py, layerspp.py, layers.py), in the
  branch configs/vp/cifar10_ddpmpp_deep_continuous.py selects: `ddpmpp_shapes`, `ddpmpp_forward`.
* Ho et al.'s DDPM (pesser/pytorch_diffusion pytorch_diffusion/model.py ``Model``): `ddpm_shapes`, `ddpm_forward`.
* guided-diffusion ADM: in `helpers.reference_adm` (it shares this module's primitives).

Configurations use the official code's own names (score_sde ``config.model`` / ``config.data`` fields,
pytorch_diffusion ``Model`` arguments, guided-diffusion ``create_model`` arguments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# official configurations, in each code base's own terms
DDPMPP_DEEP_CIFAR10 = dict(  # configs/vp/cifar10_ddpmpp_deep_continuous.py + default_cifar10_configs.py
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), image_size=32, num_channels=3,
    sigma_max=50.0, sigma_min=0.01, num_scales=1000,
)  # fmt: skip
DDPM_CIFAR10 = dict(  # pytorch_diffusion's cifar10 Model(...)
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    in_channels=3,
    resolution=32,
)
SMALL_28 = {
    "ncsnpp": dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,), image_size=28, num_channels=1,
                   sigma_max=50.0, sigma_min=0.01, num_scales=1000),
    "ddpm": dict(ch=32, out_ch=1, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,), in_channels=1,
                 resolution=28),
    "adm": dict(image_size=28, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                learn_sigma=True, attention_resolutions="14", num_heads=4, num_head_channels=32,
                num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True),
}  # fmt: skip


def _emb_sin_cos(t, dim):
    """DDPM / score_sde get_timestep_embedding: [sin, cos] with frequencies 10000^(-k / (half - 1))."""
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=t.dtype) * -(math.log(10000) / (half - 1)))
    a = t[:, None] * f[None]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


def _lin(s, name, cin, cout):
    s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin), (cout,)


def _cv(s, name, cin, cout, k=3):
    s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)


def _gn(s, name, c):
    s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)


def _gn_f(x, sd, name, groups, eps):
    return F.group_norm(x, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _conv_f(x, sd, name, **kw):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _lin_f(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


# --- score_sde NCSN++ (DDPM++ continuous VP) ----------------------------------------------------------------


def _biggan_shapes(s, p, cin, cout, temb, resample):
    _gn(s, f"{p}GroupNorm_0", cin)
    _cv(s, f"{p}Conv_0", cin, cout)
    _lin(s, f"{p}Dense_0", temb, cout)
    _gn(s, f"{p}GroupNorm_1", cout)
    _cv(s, f"{p}Conv_1", cout, cout)
    if cin != cout or resample:
        _cv(s, f"{p}Conv_2", cin, cout, k=1)


def _attnpp_shapes(s, p, c):
    _gn(s, f"{p}GroupNorm_0", c)
    for i in range(4):
        s[f"{p}NIN_{i}.W"], s[f"{p}NIN_{i}.b"] = (c, c), (c,)


def ddpmpp_modules(cfg: dict) -> list[tuple]:
    """The official ``all_modules`` list as (kind, in_ch, out_ch, resample) in construction order."""
    nf, mult, nrb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
    res = [cfg["image_size"] // 2**i for i in range(len(mult))]
    mods = [
        ("dense", nf, 4 * nf, None),
        ("dense", 4 * nf, 4 * nf, None),
        ("conv", cfg["num_channels"], nf, None),
    ]
    hs_c, in_ch = [nf], nf
    for lvl in range(len(mult)):
        for _ in range(nrb):
            mods.append(("res", in_ch, nf * mult[lvl], None))
            in_ch = nf * mult[lvl]
            if res[lvl] in cfg["attn_resolutions"]:
                mods.append(("attn", in_ch, in_ch, None))
            hs_c.append(in_ch)
        if lvl != len(mult) - 1:
            mods.append(("res", in_ch, in_ch, "down"))
            hs_c.append(in_ch)
    mods += [("res", in_ch, in_ch, None), ("attn", in_ch, in_ch, None), ("res", in_ch, in_ch, None)]
    for lvl in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            mods.append(("res", in_ch + hs_c.pop(), nf * mult[lvl], None))
            in_ch = nf * mult[lvl]
        if res[lvl] in cfg["attn_resolutions"]:
            mods.append(("attn", in_ch, in_ch, None))
        if lvl != 0:
            mods.append(("res", in_ch, in_ch, "up"))
    mods += [("gn", in_ch, in_ch, None), ("conv", in_ch, cfg["num_channels"], None)]
    return mods


def ddpmpp_shapes(cfg: dict, with_sigmas: bool = False) -> dict[str, tuple]:
    """The official NCSNpp state dict (key -> shape); the ``sigmas`` buffer first if asked."""
    s: dict[str, tuple] = {}
    if with_sigmas:
        s["sigmas"] = (cfg["num_scales"],)
    temb = 4 * cfg["nf"]
    for i, (kind, cin, cout, resample) in enumerate(ddpmpp_modules(cfg)):
        p = f"all_modules.{i}"
        if kind == "dense":
            _lin(s, p, cin, cout)
        elif kind == "conv":
            _cv(s, p, cin, cout)
        elif kind == "gn":
            _gn(s, p, cin)
        elif kind == "res":
            _biggan_shapes(s, p + ".", cin, cout, temb, resample)
        else:
            _attnpp_shapes(s, p + ".", cin)
    return s


def _groups_pp(c):
    return min(c // 4, 32)


def _biggan_f(x, temb, sd, p, resample):
    h = F.silu(_gn_f(x, sd, p + "GroupNorm_0", _groups_pp(x.shape[1]), 1e-6))
    if resample == "up":  # naive_upsample_2d: each pixel repeated into a 2x2 block
        n, c, hh, ww = x.shape
        h = h.reshape(n, c, hh, 1, ww, 1).repeat(1, 1, 1, 2, 1, 2).reshape(n, c, 2 * hh, 2 * ww)
        x = x.reshape(n, c, hh, 1, ww, 1).repeat(1, 1, 1, 2, 1, 2).reshape(n, c, 2 * hh, 2 * ww)
    elif resample == "down":  # naive_downsample_2d: mean of 2x2 blocks
        n, c, hh, ww = x.shape
        h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).mean(dim=(3, 5))
        x = x.reshape(n, c, hh // 2, 2, ww // 2, 2).mean(dim=(3, 5))
    h = _conv_f(h, sd, p + "Conv_0", padding=1)
    h = h + _lin_f(F.silu(temb), sd, p + "Dense_0")[:, :, None, None]
    h = F.silu(_gn_f(h, sd, p + "GroupNorm_1", _groups_pp(h.shape[1]), 1e-6))
    h = _conv_f(h, sd, p + "Conv_1", padding=1)
    if f"{p}Conv_2.weight" in sd:
        x = _conv_f(x, sd, p + "Conv_2")
    return (x + h) / math.sqrt(2.0)


def _nin_f(x, sd, p):
    y = x.permute(0, 2, 3, 1) @ sd[f"{p}.W"] + sd[f"{p}.b"]
    return y.permute(0, 3, 1, 2)


def _attnpp_f(x, sd, p):
    b, c, hh, ww = x.shape
    h = _gn_f(x, sd, p + "GroupNorm_0", _groups_pp(c), 1e-6)
    q, k, v = (_nin_f(h, sd, f"{p}NIN_{i}") for i in range(3))
    w = torch.einsum("bchw,bcij->bhwij", q, k) * c**-0.5
    w = F.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
    h = _nin_f(torch.einsum("bhwij,bcij->bchw", w, v), sd, p + "NIN_3")
    return (x + h) / math.sqrt(2.0)


def ddpmpp_forward(sd: dict, x: torch.Tensor, labels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """NCSNpp.forward(x, time_cond) for centered x (N, C, H, W) in [-1, 1] and labels (N,) = 999 t."""
    mods = ddpmpp_modules(cfg)
    m = 0

    def key(i):
        return f"all_modules.{i}"

    temb = _emb_sin_cos(labels, cfg["nf"])
    temb = _lin_f(F.silu(_lin_f(temb, sd, key(0))), sd, key(1))
    m = 2
    hs = [_conv_f(x, sd, key(m), padding=1)]
    m += 1
    nlev, nrb = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    for lvl in range(nlev):
        for _ in range(nrb):
            h = _biggan_f(hs[-1], temb, sd, key(m) + ".", None)
            m += 1
            if h.shape[-1] in cfg["attn_resolutions"]:
                h = _attnpp_f(h, sd, key(m) + ".")
                m += 1
            hs.append(h)
        if lvl != nlev - 1:
            hs.append(_biggan_f(hs[-1], temb, sd, key(m) + ".", "down"))
            m += 1
    h = _biggan_f(hs[-1], temb, sd, key(m) + ".", None)
    h = _attnpp_f(h, sd, key(m + 1) + ".")
    h = _biggan_f(h, temb, sd, key(m + 2) + ".", None)
    m += 3
    for lvl in reversed(range(nlev)):
        for _ in range(nrb + 1):
            h = _biggan_f(torch.cat([h, hs.pop()], dim=1), temb, sd, key(m) + ".", None)
            m += 1
        if h.shape[-1] in cfg["attn_resolutions"]:
            h = _attnpp_f(h, sd, key(m) + ".")
            m += 1
        if lvl != 0:
            h = _biggan_f(h, temb, sd, key(m) + ".", "up")
            m += 1
    h = F.silu(_gn_f(h, sd, key(m), _groups_pp(h.shape[1]), 1e-6))
    h = _conv_f(h, sd, key(m + 1), padding=1)
    assert m + 2 == len(mods) and not hs
    return h


def vp_sigmas(cfg: dict) -> torch.Tensor:
    """models/utils.py get_sigmas: exp(linspace(log sigma_max, log sigma_min, num_scales)), float64."""
    return torch.exp(
        torch.linspace(
            math.log(cfg["sigma_max"]), math.log(cfg["sigma_min"]), cfg["num_scales"], dtype=torch.float64
        )
    )


# --- Ho et al. DDPM (pytorch_diffusion Model) ------------------------------------------------------------------


def _ddpm_res_shapes(s, p, cin, cout, temb):
    _gn(s, p + "norm1", cin)
    _cv(s, p + "conv1", cin, cout)
    _lin(s, p + "temb_proj", temb, cout)
    _gn(s, p + "norm2", cout)
    _cv(s, p + "conv2", cout, cout)
    if cin != cout:
        _cv(s, p + "nin_shortcut", cin, cout, k=1)


def _ddpm_attn_shapes(s, p, c):
    _gn(s, p + "norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _cv(s, p + n, c, c, k=1)


def ddpm_shapes(cfg: dict) -> dict[str, tuple]:
    """pytorch_diffusion Model's state dict (key -> shape) in its registration order."""
    ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    temb, in_mult, n = 4 * ch, (1, *mult), len(mult)
    s: dict[str, tuple] = {}
    _lin(s, "temb.dense.0", ch, temb)
    _lin(s, "temb.dense.1", temb, temb)
    _cv(s, "conv_in", cfg["in_channels"], ch)
    res = cfg["resolution"]
    for lvl in range(n):
        bin_, bout = ch * in_mult[lvl], ch * mult[lvl]
        blocks, attns = {}, {}
        for b in range(nrb):
            _ddpm_res_shapes(blocks, f"down.{lvl}.block.{b}.", bin_, bout, temb)
            bin_ = bout
            if res in cfg["attn_resolutions"]:
                _ddpm_attn_shapes(attns, f"down.{lvl}.attn.{b}.", bin_)
        s.update(blocks)
        s.update(attns)
        if lvl != n - 1:
            _cv(s, f"down.{lvl}.downsample.conv", bin_, bin_)
            res //= 2
    _ddpm_res_shapes(s, "mid.block_1.", bin_, bin_, temb)
    _ddpm_attn_shapes(s, "mid.attn_1.", bin_)
    _ddpm_res_shapes(s, "mid.block_2.", bin_, bin_, temb)
    ups = {}
    for lvl in reversed(range(n)):
        u: dict[str, tuple] = {}
        blocks, attns = {}, {}
        bout, skip_in = ch * mult[lvl], ch * mult[lvl]
        for b in range(nrb + 1):
            if b == nrb:
                skip_in = ch * in_mult[lvl]
            _ddpm_res_shapes(blocks, f"up.{lvl}.block.{b}.", bin_ + skip_in, bout, temb)
            bin_ = bout
            if res in cfg["attn_resolutions"]:
                _ddpm_attn_shapes(attns, f"up.{lvl}.attn.{b}.", bin_)
        u.update(blocks)
        u.update(attns)
        if lvl != 0:
            _cv(u, f"up.{lvl}.upsample.conv", bin_, bin_)
            res *= 2
        ups[lvl] = u
    for lvl in range(n):  # ModuleList.insert(0, .) keeps the keys '0', '1', ... in index order
        s.update(ups[lvl])
    _gn(s, "norm_out", bin_)
    _cv(s, "conv_out", bin_, cfg["out_ch"])
    return s


def _ddpm_res_f(x, temb, sd, p):
    h = _conv_f(F.silu(_gn_f(x, sd, p + "norm1", 32, 1e-6)), sd, p + "conv1", padding=1)
    h = h + _lin_f(F.silu(temb), sd, p + "temb_proj")[:, :, None, None]
    h = _conv_f(F.silu(_gn_f(h, sd, p + "norm2", 32, 1e-6)), sd, p + "conv2", padding=1)
    if f"{p}nin_shortcut.weight" in sd:
        x = _conv_f(x, sd, p + "nin_shortcut")
    return x + h


def _ddpm_attn_f(x, sd, p):
    b, c, hh, ww = x.shape
    h = _gn_f(x, sd, p + "norm", 32, 1e-6)
    q = _conv_f(h, sd, p + "q").reshape(b, c, hh * ww).permute(0, 2, 1)
    k = _conv_f(h, sd, p + "k").reshape(b, c, hh * ww)
    w = F.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = _conv_f(h, sd, p + "v").reshape(b, c, hh * ww)
    h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv_f(h, sd, p + "proj_out")


def ddpm_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Model.forward(x, t): x (N, C, H, W) in [-1, 1], t (N,) step indices (as floats)."""
    n, nrb = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    temb = _emb_sin_cos(t, cfg["ch"])
    temb = _lin_f(F.silu(_lin_f(temb, sd, "temb.dense.0")), sd, "temb.dense.1")
    hs = [_conv_f(x, sd, "conv_in", padding=1)]
    for lvl in range(n):
        for b in range(nrb):
            h = _ddpm_res_f(hs[-1], temb, sd, f"down.{lvl}.block.{b}.")
            if f"down.{lvl}.attn.{b}.q.weight" in sd:
                h = _ddpm_attn_f(h, sd, f"down.{lvl}.attn.{b}.")
            hs.append(h)
        if lvl != n - 1:
            hs.append(_conv_f(F.pad(hs[-1], (0, 1, 0, 1)), sd, f"down.{lvl}.downsample.conv", stride=2))
    h = _ddpm_res_f(hs[-1], temb, sd, "mid.block_1.")
    h = _ddpm_res_f(_ddpm_attn_f(h, sd, "mid.attn_1."), temb, sd, "mid.block_2.")
    for lvl in reversed(range(n)):
        for b in range(nrb + 1):
            h = _ddpm_res_f(torch.cat([h, hs.pop()], dim=1), temb, sd, f"up.{lvl}.block.{b}.")
            if f"up.{lvl}.attn.{b}.q.weight" in sd:
                h = _ddpm_attn_f(h, sd, f"up.{lvl}.attn.{b}.")
        if lvl != 0:
            h = _conv_f(
                F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"up.{lvl}.upsample.conv", padding=1
            )
    return _conv_f(F.silu(_gn_f(h, sd, "norm_out", 32, 1e-6)), sd, "conv_out", padding=1)


def random_diffusion_state(
    shapes: dict[str, tuple], seed: int, dtype=torch.float64
) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes: weights scaled by 1/sqrt(fan_in) (NIN ``W`` (in, out): by 1/sqrt(in)),
    norm gains near 1, biases ~0.1 N(0, 1). Nothing is zero, unlike the official zero-initialized layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if k.endswith(".W"):
            t = t / math.sqrt(shape[0])
        elif len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif k.endswith(".weight"):
            t = 1.0 + 0.2 * t
        else:
            t = 0.1 * t
        out[k] = t.to(dtype)
    return out
