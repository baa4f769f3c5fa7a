"""Randomized smoothing certification (advpure.certify): statistics, keyed noise, invariance, bases,
the certificate checked against PGD-l2, and the Gaussian-noise training augmentation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from advpure.api import load_net_with_meta
from advpure.certify import (
    ABSTAIN,
    BASES,
    KeyedNormal,
    SmoothedClassifier,
    build_base,
    certified_accuracy,
    certify_from_counts,
    check_sigma_covered,
    lower_confidence_bound,
    predict_from_counts,
    score_sigma_range,
    smoothed_pgd_l2,
)
from advpure.certify.noise import block_rows, num_blocks
from advpure.config import compose as C
from advpure.core.errors import ConfigError
from advpure.nets import build_classifier, build_score_net
from conftest import FMNIST_DIR, needs_fmnist, tiny_overrides


# --- statistics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_lower_bound_equals_the_beta_quantile(alpha):
    for n_a, n in [(1, 10), (5, 10), (50, 100), (99, 100), (100, 100), (520, 1000), (99_990, 100_000)]:
        expected = beta.ppf(alpha, n_a, n - n_a + 1)  # one-sided (1 - alpha) Clopper-Pearson
        assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert lower_confidence_bound(0, 50, alpha) == 0.0
    assert lower_confidence_bound(100, 100, alpha) == pytest.approx(alpha ** (1 / 100), rel=1e-9)
    with pytest.raises(ConfigError, match="alpha"):
        lower_confidence_bound(5, 10, 1.5)


def test_certify_abstains_exactly_below_one_half_and_uses_the_selection_guess():
    n, alpha, sigma = 1000, 0.001, 0.5
    first = next(k for k in range(n + 1) if beta.ppf(alpha, k, n - k + 1) >= 0.5)  # smallest certified n_A
    below = [0] * 10
    below[3] = first - 1
    below[7] = n - first + 1
    at = [0] * 10
    at[3], at[7] = first, n - first
    sel = [0] * 10
    sel[3] = 5
    guess, pred, p_a, radius, abstained = certify_from_counts(sel, below, sigma, alpha)
    assert (guess, pred, abstained, radius) == (3, ABSTAIN, True, 0.0) and p_a < 0.5
    guess, pred, p_a, radius, abstained = certify_from_counts(sel, at, sigma, alpha)
    assert (guess, pred, abstained) == (3, 3, False) and p_a >= 0.5
    assert radius == pytest.approx(sigma * norm.ppf(p_a)) and radius >= 0
    # c_A comes from the n0 counts even when the estimation counts favour another class
    sel_other = [0] * 10
    sel_other[7] = 5
    guess, pred, *_ = certify_from_counts(sel_other, at, sigma, alpha)
    assert guess == 7 and pred == ABSTAIN


def test_predict_from_counts_is_the_two_sided_binomial_test_of_the_top_two():
    pred, pvalue = predict_from_counts([3, 60, 40, 0], alpha=0.05)
    from scipy.stats import binomtest

    assert pvalue == pytest.approx(binomtest(60, 100, 0.5).pvalue)
    assert pred == ABSTAIN  # p = 0.057 > 0.05
    pred, _ = predict_from_counts([3, 70, 30, 0], alpha=0.05)
    assert pred == 1


def test_certified_accuracy_counts_correct_and_certified_at_each_radius():
    recs = [
        {"label": 1, "prediction": 1, "radius": 0.6},
        {"label": 2, "prediction": 2, "radius": 0.3},
        {"label": 0, "prediction": 3, "radius": 0.9},  # certified, wrong
        {"label": 4, "prediction": ABSTAIN, "radius": 0.0},
    ]
    assert certified_accuracy(recs, [0.0, 0.25, 0.5, 0.75]) == {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 0.75: 0.0}


# --- keyed noise ---------------------------------------------------------------------------------
def test_keyed_noise_is_standard_normal_and_independent_across_images_and_blocks():
    gen = KeyedNormal(seed=3, block=200)
    blocks = torch.stack([gen.draw(i, "estimate", k, 1000, (1, 4, 4)) for i in range(12) for k in range(5)])
    flat = blocks.flatten(1).double()  # (60 blocks, 3200 values)
    n_all = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n_all)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n_all)
    corr = torch.corrcoef(flat)
    off = corr - torch.eye(len(flat), dtype=corr.dtype)
    assert off.abs().max().item() < 5 / math.sqrt(flat.shape[1])  # no two blocks (images, k) related
    # keyed: the same key repeats, another stream or seed does not
    again = KeyedNormal(seed=3, block=200).draw(4, "estimate", 2, 1000, (1, 4, 4))
    assert torch.equal(again, blocks[4 * 5 + 2])
    assert not torch.equal(KeyedNormal(seed=3, block=200).draw(4, "select", 2, 1000, (1, 4, 4)), again)
    assert not torch.equal(KeyedNormal(seed=4, block=200).draw(4, "estimate", 2, 1000, (1, 4, 4)), again)
    assert [block_rows(250, k, 64) for k in range(num_blocks(250, 64))] == [64, 64, 64, 58]


# --- a base classifier with a closed-form smoothed probability ------------------------------------
class LinearBase(nn.Module):
    """h(x) = 1[w.x + b > 0] (class 1) else class 0. On x + sigma n: P(class 1) = Phi(margin / sigma),
    margin = (w.x + b) / |w|, so the exact certified radius of class 1 is sigma * Phi^-1(p) = margin."""

    name = "linear"

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), float(b)

    def forward(self, x):
        s = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([-s, s], 1)


def linear_case(margin_over_sigma: float, sigma: float):
    x = torch.full((1, 1, 2, 2), 0.5)
    w = torch.full((4,), 0.5)  # |w| = 1, w.x = 1
    margin = margin_over_sigma * sigma
    return x, LinearBase(w, margin - 1.0), margin


def test_radius_approaches_the_exact_radius_from_below_as_n_grows():
    sigma, alpha, trials = 0.5, 0.001, 48
    x, base, margin = linear_case(1.0, sigma)  # p_A = Phi(1) = 0.841: exact radius = margin = 0.5
    smooth = SmoothedClassifier(base, sigma, 2, max_batch=50_000, seed=0)
    gaps = []
    for n in (100, 1000, 10_000, 100_000):
        res = smooth.certify(x.expand(trials, -1, -1, -1), list(range(trials)), n0=100, n=n, alpha=alpha)
        assert all(r.guess == 1 for r in res)
        radii = torch.tensor([r.radius for r in res])
        assert (radii <= margin).all()  # alpha = 0.001: no trial above the exact radius
        gaps.append(margin - radii.mean().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # approaches from below
    assert gaps[0] > 0.2 * sigma and 0 < gaps[-1] < 0.03 * sigma, gaps  # n = 1e5: within 1.5% of sigma


def test_radius_exceeds_the_exact_radius_in_at_most_alpha_of_the_seeds():
    sigma, alpha, trials, n = 0.5, 0.05, 1000, 200
    x, base, margin = linear_case(1.0, sigma)
    smooth = SmoothedClassifier(base, sigma, 2, max_batch=100_000, seed=1)
    res = smooth.certify(x.expand(trials, -1, -1, -1), list(range(trials)), n0=20, n=n, alpha=alpha)
    over = sum(r.radius > margin for r in res)
    # Clopper-Pearson: P(radius > margin) <= alpha per trial; allow the binomial 99.9% quantile
    assert over <= binom.ppf(0.999, trials, alpha), over
    # the check has power: the plug-in radius sigma * Phi^-1(n_A / n) is above margin about half the time
    plug_in = sum(sigma * norm.ppf(min(r.counts[1] / n, 1 - 1e-12)) > margin for r in res)
    assert plug_in > 0.3 * trials


def test_predict_abstains_on_a_fifty_fifty_base_and_not_on_a_clear_one():
    sigma, alpha, trials = 0.5, 0.05, 300
    x, coin, _ = linear_case(0.0, sigma)  # P(class 1) = 1/2 exactly
    res = SmoothedClassifier(coin, sigma, 2).predict(
        x.expand(trials, -1, -1, -1), range(trials), n=400, alpha=alpha
    )
    decided = sum(not r.abstained for r in res)
    assert decided <= binom.ppf(0.999, trials, alpha), decided
    x, clear, _ = linear_case(2.0, sigma)  # P(class 1) = 0.977
    res = SmoothedClassifier(clear, sigma, 2).predict(
        x.expand(trials, -1, -1, -1), range(trials), n=400, alpha=alpha
    )
    assert all(r.prediction == 1 for r in res)


# --- batch layout invariance on real nets -----------------------------------------------------------
def small_nets(seed: int = 0):
    torch.manual_seed(seed)
    clf = build_classifier("small_cnn", in_channels=1, image_size=28, num_classes=10, mean=[0.3], std=[0.3])
    score = build_score_net("ncsnv2", in_channels=1, image_size=28, ngf=4)
    return clf.eval().requires_grad_(False), score.eval().requires_grad_(False)


def eps_net() -> dict:
    """{"eps": a small random diffusion eps-net} for the `diffusion` base (Carlini et al. 2023)."""
    from helpers.diffusion_toys import TinyEps

    return {"eps": TinyEps(channels=1).eval().requires_grad_(False)}


@pytest.mark.parametrize("name", list(BASES))
def test_counts_do_not_depend_on_batch_size_chunking_or_image_order(name):
    clf, score = small_nets()
    sigma, n0, n = 0.25, 10, 70
    params = {"steps": 2} if name == "adp" else {}
    base = build_base(name, clf, sigma, score_net=score, nets=eps_net(), **params)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand((3, 1, 28, 28), generator=gen)
    idx = [10, 3, 42]

    def run(max_batch, rows=(0, 1, 2)):
        smooth = SmoothedClassifier(base, sigma, 10, seed=9, max_batch=max_batch, block=32)
        res = smooth.certify(x[list(rows)], [idx[r] for r in rows], n0=n0, n=n, alpha=0.01)
        return {r.idx: r for r in res}

    ref = run(10_000)
    assert len({c for r in ref.values() for c, k in enumerate(r.counts) if k}) >= 2  # not a constant net
    assert all(sum(r.counts0) == n0 and sum(r.counts) == n for r in ref.values())
    # blocks of 32 rows span chunks of 37 or 23 rows; chunks mix images; subsets and order change
    for other in (run(37), run(64), run(10_000, rows=(2, 0)), run(23, rows=(1,))):
        for key, r in other.items():
            assert r == ref[key]


def test_different_seeds_give_different_counts():
    clf, _ = small_nets()
    base = build_base("noisy", clf, 0.5)
    x = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    a = SmoothedClassifier(base, 0.5, 10, seed=0).certify(x, [0, 1], n0=10, n=200, alpha=0.01)
    b = SmoothedClassifier(base, 0.5, 10, seed=1).certify(x, [0, 1], n0=10, n=200, alpha=0.01)
    assert [r.counts for r in a] != [r.counts for r in b]


# --- bases and their checks ---------------------------------------------------------------------------
def test_denoised_base_is_the_clipped_tweedie_step_and_noise_is_not_clipped_before_it():
    clf, score = small_nets()
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return score(x)

    sigma = 0.5
    base = build_base("denoised", clf, sigma, score_net=Spy())
    x = torch.zeros((1, 1, 28, 28))  # black image: half of the noisy pixels are negative
    smooth = SmoothedClassifier(base, sigma, 10, seed=0, max_batch=64)
    smooth.sample_counts(x, [0], [("estimate", 64)])
    noisy = seen[0]
    expected = KeyedNormal(0).draw(0, "estimate", 0, 64, (1, 28, 28)) * sigma
    assert torch.equal(noisy, expected) and (noisy < 0).any()  # exact Gaussian, unclipped
    den = base.denoise(noisy)
    assert (
        torch.allclose(den, (noisy + sigma * score(noisy)).clamp(0, 1)) and den.min() >= 0 and den.max() <= 1
    )


def test_sigma_coverage_and_base_errors_are_one_line_config_errors():
    clf, score = small_nets()
    check_sigma_covered(0.5, 0.01, 0.5)
    check_sigma_covered(0.01, 0.01, 0.5)
    for bad in (0.005, 0.75):
        with pytest.raises(ConfigError, match=r"outside the score net's DSM noise levels \[0.01, 0.5\]") as e:
            check_sigma_covered(bad, 0.01, 0.5)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="outside"):
        build_base("denoised", clf, 1.0, score_net=score, score_range=(0.01, 0.5))
    with pytest.raises(ConfigError, match="outside"):
        build_base("adp", clf, 1.0, score_net=score, score_range=(0.01, 0.5))
    build_base("noisy", clf, 1.0, score_range=(0.01, 0.5))  # the bare classifier needs no score net
    with pytest.raises(ConfigError, match="unknown base classifier 'tweedie'; allowed: noisy, denoised, adp"):
        build_base("tweedie", clf, 0.25)
    with pytest.raises(ConfigError, match="needs a score network"):
        build_base("denoised", clf, 0.25)
    with pytest.raises(ConfigError, match="no parameter"):
        build_base("denoised", clf, 0.25, score_net=score, steps=3)
    with pytest.raises(ConfigError, match="sigma must be > 0"):
        build_base("noisy", clf, 0.0)


def test_score_sigma_range_from_meta_then_config(tmp_path):
    assert score_sigma_range({"dsm_sigma_min": 0.01, "dsm_sigma_max": 0.5}) == (0.01, 0.5)
    cfg = C.load("fmnist", tiny_overrides(tmp_path))
    assert score_sigma_range({}, cfg.score) == (0.01, 0.5)  # conf/score/ncsnv2_small.yaml
    fixed = C.load("fmnist", tiny_overrides(tmp_path, **{"score.dsm_sigma_fixed": 0.25}))
    assert score_sigma_range(None, fixed.score) == (0.25, 0.25)
    with pytest.raises(ConfigError, match="noise range is unknown"):
        score_sigma_range({"steps": 3})


# --- the certificate against PGD-l2 on the trained embedded default ------------------------------------
def _certified_then_attacked(tiny_artifacts, name: str, attack: dict):
    from advpure.data.readers import read_idx

    clf, _, _ = load_net_with_meta(tiny_artifacts / "fmnist" / "classifier.pt", "classifier")
    score, _, meta = load_net_with_meta(tiny_artifacts / "fmnist" / "score.pt", "score")
    assert score_sigma_range(meta) == pytest.approx((0.01, 0.5))  # written by `advpure train`
    sigma = 0.25
    base = build_base(name, clf, sigma, score_net=score, score_range=score_sigma_range(meta))
    idx = list(range(0, 50, 10))  # test images 0, 10, ..., 40
    x = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")[idx].float().unsqueeze(1) / 255
    y = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")[idx].long()
    smooth = SmoothedClassifier(base, sigma, 10, seed=0, max_batch=2000)
    res = smooth.certify(x, idx, n0=20, n=200, alpha=0.01, labels=y)
    keep = [i for i, r in enumerate(res) if r.prediction != ABSTAIN and r.radius > 0]
    assert len(keep) >= 3, [r.radius for r in res]
    xc = x[keep]
    c_a = torch.tensor([res[i].prediction for i in keep])
    radius = torch.tensor([res[i].radius for i in keep])
    flipped = {}
    for scale in (0.99, 4.0):
        x_adv = smoothed_pgd_l2(base, xc, c_a, sigma=sigma, eps=scale * radius, seed=1, **attack)
        dist = (x_adv - xc).flatten(1).norm(dim=1)
        assert (dist <= scale * radius + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        pred = smooth.predict(x_adv, [idx[i] for i in keep], n=100, alpha=0.001)
        flipped[scale] = [
            p.prediction for p, c in zip(pred, c_a.tolist()) if p.prediction not in (c, ABSTAIN)
        ]
    assert flipped[0.99] == []  # inside the certified radius nothing flips
    assert flipped[4.0], "the attack is too weak to test anything: nothing flips at 4x the radius"


@pytest.mark.parametrize("name", list(BASES))
def test_pgd_l2_differentiates_through_every_base_and_stays_in_the_ball(name):
    clf, score = small_nets()
    base = build_base(
        name, clf, 0.25, score_net=score, nets=eps_net(), **({"steps": 2} if name == "adp" else {})
    )
    x = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(2))
    eps = torch.tensor([0.3, 0.1])
    with torch.inference_mode():  # callable from inference code (a certify loop) too
        x_adv = smoothed_pgd_l2(base, x, torch.tensor([0, 1]), sigma=0.25, eps=eps, steps=1, samples=2)
    dist = (x_adv - x).flatten(1).norm(dim=1)
    assert (dist > 0.5 * eps).all() and (dist <= eps + 1e-5).all()  # moved: the gradient reached x
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@needs_fmnist
def test_pgd_l2_inside_the_certified_radius_does_not_flip_the_smoothed_prediction(tiny_artifacts):
    _certified_then_attacked(tiny_artifacts, "noisy", {"steps": 6, "samples": 12})


@needs_fmnist
@pytest.mark.slow
def test_pgd_l2_inside_the_certified_radius_denoised_smoothing(tiny_artifacts):
    _certified_then_attacked(tiny_artifacts, "denoised", {"steps": 8, "samples": 16})


# --- Gaussian-noise augmentation for the classifier (Cohen et al.'s training) ---------------------------
def test_gaussian_noise_augmentation_has_the_std_and_is_off_at_zero():
    from advpure.data.augment import gaussian_noise

    x = torch.full((64, 1, 28, 28), 0.5)
    out = gaussian_noise(x, 0.25, torch.Generator().manual_seed(0))
    d = (out - x).flatten()
    assert d.std().item() == pytest.approx(0.25, rel=0.02) and abs(d.mean().item()) < 0.005
    corner = gaussian_noise(torch.zeros(1000), 0.25, torch.Generator().manual_seed(1))
    assert (corner < 0).any()  # not clipped to [0, 1]: smoothing classifies x + sigma * n as it is
    assert gaussian_noise(x, 0.0) is x
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_noise(x, -0.1)


def test_classifier_training_batches_get_noise_and_evaluation_batches_do_not(tmp_path):
    from advpure.data.sources import get_spec
    from advpure.kinds.classifier import Classifier
    from advpure.training.classifier import ClassifierModule

    cfg = C.load("fmnist", tiny_overrides(tmp_path, **{"classifier.noise_sd": 0.3}))
    assert cfg.classifier.noise_sd == 0.3
    spec = get_spec("fmnist")
    module = ClassifierModule(
        Classifier.arch(cfg.classifier, spec),
        spec,
        C.to_dict(cfg.classifier.optim),
        noise_sd=cfg.classifier.noise_sd,
    )
    seen = []
    net = module.net

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return net(x)

    module.net = Spy()
    x = torch.full((32, 1, 28, 28), 0.5)
    batch = (x, torch.arange(32) % 10, torch.arange(32))
    module.training_step(batch, 0)
    d = (seen[-1] - x).flatten()
    assert d.std().item() == pytest.approx(0.3, rel=0.03) and abs(d.mean().item()) < 0.01
    with torch.no_grad():
        module.validation_step(batch, 0)
        assert torch.equal(seen[-1], x)
        module.test_step(batch, 0)
        assert torch.equal(seen[-1], x)
    with pytest.raises(ConfigError, match="noise_sd"):
        C.load("fmnist", tiny_overrides(tmp_path, **{"classifier.noise_sd": -0.1}))


def test_training_noise_is_part_of_the_classifier_fingerprint_only_when_set(tmp_path):
    from advpure.jobs.stages import Stages

    def stage_fingerprint(cfg, kind):
        return Stages.from_config(cfg).stage(kind).fingerprint()

    base = C.load("fmnist", tiny_overrides(tmp_path))
    noisy = C.load("fmnist", tiny_overrides(tmp_path, **{"classifier.noise_sd": 0.25}))
    assert stage_fingerprint(base, "classifier") != stage_fingerprint(noisy, "classifier")
    assert stage_fingerprint(base, "score") == stage_fingerprint(noisy, "score")


def test_pgd_l2_noise_is_keyed_per_image_not_per_batch_position():
    clf, score = small_nets()
    base = build_base("denoised", clf, 0.25, score_net=score)
    x = torch.rand((3, 1, 28, 28), generator=torch.Generator().manual_seed(5))
    kw = dict(sigma=0.25, eps=0.5, steps=2, samples=3, seed=4)
    target = torch.tensor([0, 1, 2])
    together = smoothed_pgd_l2(base, x, target, idx=[7, 8, 9], **kw)
    alone = smoothed_pgd_l2(base, x[2:], target[2:], idx=[9], **kw)
    reversed_ = smoothed_pgd_l2(base, x.flip(0), target.flip(0), idx=[9, 8, 7], **kw)
    torch.testing.assert_close(together[2:], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(together, reversed_.flip(0), rtol=0, atol=1e-6)
    other_key = smoothed_pgd_l2(base, x[2:], target[2:], idx=[10], **kw)
    assert not torch.allclose(other_key, alone)  # the index keys the noise


def test_nan_logits_of_the_base_are_an_error_not_votes():
    """argmax over NaN logits returns some class: counted, they would certify garbage."""
    from advpure.core.errors import NonFiniteError

    class Broken(nn.Module):
        def forward(self, rows):
            out = torch.zeros(rows.shape[0], 3)
            out[::7] = float("nan")  # one row in seven, e.g. a score net that diverged on some inputs
            return out

    smooth = SmoothedClassifier(Broken(), 0.25, 3, seed=0, max_batch=16)
    with pytest.raises(NonFiniteError, match=r"NaN or infinite logits for \d+ of 60 noisy rows"):
        smooth.certify(torch.rand(2, 1, 4, 4), [0, 1], n0=10, n=20, alpha=0.01)
