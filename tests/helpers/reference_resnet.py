"""An independent functional reference for torchvision's ResNet-50 layout (He et al. 2016, "v1.5":
the stride of a down-sampling bottleneck on its 3x3 conv), written from the published definition
and torchvision's key names, not from advpure's module: `resnet_shapes` lists the state dict (key ->
shape, torchvision's order, BatchNorm buffers included), `random_resnet_state` fills it, and
`resnet_forward` evaluates it in eval mode with plain functional ops, after RobustBench's
``normalize_model`` normalization (x - mean) / std."""

from __future__ import annotations

import torch
import torch.nn.functional as F

WIDTHS = (64, 128, 256, 512)


def resnet_shapes(blocks=(3, 4, 6, 3), num_classes: int = 1000) -> dict[str, tuple]:
    s: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            s[f"{name}.{p}"] = (c,)
        s[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for i, (n, w) in enumerate(zip(blocks, WIDTHS)):
        for j in range(n):
            p = f"layer{i + 1}.{j}."
            s[p + "conv1.weight"] = (w, cin, 1, 1)
            bn(p + "bn1", w)
            s[p + "conv2.weight"] = (w, w, 3, 3)
            bn(p + "bn2", w)
            s[p + "conv3.weight"] = (4 * w, w, 1, 1)
            bn(p + "bn3", 4 * w)
            if j == 0:  # every stage's first block changes the width (64 -> 256) or the stride
                s[p + "downsample.0.weight"] = (4 * w, cin, 1, 1)
                bn(p + "downsample.1", 4 * w)
            cin = 4 * w
    s["fc.weight"] = (num_classes, cin)
    s["fc.bias"] = (num_classes,)
    return s


def random_resnet_state(shapes: dict[str, tuple], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights and BatchNorm statistics that keep activations of order one through the depth
    (the last BN of each block gets small gains, as zero-init-residual training leaves them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
            continue
        if k.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif k.endswith(".weight") and len(shape) == 4:
            t = torch.randn(shape, generator=g, dtype=torch.float64) / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif k.endswith(".weight") and len(shape) == 1:
            gain = 0.2 if ("bn3" in k or "downsample" in k) else 1.0
            t = gain * (1.0 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64))
        else:
            t = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        out[k] = t.to(dtype)
    return out


def resnet_forward(sd, x, blocks=(3, 4, 6, 3), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """Logits of the ResNet in `sd` for images x in [0, 1], (N, 3, H, W), normalization first."""

    def bn(t, p):
        w, b, m, v = (sd[f"{p}.{q}"] for q in ("weight", "bias", "running_mean", "running_var"))
        return (t - m[:, None, None]) / torch.sqrt(v[:, None, None] + 1e-5) * w[:, None, None] + b[
            :, None, None
        ]

    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    h = F.conv2d((x - m) / s, sd["conv1.weight"], stride=2, padding=3)
    h = F.max_pool2d(torch.relu(bn(h, "bn1")), kernel_size=3, stride=2, padding=1)
    for i, n in enumerate(blocks):
        for j in range(n):
            p = f"layer{i + 1}.{j}."
            stride = 2 if (i > 0 and j == 0) else 1
            o = torch.relu(bn(F.conv2d(h, sd[p + "conv1.weight"]), p + "bn1"))
            o = torch.relu(bn(F.conv2d(o, sd[p + "conv2.weight"], stride=stride, padding=1), p + "bn2"))
            o = bn(F.conv2d(o, sd[p + "conv3.weight"]), p + "bn3")
            if p + "downsample.0.weight" in sd:
                h = bn(F.conv2d(h, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            h = torch.relu(o + h)
    h = h.mean(dim=(2, 3))
    return h @ sd["fc.weight"].T + sd["fc.bias"]
