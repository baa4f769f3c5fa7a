"""Defense interface: replicas as a batch dimension, chunking, merge rules, identity, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advpure.core.rng import GeneratorRNG, SampleRNG
from advpure.purify import (
    Defense,
    correct_by_merge,
    merge_predict,
    merge_scores,
)
from helpers.defenses import adp_defense as adp
from helpers.defenses import langevin_defense as langevin


def tiny_nets(seed=0):
    torch.manual_seed(seed)
    score = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 1, 3, padding=1))
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return clf, score


def adp_defense(replicas=4, max_batch=4096, amp_dtype=None, **kw):
    clf, score = tiny_nets()
    return adp(
        clf, score, sigma=0.2, steps=5, tau=0.0, replicas=replicas, max_batch=max_batch, channels=1, image_size=8,
        amp_dtype=amp_dtype, **kw,
    )  # fmt: skip


def test_replicas_in_batch_equal_a_loop_over_replicas_with_the_same_generator():
    d = adp_defense()
    x = torch.rand(6, 1, 8, 8)
    g1 = torch.Generator().manual_seed(7)
    batched = d.purify(x, GeneratorRNG(g1), draws=4).x.view(4, 6, 1, 8, 8)
    g2 = torch.Generator().manual_seed(7)
    looped = torch.stack([d.purify(x, GeneratorRNG(g2), draws=1).x for _ in range(4)])
    assert torch.equal(batched, looped)
    assert g1.get_state().equal(g2.get_state())  # same amount of randomness consumed


def test_chunking_does_not_change_results():
    """Chunks see the same rows and the same noise; only the kernels' blocking may differ with the
    batch size (oneDNN picks algorithms by shape), so equality is up to float rounding."""
    x = torch.rand(5, 1, 8, 8)
    big = adp_defense(max_batch=4096).chain_logits(x, SampleRNG(0, range(5)), 4)[0]
    small = adp_defense(max_batch=3).chain_logits(x, SampleRNG(0, range(5)), 4)[0]
    assert torch.allclose(big, small, rtol=1e-5, atol=1e-6)
    assert torch.equal(big.argmax(-1), small.argmax(-1))


def test_purification_runs_the_score_net_in_fp32_under_bf16_autocast():
    """ADP's probe compares f(x) and f(x + delta g): bf16 would turn it into rounding noise."""
    d = adp_defense(amp_dtype=torch.bfloat16)
    x = torch.rand(6, 1, 8, 8)
    plain = adp_defense().purify(x, SampleRNG(0, range(6)), draws=2)  # no amp anywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = d.purify(x, SampleRNG(0, range(6)), draws=2)
        assert d.field(x).dtype == torch.float32  # the field is taken at the purification precision ...
        bf16_out = d.nets["field"].net(x)
    assert bf16_out.dtype == torch.bfloat16  # ... (autocast is active in this block)
    assert torch.equal(plain.x, under_amp.x) and torch.equal(plain.steps, under_amp.steps)


def test_sample_rng_results_do_not_depend_on_batch_composition():
    d = adp_defense()
    x = torch.rand(6, 1, 8, 8)
    idx = torch.arange(100, 106)
    whole = d.purify(x, SampleRNG(3, idx), draws=2).x.view(2, 6, 1, 8, 8)
    even = d.purify(x[::2], SampleRNG(3, idx[::2]), draws=2).x.view(2, 3, 1, 8, 8)
    odd = d.purify(x[1::2], SampleRNG(3, idx[1::2]), draws=2).x.view(2, 3, 1, 8, 8)
    assert torch.equal(whole[:, ::2], even) and torch.equal(whole[:, 1::2], odd)
    again = d.purify(x, SampleRNG(4, idx), draws=2).x.view(2, 6, 1, 8, 8)
    assert not torch.equal(whole, again)  # another seed, other noise


def test_fresh_randomness_on_every_call():
    d = adp_defense()
    x = torch.rand(3, 1, 8, 8)
    rng = SampleRNG(0, range(3))
    a, b = d.purify(x, rng).x, d.purify(x, rng).x
    assert not torch.equal(a, b)


def test_merge_rules_on_hand_made_logits():
    # 3 replicas, 2 images, 3 classes
    logits = torch.tensor(
        [
            [[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 1.0, 0.0], [0.0, 0.0, 1.1]],
            [[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
        ]
    )
    # softmax mean: image 0 -> class 0 (one very confident replica beats two mild ones)
    assert merge_predict(logits, "softmax").tolist() == [0, 0]
    # mean logits: image 0: [10/3, 2/3, 0] -> 0; image 1: [1, 1/3, 0.367] -> 0
    assert merge_predict(logits, "logits").tolist() == [0, 0]
    # vote: image 0: class 1 twice -> 1; image 1: a three-way tie broken by mean softmax -> 0
    assert merge_predict(logits, "vote").tolist() == [1, 0]
    assert torch.allclose(merge_scores(logits, "vote")[0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    assert torch.allclose(merge_scores(logits, "softmax").sum(-1), torch.ones(2))
    # exact ties under softmax/logits: the lowest class index
    tie = torch.zeros(2, 1, 3)
    assert merge_predict(tie, "softmax").tolist() == [0]
    assert merge_predict(tie, "vote").tolist() == [0]
    with pytest.raises(ValueError, match="merge"):
        merge_scores(logits, "max")


def test_correct_by_merge_shapes_and_values():
    logits = torch.zeros(2, 3, 4, 5)  # n=2 evaluations, S=3, B=4, K=5
    logits[..., 2] = 1.0
    y = torch.tensor([2, 0, 2, 1])
    out = correct_by_merge(logits, y)
    assert set(out) == {"softmax", "logits", "vote"}
    for v in out.values():
        assert v.shape == (2, 4) and v.tolist() == [[True, False, True, False]] * 2


def test_identity_purifier_is_the_bare_classifier():
    clf, _ = tiny_nets()
    d = Defense(clf, replicas=3)
    x = torch.rand(4, 1, 8, 8)
    rng = SampleRNG(0, range(4))
    assert torch.allclose(d(x, rng), clf(x).softmax(-1))
    assert not d.stochastic and not d.has_field
    logits, out = d.chain_logits(x, rng, 5)
    assert logits.shape == (5, 4, 10) and torch.equal(logits[3], clf(x))
    assert out.score_evals.sum() == 0
    with pytest.raises(ValueError, match="no time-free score field"):
        d.field(x)


def test_score_evals_are_counted():
    d = adp_defense(replicas=2)
    x = torch.rand(3, 1, 8, 8)
    before = d.score_evals
    _, out = d.chain_logits(x, SampleRNG(0, range(3)), 2)
    assert d.score_evals - before == int(out.score_evals.sum()) == 2 * 5 * 2 * 3  # T=5, tau=0: no stops


def test_differentiable_chain_logits_have_input_gradients():
    d = adp_defense(replicas=1)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    logits, _ = d.chain_logits(x, SampleRNG(0, range(2)), 3, differentiable=True)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_langevin_purifier_runs_fixed_steps_and_is_seeded():
    clf, score = tiny_nets()
    d = langevin(clf, score, sigma=0.1, eta=1e-3, dsm_sigma=0.1, steps=7, replicas=2)
    x = torch.rand(3, 1, 8, 8)
    a = d.purify(x, SampleRNG(0, range(3)), draws=2)
    b = d.purify(x, SampleRNG(0, range(3)), draws=2)
    assert torch.equal(a.x, b.x)
    assert a.score_evals.tolist() == [7] * 6
    assert 0 <= a.x.min() and a.x.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -0.1}, "sigma"),
        ({"steps": 0}, "steps"),
        ({"noise": "uniform"}, "noise"),
    ],
)
def test_bad_purifier_arguments(kwargs, match):
    _, score = tiny_nets()
    with pytest.raises(ValueError, match=match):
        adp(nn.Identity(), score, **kwargs)


def test_bad_defense_arguments_and_inputs():
    clf, score = tiny_nets()
    with pytest.raises(ValueError, match="replicas"):
        adp(clf, score, replicas=0)
    with pytest.raises(ValueError, match="merge"):
        adp(clf, score, merge="max")
    d = adp(clf, score, channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d.check(torch.full((1, 1, 8, 8), 1.5))
    with pytest.raises(ValueError, match="channel"):
        d.check(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        d.check(torch.rand(1, 1, 9, 9))
    with pytest.raises(ValueError, match="shape"):
        d.check(torch.rand(8, 8))


def test_frozen_defense_replays_its_noise_and_eot_draws_cycle_through_its_replicas():
    """DW-box (Liu et al. 2025): under `frozen(seed)` the noise is drawn once per image."""
    d = adp_defense(replicas=2)
    x, y, idx = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3]), [5, 6, 7]
    with d.frozen(11):
        a = d.purify(x, SampleRNG(0, idx), draws=2).x
        b = d.purify(x, SampleRNG(99, idx, stream="other"), draws=2).x  # the rng only names the images
        four = d.purify(x, SampleRNG(1, idx), draws=4).x.view(4, 3, 1, 8, 8)
        sub = d.purify(x[1:], SampleRNG(0, idx[1:]), draws=2).x.view(2, 2, 1, 8, 8)
        verdicts = d.evaluate(x, y, SampleRNG(0, idx), n=3)
    assert torch.equal(a, b)
    assert torch.equal(four[:2].reshape(6, 1, 8, 8), a) and torch.equal(
        four[2:], four[:2]
    )  # draw d -> d mod S
    assert torch.equal(sub, a.view(2, 3, 1, 8, 8)[:, 1:])  # keyed per image, not per batch position
    assert all(torch.equal(v, v[:1].expand_as(v)) for v in verdicts.values())  # N frozen verdicts agree
    assert not torch.equal(d.purify(x, SampleRNG(0, idx), draws=2).x, a)  # outside the block: fresh noise
    with d.frozen(12):
        assert not torch.equal(d.purify(x, SampleRNG(0, idx), draws=2).x, a)  # another frozen draw
    assert d.frozen_seed is None


def test_frozen_langevin_steps_see_different_noise_but_every_call_the_same():
    clf, score = tiny_nets()
    d = langevin(clf, score, sigma=0.0, eta=1e-2, dsm_sigma=0.1, steps=3, replicas=1)
    x, idx = torch.full((2, 1, 8, 8), 0.5), [0, 1]
    zero = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.zeros_(zero.weight)
    walk = langevin(clf, zero, sigma=0.0, eta=1e-2, dsm_sigma=0.1, steps=2, replicas=1)
    with d.frozen(3), walk.frozen(3):
        assert torch.equal(d.purify(x, SampleRNG(0, idx)).x, d.purify(x, SampleRNG(1, idx)).x)
        two = walk.purify(x, SampleRNG(0, idx)).x  # zero score: x + sqrt(eta) (n_1 + n_2)
        one = langevin(clf, zero, sigma=0.0, eta=1e-2, dsm_sigma=0.1, steps=1, replicas=1)
        with one.frozen(3):
            first = one.purify(x, SampleRNG(0, idx)).x
    step2 = (two - x) - (first - x)  # the second step's noise; equal to the first's only if reused
    assert not torch.allclose(step2, first - x)


def test_langevin_purify_samples_the_gaussian_its_score_describes():
    """With the DSM score f / dsm_sigma = -(x - mu) / s^2 of N(mu, s^2) per pixel, the Langevin chain
    x <- x + eta/2 s(x) + sqrt(eta) n forgets its start and samples the unadjusted-Langevin
    stationary law: mean mu, variance eta / (1 - (1 - eta / (2 s^2))^2) (closed form)."""
    from advpure.purify import langevin_purify

    mu, s, eta, dsm_sigma = 0.5, 0.05, 1e-4, 0.1
    x0 = torch.full((64, 1, 8, 8), 0.8)  # 6 s away from mu

    def score(x):
        return -dsm_sigma * (x - mu) / s**2

    out = langevin_purify(
        x0,
        score,
        sigma=0.0,
        eta=eta,
        dsm_sigma=dsm_sigma,
        steps=400,
        generator=torch.Generator().manual_seed(0),
    )
    a = 1 - eta / (2 * s**2)
    std = (eta / (1 - a**2)) ** 0.5
    assert out.x.mean().item() == pytest.approx(mu, abs=0.004)
    assert out.x.std().item() == pytest.approx(std, rel=0.05)
    assert out.steps.tolist() == [400] * 64 and out.score_evals.tolist() == [400] * 64
