"""Denoising score matching: the objective, the EMA, a real training run, kill-and-resume, NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from advpure.config import compose as C
from advpure.core.errors import ConfigError, TrainingError
from advpure.nets.weights import read_weights
from advpure.training.ema import EMA
from advpure.training.losses import dsm_loss, geometric_sigmas, psnr
from conftest import needs_fmnist, tiny_overrides


def exact_gaussian_score(mu, s, sigma):
    """DSM optimum for data N(mu, s^2 I): f(x) = -sigma (x - mu) / (s^2 + sigma^2)."""
    return lambda x: -sigma * (x - mu) / (s**2 + sigma**2)


def loadable(path) -> bool:
    """The file exists and is a complete checkpoint (torch.load reads it)."""
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:  # missing, or still being written
        return False


def test_exact_gaussian_score_minimises_the_dsm_loss():
    torch.manual_seed(0)
    D, N, mu, s, sigma = 16, 200_000, 0.3, 0.5, 0.25
    x = mu + s * torch.randn(N, D, dtype=torch.float64)
    eps = torch.randn(N, D, dtype=torch.float64)
    exact = exact_gaussian_score(mu, s, sigma)
    best = dsm_loss(exact, x, torch.tensor(sigma), eps)
    # closed form of the minimum: 1/2 * D * s^2 / (s^2 + sigma^2)
    assert best.item() == pytest.approx(0.5 * D * s**2 / (s**2 + sigma**2), rel=0.01)
    for perturbed in (
        lambda z: 1.1 * exact(z),
        lambda z: 0.9 * exact(z),
        lambda z: exact(z) + 0.05,
        lambda z: exact(z - 0.1),
        exact_gaussian_score(mu, s, 0.5),
    ):
        assert dsm_loss(perturbed, x, torch.tensor(sigma), eps) > best


def test_training_moves_the_learned_score_towards_the_exact_one():
    torch.manual_seed(0)
    D, mu, s, sigma = 8, 0.3, 0.5, 0.25

    class Affine(nn.Module):  # f(x) = a * (x - b), per dimension; the exact score is in the family
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(D))
            self.b = nn.Parameter(torch.zeros(D))

        def forward(self, x):
            return self.a * (x - self.b)

    net = Affine()
    a_star = -sigma / (s**2 + sigma**2)

    def dist():
        return ((net.a - a_star).norm() + (net.b - mu).norm()).item()

    before = dist()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(400):
        x = mu + s * torch.randn(512, D)
        opt.zero_grad()
        dsm_loss(net, x, torch.tensor(sigma)).backward()
        opt.step()
    assert dist() < 0.1 * before
    assert net.a.detach().mean().item() == pytest.approx(a_star, abs=0.05)


def test_geometric_sigmas_and_their_errors():
    s = geometric_sigmas(50.0, 0.01, 232)
    assert len(s) == 232 and s[0].item() == pytest.approx(50.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    for args, match in [((1.0, 2.0, 5), "sigma_min"), ((0.0, 0.01, 5), "> 0"), ((1.0, 0.1, 0), ">= 1")]:
        with pytest.raises(ValueError, match=match):
            geometric_sigmas(*args)


@pytest.mark.parametrize(
    "override, match",
    [
        ("score.dsm_sigma_max=0", "score.dsm_sigma_max"),
        ("score.dsm_sigma_min=-1", "score.dsm_sigma_min"),
        ("score.dsm_sigma_fixed=0", "score.dsm_sigma_fixed"),
        ("score.dsm_levels=0", "score.dsm_levels"),
    ],
)
def test_bad_sigma_config(override, match):
    with pytest.raises(ConfigError, match=match):
        C.load("fmnist", [override])


def test_ema_update_arithmetic():
    net = nn.Linear(2, 1)
    net.register_buffer("count", torch.zeros(()))
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.count.fill_(7.0)
    ema.update(net)
    assert torch.allclose(ema.shadow.weight, torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))
    ema.update(net)
    assert torch.allclose(ema.shadow.weight, torch.full((1, 2), 0.9 * 1.2 + 0.1 * 3.0))
    assert ema.shadow.count.item() == 7.0  # buffers are copied, not averaged
    assert int(ema.updates) == 2
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def score_overrides(tmp, **extra):
    base = {
        "train.stages": "[score]",
        "score.ngf": 8,
        "score.batch_size": 32,
        "score.max_steps": 60,
        "score.ckpt_every_n_steps": 20,
        "score.val_every_n_steps": 60,
        "score.val_batches": 2,
        "score.ema_decay": 0.9,
        "data.train_subset": 2000,
        "data.val_size": 500,
        "data.eval_batch_size": 100,
    }
    base.update(extra)
    return tiny_overrides(tmp, **base)


@needs_fmnist
def test_short_real_training_denoises_and_exports_the_ema(tmp_path):
    from advpure.data import ImageDataModule
    from advpure.jobs.train import train
    from advpure.training.score import make_score_net

    cfg = C.load(
        "fmnist", score_overrides(tmp_path, **{"score.max_steps": 100, "score.val_every_n_steps": 100})
    )
    meta = train(cfg)["score"]
    assert meta["steps"] == 100
    # the one-step denoiser beats the noisy input at both validation sigmas
    assert meta["val/psnr_gain_s0.25"] > 1.0 and meta["val/psnr_gain_s0.1"] > 0.0
    w = read_weights(cfg.score.weights)
    net = make_score_net(w["arch"])
    net.load_state_dict(w["state_dict"])
    init = make_score_net(w["arch"])  # an untrained net with the same init seed
    torch.manual_seed(cfg.seed)
    dm = ImageDataModule(cfg.data, cfg.paths)
    dm.setup()
    x = dm.train_x[dm.val_indices[:128]].float() / 255
    sigma = geometric_sigmas(1.0, 0.01, 100)[torch.randint(0, 100, (128,))]
    eps = torch.randn_like(x)
    with torch.no_grad():
        assert dsm_loss(net, x, sigma, eps) < 0.7 * dsm_loss(init, x, sigma, eps)
        noisy = x + 0.25 * eps
        assert psnr((noisy + 0.25 * net(noisy)).clamp(0, 1), x).mean() > psnr(noisy.clamp(0, 1), x).mean()
    # the exported weights are the EMA copy, not the raw ones
    ckpt = torch.load(tmp_path / "runs/train/fmnist/score/checkpoints/last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    for k, v in w["state_dict"].items():
        assert torch.equal(v, sd[f"ema.shadow.{k}"])
    assert any(not torch.equal(v, sd[f"net.{k}"]) for k, v in w["state_dict"].items())


def _train_cmd(tmp, **extra):
    return [sys.executable, "-m", "advpure", "train", *score_overrides(tmp, **extra)]


@needs_fmnist
def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    extra = {
        "score.max_steps": 80,
        "score.ckpt_every_n_steps": 10,
        "score.val_every_n_steps": 1000,
        "trainer.num_threads": 1,
    }
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(straight, **extra), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(killed, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "runs/train/fmnist/score/checkpoints/last.ckpt"
    t0 = time.time()
    while not loadable(last) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)  # poll until the first step checkpoint is complete (it is the event we wait for)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    weights = killed / "artifacts/fmnist/score.pt"
    assert not weights.exists(), "the run finished before it could be killed"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < stopped_at < 80
    out = subprocess.run(_train_cmd(killed, **extra), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout
    a = read_weights(straight / "artifacts/fmnist/score.pt")
    b = read_weights(weights)
    assert a["meta"]["steps"] == b["meta"]["steps"] == 80
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


@needs_fmnist
def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    from advpure.jobs.train import train
    from advpure.training import score as score_mod

    original = score_mod.dsm_loss
    calls = {"n": 0}

    def poisoned(net, x, sigma, eps=None, reduce=True):
        calls["n"] += 1
        loss = original(net, x, sigma, eps, reduce)
        return loss * float("nan") if calls["n"] > 25 else loss

    monkeypatch.setattr(score_mod, "dsm_loss", poisoned)
    cfg = C.load("fmnist", score_overrides(tmp_path))
    with pytest.raises(
        TrainingError, match=r"DSM loss is nan at step 25; last good checkpoint: .*step0000020\.ckpt"
    ):
        train(cfg)
    assert not os.path.exists(cfg.score.weights)  # nothing exported from a diverged run
