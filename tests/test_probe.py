"""The jvp step-size probe (advpure.purify.probe): the delta -> 0 limit of ADP's secant probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advpure.nets import build_score_net
from advpure.nets.ebm import ConvEnergy, EnergyField
from advpure.purify.adp import adp_step, checkpointed, step_size
from advpure.purify.probe import adp_step_jvp, curvature, fast_tangents, jvp_field, step_size_jvp

F64 = torch.float64


class LinearField(nn.Module):
    """f(x) = -c (x - mu): the DSM optimum for data N(mu, s^2 I) (c = sigma / s^2); c per sample."""

    def __init__(self, mu: float, c: torch.Tensor):
        super().__init__()
        self.mu, self.c = mu, c

    def forward(self, x):
        return -self.c * (x - self.mu)


class MixtureScore(nn.Module):
    """The closed-form DSM optimum for data {x_k} at noise level s: the scaled score of the Gaussian
    smoothing of the data, f(x) = s grad log p_s(x) = sum_k w_k(x) (x_k - x) / s with softmax
    weights w_k ~ exp(-|x - x_k|^2 / (2 s^2)). Nonlinear where two points compete."""

    def __init__(self, points: torch.Tensor, s: float):
        super().__init__()
        self.points, self.s = points, s  # (K, D)

    def forward(self, x):
        flat = x.flatten(1)
        d2 = (flat.unsqueeze(1) - self.points.to(flat.dtype)).square().sum(-1)  # (R, K)
        w = torch.softmax(-d2 / (2 * self.s**2), dim=1)
        return ((w @ self.points.to(flat.dtype) - flat) / self.s).view_as(x)


def _secant_alpha(fn, x, lam, delta):
    with torch.no_grad():
        g = fn(x)
        return step_size(g, fn(x + delta * g), lam, delta)


def test_linear_field_gives_lambda_over_c_exactly_and_equals_the_secant():
    c = torch.tensor([0.5, 2.0, 8.0, 30.0], dtype=F64).view(4, 1, 1, 1)
    f = LinearField(0.5, c)
    x = 0.5 + 0.2 * (torch.rand(4, 1, 5, 5, dtype=F64) - 0.5)
    g, jg = jvp_field(f, x, f(x))
    assert torch.allclose(jg, -c * g, rtol=0, atol=1e-15)  # J = -c I
    alpha = step_size_jvp(g, jg, 0.05)
    assert torch.allclose(alpha, 0.05 / c.flatten(), rtol=1e-12)  # all inside the clamp
    for delta in (1e-1, 1e-3, 1e-6):  # the secant is exact for a linear field at every delta
        assert torch.allclose(_secant_alpha(f, x, 0.05, delta), alpha, rtol=1e-7)
    x_next, a = adp_step_jvp(x, f, 0.05)
    assert torch.equal(a, alpha)
    assert torch.allclose(x_next, 0.5 + 0.95 * (x - 0.5), atol=1e-14)


def test_clamp_and_nan_rules_mirror_the_secant():
    g = -torch.ones(3, 10, dtype=F64)
    assert step_size_jvp(g, -1e-9 * g, 0.05).tolist() == pytest.approx([0.1] * 3)  # flat: largest
    assert step_size_jvp(g, 0.5 * g, 0.05).tolist() == pytest.approx([1e-5] * 3)  # expanding: smallest
    assert step_size_jvp(g, torch.full_like(g, float("nan")), 0.05).tolist() == pytest.approx([1e-5] * 3)
    bf = step_size_jvp(g.bfloat16(), (2.0 * g).bfloat16().neg(), 0.05)
    assert bf.dtype == torch.float32 and bf.tolist() == pytest.approx([0.025] * 3)


def test_mixture_score_secant_converges_to_the_jvp_at_first_order():
    """On the closed-form Gaussian(-mixture) score the secant alpha(delta) -> the jvp alpha with an
    error proportional to delta (f(x + delta g) = g + delta J g + O(delta^2))."""
    torch.manual_seed(0)
    pts = torch.rand(2, 16, dtype=F64)
    f = MixtureScore(pts, s=1.0)  # |x_1 - x_2| ~ 1.6 < 2 s: unimodal, curved along the line
    t = torch.rand(6, 1, dtype=F64) * 0.6 + 0.2  # between the two points: both weights matter
    x = ((1 - t) * pts[0] + t * pts[1] + 0.05 * torch.randn(6, 16, dtype=F64)).view(6, 1, 4, 4)
    g, jg = jvp_field(f, x, f(x))
    a_jvp = step_size_jvp(g, jg, 0.05)
    assert ((a_jvp > 1e-5) & (a_jvp < 0.1)).all()  # unclamped: the comparison means something
    errs = [((_secant_alpha(f, x, 0.05, d) - a_jvp).abs() / a_jvp).max().item() for d in (1e-2, 1e-3, 1e-4)]
    assert errs[0] > 1e-5  # the mixture is nonlinear along g: the secant is not exact
    assert 5 < errs[0] / errs[1] < 20 and 5 < errs[1] / errs[2] < 20  # first order in delta
    assert errs[2] < 1e-4, errs


def test_adp_step_jvp_gradient_matches_finite_differences_float64():
    """x_next is differentiable through g = f(x) with alpha held at its value (the attack's
    definition): its gradient equals finite differences of x -> clip(x + alpha0 f(x)); a
    checkpointed score_fn with the plain probe_fn gives the same gradient."""
    torch.manual_seed(1)
    f = MixtureScore(torch.rand(2, 9, dtype=F64), s=0.3)
    x0 = (0.35 + 0.3 * torch.rand(2, 1, 3, 3, dtype=F64)).requires_grad_(True)
    w = torch.randn(2, 1, 3, 3, dtype=F64)
    x_next, alpha = adp_step_jvp(x0, f, 0.05)
    assert not alpha.requires_grad and x_next.requires_grad
    (grad,) = torch.autograd.grad((x_next * w).sum(), x0)
    xc, ac = adp_step_jvp(x0, checkpointed(f), 0.05, probe_fn=f)
    (grad_ckpt,) = torch.autograd.grad((xc * w).sum(), x0)
    assert torch.equal(ac, alpha) and torch.allclose(grad_ckpt, grad, atol=1e-14)

    def h(x):
        return ((x + alpha.view(-1, 1, 1, 1) * f(x)).clamp(0, 1) * w).sum()

    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(x0.numel()):
            e = torch.zeros(x0.numel(), dtype=F64)
            e[i] = 1e-6
            e = e.view_as(x0)
            fd.view(-1)[i] = (h(x0 + e) - h(x0 - e)) / 2e-6
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6)
    assert not torch.allclose(grad, w)  # the field's Jacobian contributes


def test_ebm_field_hessian_vector_product():
    """EBM field f = -c grad E: J v is -c H v (forward-over-reverse), equal to the double-backward
    Hessian-vector product and to finite differences; `input_grad=None` finds it by itself."""
    torch.manual_seed(2)
    field = EnergyField(ConvEnergy(1, 28, nf=4).to(F64).eval().requires_grad_(False), scale=0.7)
    x = torch.rand(2, 1, 28, 28, dtype=F64)
    v = torch.randn_like(x)
    with torch.no_grad():
        fx, jv = jvp_field(field, x, v)  # auto: the plain attempt has no tangent, then input grad
        fx2, jv2 = jvp_field(field, x, v, input_grad=True)
    assert torch.equal(jv, jv2) and torch.allclose(fx, field(x))
    xr = x.clone().requires_grad_(True)
    gr = field(xr)  # grad mode: the field is differentiable (create_graph)
    (hvp,) = torch.autograd.grad(gr, xr, v)  # v^T J = (J v)^T: J is symmetric
    assert torch.allclose(jv, hvp, rtol=1e-9, atol=1e-12)
    fd = (field(x + 1e-6 * v) - field(x - 1e-6 * v)) / 2e-6
    assert torch.allclose(jv, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())
    with torch.no_grad():
        x_next, alpha = adp_step_jvp(x, field, 0.05, input_grad=True)
    assert torch.equal(alpha, step_size_jvp(fx, jvp_field(field, x, fx, input_grad=True)[1], 0.05))
    assert x_next.shape == x.shape and not x_next.requires_grad


def test_fast_tangents_agree_with_pytorch_rules_on_ncsnv2():
    torch.manual_seed(3)
    net = build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=8).eval().requires_grad_(False)
    x, v = torch.rand(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        p_fast, t_fast = jvp_field(net, x, v)
        p_slow, t_slow = jvp_field(net, x, v, fast=False)
        _, t_func = torch.func.jvp(net, (x,), (v,))
    assert torch.equal(p_fast, p_slow)
    assert torch.allclose(t_fast, t_slow, rtol=0, atol=1e-5 * t_slow.abs().max().item())
    assert torch.equal(t_slow, t_func)  # dual tensors and torch.func agree exactly
    with pytest.raises(ValueError, match="unknown op"):
        fast_tangents(("conv3d",))


def _normalized_curvature_errors(net, x, lam=0.05, delta=1e-3):
    """|kappa_bf16 - kappa_fp32| / (|J g| / |g|)_fp32 per row, for the jvp and the secant probe
    (kappa_secant = (1 - z) / delta). The scale is the field's own derivative along g: random
    weights give curvatures near 0, where a relative error of kappa (or alpha) means nothing."""
    out = {}
    for amp in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            g = net(x)
            g_d = net(x + delta * g.float())
            _, jg = jvp_field(net, x, g)
        gw, gdw = g.float().flatten(1), g_d.float().flatten(1)
        out[amp] = {
            "jvp": curvature(g, jg),
            "secant": (1 - (gw * gdw).sum(1) / (gw * gw).sum(1)) / delta,
            "scale": jg.float().flatten(1).norm(dim=1) / gw.norm(dim=1),
        }
    ref, scale = out[False]["jvp"], out[False]["scale"]
    return {k: ((out[True][k] - ref).abs() / scale) for k in ("jvp", "secant")}, out


def test_bf16_jvp_probe_stays_close_while_the_bf16_secant_does_not():
    """The default's net shape (NCSNv2 28x28, ngf 16; random weights): under bf16 autocast the jvp
    probe's curvature stays within 2 % (median; measured 0.5 %) and 6 % (max; measured 1 %) of the
    field's scale |J g|/|g| of its fp32 value; the bf16 secant's is off by > 15 % (median; measured
    45 %): its 1 - z ~ 1e-3 is below bf16's resolution."""
    torch.manual_seed(0)
    net = build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=16).eval().requires_grad_(False)
    x = torch.rand(16, 1, 28, 28) * 0.5 + 0.25
    err, out = _normalized_curvature_errors(net, x)
    fp32 = out[False]
    assert ((fp32["secant"] - fp32["jvp"]).abs() / fp32["scale"]).median() < 0.01  # fp32: both agree
    assert err["jvp"].median() < 0.02 and err["jvp"].max() < 0.06
    assert err["secant"].median() > 0.15
    assert err["secant"].median() > 10 * err["jvp"].median()


def test_adp_step_and_adp_step_jvp_agree_on_a_smooth_net_in_fp64():
    torch.manual_seed(4)
    f = MixtureScore(torch.rand(3, 16, dtype=F64), s=0.3)
    x = torch.rand(5, 1, 4, 4, dtype=F64)
    with torch.no_grad():
        xs, a_s = adp_step(x, f, 0.05, 1e-6)
        xj, a_j = adp_step_jvp(x, f, 0.05)
    assert torch.allclose(a_s, a_j, rtol=1e-4)
    assert torch.allclose(xs, xj, atol=1e-6)


def test_probe_agreement_counts_discordant_images_and_reads_a_run(tmp_path):
    from advpure.perf.probe_agreement import agreements, compare
    from advpure.results.store import RecordStore

    ref = {i: 1.0 for i in range(20)}
    var = {**ref, 3: 0.0, 7: 0.0, 11: 0.0}  # 3 images only the reference gets right
    a = compare(ref, var, "bpda", "adp_jvp")
    assert (a.n, a.only_reference_correct, a.only_variant_correct) == (20, 3, 0)
    assert a.agreement == 85.0 and a.reference_acc == 100.0 and a.variant_acc == 85.0
    assert abs(a.mcnemar_p - 0.25) < 1e-12  # two-sided exact: 2 * 0.5**3
    assert a.intervals_overlap
    far = compare({i: 1.0 for i in range(50)}, {i: 0.0 for i in range(50)}, "natural", "x")
    assert not far.intervals_overlap and far.agreement == 0.0

    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    store = RecordStore(run / "records" / "rank0.sqlite")
    for d in ("adp_s0.25", "adp_jvp"):  # image 0: only the reference is correct (softmax rows)
        rows = [
            ("single", m, i, float(d != "adp_jvp" or i != 0 or m == "vote"))
            for m in ("softmax", "vote")
            for i in range(4)
        ]
        store.write_batch(d, "natural", 0, 0, 4, rows)
    store.close()
    (got,) = agreements(run, "adp_s0.25", "single", "softmax")
    assert (got.variant, got.n, got.only_reference_correct, got.agreement) == ("adp_jvp", 4, 1, 75.0)
