"""Independent functional reference for guided-diffusion's ADM U-Net (openai/guided-diffusion
guided_diffusion/unet.py ``UNetModel``, nn.py ``timestep_embedding`` / ``GroupNorm32``, script_util.py
``create_model``), in the style of `helpers.reference_diffusion` (whose primitives it shares): `adm_unet_args`
(create_model's argument mapping), `adm_shapes` (the state dict's keys and shapes in registration order) and
`adm_forward` (UNetModel.forward on a state dict with plain functional ops, in the input's dtype)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers.reference_diffusion import _conv_f, _cv, _gn, _gn_f, _lin, _lin_f

ADM_256_UNCOND = dict(  # create_model(...) as DiffPure's configs/imagenet.yml calls it
    image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
    attention_resolutions="32,16,8", num_heads=4, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip

# advpure's 28x28 configurations (ddpmpp_28, ddpm_28, adm_28), stated in each official code base's terms


def _emb_cos_sin(t, dim):
    """guided-diffusion timestep_embedding: [cos, sin] with frequencies 10000^(-k / half)."""
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=t.dtype) / half)
    a = t[:, None] * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


# --- guided-diffusion ADM (UNetModel) ----------------------------------------------------------------------------


def adm_unet_args(c: dict) -> dict:
    """script_util.create_model's mapping to UNetModel arguments (channel_mult by image size, attention
    resolutions -> downsampling rates, out_channels 6 with learn_sigma)."""
    mult = c["channel_mult"]
    if mult == "":
        mult = {
            512: (0.5, 1, 1, 2, 2, 4, 4),
            256: (1, 1, 2, 2, 4, 4),
            128: (1, 1, 2, 3, 4),
            64: (1, 2, 3, 4),
        }[c["image_size"]]
    elif isinstance(mult, str):
        mult = tuple(int(m) for m in mult.split(","))
    return dict(
        in_channels=c.get("in_channels", 3),
        model_channels=c["num_channels"],
        out_channels=c.get("in_channels", 3) * (2 if c["learn_sigma"] else 1),
        num_res_blocks=c["num_res_blocks"],
        attention_resolutions=tuple(c["image_size"] // int(r) for r in c["attention_resolutions"].split(",")),
        channel_mult=mult,
        num_heads=c["num_heads"],
        num_head_channels=c["num_head_channels"],
        num_heads_upsample=c["num_heads"] if c["num_heads_upsample"] == -1 else c["num_heads_upsample"],
        use_scale_shift_norm=c["use_scale_shift_norm"],
        resblock_updown=c["resblock_updown"],
    )


def _adm_plan(a: dict) -> tuple[list, list, list]:
    """input_blocks, middle_block and output_blocks as lists of layer tuples, in construction order."""
    mc = a["model_channels"]
    ch = input_ch = int(a["channel_mult"][0] * mc)
    inputs, chans, ds = [[("conv", a["in_channels"], ch)]], [ch], 1
    for level, mult in enumerate(a["channel_mult"]):
        for _ in range(a["num_res_blocks"]):
            layers = [("res", ch, int(mult * mc), None)]
            ch = int(mult * mc)
            if ds in a["attention_resolutions"]:
                layers.append(("attn", ch))
            inputs.append(layers)
            chans.append(ch)
        if level != len(a["channel_mult"]) - 1:
            assert a["resblock_updown"]  # the configurations here resample with ResBlocks
            inputs.append([("res", ch, ch, "down")])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch), ("res", ch, ch, None)]
    outputs = []
    for level, mult in list(enumerate(a["channel_mult"]))[::-1]:
        for i in range(a["num_res_blocks"] + 1):
            layers = [("res", ch + chans.pop(), int(mc * mult), None)]
            ch = int(mc * mult)
            if ds in a["attention_resolutions"]:
                layers.append(("attn", ch))
            if level and i == a["num_res_blocks"]:
                layers.append(("res", ch, ch, "up"))
                ds //= 2
            outputs.append(layers)
    assert ch == input_ch
    return inputs, middle, outputs


def _adm_layer_shapes(s, p, layer, emb, scale_shift):
    if layer[0] == "conv":
        _cv(s, p, layer[1], layer[2])
    elif layer[0] == "attn":
        c = layer[1]
        _gn(s, p + ".norm", c)
        s[f"{p}.qkv.weight"], s[f"{p}.qkv.bias"] = (3 * c, c, 1), (3 * c,)
        s[f"{p}.proj_out.weight"], s[f"{p}.proj_out.bias"] = (c, c, 1), (c,)
    else:
        _, cin, cout, _ = layer
        _gn(s, p + ".in_layers.0", cin)
        _cv(s, p + ".in_layers.2", cin, cout)
        _lin(s, p + ".emb_layers.1", emb, 2 * cout if scale_shift else cout)
        _gn(s, p + ".out_layers.0", cout)
        _cv(s, p + ".out_layers.3", cout, cout)
        if cin != cout:
            _cv(s, p + ".skip_connection", cin, cout, k=1)


def adm_shapes(cfg: dict) -> dict[str, tuple]:
    """UNetModel's state dict (key -> shape) for create_model arguments `cfg` (see `adm_unet_args`)."""
    a = adm_unet_args(cfg)
    mc, emb, ss = a["model_channels"], 4 * a["model_channels"], a["use_scale_shift_norm"]
    s: dict[str, tuple] = {}
    _lin(s, "time_embed.0", mc, emb)
    _lin(s, "time_embed.2", emb, emb)
    inputs, middle, outputs = _adm_plan(a)
    for i, layers in enumerate(inputs):
        for j, layer in enumerate(layers):
            _adm_layer_shapes(s, f"input_blocks.{i}.{j}", layer, emb, ss)
    for j, layer in enumerate(middle):
        _adm_layer_shapes(s, f"middle_block.{j}", layer, emb, ss)
    for i, layers in enumerate(outputs):
        for j, layer in enumerate(layers):
            _adm_layer_shapes(s, f"output_blocks.{i}.{j}", layer, emb, ss)
    c0 = int(a["channel_mult"][0] * mc)
    _gn(s, "out.0", c0)
    _cv(s, "out.2", c0, a["out_channels"])
    return s


def _adm_layer_f(h, emb, sd, p, layer, a):
    if layer[0] == "conv":
        return _conv_f(h, sd, p, padding=1)
    if layer[0] == "attn":
        b, c, hh, ww = h.shape
        x = h.reshape(b, c, hh * ww)
        qkv = F.conv1d(
            F.group_norm(x, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-5),
            sd[p + ".qkv.weight"],
            sd[p + ".qkv.bias"],
        )
        heads = c // a["num_head_channels"] if a["num_head_channels"] != -1 else a["num_heads"]
        ch = c // heads
        q, k, v = qkv.reshape(b * heads, 3 * ch, hh * ww).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        att = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, hh * ww)
        out = x + F.conv1d(att, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])
        return out.reshape(b, c, hh, ww)
    _, cin, cout, resample = layer
    x = h
    h = F.silu(_gn_f(x, sd, p + ".in_layers.0", 32, 1e-5))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
    elif resample == "up":
        h, x = (
            F.interpolate(h, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="nearest"),
        )
    h = _conv_f(h, sd, p + ".in_layers.2", padding=1)
    e = _lin_f(F.silu(emb), sd, p + ".emb_layers.1")[:, :, None, None]
    if a["use_scale_shift_norm"]:
        scale, shift = e[:, :cout], e[:, cout:]
        h = _gn_f(h, sd, p + ".out_layers.0", 32, 1e-5) * (1 + scale) + shift
    else:
        h = _gn_f(h + e, sd, p + ".out_layers.0", 32, 1e-5)
    h = _conv_f(F.silu(h), sd, p + ".out_layers.3", padding=1)
    if cin != cout:
        x = _conv_f(x, sd, p + ".skip_connection")
    return x + h


def adm_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """UNetModel.forward(x, timesteps) (unconditional, eval, in x's dtype): all out_channels."""
    a = adm_unet_args(cfg)
    emb = _emb_cos_sin(t, a["model_channels"])
    emb = _lin_f(F.silu(_lin_f(emb, sd, "time_embed.0")), sd, "time_embed.2")
    inputs, middle, outputs = _adm_plan(a)
    hs, h = [], x
    for i, layers in enumerate(inputs):
        for j, layer in enumerate(layers):
            h = _adm_layer_f(h, emb, sd, f"input_blocks.{i}.{j}", layer, a)
        hs.append(h)
    for j, layer in enumerate(middle):
        h = _adm_layer_f(h, emb, sd, f"middle_block.{j}", layer, a)
    for i, layers in enumerate(outputs):
        h = torch.cat([h, hs.pop()], dim=1)
        for j, layer in enumerate(layers):
            h = _adm_layer_f(h, emb, sd, f"output_blocks.{i}.{j}", layer, a)
    return _conv_f(F.silu(_gn_f(h, sd, "out.0", 32, 1e-5)), sd, "out.2", padding=1)
