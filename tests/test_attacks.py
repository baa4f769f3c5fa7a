"""Attacks: threat model, sanity checks of the paper (eps = 0, identity purifier), batched EOT,
SPSA's estimator, APGD vs PGD, losses, path tracking and validation. Tiny nets, 8x8 images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn

from advpure.attacks import (
    aggregate_draws,
    apgd_attack,
    apgd_checkpoints,
    check_attack,
    cross_entropy,
    dlr,
    eot_gradient,
    pgd_attack,
    project,
    run_attack,
    should_halve,
    spsa_attack,
    spsa_gradient,
)
from advpure.core.rng import GeneratorRNG, SampleRNG
from advpure.purify import Defense
from helpers.attack_models import (
    any_size_classifier,
    attack_spec,
    prototypes_data,
    rng_for,
    score_net,
    trained_mlp,
)
from helpers.defenses import adp_defense as adp

EPS, STEP = 8 / 255, 2 / 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- tiny nets and defenses ---------------------------------------------------------------------
def adp_defense(clf=None, *, replicas=2, sigma=0.2, steps=2, channels=1, dtype=torch.float32, cls=Defense):
    clf = clf if clf is not None else any_size_classifier(channels)
    d = adp(clf, score_net(channels), sigma=sigma, steps=steps, tau=0.0, replicas=replicas, cls=cls)
    return d.to(dtype)


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained in < 1 s to ~98% test accuracy; returns (classifier, x_test, y_test)."""
    clf = trained_mlp()
    x_test, y_test = prototypes_data(64, 2)
    assert (clf(x_test).argmax(1) == y_test).float().mean() > 0.9
    return clf, x_test, y_test


def spec(kind="pgd", **kw):
    """Parameters of attack `kind`, unvalidated, with small budgets (iters 3, EOT 2, 4 SPSA samples)."""
    return attack_spec(kind, {"iters": 3, "eot": 2, "samples": 4}, **kw)


SPECS = {
    "pgd_classifier": spec(gradient="classifier", random_start=True),
    "pgd_full": spec(gradient="full"),
    "pgd_bpda": spec(gradient="bpda", random_start=True),
    "pgd_bpda_vote": spec(gradient="bpda", eot_aggregate="vote"),
    "apgd_full": spec("apgd", gradient="full", iters=5),
    "apgd_bpda_dlr": spec("apgd", gradient="bpda", loss="dlr", iters=5, random_start=True),
    "apgd_classifier": spec("apgd", gradient="classifier", iters=5),
    "joint_score": spec("joint_score"),
    "joint_score_bpda": spec("joint_score", joint_grad="bpda", random_start=True),
    "joint_full": spec("joint_full"),
    "joint_full_bpda_vote": spec("joint_full", joint_grad="bpda", eot_aggregate="vote"),
    "spsa": spec("spsa", random_start=True),
}


# --- sanity checks of the paper -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_eps_zero_leaves_the_input_and_robust_equals_natural(name, trained):
    clf, x, y = trained
    x, y = x[:6], y[:6]
    d = adp_defense(clf, replicas=2, sigma=0.3)
    res = run_attack(SPECS[name], d, x, y, rng_for(6), eps=0.0, step=STEP)
    assert torch.equal(res.x_adv, x)
    robust = d.evaluate(res.x_adv, y, rng_for(6, seed=9), n=2)
    natural = d.evaluate(x, y, rng_for(6, seed=9), n=2)
    for rule in natural:
        assert torch.equal(robust[rule], natural[rule])


@pytest.mark.parametrize("kind", ["pgd", "apgd"])
def test_identity_purifier_makes_bpda_and_full_equal_classifier_pgd(kind, trained):
    clf, x, y = trained
    x, y = x[:16], y[:16]
    d = Defense(clf, replicas=3)  # identity purifier
    runs = {
        g: run_attack(
            spec(kind, gradient=g, eot=4, iters=6, random_start=True),
            d,
            x,
            y,
            rng_for(16),
            eps=0.08,
            step=0.02,
        )
        for g in ("classifier", "bpda", "full")
    }
    runs["vote"] = run_attack(
        spec(kind, gradient="bpda", eot_aggregate="vote", eot=4, iters=6, random_start=True),
        d,
        x,
        y,
        rng_for(16),
        eps=0.08,
        step=0.02,
    )
    ref = runs["classifier"]
    assert not torch.equal(ref.x_adv, x)  # the attack moved
    for r in runs.values():
        assert torch.equal(r.x_adv, ref.x_adv) and torch.equal(r.losses, ref.losses)


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=5, deadline=None)
@given(
    eps=st.floats(0.0, 0.3),
    step=st.floats(1e-3, 0.2),
    b=st.integers(1, 4),
    c=st.sampled_from([1, 2]),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_iterate_stays_in_the_ball_and_the_image_range(name, eps, step, b, c, h, w, seed):
    torch.manual_seed(seed)
    x = torch.rand(b, c, h, w)
    x[:, :, 0, 0] = 0.0  # pixels at the edges of [0, 1] make the clipping matter
    x[:, :, -1, -1] = 1.0
    y = torch.randint(0, 10, (b,))
    d = adp_defense(channels=c, replicas=2)
    iterates = []
    cfg = SPECS[name]
    res = run_attack(
        cfg,
        d,
        x,
        y,
        SampleRNG(seed, range(b)),
        eps=eps,
        step=step,
        track_path=True,
        observer=lambda i, xi: iterates.append((i, xi.clone())),
    )
    assert [i for i, _ in iterates] == list(range(cfg.iters + 1))
    for _, xi in [*iterates, (None, res.x_adv)]:
        assert xi.shape == x.shape
        assert 0 <= xi.min() and xi.max() <= 1
        assert (xi - x).abs().max() <= eps + 1e-6
    assert res.losses.shape == (cfg.iters + 1, b) and torch.isfinite(res.losses).all()
    assert set(res.path_correct) == {"softmax", "logits", "vote"}
    assert all(v.shape == (cfg.iters, b) and v.dtype == torch.bool for v in res.path_correct.values())


def test_progress_is_called_once_per_iteration():
    d = adp_defense()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    for cfg in SPECS.values():
        calls = []
        run_attack(cfg, d, x, y, rng_for(2), eps=EPS, step=STEP, progress=calls.append)
        assert calls == list(range(cfg.iters))


def test_runs_under_inference_mode_with_an_omegaconf_spec():
    d = adp_defense()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    cfg = OmegaConf.structured(spec(gradient="full", eot=2))
    plain = run_attack(cfg, d, x, y, rng_for(2), eps=EPS, step=STEP)
    with torch.inference_mode():  # as in Lightning's test loop
        x_inf, y_inf = x.clone(), y.clone()
        res = run_attack(cfg, d, x_inf, y_inf, rng_for(2), eps=EPS, step=STEP)
    assert torch.equal(res.x_adv, plain.x_adv)


def test_results_depend_on_seed_and_index_only_not_on_the_batch():
    d = adp_defense(sigma=0.3)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    idx = torch.arange(50, 54)
    cfg = spec(gradient="bpda", eot=3, random_start=True)
    whole = run_attack(cfg, d, x, y, SampleRNG(1, idx), eps=EPS, step=STEP)
    again = run_attack(cfg, d, x, y, SampleRNG(1, idx), eps=EPS, step=STEP)
    half = run_attack(cfg, d, x[2:], y[2:], SampleRNG(1, idx[2:]), eps=EPS, step=STEP)
    assert torch.equal(whole.x_adv, again.x_adv)
    assert torch.allclose(whole.x_adv[2:], half.x_adv, atol=1e-6)
    other = run_attack(cfg, d, x, y, SampleRNG(2, idx), eps=EPS, step=STEP)
    assert not torch.equal(whole.x_adv, other.x_adv)


# --- joint attacks -------------------------------------------------------------------------------
@pytest.mark.parametrize("joint_grad, aggregate", [("input", "mean"), ("bpda", "mean"), ("bpda", "vote")])
@pytest.mark.parametrize("kind", ["joint_score", "joint_full"])
def test_joint_attacks_without_the_purifier_term_are_pgd(kind, joint_grad, aggregate):
    # eps_mix = 0 leaves the classifier term: PGD with the classifier gradient (input) or BPDA,
    # which for joint (full) shares its draws with the purifier term, so the draws line up
    d = adp_defense(replicas=2, sigma=0.3)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    gradient = "classifier" if joint_grad == "input" else "bpda"
    pgd = run_attack(
        spec(gradient=gradient, eot_aggregate=aggregate, eot=3), d, x, y, rng_for(4), eps=EPS, step=STEP
    )
    joint = run_attack(
        spec(kind, eps_mix=0.0, joint_grad=joint_grad, eot_aggregate=aggregate, eot=3),
        d,
        x,
        y,
        rng_for(4),
        eps=EPS,
        step=STEP,
    )
    assert torch.equal(joint.x_adv, pgd.x_adv) and torch.equal(joint.losses, pgd.losses)


@pytest.mark.parametrize("kind", ["joint_score", "joint_full"])
def test_joint_attacks_purifier_term(kind):
    # eps_mix = 1 leaves the purifier term: sign(s(x)) or sign(mean_k f(x; n_k) - x)
    d = adp_defense(replicas=2, sigma=0.3)
    b, k, step = 4, 3, 0.01
    x, y = 0.2 + 0.6 * torch.rand(b, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    iterates = []
    run_attack(
        spec(kind, eps_mix=1.0, eot=k, iters=1),
        d,
        x,
        y,
        rng_for(b),
        eps=0.1,
        step=step,
        observer=lambda i, xi: iterates.append(xi),
    )
    with torch.no_grad():
        if kind == "joint_score":
            direction = d.field(x).sign()
        else:
            purified = d.purify(x, rng_for(b).child("eot"), k).x.view(k, *x.shape)
            direction = (purified.mean(0) - x).sign()
    assert torch.allclose(iterates[1], x + step * direction, atol=1e-7)


# --- batched EOT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["bpda", "full"])
def test_batched_eot_equals_a_loop_over_draws(gradient):
    d = adp_defense(replicas=1, sigma=0.3, steps=3, dtype=torch.float64)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 4, 7])
    k = 4
    g1 = torch.Generator().manual_seed(5)
    batched = eot_gradient(d, x, y, GeneratorRNG(g1), gradient=gradient, eot=k)
    g2 = torch.Generator().manual_seed(5)
    singles = [eot_gradient(d, x, y, GeneratorRNG(g2), gradient=gradient, eot=1) for _ in range(k)]
    assert g1.get_state().equal(g2.get_state())  # the same randomness consumed
    grads = torch.stack([s.grad for s in singles])
    assert torch.allclose(batched.grad, grads.mean(0), rtol=1e-9, atol=1e-12)
    assert torch.allclose(batched.loss, torch.stack([s.loss for s in singles]).mean(0), rtol=1e-6)
    assert torch.allclose(batched.chains, torch.cat([s.chains for s in singles]), rtol=1e-6)
    assert not torch.allclose(grads[0], grads[1])  # the draws differ: the comparison means something
    if gradient == "bpda":
        g3 = torch.Generator().manual_seed(5)
        vote = eot_gradient(d, x, y, GeneratorRNG(g3), gradient="bpda", eot=k, aggregate="vote")
        assert torch.equal(vote.grad, aggregate_draws(grads, "vote"))


def test_vote_aggregation_on_hand_made_gradients():
    # 3 draws, 1 image, 3 pixels
    grads = torch.tensor([[[1e-3, -2.0, 0.0]], [[1e-3, 1.0, 0.0]], [[-10.0, 1.0, 5.0]]])
    assert aggregate_draws(grads, "vote").tolist() == [[1.0, 1.0, 1.0]]  # majority of signs
    assert aggregate_draws(grads, "mean").sign().tolist() == [[-1.0, 0.0, 1.0]]
    tie = torch.tensor([[[1.0]], [[-3.0]]])
    assert aggregate_draws(tie, "vote").tolist() == [[0.0]]
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_draws(grads, "median")


def test_vote_with_full_gradient_is_an_error():
    d = adp_defense()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="vote"):
        check_attack(spec(gradient="full", eot_aggregate="vote"), d, EPS, STEP)
    with pytest.raises(ValueError, match="bpda"):
        eot_gradient(d, x, y, rng_for(2), gradient="full", eot=2, aggregate="vote")


# --- losses --------------------------------------------------------------------------------------
def test_dlr_against_a_hand_computation():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    y = torch.tensor([0, 1, 2])
    # sorted: 3, 2, 1, 0 -> denominator z_pi1 - z_pi3 = 3 - 1 = 2
    # y=0: -(3 - 2) / 2 = -0.5 ; y=1: -(1 - 3) / 2 = 1.0 ; all equal: -(0) / 1e-12 = 0
    assert torch.allclose(dlr(z, y), torch.tensor([-0.5, 1.0, 0.0]))
    assert torch.allclose(dlr(5 * z + 7, y), dlr(z, y))  # shift and scale invariant
    assert torch.allclose(cross_entropy(z, y)[0], -z[0].log_softmax(-1)[0])
    with pytest.raises(ValueError, match="3 classes"):
        dlr(torch.zeros(1, 2), torch.tensor([0]))


def test_dlr_with_two_classes_fails_with_a_clear_error():
    d = Defense(any_size_classifier(classes=2))
    with pytest.raises(ValueError, match="3 classes"):
        run_attack(
            spec(loss="dlr", gradient="classifier"),
            d,
            torch.rand(2, 1, 8, 8),
            torch.tensor([0, 1]),
            rng_for(2),
            eps=EPS,
            step=STEP,
        )


# --- SPSA ----------------------------------------------------------------------------------------
def _smooth_loss(a, b):
    def f(x):
        return torch.logsumexp(x @ a, -1) + 0.5 * ((x - b) ** 2).sum(-1)

    return f


def _cosines(samples, seeds=5):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 7, generator=g), torch.randn(20, generator=g)
    f = _smooth_loss(a, b)
    x = torch.randn(3, 20, generator=g, dtype=torch.float64).float()
    xr = x.clone().requires_grad_(True)
    true = torch.autograd.grad(f(xr).sum(), xr)[0]
    cos = [
        nn.functional.cosine_similarity(
            spsa_gradient(f, x, GeneratorRNG(seed=s), samples, 1e-3), true, dim=-1
        )
        for s in range(seeds)
    ]
    return torch.stack(cos)


def test_spsa_estimate_aligns_with_the_true_gradient_and_improves_with_samples():
    means = [_cosines(n).mean().item() for n in (4, 40, 400)]
    assert _cosines(400).min() > 0.5
    assert means[0] < means[1] < means[2]


def test_spsa_chunking_does_not_change_the_estimate():
    g = torch.Generator().manual_seed(1)
    f = _smooth_loss(torch.randn(20, 5, generator=g).double(), torch.randn(20, generator=g).double())
    x = torch.randn(3, 20, generator=g).double()
    whole = spsa_gradient(f, x, GeneratorRNG(seed=3), 50, 1e-2)
    chunked = spsa_gradient(f, x, GeneratorRNG(seed=3), 50, 1e-2, max_queries=7)  # one +/- pair per call
    assert torch.allclose(whole, chunked, rtol=1e-9, atol=1e-12)


class Recording(Defense):
    """A Defense that remembers what it purified (inputs and outputs)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def purify(self, x, rng, draws=1, differentiable=False):
        out = super().purify(x, rng, draws, differentiable)
        self.calls.append((x.detach(), out.x.detach()))
        return out


def test_spsa_queries_use_common_random_numbers_and_chunks_do_not_matter():
    b, n, s = 2, 3, 2
    d = adp_defense(replicas=s, sigma=0.3, cls=Recording, dtype=torch.float64)
    x, y = torch.rand(b, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    p = attack_spec("spsa", iters=2, samples=n, delta=0.01)
    whole = spsa_attack(d, x, y, rng_for(b), p, eps=EPS, step=STEP)
    queries = [c for c in d.calls if c[0].shape[0] == 2 * n * b]
    assert queries
    for q_in, q_out in queries:
        q_in, q_out = q_in.view(2, n, b, -1), q_out.view(s, 2, n, b, -1)
        # the pair x + c v, x - c v (clipped to [0, 1]) differs by at most 2c per pixel
        assert (q_in[0] - q_in[1]).abs().max() <= 0.02 + 1e-9
        # +/- queries of one image see the same purification noise: their purified versions
        # differ by far less than independent noise (sigma = 0.3) would make them differ
        assert (q_out[:, 0] - q_out[:, 1]).abs().mean() < 0.05
        assert (q_out[0] - q_out[1]).abs().mean() > 0.1  # replicas are independent draws
    d.calls.clear()
    chunked = spsa_attack(d, x, y, rng_for(b), p, eps=EPS, step=STEP, max_queries=2 * b)
    assert max(c[0].shape[0] for c in d.calls) == 2 * b
    assert torch.allclose(whole.losses, chunked.losses) and torch.equal(whole.x_adv, chunked.x_adv)


# --- APGD ----------------------------------------------------------------------------------------
def test_apgd_checkpoints():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert apgd_checkpoints(1) == []


def test_apgd_step_size_rule_on_hand_made_counts():
    # rho = 0.75, 8 steps since the last checkpoint: condition 1 needs >= 6 increases to keep eta
    increases = torch.tensor([6, 5, 8, 8])
    halved_last = torch.tensor([False, False, False, True])
    best = torch.tensor([2.0, 2.0, 1.0, 1.0])
    best_before = torch.tensor([1.0, 1.0, 1.0, 1.0])  # samples 2, 3 did not improve
    out = should_halve(increases, 8, 0.75, halved_last, best, best_before)
    # 0: increasing and improving -> keep; 1: too few increases -> halve;
    # 2: no improvement and not halved last time -> halve; 3: no improvement but just halved -> keep
    assert out.tolist() == [False, True, True, False]


def test_apgd_first_step_has_size_two_eps_and_the_best_iterate_is_returned():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))  # gradients vary
    d = adp_defense(clf, replicas=2, sigma=0.4)
    b, eps = 8, 0.05
    x = 0.2 + 0.6 * torch.rand(b, 1, 8, 8)  # interior: the ball is not clipped by [0, 1]
    y = d.classify(x).argmax(1)
    iterates = []
    res = apgd_attack(
        d,
        x,
        y,
        rng_for(b),
        attack_spec("apgd", iters=10, gradient="bpda", eot=2, random_start=True),
        eps=eps,
        observer=lambda i, xi: iterates.append(xi),
    )
    # from a random start inside the ball, a step of 2 eps reaches its boundary in every pixel
    assert torch.allclose((iterates[1] - x).abs(), torch.full_like(x, eps), atol=1e-6)
    # the best point: the iterate with the highest (EOT) loss, per sample
    best = res.losses.argmax(0)
    stacked = torch.stack(iterates)
    assert torch.equal(res.x_adv, stacked[best, torch.arange(b)])
    assert (best < len(iterates) - 1).any()  # not simply the last iterate
    assert not torch.equal(stacked[best, torch.arange(b)], stacked[-1])


def test_apgd_halves_and_restarts_from_the_best_point(trained):
    # rho = 1: at the first checkpoint (iteration 3 of 10) every sample whose loss did not rise at
    # each step halves eta (2 eps -> eps) and steps from its best point without momentum; the
    # others take the momentum step from x_3 with eta = 2 eps
    clf, x, y = trained
    d = Defense(clf)
    eps, a = 0.1, 0.75
    iterates = []
    res = apgd_attack(
        d,
        x,
        y,
        rng_for(64),
        attack_spec("apgd", iters=10, gradient="classifier", rho=1.0, momentum=a),
        eps=eps,
        observer=lambda i, xi: iterates.append(xi),
    )
    w = apgd_checkpoints(10)[0]
    assert w == 3
    loss = res.losses[: w + 1]
    halved = ~(loss[1:] > loss[:-1]).all(0)
    best_at = loss.argmax(0)
    x_best = torch.stack(iterates)[best_at, torch.arange(64)]

    def sign_grad(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(cross_entropy(clf(z), y).sum(), z)[0].sign()

    z_best = project(x_best + eps * sign_grad(x_best), x, eps)
    restarted = project(x_best + a * (z_best - x_best), x, eps)
    x_w, x_prev = iterates[w], iterates[w - 1]
    z_w = project(x_w + 2 * eps * sign_grad(x_w), x, eps)
    kept = project(x_w + a * (z_w - x_w) + (1 - a) * (x_w - x_prev), x, eps)
    expected = torch.where(halved.view(-1, 1, 1, 1), restarted, kept)
    assert torch.allclose(iterates[w + 1], expected, atol=1e-6)
    assert (halved & (best_at < w)).any() and (~halved).any()  # both cases occur


def test_apgd_beats_or_equals_pgd_at_the_same_budget(trained):
    clf, x, y = trained
    d = Defense(clf)
    eps, iters = 0.08, 5
    pgd = pgd_attack(
        d, x, y, rng_for(64), attack_spec("pgd", iters=iters, gradient="classifier"), eps=eps, step=eps / 4
    )
    apgd = apgd_attack(d, x, y, rng_for(64), attack_spec("apgd", iters=iters, gradient="classifier"), eps=eps)
    with torch.no_grad():
        lp, la = cross_entropy(clf(pgd.x_adv), y), cross_entropy(clf(apgd.x_adv), y)
        acc_p = (clf(pgd.x_adv).argmax(1) == y).float().mean()
        acc_a = (clf(apgd.x_adv).argmax(1) == y).float().mean()
    assert la.mean() >= lp.mean()
    assert acc_a <= acc_p < 0.9  # and PGD did reduce the accuracy: the comparison is meaningful
    # APGD returns the best iterate: on a deterministic model its loss is the max along the path
    assert torch.allclose(la, apgd.losses.max(0).values)
    assert not torch.equal(apgd.x_adv, x)


def test_apgd_dlr_fools_the_undefended_classifier(trained):
    clf, x, y = trained
    d = Defense(clf)
    res = run_attack(
        spec("apgd", gradient="classifier", loss="dlr", iters=10), d, x, y, rng_for(64), eps=0.15, step=STEP
    )
    assert (clf(res.x_adv).argmax(1) == y).float().mean() < 0.2


# --- path tracking -------------------------------------------------------------------------------
def _path_by_separate_evaluation(d, iterates, y, rng):
    rows = [d.evaluate(xi, y, rng, n=1) for xi in iterates]
    return {rule: torch.cat([r[rule] for r in rows]) for rule in rows[0]}


@pytest.mark.parametrize(
    "name, cfg, stream",
    [
        ("bpda_reuses", spec(gradient="bpda", eot=3, iters=4), "eot"),
        ("full_reuses", spec(gradient="full", eot=2, iters=4), "eot"),
        ("apgd_reuses", spec("apgd", gradient="bpda", eot=2, iters=4), "eot"),
        ("joint_full_reuses", spec("joint_full", eot=2, iters=4), "eot"),
        ("few_draws_evaluates", spec(gradient="bpda", eot=1, iters=4), "path"),
        ("classifier_evaluates", spec(gradient="classifier", iters=4), "path"),
    ],
)
def test_path_tracking_reuses_the_attack_chains_or_evaluates_afresh(name, cfg, stream):
    # borderline predictions (untrained classifier, large screening noise) so that other draws
    # would give another path: the comparison can tell which chains were used
    d = adp_defense(replicas=2, sigma=0.5)
    b = 8
    x = torch.rand(b, 1, 8, 8)
    y = d.classify(x).argmax(1)
    iterates = []
    res = run_attack(
        cfg,
        d,
        x,
        y,
        rng_for(b),
        eps=EPS,
        step=STEP,
        track_path=True,
        observer=lambda i, xi: iterates.append(xi),
    )
    iterates = iterates[: cfg.iters]
    expected = _path_by_separate_evaluation(d, iterates, y, rng_for(b).child(stream))
    for rule in expected:
        assert torch.equal(res.path_correct[rule], expected[rule]), rule
    other = "path" if stream == "eot" else "eot"
    different = _path_by_separate_evaluation(d, iterates, y, rng_for(b).child(other))
    assert any(not torch.equal(res.path_correct[r], different[r]) for r in expected)


@pytest.mark.parametrize("name", ["pgd_classifier", "pgd_bpda", "apgd_full", "spsa"])
def test_path_of_the_identity_defense_is_classifier_correctness(name, trained):
    clf, x, y = trained
    x, y = x[:16], y[:16]
    d = Defense(clf, replicas=3)
    iterates = []
    res = run_attack(
        replace(SPECS[name], iters=4),
        d,
        x,
        y,
        rng_for(16),
        eps=0.1,
        step=0.03,
        track_path=True,
        observer=lambda i, xi: iterates.append(xi),
    )
    expected = torch.stack([clf(xi).argmax(1) == y for xi in iterates[:-1]])
    for v in res.path_correct.values():
        assert torch.equal(v, expected)
    assert expected[0].any() and not expected.all()  # the attack broke some, not all, samples


# --- validation ----------------------------------------------------------------------------------
BAD = [
    ({"eps": -0.1}, "eps"),
    ({"step": 0.0}, "step"),
    ({"iters": 0}, "iters"),
    ({"eot": 0}, "eot"),
    ({"samples": 0, "kind": "spsa"}, "samples"),
    ({"kind": "cw"}, "kind"),
    ({"gradient": "exact"}, "gradient"),
    ({"loss": "hinge"}, "loss"),
    ({"eot_aggregate": "median"}, "eot_aggregate"),
    ({"gradient": "full", "eot_aggregate": "vote"}, "vote"),
    ({"kind": "apgd", "gradient": "full", "eot_aggregate": "vote"}, "vote"),
    ({"kind": "joint_score", "defense": "none"}, "time-free score field"),
    ({"kind": "joint_full", "defense": "none"}, "stochastic"),
    ({"kind": "joint_score", "joint_grad": "exact"}, "joint_grad"),
]


@pytest.mark.parametrize("bad, match", BAD)
def test_bad_attacks_fail_before_any_defense_call(bad, match):
    bad = dict(bad)
    eps, step = bad.pop("eps", EPS), bad.pop("step", STEP)
    d = Defense(any_size_classifier()) if bad.pop("defense", "adp") == "none" else adp_defense()
    cfg = spec(**bad)
    with pytest.raises(ValueError, match=match):
        check_attack(cfg, d, eps, step)
    with pytest.raises(ValueError, match=match):
        run_attack(cfg, d, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), rng_for(2), eps=eps, step=step)
    assert d.classifier.evals == 0 and d.score_evals == 0


def test_joint_attacks_run_on_their_defenses():
    d = adp_defense()
    for kind in ("joint_score", "joint_full"):
        check_attack(spec(kind), d, EPS, STEP)  # no error


def test_dwbox_on_the_identity_defense_is_exactly_classifier_pgd(trained):
    """With no randomness to freeze, the DW-box attack is the classifier PGD itself."""
    clf, x, y = trained
    x, y = x[:8], y[:8]
    d = Defense(clf)
    p = spec(gradient="bpda", iters=5, eot=3)
    plain = run_attack(p, d, x, y, rng_for(8), eps=0.1, step=0.03).x_adv
    with d.frozen(7):
        frozen = run_attack(p, d, x, y, rng_for(8), eps=0.1, step=0.03).x_adv
    blind = run_attack(spec(gradient="classifier", iters=5), d, x, y, rng_for(8), eps=0.1, step=0.03).x_adv
    assert torch.equal(frozen, plain) and torch.equal(frozen, blind)


def test_dwbox_eot_averages_exactly_the_frozen_replicas(trained):
    """Under a frozen defense, EOT over K = 2S draws gives the gradient of the S frozen replicas."""
    clf, x, y = trained
    x, y = x[:4], y[:4]
    d = adp_defense(clf, replicas=2, sigma=0.3)
    with d.frozen(5):
        k_s = eot_gradient(d, x, y, rng_for(4), gradient="full", eot=2)
        k_2s = eot_gradient(d, x, y, rng_for(4), gradient="full", eot=4)
    assert torch.allclose(k_s.grad, k_2s.grad, atol=1e-6) and torch.allclose(k_s.loss, k_2s.loss, atol=1e-6)
    free = eot_gradient(d, x, y, rng_for(4), gradient="full", eot=2)
    assert not torch.allclose(free.grad, k_s.grad)
