"""The three diffusion net families (score_sde NCSN++/DDPM++, Ho et al. DDPM, guided-diffusion ADM): official
layouts and parameter counts, forward equal to independent references, the eps/score/time convention, the
importers of the published formats, and the continuous-time DSM loss."""

from __future__ import annotations

import math

import pytest
import torch

from advpure.nets.adm import ADM_CONFIGS, ADMUNet
from advpure.nets.ddpm import DDPM_CONFIGS, DDPMUNet
from advpure.nets.diffusion import DiffusionNet, diffuse, eps_to_score, score_to_eps
from advpure.nets.ncsnpp import NCSNPP_CONFIGS, NCSNpp
from advpure.nets.schedules import DiscreteSchedule, VPSchedule
from advpure.training.losses_diffusion import sample_times, vp_dsm_loss
from helpers import reference_adm as RA
from helpers import reference_diffusion as R


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


SMALL_REF = R.SMALL_28
FAMILIES = {  # family -> (advpure class, official config, small config, reference shapes / forward, ref config)
    "ncsnpp": (
        NCSNpp,
        "ddpmpp_deep_cifar10",
        "ddpmpp_28",
        R.ddpmpp_shapes,
        R.ddpmpp_forward,
        R.DDPMPP_DEEP_CIFAR10,
    ),
    "ddpm": (DDPMUNet, "ddpm_cifar10", "ddpm_28", R.ddpm_shapes, R.ddpm_forward, R.DDPM_CIFAR10),
    "adm": (ADMUNet, "adm_imagenet256_uncond", "adm_28", RA.adm_shapes, RA.adm_forward, RA.ADM_256_UNCOND),
}
CONFIGS = {"ncsnpp": NCSNPP_CONFIGS, "ddpm": DDPM_CONFIGS, "adm": ADM_CONFIGS}
# parameter counts of the official definitions (score_sde issue facts / pytorch_diffusion / guided-diffusion)
OFFICIAL = {"ncsnpp": (106_632_579, 956), "ddpm": (35_746_307, 328), "adm": (552_814_086, 566)}


def _build(family: str, name: str, device="cpu") -> DiffusionNet:
    cls = FAMILIES[family][0]
    with torch.device(device):
        return cls(**CONFIGS[family][name])


# --- official layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_official_parameter_count_and_keys(family):
    """Built on the meta device (nothing allocated): the parameter count, tensor count, key list (in order)
    and every shape equal the official definition's, listed independently by the reference helper."""
    _, official, _, shapes_fn, _, ref_cfg = FAMILIES[family]
    net = _build(family, official, "meta")
    ref = shapes_fn(ref_cfg)
    params, tensors = OFFICIAL[family]
    assert sum(math.prod(s) for s in ref.values()) == params
    assert sum(p.numel() for p in net.parameters()) == params
    sd = net.state_dict()
    assert len(sd) == len(ref) == tensors
    assert list(sd) == list(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    # parameters() order = the official registration order (the score_sde EMA list is positional over it)
    assert [n for n, _ in net.named_parameters()] == list(ref)


def test_official_layout_details():
    """Keys the issue names, the sigmas buffer left out, ADM's 6 output channels."""
    ddpm = _build("ddpm", "ddpm_cifar10", "meta").state_dict()
    assert list(ddpm)[0] == "temb.dense.0.weight" and list(ddpm)[-1] == "conv_out.bias"
    pp = _build("ncsnpp", "ddpmpp_deep_cifar10", "meta")
    assert "sigmas" not in pp.state_dict() and "sigmas" in R.ddpmpp_shapes(
        R.DDPMPP_DEEP_CIFAR10, with_sigmas=True
    )
    # a net described on the meta device keeps a usable (CPU) schedule
    assert _build("ddpm", "ddpm_cifar10", "meta").alpha_bar(0.1).item() == pytest.approx(0.89702, abs=1e-5)
    adm = _build("adm", "adm_imagenet256_uncond", "meta").state_dict()
    assert tuple(adm["out.2.weight"].shape) == (6, 256, 3, 3)
    assert tuple(adm["input_blocks.10.1.qkv.weight"].shape) == (3 * 512, 512, 1)  # attention at 32x32


# --- forward equals the references -----------------------------------------------------------------------


def _times_and_labels(family: str):
    t = torch.tensor([0.001, 0.1, 0.5, 1.0], dtype=torch.float64)
    if family == "ncsnpp":
        return t, 999.0 * t
    return t, torch.tensor([0.0, 99.0, 499.0, 999.0], dtype=torch.float64)  # t = (i + 1) / 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_reference_float64(family):
    """Random weights (nothing zero): advpure's forward equals the functional reference to 1e-10 in float64,
    at the label the convention gives (999 t, or the step index of t = (i + 1) / T)."""
    _, _, small, shapes_fn, fwd_fn, _ = FAMILIES[family]
    ref_cfg = SMALL_REF[family]
    shapes = shapes_fn(ref_cfg)
    sd = R.random_diffusion_state(shapes, seed=11)
    net = _build(family, small).double().eval()
    net.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    t, labels = _times_and_labels(family)
    assert torch.equal(net.labels(t, u), labels)
    with torch.no_grad():
        ref = fwd_fn(sd, u, labels, ref_cfg)
        out = net.output(u, t)
        eps = net(u, t)
    assert ref.abs().max() > 0.1  # a live output
    assert (out - ref).abs().max().item() < 1e-10
    assert torch.equal(eps, out[:, :1])
    if family == "adm":
        e2, v = net.eps_and_variance(u, t)
        assert torch.equal(e2, eps) and torch.equal(v, out[:, 1:]) and out.shape[1] == 2
    else:
        assert out.shape == u.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_input_checks(family):
    net = _build(family, FAMILIES[family][2])
    u = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(u, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="shape"):
        net(u, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="28, 28"):
        net(torch.zeros(2, 1, 32, 32), 0.5)


# --- the time / schedule convention ------------------------------------------------------------------------


def test_schedule_convention_at_diffpure_t_star():
    """t* = 0.1: the VP abar in closed form, DiffPure's discrete index 1000 t* - 1 = 99 and its abar as the
    product of (1 - beta_j) for j <= 99, and the nets' labels (99.9 on the VP net, 99 on the discrete ones)."""
    vp = VPSchedule()
    assert vp.alpha_bar(torch.tensor(0.1, dtype=torch.float64)).item() == pytest.approx(
        math.exp(-(0.1 * 0.1 + 0.5 * 0.01 * 19.9)), rel=1e-14
    )
    d = DiscreteSchedule()
    assert int(d.index(torch.tensor(0.1))) == 99
    prod = 1.0
    for j in range(100):
        prod *= 1 - (1e-4 + j * (0.02 - 1e-4) / 999)
    assert d.alpha_bar(torch.tensor(0.1, dtype=torch.float64)).item() == pytest.approx(prod, rel=1e-12)
    # the continuous VP and the discrete chain agree at t* to 3 decimals (beta(t) = 1000 beta_i)
    assert abs(prod - vp.alpha_bar(torch.tensor(0.1)).item()) < 1e-3
    assert vp.sigma_image(torch.tensor(0.1)).item() == pytest.approx(0.170, abs=5e-4)
    u = torch.zeros(1, 1, 28, 28)
    for family, label in (("ncsnpp", 99.9), ("ddpm", 99.0), ("adm", 99.0)):
        net = _build(family, FAMILIES[family][2])
        assert isinstance(net.schedule, VPSchedule if family == "ncsnpp" else DiscreteSchedule)
        assert net.labels(0.1, u).item() == pytest.approx(label, abs=1e-5)


def test_eps_score_conversions_roundtrip():
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=torch.float64)
    for sch in (VPSchedule(), DiscreteSchedule()):
        s = eps_to_score(eps, t, sch)
        ab = sch.alpha_bar(t)
        assert torch.allclose(s, -eps / (1 - ab).sqrt().view(-1, 1, 1, 1), rtol=1e-14, atol=0)
        assert torch.allclose(score_to_eps(s, t, sch), eps, rtol=1e-13, atol=0)


class GaussianEps(DiffusionNet):
    """The exact eps-predictor E[eps | u_t] for data u0 ~ N(m, s^2 I): with a = abar(t),
    u_t ~ N(sqrt(a) m, (a s^2 + 1 - a) I) and E[eps | u_t] = sqrt(1 - a) (u_t - sqrt(a) m) / (a s^2 + 1 - a)
    = -sqrt(1 - a) grad log p_t(u_t). m and log s are learnable (to check that DSM training finds them)."""

    def __init__(self, schedule, m=0.0, s=1.0):
        super().__init__()
        self.schedule, self.in_channels, self.image_size = schedule, 1, 4
        self.m = torch.nn.Parameter(torch.tensor(float(m), dtype=torch.float64))
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(s), dtype=torch.float64))

    def forward(self, u, t):
        a = self.schedule.alpha_bar(t.double()).view(-1, 1, 1, 1)
        var = a * self.log_s.exp() ** 2 + 1 - a
        return (1 - a).sqrt() * (u - a.sqrt() * self.m) / var


def _true_score(u, t, sch, m, s):
    a = sch.alpha_bar(t.double()).view(-1, 1, 1, 1)
    return -(u - a.sqrt() * m) / (a * s * s + 1 - a)


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule()], ids=["vp", "discrete"])
def test_gaussian_closed_form_score_and_dsm(schedule):
    """On Gaussian data: (1) `score` of the exact eps-predictor is the true grad log p_t, and at small t it
    approaches the data score -(u - m) / s^2 (error shrinking with t); (2) the exact predictor attains the
    closed-form DSM minimum a s^2 / (a s^2 + 1 - a) at fixed t and a mis-scaled one does worse; (3) DSM
    training of (m, s) from a wrong start recovers them, so eps at small t -> -sqrt(1 - abar) grad log p."""
    m, s = 0.3, 0.5
    g = torch.Generator().manual_seed(2)
    exact = GaussianEps(schedule, m, s)
    u = m + s * torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    errs = []
    for tv in (0.3, 0.03, 0.003):
        t = torch.full((64,), tv, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(exact.score(u, t), _true_score(u, t, schedule, m, s), rtol=1e-12, atol=0)
            errs.append((exact.score(u, t) - (-(u - m) / s**2)).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05 * errs[0]
    # (2) the DSM loss at fixed t: minimum value in closed form
    n, tv = 4096, 0.2
    t = torch.full((n,), tv, dtype=torch.float64)
    u0 = m + s * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    a = schedule.alpha_bar(torch.tensor(tv, dtype=torch.float64)).item()
    with torch.no_grad():
        best = vp_dsm_loss(exact, u0, t, z).item()
        worse = vp_dsm_loss(GaussianEps(schedule, m, 1.3 * s), u0, t, z).item()
    assert best == pytest.approx(a * s * s / (a * s * s + 1 - a), rel=0.03)
    assert worse > best
    # (3) training (m, s) by DSM with t ~ U(1e-5, 1)
    learner = GaussianEps(schedule, m=-0.5, s=1.5)
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)
    for _ in range(300):
        u0 = m + s * torch.randn(256, 1, 4, 4, generator=g, dtype=torch.float64)
        tt = sample_times(256, generator=g, dtype=torch.float64)
        loss = vp_dsm_loss(learner, u0, tt, torch.randn(u0.shape, generator=g, dtype=torch.float64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert learner.m.item() == pytest.approx(m, abs=0.03)
    assert learner.log_s.exp().item() == pytest.approx(s, abs=0.03)
    t = torch.full((64,), 0.003, dtype=torch.float64)
    with torch.no_grad():
        a = schedule.alpha_bar(t).view(-1, 1, 1, 1)
        target = -(1 - a).sqrt() * _true_score(u, t, schedule, m, s)
        assert ((learner(u, t) - target).norm() / target.norm()).item() < 0.1


def test_dsm_loss_definition():
    """vp_dsm_loss = mean over rows of the per-row MSE between eps_theta(diffuse(u0, t, z), t) and z."""
    sch = VPSchedule()
    net = GaussianEps(sch, 0.1, 0.7)
    g = torch.Generator().manual_seed(3)
    u0 = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1e-5, 0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    a = sch.alpha_bar(t).view(-1, 1, 1, 1)
    ut = a.sqrt() * u0 + (1 - a).sqrt() * z
    assert torch.allclose(diffuse(u0, t, z, sch), ut, rtol=1e-15, atol=1e-15)
    rows = ((net(ut, t) - z) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(vp_dsm_loss(net, u0, t, z, reduction="none"), rows, rtol=1e-14, atol=0)
    assert vp_dsm_loss(net, u0, t, z).item() == pytest.approx(rows.mean().item(), rel=1e-14)
    ts = sample_times(10000, generator=g)
    assert ts.min() >= 1e-5 and ts.max() <= 1.0 and abs(ts.mean().item() - 0.5) < 0.02


def test_adm_learned_log_variance_endpoints():
    """v = 1 gives log beta_i, v = -1 the clipped log posterior variance (guided-diffusion LEARNED_RANGE)."""
    net = _build("adm", "adm_28")
    sch = net.schedule
    b, ab = sch.betas, sch.alpha_bars
    t = torch.tensor([0.001, 0.1, 1.0], dtype=torch.float64)
    ones = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    for i, k in enumerate((0, 99, 999)):
        post = b[max(k, 1)] * (1 - ab[max(k, 1) - 1]) / (1 - ab[max(k, 1)])
        assert net.learned_log_variance(ones, t)[i, 0, 0, 0].item() == pytest.approx(
            math.log(b[k]), rel=1e-12
        )
        assert net.learned_log_variance(-ones, t)[i, 0, 0, 0].item() == pytest.approx(
            math.log(post), rel=1e-12
        )
