"""Independent functional references for the imported architectures, written from the published
definitions (not from advpure's modules), used to check advpure's nets tensor for tensor.

* NCSNv2 (Song & Ermon 2020; ermongroup/ncsnv2 models/ncsnv2.py ``NCSNv2``, models/layers.py,
  models/normalization.py ``InstanceNorm2dPlus``): `ncsnv2_shapes` lists the state dict of the
  reference net (key -> shape, in the reference's order), `ncsnv2_forward` evaluates it from a state
  dict with plain functional ops in NCHW, following the reference's equations literally (mean pooling
  as the sum of four strided slices / 4, torch.var's unbiased channel variance, interpolation always).
* RobustBench WRN (robustbench/model_zoo/architectures/wide_resnet.py): `wrn_shapes`, `wrn_forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- NCSNv2 -----------------------------------------------------------------------------------------


def _conv(shapes, name, cin, cout, k=3, bias=True):
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    if bias:
        shapes[f"{name}.bias"] = (cout,)


def _norm(shapes, name, c):
    for p in ("alpha", "gamma", "beta"):
        shapes[f"{name}.{p}"] = (c,)


def _resblock(shapes, p, cin, cout, resample, dilation):
    # reference ResidualBlock.__init__ registration order: conv1, normalize2, conv2, shortcut, normalize1
    if resample == "down":
        _conv(shapes, f"{p}conv1", cin, cin)
        _norm(shapes, f"{p}normalize2", cin)
        if dilation is not None:
            _conv(shapes, f"{p}conv2", cin, cout)
            _conv(shapes, f"{p}shortcut", cin, cout)  # dilated 3x3 with bias
        else:
            _conv(shapes, f"{p}conv2.conv", cin, cout)  # ConvMeanPool
            _conv(shapes, f"{p}shortcut.conv", cin, cout, k=1)  # ConvMeanPool, kernel 1
    else:
        _conv(shapes, f"{p}conv1", cin, cout)
        _norm(shapes, f"{p}normalize2", cout)
        _conv(shapes, f"{p}conv2", cout, cout)
        assert cin == cout  # NCSNv2 never changes the width without resampling
    _norm(shapes, f"{p}normalize1", cin)


def _rcu(shapes, p, c, n_blocks, n_stages=2):
    for i in range(n_blocks):
        for j in range(n_stages):
            shapes[f"{p}{i + 1}_{j + 1}_conv.weight"] = (c, c, 3, 3)


def _refine(shapes, p, in_planes, features, start=False, end=False):
    # reference RefineBlock registration order: adapt_convs, output_convs, msf, crp
    for i, c in enumerate(in_planes):
        _rcu(shapes, f"{p}adapt_convs.{i}.", c, 2)
    _rcu(shapes, f"{p}output_convs.", features, 3 if end else 1)
    if not start:
        for i, c in enumerate(in_planes):
            _conv(shapes, f"{p}msf.convs.{i}", c, features)
    for i in range(2):
        shapes[f"{p}crp.convs.{i}.weight"] = (features, features, 3, 3)


RES_STAGES = {  # stage -> [(resample, dilation)] of its two blocks, as in the reference NCSNv2
    "res1": [(None, None), (None, None)],
    "res2": [("down", None), (None, None)],
    "res3": [("down", 2), (None, 2)],
    "res4": [("down", 4), (None, 4)],
}


def ncsnv2_shapes(ngf: int, channels: int = 3, with_sigmas: int | None = None) -> dict[str, tuple]:
    """The reference NCSNv2 state dict: key -> shape (with the 'sigmas' buffer first if asked)."""
    s: dict[str, tuple] = {}
    if with_sigmas:
        s["sigmas"] = (with_sigmas,)
    _conv(s, "begin_conv", channels, ngf)
    _norm(s, "normalizer", ngf)
    _conv(s, "end_conv", ngf, channels)
    widths = {
        "res1": (ngf, ngf),
        "res2": (ngf, 2 * ngf),
        "res3": (2 * ngf, 2 * ngf),
        "res4": (2 * ngf, 2 * ngf),
    }
    for stage, blocks in RES_STAGES.items():
        cin, cout = widths[stage]
        for i, (resample, dil) in enumerate(blocks):
            _resblock(s, f"{stage}.{i}.", cin if i == 0 else cout, cout, resample, dil)
    c, c2 = ngf, 2 * ngf
    _refine(s, "refine1.", [c2], c2, start=True)
    _refine(s, "refine2.", [c2, c2], c2)
    _refine(s, "refine3.", [c2, c2], c)
    _refine(s, "refine4.", [c, c], c, end=True)
    return s


def _in_plus(x, sd, p, eps=1e-5):
    means = torch.mean(x, dim=(2, 3))
    m = torch.mean(means, dim=-1, keepdim=True)
    v = torch.var(means, dim=-1, keepdim=True)
    means = (means - m) / torch.sqrt(v + eps)
    h = F.instance_norm(x, eps=eps)
    h = h + means[..., None, None] * sd[f"{p}.alpha"][..., None, None]
    return sd[f"{p}.gamma"].view(1, -1, 1, 1) * h + sd[f"{p}.beta"].view(1, -1, 1, 1)


def _c(x, sd, name, dilation=1, k=3):
    pad = dilation * (k // 2)
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=pad, dilation=dilation)


def _meanpool(x):
    return sum([x[:, :, ::2, ::2], x[:, :, 1::2, ::2], x[:, :, ::2, 1::2], x[:, :, 1::2, 1::2]]) / 4.0


def _res(x, sd, p, resample, dilation):
    d = dilation or 1
    out = F.elu(_in_plus(x, sd, f"{p}normalize1"))
    out = _c(out, sd, f"{p}conv1", d)
    out = F.elu(_in_plus(out, sd, f"{p}normalize2"))
    if resample == "down" and dilation is None:
        out = _meanpool(_c(out, sd, f"{p}conv2.conv"))
        short = _meanpool(_c(x, sd, f"{p}shortcut.conv", k=1))
    else:
        out = _c(out, sd, f"{p}conv2", d)
        short = _c(x, sd, f"{p}shortcut", d) if resample == "down" else x
    return short + out


def _rcu_f(x, sd, p, n_blocks, n_stages=2):
    for i in range(n_blocks):
        residual = x
        for j in range(n_stages):
            x = F.elu(x)
            x = F.conv2d(x, sd[f"{p}{i + 1}_{j + 1}_conv.weight"], padding=1)
        x = x + residual
    return x


def _refine_f(xs, sd, p, shape, start=False, end=False):
    hs = [_rcu_f(x, sd, f"{p}adapt_convs.{i}.", 2) for i, x in enumerate(xs)]
    if not start:
        h = 0
        for i, hi in enumerate(hs):
            hi = _c(hi, sd, f"{p}msf.convs.{i}")
            h = h + F.interpolate(hi, size=shape, mode="bilinear", align_corners=True)
    else:
        h = hs[0]
    h = F.elu(h)
    path = h
    for i in range(2):
        path = F.max_pool2d(path, kernel_size=5, stride=1, padding=2)
        path = F.conv2d(path, sd[f"{p}crp.convs.{i}.weight"], padding=1)
        h = path + h
    return _rcu_f(h, sd, f"{p}output_convs.", 3 if end else 1)


def ncsnv2_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, return_layers: bool = False):
    """The reference NCSNv2's output before its division by sigma, for images x in [0, 1], NCHW.
    `sd` has unprefixed keys (a 'sigmas' entry is ignored). With `return_layers`, also the four stage
    outputs."""
    h = 2 * x - 1.0
    out = _c(h, sd, "begin_conv")
    layers = []
    for stage, blocks in RES_STAGES.items():
        for i, (resample, dil) in enumerate(blocks):
            out = _res(out, sd, f"{stage}.{i}.", resample, dil)
        layers.append(out)
    l1, l2, l3, l4 = layers
    r = _refine_f([l4], sd, "refine1.", l4.shape[2:], start=True)
    r = _refine_f([l3, r], sd, "refine2.", l3.shape[2:])
    r = _refine_f([l2, r], sd, "refine3.", l2.shape[2:])
    r = _refine_f([l1, r], sd, "refine4.", l1.shape[2:], end=True)
    y = _c(F.elu(_in_plus(r, sd, "normalizer")), sd, "end_conv")
    return (y, layers) if return_layers else y


def random_state(shapes: dict[str, tuple], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes: conv weights scaled by 1/sqrt(fan_in), norm gains near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if k.endswith(".weight") and len(shape) == 4:
            t = t / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif k.endswith((".gamma", ".alpha")):
            t = 1.0 + 0.3 * t
        else:
            t = 0.1 * t
        out[k] = t.to(dtype)
    return out


# --- RobustBench WideResNet ---------------------------------------------------------------------------


def wrn_shapes(depth: int, widen: int, num_classes: int = 10, sub_block1: bool = False) -> dict[str, tuple]:
    """RobustBench WideResNet's state dict (key -> shape), BatchNorm buffers included."""
    n = (depth - 4) // 6
    w = [16, 16 * widen, 32 * widen, 64 * widen]
    s: dict[str, tuple] = {"conv1.weight": (w[0], 3, 3, 3)}

    def bn(name, c):
        s.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,)})
        s.update({f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    def group(name, cin, cout):
        for i in range(n):
            p, ci = f"{name}.layer.{i}.", cin if i == 0 else cout
            bn(p + "bn1", ci)
            s[p + "conv1.weight"] = (cout, ci, 3, 3)
            bn(p + "bn2", cout)
            s[p + "conv2.weight"] = (cout, cout, 3, 3)
            if ci != cout:
                s[p + "convShortcut.weight"] = (cout, ci, 1, 1)

    group("block1", w[0], w[1])
    if sub_block1:
        group("sub_block1", w[0], w[1])
    group("block2", w[1], w[2])
    group("block3", w[2], w[3])
    bn("bn1", w[3])
    s["fc.weight"] = (num_classes, w[3])
    s["fc.bias"] = (num_classes,)
    return s


def random_wrn_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(".weight") and len(shape) == 4:
            out[k] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif k.endswith(".weight") and len(shape) == 1:
            out[k] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def wrn_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """RobustBench WideResNet.forward in eval mode (BatchNorm with running statistics)."""
    n = (depth - 4) // 6

    def bn(t, p):
        return F.batch_norm(
            t,
            sd[f"{p}.running_mean"],
            sd[f"{p}.running_var"],
            sd[f"{p}.weight"],
            sd[f"{p}.bias"],
            False,
            0.0,
            1e-5,
        )

    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for g, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for i in range(n):
            p = f"{g}.layer.{i}."
            s = stride if i == 0 else 1
            if f"{p}convShortcut.weight" in sd:  # not equalInOut: x itself is pre-activated
                x_act = F.relu(bn(out, p + "bn1"))
                o = F.relu(bn(F.conv2d(x_act, sd[p + "conv1.weight"], stride=s, padding=1), p + "bn2"))
                o = F.conv2d(o, sd[p + "conv2.weight"], padding=1)
                out = F.conv2d(x_act, sd[p + "convShortcut.weight"], stride=s) + o
            else:
                o = F.relu(bn(out, p + "bn1"))
                o = F.relu(bn(F.conv2d(o, sd[p + "conv1.weight"], stride=s, padding=1), p + "bn2"))
                out = out + F.conv2d(o, sd[p + "conv2.weight"], padding=1)
    out = F.relu(bn(out, "bn1"))
    out = F.avg_pool2d(out, 8).view(out.shape[0], -1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])
