"""Maximum-likelihood EBM: the field and its double backward, the field scale, the MCMC learner on a
2-D mixture, and the Lightning stage (export, resume with the replay buffer, divergence)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from advpure.config import compose as C
from advpure.core.errors import CheckpointError, ConfigError, TrainingError
from advpure.nets.ebm import (
    ConvEnergy,
    EnergyField,
    build_energy_net,
    energy_field,
    estimate_field_scale,
    langevin_settings,
    load_energy_field,
)
from advpure.nets.weights import read_weights
from advpure.purify.adp import step_size
from advpure.training.mcmc import PersistentChains, langevin_sample, ml_loss
from conftest import needs_fmnist, tiny_overrides
from helpers.ebm_toy import mixture_moments, train_toy


def tiny_net(activation="silu", size=28, channels=1, seed=0):
    torch.manual_seed(seed)
    return ConvEnergy(channels, size, nf=2, activation=activation).double()


# --- the field ----------------------------------------------------------------------------------
def test_field_is_minus_grad_energy_by_central_differences():
    net = tiny_net()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    field = energy_field(net, x)
    assert field.shape == x.shape and not field.requires_grad
    h = 1e-6
    gen = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 28 * 28, (12,), generator=gen)
    with torch.no_grad():
        for i in range(3):
            for c in coords.tolist():
                e = torch.zeros_like(x[i : i + 1]).flatten()
                e[c] = h
                e = e.view(1, 1, 28, 28)
                fd = (net(x[i : i + 1] + e) - net(x[i : i + 1] - e)).item() / (2 * h)
                assert -field[i].flatten()[c].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)  # a random direction too
        fd = (net(x + h * v) - net(x - h * v)) / (2 * h)
        assert torch.allclose(-(field * v).flatten(1).sum(1), fd, rtol=1e-6, atol=1e-9)


def test_field_works_under_no_grad_and_keeps_a_graph_only_when_asked():
    net = tiny_net().requires_grad_(False)
    field = EnergyField(net, scale=3.0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        a = field(x)
    assert not a.requires_grad
    assert torch.allclose(a, 3.0 * energy_field(net, x))
    with torch.enable_grad():
        b = field(x.clone().requires_grad_(True))
    assert b.requires_grad and torch.allclose(a, b.detach())
    # grad mode on but nothing requires grad: no graph kept (like a frozen score net)
    assert not field(x).requires_grad


def _loss_through_field(field, x, w):
    return (w * (x + field(x))).sum()


@pytest.mark.parametrize("activation", ["silu", "softplus", "elu"])
def test_double_backward_through_the_field_is_exact_and_non_zero(activation):
    """d/dx <w, x + c * field(x)> = w - c * H_E(x) w: the Hessian term is there, and right
    (checked against central differences of <w, c * field(x)> along a random direction)."""
    net = tiny_net(activation).requires_grad_(False)
    field = EnergyField(net, scale=10.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(_loss_through_field(field, x, w), x)
    hessian_part = grad - w
    assert hessian_part.norm() > 1e-6 * w.norm()
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = ((w * field(x + h * v)).sum() - (w * field(x - h * v)).sum()) / (2 * h)
    assert (hessian_part * v).sum().item() == pytest.approx(fd.item(), rel=1e-5)


def test_leaky_relu_energy_masks_the_gradient_through_its_field():
    """Why the default activation is not Hill et al.'s LeakyReLU: the net is piecewise linear, its
    field piecewise constant, so backprop through the field sees only the identity, and ADP's
    probe f(x + delta f) equals f(x) (1 - z = 0)."""
    net = tiny_net("leaky_relu").requires_grad_(False)
    field = EnergyField(net, scale=10.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(_loss_through_field(field, x, w), x)
    assert torch.equal(grad, w)
    with torch.no_grad():
        g = field(x)
        z = (g * field(x + 1e-4 * g)).flatten(1).sum(1) / g.flatten(1).square().sum(1)
    assert torch.allclose(z, torch.ones_like(z), atol=1e-12)


def test_field_inside_non_reentrant_checkpoint_gives_the_same_gradient():
    """ADP's differentiable chain checkpoints each score evaluation (use_reentrant=False)."""
    net = tiny_net().requires_grad_(False)
    field = EnergyField(net, scale=5.0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    w = torch.randn_like(x)

    def run(use_ckpt):
        xx = x.clone().requires_grad_(True)
        g = checkpoint(field, xx, use_reentrant=False) if use_ckpt else field(xx)
        y = xx + 0.01 * g
        g2 = checkpoint(field, y, use_reentrant=False) if use_ckpt else field(y)
        (grad,) = torch.autograd.grad((w * (y + 0.01 * g2)).sum(), xx)
        return grad

    assert torch.allclose(run(True), run(False), rtol=1e-10, atol=1e-12)


def test_cifar_sized_net_and_bad_arguments():
    net = build_energy_net("conv", in_channels=3, image_size=32, nf=32, activation="silu")
    assert sum(p.numel() for p in net.parameters()) == 693_569  # Hill et al.'s lightweight EBM
    assert net(torch.rand(5, 3, 32, 32)).shape == (5,)
    assert net(torch.rand(1, 3, 32, 32)).shape == (1,)
    with pytest.raises(ConfigError, match="image_size"):
        build_energy_net("conv", in_channels=1, image_size=64, nf=4)
    with pytest.raises(ConfigError, match="ebm.arch"):
        build_energy_net("resnet", in_channels=1, image_size=28, nf=4)
    with pytest.raises(ConfigError, match="ebm.activation"):
        build_energy_net("conv", in_channels=1, image_size=28, nf=4, activation="relu6")
    with pytest.raises(ValueError, match=r"expects \(N, 1, 28, 28\)"):
        net_small = build_energy_net("conv", in_channels=1, image_size=28, nf=2)
        net_small(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="scale"):
        EnergyField(net, scale=0.0)


# --- the field scale ----------------------------------------------------------------------------
class Quadratic(torch.nn.Module):
    """E(x) = ||x - mu||^2 / (2 s^2): the energy of N(mu, s^2 I)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x):
        return (x - self.mu).flatten(1).square().sum(1) / (2 * self.s**2)


def test_field_scale_turns_a_quadratic_energy_into_the_ideal_dsm_field():
    mu, s, sigma, lam, delta = 0.5, 0.02, 0.25, 0.05, 1e-3
    energy = Quadratic(mu, s)
    gen = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 28, 28), mu, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = estimate_field_scale(energy, x, sigma, noise)
    assert out["field_scale"] == pytest.approx(s**2 / sigma, rel=1e-9)
    field = EnergyField(energy, out["field_scale"])
    x_tilde = (x + sigma * noise).clamp(0, 1)
    g = field(x_tilde)
    assert torch.allclose(g, (x - x_tilde) / sigma, atol=1e-9)  # Tweedie's denoising direction
    # ADP's step size on the rescaled field: lam * sigma (in its clamp range, above tau = 1e-3);
    # on the raw field -grad E it is lam * s^2 = 2e-5 < tau: every sample would stop at once
    alpha = step_size(g, field(x_tilde + delta * g), lam, delta)
    assert torch.allclose(alpha, torch.full_like(alpha, lam * sigma), rtol=1e-6)
    raw = EnergyField(energy, 1.0)
    g_raw = raw(x_tilde)
    alpha_raw = step_size(g_raw, raw(x_tilde + delta * g_raw), lam, delta)
    assert torch.allclose(alpha_raw, torch.full_like(alpha_raw, lam * s**2), rtol=1e-6)
    assert torch.all(alpha_raw < 1e-3)


def test_field_scale_errors():
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="sigma"):
        estimate_field_scale(Quadratic(0.5, 1.0), x, 0.0, torch.randn_like(x))
    with pytest.raises(ValueError, match="flat"):
        estimate_field_scale(lambda z: z.flatten(1).sum(1) * 0.0, x, 0.25, torch.randn_like(x))


# --- the learner ----------------------------------------------------------------------------------
def test_ml_training_on_a_2d_mixture_matches_its_mean_and_covariance():
    """Persistent-chain ML (the functions EBMModule uses) on an equal mixture of N(mu_k, 0.1^2 I):
    Langevin samples of the learned energy match the mean within 0.03 and the covariance within
    20% (relative Frobenius error; measured 6-11% over seeds 0-2). The uniform initial chains are
    off by ~330%."""
    step = 2e-3
    net, chains, gen = train_toy(steps=300, batch=500, mcmc_steps=10, step_size=step, lr=5e-3, seed=0)
    mean, cov = mixture_moments()
    init = torch.rand(2000, 2, generator=torch.Generator().manual_seed(5)).double()
    assert (torch.cov(init.T) - cov).norm() / cov.norm() > 2.0
    net.requires_grad_(False)
    x, _ = langevin_sample(net, chains.x, steps=50, step_size=step, noise_std=step**0.5, generator=gen)
    x = x.double()
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    err = (torch.cov(x.T) - cov).norm() / cov.norm()
    assert err < 0.2, f"covariance off by {err:.1%}: {torch.cov(x.T).tolist()} vs {cov.tolist()}"
    assert torch.cov(x.T)[0, 1] > 0.5 * cov[0, 1]  # the between-mode correlation is learned


def test_langevin_step_is_the_stated_update():
    energy = Quadratic(0.0, 1.0)  # grad E = x
    x0 = torch.full((3, 2), 2.0, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x, gn = langevin_sample(energy, x0, steps=1, step_size=0.2, noise_std=0.3, generator=g1)
    n = torch.randn(x0.shape, generator=g2, dtype=torch.float64)
    assert torch.allclose(x, x0 - 0.1 * x0 + 0.3 * n)
    assert gn.item() == pytest.approx(2.0 * 2**0.5, rel=1e-6)
    x, _ = langevin_sample(energy, x0, steps=3, step_size=0.2, noise_std=10.0, clamp=(0.0, 1.0))
    assert x.min() >= 0 and x.max() <= 1


def test_langevin_purifier_settings_reproduce_the_training_sampler():
    from advpure.purify.langevin import langevin_chain

    energy, c, step, noise_std = Quadratic(0.5, 0.3), 0.07, 2.0, 0.005
    x0 = 0.3 + 0.4 * torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ref, _ = langevin_sample(
        energy, x0, steps=5, step_size=step, noise_std=noise_std, generator=g1, clamp=(0, 1)
    )
    kw = langevin_settings(c, step, noise_std)
    out = langevin_chain(
        x0,
        EnergyField(energy, c),
        lambda: torch.randn(x0.shape, generator=g2, dtype=torch.float64),
        eta=kw["eta"],
        dsm_sigma=kw["dsm_sigma"],
        steps=5,
    )
    assert torch.allclose(out.x, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="> 0"):
        langevin_settings(0.0, step, noise_std)


def test_ml_loss_and_its_regulariser():
    e_data, e_model = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0, 1.0])
    loss, st = ml_loss(e_data, e_model)
    assert loss.item() == pytest.approx(2.0) and st["energy_gap"].item() == pytest.approx(2.0)
    loss, _ = ml_loss(e_data, e_model, l2=0.5)
    assert loss.item() == pytest.approx(2.0 + 0.5 * (5.0 + 2 / 3))


def test_persistent_chains_draw_restart_and_state_round_trip():
    chains = PersistentChains(10, (2,), reinit_prob=0.0)
    chains.initialize(torch.Generator().manual_seed(0), "cpu")
    before = chains.x.clone()
    data = torch.full((4, 2), 7.0)
    # two ranks with the same shared stream take disjoint rows
    x_a, idx_a = chains.draw(4, torch.Generator().manual_seed(1), torch.Generator(), data, rank=0, world=2)
    x_b, idx_b = chains.draw(4, torch.Generator().manual_seed(1), torch.Generator(), data, rank=1, world=2)
    assert not set(idx_a.tolist()) & set(idx_b.tolist())
    assert torch.equal(x_a, before[idx_a])
    chains.put(idx_a, torch.zeros(4, 2))
    assert torch.equal(chains.x[idx_a], torch.zeros(4, 2)) and torch.equal(chains.x[idx_b], before[idx_b])
    state = chains.state_dict()
    other = PersistentChains(10, (2,))
    other.load_state_dict(state)
    assert torch.equal(other.x, chains.x)
    with pytest.raises(ValueError, match="expected 12"):
        PersistentChains(12, (2,)).load_state_dict(state)
    restart = PersistentChains(10, (2,), reinit_prob=1.0, init="data")
    restart.initialize(torch.Generator().manual_seed(0), "cpu")
    x, _ = restart.draw(4, torch.Generator().manual_seed(1), torch.Generator(), data)
    assert torch.equal(x, data)
    with pytest.raises(ValueError, match="fewer than"):
        chains.draw(6, torch.Generator(), torch.Generator(), torch.zeros(6, 2), world=2)
    fresh = PersistentChains(0, (2,), init="uniform")  # no buffer: short-run chains from noise
    x, idx = fresh.draw(4, torch.Generator(), torch.Generator().manual_seed(3), data)
    assert idx is None and x.min() >= 0 and x.max() <= 1


# --- config -------------------------------------------------------------------------------------
def test_ebm_config_group_and_errors():
    cfg = C.load("fmnist", ["train.stages=[ebm]"])
    assert cfg.ebm.mcmc_steps == 20 and cfg.ebm.nf == 16  # conf/ebm/ebm_small.yaml via the experiment
    assert C.load("cifar10_paper").ebm.buffer_size == 50000
    assert C.load("fmnist", ["ebm=ebm_cifar10"]).ebm.nf == 32
    for override, match in [
        ("ebm.noise_std=-1", "ebm.noise_std"),
        ("ebm.activation=relu", "ebm.activation"),
        ("ebm.reinit_prob=2", "ebm.reinit_prob"),
        ("ebm.init=gaussian", "ebm.init"),
        ("ebm=nope", "unknown ebm option"),
    ]:
        with pytest.raises(ConfigError, match=match):
            C.load("fmnist", [override])


# --- the Lightning stage ------------------------------------------------------------------------
_ARRAYS: dict = {}


@pytest.fixture(autouse=True)
def _decode_the_dataset_once(monkeypatch):
    """Each training run would gunzip Fashion-MNIST again (~3 s); these tests share one copy."""
    from advpure.data import datamodule

    original = datamodule.load_arrays

    def cached(name, *args):
        if name not in _ARRAYS:
            _ARRAYS[name] = original(name, *args)
        return _ARRAYS[name]

    monkeypatch.setattr(datamodule, "load_arrays", cached)


def ebm_overrides(tmp, **extra):
    base = {
        "train.stages": "[ebm]",
        "ebm.nf": 4,
        "ebm.batch_size": 16,
        "ebm.mcmc_steps": 3,
        "ebm.buffer_size": 64,
        "ebm.max_steps": 8,
        "ebm.ckpt_every_n_steps": 4,
        "ebm.sample_every_n_steps": 4,
        "ebm.scale_images": 64,
        "data.train_subset": 500,
        "data.val_size": 100,
        "trainer.num_threads": 1,
    }
    base.update(extra)
    return tiny_overrides(tmp, **base)


@needs_fmnist
def test_ebm_stage_exports_the_field_and_resume_continues_the_same_chains(tmp_path):
    from advpure.jobs.stages import Stages
    from advpure.jobs.train import train

    def stage_dir(cfg, kind):
        return Stages.from_config(cfg).stage(kind).run_dir

    straight = C.load("fmnist", ebm_overrides(tmp_path / "straight"))
    meta = train(straight)["ebm"]
    assert meta["steps"] == 8 and meta["field_scale"] > 0
    w = read_weights(straight.ebm.weights)
    assert w["kind"] == "ebm" and w["arch"]["activation"] == "silu"
    field = load_energy_field(straight.ebm.weights)
    assert field.scale == meta["field_scale"]
    samples = stage_dir(straight, "ebm") / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["mcmc_step0000004.png", "mcmc_step0000008.png"]

    # 4 steps, then a second run that resumes from the step-4 checkpoint up to 8
    half = C.load("fmnist", ebm_overrides(tmp_path / "resumed", **{"ebm.max_steps": 4}))
    train(half)
    last = stage_dir(half, "ebm") / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["ebm_chains"]["x"].shape == (64, 1, 28, 28)
    os.unlink(half.ebm.weights)
    resumed = C.load("fmnist", ebm_overrides(tmp_path / "resumed"))
    train(resumed)
    a, b = read_weights(straight.ebm.weights), read_weights(resumed.ebm.weights)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    end_a = torch.load(stage_dir(straight, "ebm") / "checkpoints" / "last.ckpt", weights_only=True)
    end_b = torch.load(last, weights_only=True)
    assert torch.equal(end_a["ebm_chains"]["x"], end_b["ebm_chains"]["x"])  # the same chains
    assert not torch.equal(end_b["ebm_chains"]["x"], ckpt["ebm_chains"]["x"])  # which did move

    # a checkpoint without the buffer cannot continue those chains: refused, nothing exported
    del end_b["ebm_chains"]
    torch.save(end_b, last)
    os.unlink(resumed.ebm.weights)
    with pytest.raises(CheckpointError, match="replay buffer"):
        train(C.load("fmnist", ebm_overrides(tmp_path / "resumed", **{"ebm.max_steps": 12})))
    assert not os.path.exists(resumed.ebm.weights)


@needs_fmnist
@pytest.mark.parametrize(
    "extra, match",
    [
        # a real divergence: Adam with lr 1000 throws the energies to inf at the first update
        (
            {"ebm.lr": 1000.0},
            r"EBM loss is inf \(energy diverged\) at step 1; last good checkpoint: none saved yet",
        ),
        # the configurable bound on |E|
        (
            {"ebm.lr": 0.05, "ebm.l2": 0.0, "ebm.energy_bound": 0.5},
            r"EBM energy diverged: max \|E\| = [0-9.e+]+ > ebm.energy_bound = 0.5 at step \d+; last good",
        ),
    ],
)
def test_a_diverging_ebm_run_stops_naming_the_step(tmp_path, extra, match):
    from advpure.jobs.train import train

    cfg = C.load("fmnist", ebm_overrides(tmp_path, **{"ebm.max_steps": 20, **extra}))
    with pytest.raises(TrainingError, match=match):
        train(cfg)
    assert not os.path.exists(cfg.ebm.weights)


@needs_fmnist
def test_a_nan_energy_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    from advpure.jobs.train import train
    from advpure.training import ebm as ebm_mod

    original = ebm_mod.ml_loss
    calls = {"n": 0}

    def poisoned(e_data, e_model, l2=0.0):
        calls["n"] += 1
        loss, stats = original(e_data, e_model, l2)
        return (loss * float("nan") if calls["n"] > 6 else loss), stats

    monkeypatch.setattr(ebm_mod, "ml_loss", poisoned)
    cfg = C.load("fmnist", ebm_overrides(tmp_path))
    with pytest.raises(
        TrainingError, match=r"EBM loss is nan .* at step 6; last good checkpoint: .*step0000004\.ckpt"
    ):
        train(cfg)
    assert not os.path.exists(cfg.ebm.weights)


@needs_fmnist
@pytest.mark.ddp
def test_two_ddp_ranks_update_one_shared_replay_buffer(tmp_path):
    """Each rank runs its own B chains; all 2B updated chains land in the (identical) buffer that
    rank 0 checkpoints: exactly the rows the shared stream picked, and nothing else."""
    from advpure.core.rng import mix
    from advpure.jobs.stages import Stages
    from advpure.jobs.train import train

    def stage_dir(cfg, kind):
        return Stages.from_config(cfg).stage(kind).run_dir

    from advpure.training.ebm import _INIT, _SHARED

    extra = {
        "ebm.max_steps": 1,
        "ebm.ckpt_every_n_steps": 1,
        "trainer.devices": 2,
        "trainer.strategy": "ddp_fork",
    }
    cfg = C.load("fmnist", ebm_overrides(tmp_path, **extra))
    train(cfg)
    ckpt = torch.load(stage_dir(cfg, "ebm") / "checkpoints" / "last.ckpt", weights_only=True)
    size, b = cfg.ebm.buffer_size, cfg.ebm.batch_size
    initial = torch.rand((size, 1, 28, 28), generator=torch.Generator().manual_seed(mix(cfg.seed, _INIT)))
    changed = (ckpt["ebm_chains"]["x"] != initial).flatten(1).any(1).nonzero().flatten()
    picked = torch.randperm(size, generator=torch.Generator().manual_seed(mix(cfg.seed, 0, _SHARED)))[: 2 * b]
    assert sorted(changed.tolist()) == sorted(picked.tolist())
