"""Diffusion purifiers (DiffPure, GDMP, reverse-VE) and their replayed exact gradients: closed forms on
Gaussian data, the identity at t* = 0, per-image keyed and frozen noise, batch independence, and
gradients equal to plain autograd's."""

from __future__ import annotations

import math

import pytest
import torch

from advpure.core.rng import FrozenRNG, GeneratorRNG, SampleRNG
from advpure.nets.schedules import DiscreteSchedule, VPSchedule
from advpure.perf.memory import clean_heap, cpu_peak_supported, peak_memory
from advpure.purify.diffpure import DiffPureChain, DiffPurePurifier, diffpure_times, diffusion_alpha_bar
from advpure.purify.gdmp import (
    GDMPPurifier,
    ddpm_coefficients,
    guidance_gradient,
    respaced_steps,
    ssim_per_image,
)
from advpure.purify.replay import NoiseStream, ReplayMismatch, run_chain
from advpure.purify.reverse_ve import ReverseVEPurifier, sigma_grid, walk
from helpers.diffusion_toys import GaussianEps, TinyEps, TinyField

SHAPE = (2, 5, 5)


def images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(n, *SHAPE, generator=g)).to(dtype)


def gaussian_data(n: int, seed: int = 0):
    """n samples u0 ~ N(mu, Sigma) in diffusion space, D = 4 (shape (1, 2, 2)), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.15
    cov = a @ a.T + 0.02 * torch.eye(4, dtype=torch.float64)
    mu = torch.tensor([0.2, -0.3, 0.1, 0.4], dtype=torch.float64)
    u0 = mu + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return mu, cov, u0.reshape(n, 1, 2, 2)


# --- DiffPure: grid, diffusion, closed forms -----------------------------------------------------
def test_diffpure_grid_follows_its_solvers():
    t = diffpure_times(0.1, 1e-3, 1e-5)
    assert len(t) - 1 == 100 and t[0] == 0.1 and t[-1] == 1e-5
    steps = [a - b for a, b in zip(t[:-1], t[1:], strict=True)]
    assert max(abs(d - 1e-3) for d in steps[:-1]) < 1e-12 and abs(steps[-1] - (1e-3 - 1e-5)) < 1e-12
    assert len(diffpure_times(0.075)) - 1 == 75 and diffpure_times(0.0) == [0.0]


def test_initial_diffusion_discrete_and_continuous():
    vp = VPSchedule(0.1, 20.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert diffusion_alpha_bar(vp, 0.1, "discrete") == pytest.approx(
        float(torch.cumprod(1 - betas, 0)[99]), 1e-12
    )
    assert diffusion_alpha_bar(vp, 0.1, "continuous") == pytest.approx(
        math.exp(-0.01 - 0.5 * 0.01 * 19.9), 1e-12
    )
    assert diffusion_alpha_bar(vp, 0.0, "discrete") == 1.0
    # a DDPM net's discrete schedule runs on its continuous limit (DiffPure: beta 0.1 -> 20)
    p = DiffPurePurifier(DiscreteSchedule(1000, 1e-4, 0.02))
    assert (p.vp.beta_min, p.vp.beta_max) == pytest.approx((0.1, 20.0))


def test_reverse_sde_recovers_gaussian_data_mean_and_covariance():
    n = 20000
    mu, cov, u0 = gaussian_data(n)
    x = (u0 + 1) / 2
    eps = GaussianEps(mu, cov, (1, 2, 2))
    p = DiffPurePurifier(VPSchedule(), t_star=0.1, diffuse="continuous", mode="sde")
    out = p(x, GeneratorRNG(seed=1), 1, {"eps": eps})
    u = (2 * out.x - 1).reshape(-1, 4).double()
    # tolerance: 4 standard errors of n samples (mean: sqrt(S_ii / n); covariance entry:
    # sqrt((S_ii S_jj + S_ij^2) / n)), about 0.009 and 0.006 here
    d = cov.diag()
    assert ((u.mean(0) - mu).abs() < 4 * (d / n).sqrt()).all(), u.mean(0) - mu
    tol = 4 * ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(u.T) - cov).abs() < tol).all(), (torch.cov(u.T) - cov) / tol
    # the diffused samples do not match the data: the reverse SDE is what brings them back
    ab = diffusion_alpha_bar(p.vp, 0.1, "continuous")
    assert (((ab - 1) * cov.diag() + 1 - ab).abs() > 10 * tol.diag()).all()
    assert out.steps.tolist() == [100] * n


def test_probability_flow_ode_is_exact_to_first_order_in_dt():
    mu, cov, u0 = gaussian_data(64, seed=3)
    eps = GaussianEps(mu, cov, (1, 2, 2))
    vp = VPSchedule()
    ab = float(vp.alpha_bar(torch.tensor(0.1, dtype=torch.float64)))
    z = torch.randn(u0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u_star = ab**0.5 * u0 + (1 - ab) ** 0.5 * z
    errors = []
    for dt in (2e-3, 1e-3, 5e-4):
        times = diffpure_times(0.1, dt, 1e-5)
        chain = DiffPureChain(eps, vp, times, "ode", ab)
        u = u_star
        for k in range(chain.n_steps):
            u = chain.step(k, u, u, None)
        errors.append((u - eps.flow(u_star, 0.1, 1e-5)).abs().max().item())
    assert errors[0] < 1e-2
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2, errors


def test_clamp_option():
    x = images(3)
    net = TinyEps(schedule=VPSchedule())
    raw = DiffPurePurifier(net.schedule, t_star=0.3)(x, SampleRNG(0, range(3)), 1, {"eps": net}).x
    clipped = DiffPurePurifier(net.schedule, t_star=0.3, clamp=True)(
        x, SampleRNG(0, range(3)), 1, {"eps": net}
    ).x
    assert raw.min() < 0 or raw.max() > 1  # the raw solver output leaves [0, 1] here
    assert torch.equal(clipped, raw.clamp(0, 1))


# --- t* = 0 is the identity ----------------------------------------------------------------------
def purifiers_at_zero():
    return [
        (DiffPurePurifier(VPSchedule(), t_star=0.0), "eps", TinyEps()),
        (GDMPPurifier(DiscreteSchedule(), steps=0), "eps", TinyEps()),
        (GDMPPurifier(DiscreteSchedule(), rounds=0), "eps", TinyEps()),
        (ReverseVEPurifier(1.0, 0.01, 12, sigma_star=0.0), "score", TinyField()),
    ]


@pytest.mark.parametrize("case", range(4))
def test_zero_noise_is_the_identity(case):
    p, slot, net = purifiers_at_zero()[case]
    x = images(3, dtype=torch.float64).requires_grad_(True)
    out = p(x, SampleRNG(0, range(3)), 2, {slot: net}, differentiable=True)
    assert torch.equal(out.x.detach(), torch.cat([x.detach(), x.detach()])) and not p.stochastic
    (g,) = torch.autograd.grad(out.x.sum(), x)
    assert torch.equal(g, torch.full_like(g, 2.0)) and net.__dict__.get("calls", 0) == 0


# --- noise: per image, per draw, frozen ----------------------------------------------------------
def all_purifiers(dtype=torch.float32, **kw):
    eps, field = TinyEps().to(dtype), TinyField().to(dtype)
    return [
        (DiffPurePurifier(eps.schedule, t_star=0.01, **kw), {"eps": eps}),
        (DiffPurePurifier(eps.schedule, t_star=0.01, mode="ode", **kw), {"eps": eps}),
        (GDMPPurifier(DiscreteSchedule(), rounds=2, steps=4, **kw), {"eps": eps}),
        (GDMPPurifier(DiscreteSchedule(), rounds=1, steps=6, respace=3, guide="ssim", **kw), {"eps": eps}),
        (GDMPPurifier(DiscreteSchedule(), rounds=2, steps=3, guide="none", **kw), {"eps": eps}),
        (ReverseVEPurifier(1.0, 0.01, 12, sigma_star=0.2, **kw), {"score": field}),
        (
            ReverseVEPurifier(1.0, 0.01, 12, sigma_star=0.2, sampler="langevin", langevin_steps=2, **kw),
            {"score": field},
        ),
    ]


CASES = range(len(all_purifiers()))


@pytest.mark.parametrize("case", CASES)
def test_noise_is_keyed_per_image_not_per_batch(case):
    p, fns = all_purifiers()[case]
    x = images(4)
    whole = p(x, SampleRNG(7, [10, 11, 12, 13]), 3, fns).x.view(3, 4, *SHAPE)
    a = p(x[:2], SampleRNG(7, [10, 11]), 3, fns).x.view(3, 2, *SHAPE)
    b = p(x[2:], SampleRNG(7, [12, 13]), 3, fns).x.view(3, 2, *SHAPE)
    assert torch.equal(whole, torch.cat([a, b], 1))
    assert not torch.equal(whole[0], whole[1])  # draws are independent chains


@pytest.mark.parametrize("case", [0, 2, 5])
def test_frozen_noise_is_per_image_and_repeats_across_calls(case):
    p, fns = all_purifiers()[case]
    x = images(1).expand(2, *SHAPE)  # two copies of one image under two indices
    first = p(x, FrozenRNG(3, [5, 6], period=1), 1, fns).x
    again = p(x, FrozenRNG(3, [5, 9], period=1), 1, fns).x
    assert not torch.allclose(first[0], first[1])  # never one noise shared by all images
    assert torch.equal(first[0], again[0])  # every step's noise frozen per image across calls
    fresh = p(x, SampleRNG(3, [5, 6]), 1, fns).x
    assert not torch.equal(fresh[0], again[0])


def test_frozen_stream_draws_a_new_noise_at_every_step():
    x = images(2)
    s = NoiseStream(FrozenRNG(1, [0, 1], period=1), 1, x)
    a, b = s.normal(), s.normal()
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])


# --- GDMP --------------------------------------------------------------------------------------
def test_gdmp_respacing_and_coefficients_match_ddpm():
    assert respaced_steps(36) == list(range(36)) and respaced_steps(36, 4) == [0, 12, 23, 35]
    ab = DiscreteSchedule().alpha_bars
    co = ddpm_coefficients(ab, list(range(36)))
    betas = DiscreteSchedule().betas
    assert co["logvar"][5] == pytest.approx(math.log(betas[5]), 1e-9)  # fixedlarge: log beta_t
    i = 10  # Ho et al. Eq. 7: the posterior mean coefficients
    assert co["c1"][i] == pytest.approx(float(betas[i] * ab[i - 1].sqrt() / (1 - ab[i])), 1e-9)
    assert co["c2"][i] == pytest.approx(float((1 - ab[i - 1]) * (1 - betas[i]).sqrt() / (1 - ab[i])), 1e-9)


def test_guidance_is_the_per_image_mse_gradient():
    u, tgt = torch.randn(3, *SHAPE, dtype=torch.float64), torch.randn(3, *SHAPE, dtype=torch.float64)
    g = guidance_gradient(u, tgt, "mse")
    assert torch.allclose(g, -2 * (u - tgt) / (2 * 5 * 5), atol=1e-15)
    s = guidance_gradient(u, tgt, "ssim")
    assert torch.allclose(ssim_per_image(u, u), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(s[0], guidance_gradient(u[:1], tgt[:1], "ssim")[0], atol=1e-15)


def test_gdmp_purification_of_an_image_does_not_depend_on_its_batch():
    net = TinyEps()
    x = images(5)
    p = GDMPPurifier(DiscreteSchedule(), rounds=2, steps=8)
    alone = p(x[:2], SampleRNG(0, [0, 1]), 1, {"eps": net}).x[0]
    crowd = p(x, SampleRNG(0, [0, 1, 2, 3, 4]), 1, {"eps": net}).x[0]
    assert torch.allclose(alone, crowd, atol=1e-6, rtol=0)
    # the guidance matters at this strength: GDMP's batch mean (1/B of it) gives another image
    weak = GDMPPurifier(DiscreteSchedule(), rounds=2, steps=8, guide_batch=5)
    other = weak(x, SampleRNG(0, [0, 1, 2, 3, 4]), 1, {"eps": net}).x[0]
    assert (other - crowd).abs().max() > 1e-2


# --- exact gradients by replay -----------------------------------------------------------------
def grad_of(p, fns, x, rng_fn):
    xx = x.clone().requires_grad_(True)
    out = p(xx, rng_fn(), 2, fns, differentiable=True).x
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (g,) = torch.autograd.grad((out * w).sum(), xx)
    return out.detach(), g


@pytest.mark.parametrize("case", CASES)
def test_replayed_gradient_equals_autograd_and_checkpoint(case):
    x = images(2, dtype=torch.float64)
    rng_fn = lambda: SampleRNG(4, [3, 8])  # noqa: E731
    results = {}
    for mode in ("replay", "autograd", "checkpoint"):
        p, fns = all_purifiers(torch.float64, gradient_mode=mode, check_replay=True)[case]
        results[mode] = grad_of(p, fns, x, rng_fn)
    out, g = results["replay"]
    assert g.abs().max() > 1e-3
    for mode in ("autograd", "checkpoint"):
        assert torch.equal(out, results[mode][0])
        assert torch.allclose(g, results[mode][1], atol=1e-6, rtol=0), (
            mode,
            (g - results[mode][1]).abs().max(),
        )


@pytest.mark.parametrize("case", CASES)
def test_replayed_gradient_matches_finite_differences(case):
    """An independent check (replay and autograd could share a mistake, e.g. a detached guidance):
    the directional derivative along a random v by central differences, float64, same keyed noise."""
    p, fns = all_purifiers(torch.float64, check_replay=True)[case]
    p.clamp = False
    x = images(2, dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out, g = grad_of(p, fns, x, lambda: SampleRNG(4, [3, 8]))
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)

    def loss(xx):
        return (p(xx, SampleRNG(4, [3, 8]), 2, fns).x * w).sum().item()

    h = 1e-6
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    assert abs(fd - (g * v).sum().item()) < 1e-6 * max(1.0, abs(fd)), (fd, (g * v).sum().item())


@pytest.mark.parametrize("noise_keys", ["key", "stored"])
def test_replay_with_generator_rng_and_stored_noise(noise_keys):
    x = images(2, dtype=torch.float64)
    outs = []
    for mode in ("replay", "autograd"):
        p, fns = all_purifiers(torch.float64, gradient_mode=mode, check_replay=True, noise_keys=noise_keys)[2]
        outs.append(grad_of(p, fns, x, lambda: GeneratorRNG(seed=5)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6, rtol=0)


def test_replay_check_catches_a_step_that_does_not_replay():
    class Drifting(TinyEps):  # a net whose output changes from call to call (as in train mode)
        def forward(self, u, t):
            return super().forward(u, t) * (1 + 1e-3 * self.calls)

    net = Drifting().double()
    p = DiffPurePurifier(net.schedule, t_star=0.005, check_replay=True)
    xx = images(2, dtype=torch.float64).requires_grad_(True)
    out = p(xx, SampleRNG(0, [0, 1]), 1, {"eps": net}, differentiable=True).x
    with pytest.raises(ReplayMismatch, match="replay of step"):
        out.sum().backward()


def test_replay_leaves_the_nets_frozen():
    p, fns = all_purifiers(torch.float64)[2]
    xx = images(2, dtype=torch.float64).requires_grad_(True)
    p(xx, SampleRNG(0, [0, 1]), 1, fns, differentiable=True).x.sum().backward()
    assert xx.grad is not None and all(q.grad is None for q in fns["eps"].parameters())


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs glibc mallinfo2 to read the CPU heap")
def test_replay_memory_grows_only_by_the_stored_states():
    """Peak memory of one exact gradient at N = 100 vs N = 10 steps: replay adds the 90 stored states
    (plus a little), plain autograd adds 90 step graphs. `python -m advpure.perf._replay_bench` times it."""
    torch.manual_seed(0)
    net = TinyEps(channels=3, width=32).requires_grad_(False)
    x = images(1).new_empty(2, 3, 16, 16).uniform_(0.2, 0.8)

    def peak(t_star, mode):
        p = DiffPurePurifier(net.schedule, t_star=t_star, gradient_mode=mode)

        def fn():
            xx = x.clone().requires_grad_(True)
            out = p(xx, SampleRNG(0, [0, 1]), 1, {"eps": net}, differentiable=True).x
            torch.autograd.grad(out.sum(), xx)

        fn()
        clean_heap()
        return peak_memory(fn)

    peak(0.01, "replay")  # the first measurement in a process carries one-time allocations
    state, act = x.numel() * 4, 2 * 32 * 16 * 16 * 4  # bytes of one state / one activation map
    grow_replay = peak(0.1, "replay") - peak(0.01, "replay")
    grow_autograd = peak(0.04, "autograd") - peak(0.01, "autograd")
    assert grow_replay < 90 * state + 4 * act, (grow_replay, 90 * state)
    assert grow_autograd > 30 * act, grow_autograd  # 30 more steps, each keeping > one map


def test_no_graph_without_differentiable():
    p, fns = all_purifiers(torch.float64)[2]
    xx = images(2, dtype=torch.float64).requires_grad_(True)
    assert not p(xx, SampleRNG(0, [0, 1]), 1, fns).x.requires_grad


def test_run_chain_rejects_unknown_mode():
    with pytest.raises(ValueError, match="gradient_mode"):
        run_chain(None, torch.zeros(1), None, differentiable=True, gradient_mode="adjoint")


# --- reverse VE ----------------------------------------------------------------------------------
def test_reverse_ve_walk_and_steps():
    grid = sigma_grid(1.0, 0.01, 12)
    assert (
        grid[0] == 1.0
        and grid[-1] == pytest.approx(0.01)
        and grid[1] / grid[0] == pytest.approx(grid[2] / grid[1])
    )
    lv = walk(0.2, grid)
    assert lv[0] == 0.2 and all(s < 0.2 for s in lv[1:]) and lv[-1] == grid[-1]
    assert walk(0.2, grid, 3)[-1] == grid[-1] and len(walk(0.2, grid, 3)) < len(lv)
    with pytest.raises(ValueError, match="largest DSM level"):
        walk(2.0, grid)


def test_reverse_ve_steps_follow_the_derivation():
    """One EM / ancestral / ODE step on a constant field f = c: the means and noise std in closed form."""
    c = 0.3
    field = lambda x: torch.full_like(x, c)  # noqa: E731
    x = torch.zeros(4000, 1, 1, 1, dtype=torch.float64)
    a, b = 0.5, 0.4
    for sampler, std in (
        ("em", math.sqrt(a * a - b * b)),
        ("ancestral", b * math.sqrt(a * a - b * b) / a),
        ("ode", 0),
    ):
        from advpure.purify.reverse_ve import ReverseVEChain

        chain = ReverseVEChain(field, [a, b], sampler=sampler, sigma_min=b, denoise=True)
        noise = NoiseStream(GeneratorRNG(seed=0), 1, x)
        y = chain.step(0, x, x, noise)
        mean = (a * a - b * b) / a * c * (0.5 if sampler == "ode" else 1)
        assert abs(y.mean().item() - mean) < 0.03 and abs(y.std().item() - std) < 0.02
        assert torch.allclose(chain.step(1, y, x, noise), y + b * c)  # Tweedie: x + sigma_end f(x)
