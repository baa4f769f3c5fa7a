"""Small hand-made classifiers with known attack behaviour, for tests/test_ensemble.py (8x8 or 4x4
grey images, [0, 1]). Real torch modules; nothing here is installed with the package."""

from __future__ import annotations

import torch
from torch import nn


def prototypes_data(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic data: a noisy copy of one of `classes` fixed 8x8 patterns."""
    protos = 0.3 + 0.4 * torch.rand(classes, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return (protos[y] + 0.2 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y


def trained_mlp(classes: int = 4) -> nn.Module:
    """An MLP trained in < 1 s on `prototypes_data` (~98% test accuracy), frozen."""
    x, y = prototypes_data(512, 1, classes)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ELU(), nn.Linear(32, classes))
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    return clf.requires_grad_(False)


class Scaled(nn.Module):
    """logits * scale: with a large scale the softmax saturates in float32, so the cross-entropy
    gradient of confident images is exactly zero (CE-based attacks stall), while DLR and CW,
    invariant to the scale, still see the margin (Croce & Hein 2020, their motivation for DLR)."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


class StartDecides(nn.Module):
    """Two classes; class 1 iff pixel (0, 0) > 0.5, a step function with zero gradient, so sign
    gradient steps never move that pixel and only a random start can cross it. A small smooth term
    a * pixel (0, 1) in the class-1 logit never changes the class but lets the attack loss differ
    between starts. With y = 0 and clean pixel (0, 0) = 0.5, a random start breaks an image iff it
    raises that pixel."""

    def __init__(self, a: float = 0.1):
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wrong = (x[:, 0, 0, 0] > 0.5).to(x.dtype)
        smooth = self.a * x[:, 0, 0, 1] + 0.0 * x.flatten(1).sum(1)  # differentiable, zero elsewhere
        return torch.stack([1.0 - 2.0 * wrong, 2.0 * wrong - 1.0 + smooth], dim=1)


def linear_net(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """z = W flatten(x) + b, frozen; weight (K, D), bias (K,)."""
    k, dim = weight.shape
    lin = nn.Linear(dim, k)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin).requires_grad_(False)


class CodeNet(nn.Module):
    """4 classes read off a code: logits = 10 * pixels (0, 0..3) of 1x4x4 images (`code_images`). An
    l_inf attack of eps < 0.5 cannot change the class (the code pixels are 1 and 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * x[:, 0, 0, :4] + 0.0 * x.flatten(1).sum(1, keepdim=True)


def code_images(y: torch.Tensor) -> torch.Tensor:
    """(B, 1, 4, 4) images of classes y for `CodeNet`: 0.5 everywhere, row 0 the one-hot code."""
    x = torch.full((y.shape[0], 1, 4, 4), 0.5)
    x[:, 0, 0, :4] = nn.functional.one_hot(y, 4).float()
    return x


def coin_purifier(p_keep: float):
    """A stochastic toy purifier: each draw keeps the image with probability `p_keep` and otherwise
    shifts its code by one class (so `CodeNet` is wrong), whatever the input, from the RNG it is
    given (keyed per image): a defense correct on a fraction p_keep of its fresh draws that no
    attack can change."""
    from advpure.purify.base import Purifier, PurifyResult, rows

    class CoinPurifier(Purifier):
        stochastic = True
        needs_score = False

        def forward(self, x, rng, draws, score_fn=None, differentiable=False):
            out = rows(x, draws)
            u = rng.uniform(draws, x[:, :1, :1, :1]).reshape(-1)  # [-1, 1)
            keep = (u + 1) / 2 < p_keep
            shifted = out.clone()
            shifted[:, 0, 0, :4] = out[:, 0, 0, :4].roll(1, dims=-1)
            zeros = torch.zeros(out.shape[0], dtype=torch.long)
            return PurifyResult(torch.where(keep[:, None, None, None], out, shifted), zeros, zeros.clone())

    return CoinPurifier()


def score_net(channels: int = 1, seed: int = 0) -> nn.Module:
    """A tiny random conv net of any image size, shaped like a score net (x -> f(x), same shape)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, channels, 3, padding=1))


def any_size_classifier(channels: int = 1, classes: int = 10, seed: int = 0) -> nn.Module:
    """A tiny random classifier of images of any size (adaptive pooling to 4x4)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * channels, classes))


def attack_spec(kind: str = "pgd", defaults: dict | None = None, **kw):
    """Unvalidated parameters of attack `kind` (`check_attack` / `run_attack` must catch bad values):
    `defaults` then `kw` over the kind's Params; keys the kind does not have are dropped. An
    unregistered kind keeps PGD's schema (to test the "unknown kind" error)."""
    import dataclasses

    from advpure.attacks import ATTACKS, PGD

    cls = ATTACKS.get(kind) if kind in ATTACKS else PGD
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    values = {k: v for k, v in {**(defaults or {}), "name": kind, **kw}.items() if k in fields}
    return dataclasses.replace(cls.Params(**values), kind=kind)


def rng_for(b: int, seed: int = 0):
    """Per-image keyed randomness for a batch of `b` images with indices 100 .. 100 + b - 1."""
    from advpure.core.rng import SampleRNG

    return SampleRNG(seed, range(100, 100 + b))
