"""The ADP chain (Yoon et al. 2021): closed form, stopping, gradients, memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advpure.perf.memory import cpu_peak_supported, peak_memory
from advpure.purify import adp_chain, adp_purify, adp_step, screen, step_size


class GaussianScore(nn.Module):
    """Exact DSM optimum for data N(mu, s^2 I) is f(x) = -c (x - mu); c may differ per sample."""

    def __init__(self, mu: float, c):
        super().__init__()
        self.mu = mu
        self.c = c
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        c = self.c(x) if callable(self.c) else self.c
        return -c * (x - self.mu)


def test_closed_form_gaussian_score_float64():
    torch.manual_seed(0)
    mu, c, lam, T = 0.5, 2.0, 0.05, 10
    x0 = mu + 0.2 * (torch.rand(5, 1, 6, 6, dtype=torch.float64) - 0.5)  # stays inside [0, 1]
    out = adp_chain(x0, GaussianScore(mu, c), lam=lam, delta=1e-3, tau=1e-3, steps=T)
    expected = mu + (1 - lam) ** T * (x0 - mu)
    assert out.x.dtype == torch.float64
    assert torch.allclose(out.x, expected, atol=1e-6, rtol=0)
    assert (out.x - expected).abs().max() < 1e-10
    assert out.steps.tolist() == [T] * 5
    assert out.score_evals.tolist() == [2 * T] * 5


def test_adp_step_on_the_closed_form_gaussian_score():
    """One update of the paper's rule: alpha = lam / c, so x - mu shrinks by (1 - lam) exactly;
    per-sample curvatures give per-sample steps; the step is differentiable through g only."""
    mu, lam = 0.5, 0.05
    c = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64).view(3, 1, 1, 1)
    x = (mu + 0.1 * (torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5)).requires_grad_(True)
    net = GaussianScore(mu, c)
    x_next, alpha = adp_step(x, net, lam, 1e-3)
    assert torch.allclose(alpha, lam / c.flatten(), rtol=1e-9)
    assert torch.allclose(x_next, mu + (1 - lam) * (x - mu), atol=1e-12)
    assert net.calls == [3, 3]  # f(x) and the probe f(x + delta g)
    # gradient: d x_next / d x = 1 - alpha c = 1 - lam (alpha held constant, as the attack defines it)
    (grad,) = torch.autograd.grad(x_next.sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, 1 - lam), atol=1e-9)


def test_step_size_is_lambda_over_c():
    g = -torch.ones(3, 10, dtype=torch.float64)
    for c in (0.5, 1.0, 4.0):
        alpha = step_size(g, (1 - c * 1e-3) * g, lam=0.05, delta=1e-3)
        assert torch.allclose(alpha, torch.full((3,), 0.05 / c, dtype=torch.float64))
    # clamping: huge step -> 0.1; negative curvature (1 - z < 0) -> 1e-5
    assert step_size(g, g * (1 - 1e-9), 0.05, 1e-3).tolist() == pytest.approx([0.1] * 3)
    assert step_size(g, g * 1.5, 0.05, 1e-3).tolist() == pytest.approx([1e-5] * 3)


def test_step_size_probe_is_fp32_for_bf16_scores():
    g = (-torch.ones(2, 64)).bfloat16()
    g_delta = (g.float() * (1 - 2e-3)).bfloat16()  # 1 - z = 2e-3 is below bf16 resolution near 1
    alpha = step_size(g, g_delta, 0.05, 1e-3)
    assert alpha.dtype == torch.float32
    z = (g.float() * g_delta.float()).sum(1) / (g.float() ** 2).sum(1)
    assert torch.allclose(alpha, (0.05e-3 / (1 - z)).clamp(1e-5, 0.1))


def test_stopping_only_stops_the_samples_whose_alpha_falls_below_tau():
    mu = 0.5

    # c = 1 (alpha = lam = 0.05) while the sample is far from mu, c = 100 (alpha = 5e-4 <= tau) once
    # its mean |x - mu| drops below 0.05 -> distance-dependent stopping step.
    def c_of(x):
        far = (x - mu).abs().flatten(1).mean(1) > 0.05
        return torch.where(far, 1.0, 100.0).to(x.dtype).view(-1, 1, 1, 1)

    net = GaussianScore(mu, c_of)
    d = torch.tensor([0.04, 0.0525, 0.08, 0.3], dtype=torch.float64)  # distances from mu
    x0 = (mu + d).view(-1, 1, 1, 1).expand(4, 1, 3, 3).clone()
    out = adp_chain(x0, net, lam=0.05, delta=1e-3, tau=1e-3, steps=50)
    # sample k moves while d * 0.95^t > 0.05: expected number of moves
    moves = [0 if dk <= 0.05 else math.ceil(math.log(0.05 / dk) / math.log(0.95)) for dk in d.tolist()]
    assert out.steps.tolist() == moves
    assert out.score_evals.tolist() == [2 * (m + 1) for m in moves]
    # stopped samples do not move: the first one never moved at all
    assert torch.equal(out.x[0], x0[0])
    expected = mu + torch.tensor([0.95**m for m in moves], dtype=torch.float64) * d
    assert torch.allclose(out.x[:, 0, 0, 0], expected, atol=1e-12)
    # stopped rows are not sent through the net again: total rows evaluated = sum of evals
    assert sum(net.calls) == int(out.score_evals.sum())


def test_screening_gaussian_and_rademacher():
    x = torch.full((2, 1, 4, 4), 0.5)
    n = torch.randn(2, 1, 4, 4)
    assert torch.allclose(screen(x, 0.1, n), (0.5 + 0.1 * n).clamp(0, 1))
    r = screen(x, 0.1, n, "rademacher")
    assert torch.allclose((r - 0.5).abs(), torch.full_like(r, 0.1 * math.sqrt(2 / math.pi)))
    assert screen(torch.ones(1, 1, 2, 2), 1.0, torch.ones(1, 1, 2, 2)).max() == 1.0  # clipped
    with pytest.raises(ValueError, match="noise"):
        screen(x, 0.1, n, "uniform")


def test_adp_purify_seeded_by_generator():
    net = GaussianScore(0.5, 1.0)
    x = torch.rand(3, 1, 5, 5)
    a = adp_purify(x, net, generator=torch.Generator().manual_seed(1)).x
    b = adp_purify(x, net, generator=torch.Generator().manual_seed(1)).x
    c = adp_purify(x, net, generator=torch.Generator().manual_seed(2)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


class TinyScore(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1)).to(
            dtype
        )

    def forward(self, x):
        return 0.3 * self.net(x)


def _frozen_alpha_chain(x0, net, alphas):
    """The chain with the step sizes held at given values: the function the attack differentiates."""
    x = x0
    for a in alphas:
        x = (x + a.view(-1, 1, 1, 1) * net(x)).clamp(0, 1)
    return x


def test_full_gradient_matches_finite_differences_float64():
    net = TinyScore()
    torch.manual_seed(0)
    x0 = 0.35 + 0.3 * torch.rand(2, 1, 5, 5, dtype=torch.float64)  # away from the clip at 0 and 1
    T, lam = 4, 0.05
    # step sizes at the base point (taken without gradient, as in the attack's definition)
    alphas, x = [], x0
    with torch.no_grad():
        for _ in range(T):
            g = net(x)
            a = step_size(g, net(x + 1e-3 * g), lam, 1e-3)
            alphas.append(a)
            x = (x + a.view(-1, 1, 1, 1) * g).clamp(0, 1)
    xg = x0.clone().requires_grad_(True)
    out = adp_chain(xg, net, lam=lam, delta=1e-3, tau=0.0, steps=T, differentiable=True)
    assert torch.allclose(out.x.detach(), _frozen_alpha_chain(x0, net, alphas), atol=1e-12)
    w = torch.randn_like(x0)
    (out.x * w).sum().backward()
    grad = xg.grad
    h = 1e-6
    fd = torch.zeros_like(x0)
    for i in range(x0.numel()):
        e = torch.zeros(x0.numel(), dtype=torch.float64)
        e[i] = h
        e = e.view_as(x0)
        with torch.no_grad():
            fp = (_frozen_alpha_chain(x0 + e, net, alphas) * w).sum()
            fm = (_frozen_alpha_chain(x0 - e, net, alphas) * w).sum()
        fd.view(-1)[i] = (fp - fm) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-5)
    assert grad.abs().sum() > 0


def test_non_differentiable_mode_keeps_no_graph():
    xg = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    out = adp_chain(xg, TinyScore(), steps=3)
    assert not out.x.requires_grad


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs glibc mallinfo2 to read the CPU heap")
def test_checkpointing_keeps_peak_memory_flat_in_T():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.ELU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ELU(),
        nn.Conv2d(64, 1, 3, padding=1),
    )
    x = torch.rand(16, 1, 28, 28)

    def run(T, ckpt):
        def fn():
            xx = x.clone().requires_grad_(True)
            adp_chain(xx, net, steps=T, tau=0.0, differentiable=True, checkpointing=ckpt).x.sum().backward()

        peak_memory(fn)  # warm-up (allocator, kernels)
        return peak_memory(fn)

    flat = [run(T, True) for T in (2, 8, 16)]
    grow = [run(T, False) for T in (2, 16)]
    activation = 16 * 64 * 28 * 28 * 4  # one activation map of the batch, bytes
    assert flat[2] - flat[0] < 2 * activation, flat  # flat: at most a couple of maps more at T=16
    assert grow[1] - grow[0] > 20 * activation, grow  # without checkpointing: grows with T
    assert flat[2] < grow[1] / 3
