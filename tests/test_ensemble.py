"""The CW margin loss, random restarts, targeted DLR / APGD-T and the `standard_rand` ensemble, on
hand-made classifiers whose answers are known (tests/helpers/attack_models.py). Tiny nets, seconds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from advpure.attacks import (
    PGD,
    Run,
    apgd_attack,
    attack_class,
    attack_params,
    check_attack,
    cw_margin,
    defended_loss,
    display_label,
    dlr,
    dlr_targeted,
    per_sample_loss,
    pgd_attack,
    run_attack,
    run_on_unbroken,
    target_classes,
)
from advpure.attacks.base import AttackResult, Trace
from advpure.attacks.ensemble import judging_draws, robust_under
from advpure.attacks.restarts import judge
from advpure.config import compose as C
from advpure.core.errors import ConfigError
from advpure.core.rng import SampleRNG
from advpure.purify import Defense
from helpers.attack_models import (
    CodeNet,
    Scaled,
    StartDecides,
    attack_spec,
    code_images,
    coin_purifier,
    linear_net,
    prototypes_data,
    rng_for,
    trained_mlp,
)
from helpers.defenses import adp_defense

EPS, STEP = 8 / 255, 2 / 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mlp():
    """(classifier, x_test (64, 1, 8, 8), y_test): 4 classes, ~98% accurate."""
    x, y = prototypes_data(64, 2)
    return trained_mlp(), x, y


def spec(kind="pgd", **kw):
    """Unvalidated parameters of attack `kind` (run_attack validates them)."""
    return attack_spec(kind, **kw)


def adp(clf, replicas=2, sigma=0.3):
    torch.manual_seed(0)
    score = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 1, 3, padding=1))
    return adp_defense(clf, score, sigma=sigma, steps=2, tau=0.0, replicas=replicas)


def wrong(d, x, y):
    with torch.no_grad():
        return d.classify(x).argmax(1) != y


# --- the CW margin -----------------------------------------------------------------------------
def test_cw_margin_by_hand_shift_invariant_and_targeted():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    y = torch.tensor([0, 1, 2])
    # max_{i != y} z_i - z_y: 2 - 3 = -1 (correct), 3 - 1 = 2 (misclassified), 0 (tie)
    assert torch.allclose(per_sample_loss("cw", z, y), torch.tensor([-1.0, 2.0, 0.0]))
    assert torch.allclose(per_sample_loss("cw", z + 7.5, y), per_sample_loss("cw", z, y))  # shift
    assert torch.allclose(per_sample_loss("cw", 3 * z, y), 3 * per_sample_loss("cw", z, y))  # logit units
    t = torch.tensor([3, 2, 0])
    assert torch.allclose(cw_margin(z, y, t), torch.tensor([-3.0, 1.0, 0.0]))  # z_t - z_y
    # the black-box form on log-probabilities of one softmax replica equals CW on the logits
    probs = z.softmax(-1)
    assert torch.allclose(defended_loss("cw", probs, y, "softmax"), per_sample_loss("cw", z, y), atol=1e-5)
    assert torch.allclose(defended_loss("cw", z, y, "logits"), per_sample_loss("cw", z, y), atol=1e-5)


@pytest.mark.parametrize("kind", ["pgd", "apgd", "joint_score", "spsa"])
def test_every_attack_with_a_loss_key_records_the_cw_margin(kind, mlp):
    clf, x, y = mlp
    x, y = x[:8], y[:8]
    d = adp(clf, replicas=1, sigma=0.0) if kind == "joint_score" else Defense(clf)
    p = spec(kind, loss="cw", gradient="classifier", iters=2, eot=1, samples=4)
    res = run_attack(p, d, x, y, rng_for(8), eps=EPS, step=STEP)
    # at x_0 = x (no random start) every attack's objective is the margin of the classifier's logits
    # (joint: of the classifier term; spsa: of the defended log-probabilities, equal by shift invariance)
    assert torch.allclose(res.losses[0], cw_margin(clf(x), y), atol=1e-5)
    assert not torch.equal(res.x_adv, x)


def test_pgd_with_cw_reaches_the_closed_form_optimum_of_a_linear_model():
    # z = W x + b, l_inf ball radius eps inside [0, 1]: max_delta max_{j != y} z_j(x + delta) - z_y
    # is attained at delta = eps * sign(w_j - w_y) for the best j, with value
    # (w_j - w_y) x + b_j - b_y + eps * ||w_j - w_y||_1
    g = torch.Generator().manual_seed(3)
    k, dim, eps = 3, 16, 0.05
    w, b = torch.randn(k, dim, generator=g), 0.3 * torch.randn(k, generator=g)
    d = Defense(linear_net(w, b))
    x = 0.3 + 0.4 * torch.rand(200, 1, 4, 4, generator=g)  # the ball stays inside [0, 1]
    y = torch.randint(0, k, (200,), generator=g)
    xf = x.flatten(1)
    others = torch.stack([(torch.arange(k) != yi).nonzero().squeeze(1) for yi in y])  # (n, 2)
    wd = w[others] - w[y][:, None]  # (n, 2, D): w_j - w_y for the two other classes
    at_x = (wd * xf[:, None]).sum(-1) + b[others] - b[y][:, None]
    # keep the images where the best other class is the same everywhere in the ball (then
    # PGD's ascent on the current max follows it to its corner)
    gap_w = (wd[:, 0] - wd[:, 1]).abs().sum(-1) * eps
    fixed = (at_x[:, 0] - at_x[:, 1]).abs() > gap_w
    x, y, wd, at_x, others = x[fixed], y[fixed], wd[fixed], at_x[fixed], others[fixed]
    best = (at_x + eps * wd.abs().sum(-1)).argmax(1)
    rows = torch.arange(len(y))
    x_star = x + eps * wd[rows, best].sign().view_as(x)
    value = (at_x + eps * wd.abs().sum(-1))[rows, best]
    assert len(set(others[rows, best].tolist())) >= 2 and len(y) > 50  # both other classes win somewhere
    res = run_attack(
        spec(loss="cw", gradient="classifier", iters=8), d, x, y, rng_for(len(y)), eps=eps, step=eps / 4
    )
    assert torch.allclose(res.x_adv, x_star, atol=1e-6)
    assert torch.allclose(res.losses[-1], value, atol=1e-4)
    assert torch.allclose(cw_margin(d.classify(res.x_adv), y), value, atol=1e-4)
    assert display_label(spec(loss="cw", gradient="bpda", iters=40, eot=15)) == "BPDA40+EOT15 CW loss"
    assert display_label(spec("apgd", loss="cw", iters=100, eot=20)) == "APGD-CW100-EOT20"


# --- restarts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pgd", "apgd"])
def test_one_restart_is_exactly_the_plain_attack(kind):
    d = adp(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 10)), sigma=0.4)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    p = spec(kind, gradient="bpda", eot=2, iters=4, random_start=True, restarts=1)
    res = run_attack(p, d, x, y, rng_for(4), eps=EPS, step=STEP, track_path=True)
    plain = (
        pgd_attack(d, x, y, rng_for(4), p, eps=EPS, step=STEP, track_path=True)
        if kind == "pgd"
        else apgd_attack(d, x, y, rng_for(4), p, eps=EPS, track_path=True)
    )
    assert torch.equal(res.x_adv, plain.x_adv) and torch.equal(res.losses, plain.losses)
    assert all(torch.equal(res.path_correct[r], plain.path_correct[r]) for r in plain.path_correct)
    assert display_label(p) == display_label(replace(p, restarts=1)) and "restart" not in display_label(p)


def _single_runs(d, x, y, rng, k, **kw):
    """Restart r alone: the plain attack with a random start on the stream restarts=k gives it."""
    out = []
    for r in range(k):
        rr = rng if r == 0 else rng.child(f"restart{r}")
        out.append(run_attack(spec(random_start=True, restarts=1, **kw), d, x, y, rr, eps=0.1, step=0.02))
    return out


def test_restarts_keep_the_first_breaking_start_else_the_highest_loss():
    # StartDecides: only the random start can break an image (zero gradient on the deciding pixel)
    d = Defense(StartDecides())
    b, k = 64, 3
    x = 0.3 + 0.4 * torch.rand(b, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = 0.5
    y = torch.zeros(b, dtype=torch.long)
    kw = dict(gradient="classifier", iters=1)
    singles = _single_runs(d, x, y, rng_for(b), k, **kw)
    broken = torch.stack([wrong(d, s.x_adv, y) for s in singles])  # (k, B)
    finals = torch.stack([s.losses[-1] for s in singles])
    first = torch.where(broken.any(0), broken.float().argmax(0), finals.argmax(0))
    assert broken[0].any() and (broken[1:].any(0) & ~broken[0]).any() and (~broken.any(0)).any()
    assert (first[~broken.any(0)] > 0).any()  # the highest loss is not always restart 0's
    calls, seen = [], []
    p = spec(restarts=k, random_start=False, **kw)  # restarts > 1 start at random anyway
    res = run_attack(
        p,
        d,
        x,
        y,
        rng_for(b),
        eps=0.1,
        step=0.02,
        track_path=True,
        progress=calls.append,
        observer=lambda i, xi: seen.append((i, xi.shape[0])),
    )
    rows = torch.arange(b)
    expected_x = torch.stack([s.x_adv for s in singles])[first, rows]
    assert torch.equal(res.x_adv, expected_x)
    assert torch.equal(wrong(d, res.x_adv, y), broken.any(0))
    assert torch.equal(res.losses, torch.stack([s.losses for s in singles])[first, :, rows].T)
    # later restarts attack only the images earlier ones did not break
    left1, left2 = b, int((~broken[0]).sum())
    left3 = int((~broken[0] & ~broken[1]).sum())
    assert [n for _, n in seen] == [left1] * 2 + [left2] * 2 + [left3] * 2
    assert [i for i, _ in seen] == list(range(6)) and calls == list(range(k))
    # path: restart-major (k * iters, B); an image not attacked in a restart is correct there, and an
    # image is ever broken iff some restart broke it at some iterate (here: at its start)
    path = res.path_correct[d.merge]
    assert path.shape == (k, b)
    assert torch.equal(~path.all(0), broken.any(0))
    assert path[1][broken[0]].all() and path[2][broken[0] | broken[1]].all()
    assert display_label(p) == "PGD1 (classifier, blind) x3 restarts (random starts)"
    assert attack_class("pgd").total_iters(p) == 3


def test_restarts_skip_broken_images_and_count_the_judging_evaluations(mlp):
    clf, x, y = mlp
    d = Defense(clf)
    k, iters = 3, 4
    p = spec("apgd", gradient="classifier", iters=iters, restarts=k)
    e0 = d.classifier.evals
    calls = []
    res = run_attack(p, d, x, y, rng_for(64), eps=0.05, step=STEP, progress=calls.append)
    evals = d.classifier.evals - e0
    # replay: restart r sees the images no earlier restart broke; (iters + 1) rows for the attack and
    # one judging classification each
    left, expected = torch.ones(64, dtype=torch.bool), 0
    for r in range(k):
        rr = rng_for(64) if r == 0 else rng_for(64).child(f"restart{r}")
        single = run_attack(replace(p, restarts=1, random_start=True), d, x, y, rr, eps=0.05, step=STEP)
        expected += int(left.sum()) * (iters + 2)
        left &= ~wrong(d, single.x_adv, y)
    assert evals == expected and calls == list(range(k * iters))
    assert 0 < int(left.sum()) < int((~wrong(d, x, y)).sum())  # restarts broke some, not all
    assert int((~wrong(d, res.x_adv, y)).sum()) == int(left.sum())


def test_restarts_depend_on_seed_and_index_only(mlp):
    clf, x, y = mlp
    d = adp(clf, replicas=2, sigma=0.3)
    x, y, idx = x[:6], y[:6], torch.arange(40, 46)
    p = spec("pgd", gradient="bpda", eot=2, iters=3, restarts=3)
    whole = run_attack(p, d, x, y, SampleRNG(1, idx), eps=0.1, step=0.03)
    half = run_attack(p, d, x[3:], y[3:], SampleRNG(1, idx[3:]), eps=0.1, step=0.03)
    assert torch.allclose(whole.x_adv[3:], half.x_adv, atol=1e-6)
    assert torch.allclose(whole.losses[:, 3:], half.losses, atol=1e-5)
    assert torch.equal(run_attack(p, d, x, y, SampleRNG(1, idx), eps=0.0, step=0.03).x_adv, x)  # eps = 0


def test_run_on_unbroken_keeps_the_highest_loss_or_the_lowest_margin_among_unbroken_runs():
    # hand-made runs on an identity defense over two classes: class 1 iff pixel (0, 0) > 0.5; the
    # class-1 logit rises with pixel (0, 1), so the judged margin p_0 - p_1 falls with it
    d = Defense(StartDecides(a=1.0))
    x = torch.full((3, 1, 2, 2), 0.2)
    y = torch.zeros(3, dtype=torch.long)
    plans = [  # per run: pixel (0, 0), pixel (0, 1) and the final attack loss, per row
        ([0.9, 0.1, 0.1], [0.0, 0.5, 0.1], [0.0, 1.0, 5.0]),  # breaks row 0
        ([0.1, 0.1, 0.1], [0.9, 0.1, 0.3], [9.0, 2.0, 3.0]),  # breaks nothing
    ]
    seen = []

    def make(r):
        def fn(x_r, y_r, rng_r, trace_r, rows):
            seen.append((r, rows.tolist()))
            x_adv = x_r.clone()
            x_adv[:, 0, 0, 0] = torch.tensor(plans[r][0])[rows]
            x_adv[:, 0, 0, 1] = torch.tensor(plans[r][1])[rows]
            return AttackResult(x_adv, torch.tensor(plans[r][2])[rows].view(1, -1).expand(2, -1), None)

        return fn

    def outcome(keep):
        runs = [Run(f"r{r}", make(r), 1) for r in range(2)]
        return run_on_unbroken(d, x, y, rng_for(3), Trace(d, y, rng_for(3)), runs, keep=keep)

    out = outcome("loss")
    assert seen == [(0, [0, 1, 2]), (1, [1, 2])]  # row 0 broken by run 0: not attacked again
    assert out.broken.tolist() == [True, False, False]
    assert out.chosen.tolist() == [0, 1, 0]  # rows 1, 2: the higher loss (2 > 1; 5 > 3)
    assert outcome("margin").chosen.tolist() == [0, 0, 1]  # rows 1, 2: the higher pixel (0, 1)
    with pytest.raises(ValueError, match="keep"):
        run_on_unbroken(d, x, y, rng_for(3), Trace(d, y, rng_for(3)), [Run("r", make(0), 1)], keep="best")


# --- targeted DLR and APGD-T ---------------------------------------------------------------------
def test_targeted_dlr_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0], [3.0, 1.0, 2.0, 0.0, -1.0]])
    y, t = torch.tensor([0, 1]), torch.tensor([2, 0])
    # sorted 3, 2, 1, 0, -1: denominator z_pi1 - (z_pi3 + z_pi4) / 2 = 3 - (1 + 0) / 2 = 2.5
    # -(z_y - z_t) / 2.5: -(3 - 2) / 2.5 = -0.4 ; -(1 - 3) / 2.5 = 0.8
    assert torch.allclose(dlr_targeted(z, y, t), torch.tensor([-0.4, 0.8]))
    assert torch.allclose(per_sample_loss("dlr", 4 * z - 2, y, t), dlr_targeted(z, y, t))  # invariant
    assert torch.allclose(per_sample_loss("ce", z, y, t), z.log_softmax(-1)[[0, 1], t])  # log p_t
    with pytest.raises(ValueError, match="4 classes"):
        dlr_targeted(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([1]))


def test_target_classes_rank_the_other_classes_by_mean_logits():
    d = Defense(linear_net(torch.zeros(5, 4), torch.tensor([0.1, 3.0, 2.0, 1.0, -1.0])))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([1, 0])
    assert target_classes(d, x, y, rng_for(2), 3).tolist() == [[2, 3, 0], [1, 2, 3]]
    with pytest.raises(ValueError, match="at least 6 classes"):
        target_classes(d, x, y, rng_for(2), 5)


def test_apgd_targeted_moves_towards_the_target(mlp):
    clf, x, y = mlp
    d = Defense(clf)
    p = spec("apgd", gradient="classifier", loss="dlr", iters=10, target_rank=1)
    res = run_attack(p, d, x, y, rng_for(64), eps=0.08, step=STEP)
    t = target_classes(d, x, y, rng_for(64), 1)[:, 0]
    z0, z1 = clf(x), clf(res.x_adv)
    assert torch.allclose(res.losses[0], dlr_targeted(z0, y, t), atol=1e-5)
    assert (dlr_targeted(z1, y, t) > dlr_targeted(z0, y, t)).all()
    broken = z1.argmax(1) != y
    assert broken.float().mean() > 0.5 and (z1.argmax(1)[broken] == t[broken]).float().mean() > 0.9
    assert display_label(p) == "APGD-T-DLR10-EOT1, classifier (target rank 1)"
    three = Defense(trained_mlp(classes=3))
    with pytest.raises(ValueError, match="4 classes"):
        run_attack(p, three, x[:2], torch.tensor([0, 1]), rng_for(2), eps=0.08, step=STEP)


# --- the standard_rand ensemble ------------------------------------------------------------------
def test_standard_rand_label_and_budget():
    p = attack_params("standard_rand")
    assert (p.iters, p.eot, p.gradient, p.n_target_classes, p.restarts) == (100, 20, "full", 3, 1)
    assert display_label(p) == (
        "standard_rand (APGD-CE, APGD-T-DLR x3; 100 it, EOT 20; later stages on images some protocol counts robust)"
    )
    cls = attack_class("standard_rand")
    assert cls.total_iters(p) == 400 and cls.total_iters(p, classes=3) == 200
    assert cls.total_iters(replace(p, restarts=2)) == 800
    assert display_label(replace(p, restarts=2)).endswith("robust) x2 restarts (random starts)")
    with pytest.raises(ValueError, match="fixes its losses"):
        check_attack(replace(p, loss="cw"), Defense(trained_mlp()), EPS, STEP)


def test_standard_rand_attacks_later_stages_only_on_unbroken_images(mlp):
    # logits x 100: the softmax saturates, CE's gradient vanishes on confident images and APGD-CE
    # breaks almost nothing; the scale-invariant targeted DLR stages break the rest
    clf, x, y = mlp
    d = Defense(Scaled(clf, 100.0))
    iters, eps, b = 6, 0.05, 64
    stages = [dict(loss="ce")] + [dict(loss="dlr", target_rank=t) for t in (1, 2, 3)]
    alone = [
        run_attack(
            spec("apgd", gradient="classifier", iters=iters, **s), d, x, y, rng_for(b), eps=eps, step=STEP
        )
        for s in stages
    ]
    broke = torch.stack([wrong(d, r.x_adv, y) for r in alone])  # (4, B): each stage run on every image
    left = [torch.ones(b, dtype=torch.bool)]
    for s in range(3):
        left.append(left[-1] & ~broke[s])
    assert 0 < int(broke[0].sum()) < int(broke[1].sum())  # stage 2 breaks what stage 1 could not
    seen, calls = [], []
    e0 = d.classifier.evals
    p = spec("standard_rand", gradient="classifier", iters=iters, eot=1)
    res = run_attack(
        p,
        d,
        x,
        y,
        rng_for(b),
        eps=eps,
        step=STEP,
        track_path=True,
        progress=calls.append,
        observer=lambda i, xi: seen.append(xi),
    )
    evals = d.classifier.evals - e0
    # stage s sees exactly the images the earlier stages left, starting at their clean inputs
    for s in range(4):
        first = seen[s * (iters + 1)]
        assert torch.equal(first, x[left[s]])
    assert len(seen) == 4 * (iters + 1) and calls == list(range(4 * iters))
    # cost: 1 row to count classes, B to rank the targets, (iters + 1) per attacked image per stage,
    # one judging classification per attacked image and stage
    n = [int(m.sum()) for m in left]
    assert evals == 1 + b + sum(k * (iters + 1) for k in n) + sum(n)
    # per-image worst case: broken iff some stage (run alone) broke it; kept x_adv is the first such
    # stage's, else the one whose softmax margin p_y - max_other p was lowest
    union = broke.any(0)
    assert torch.equal(wrong(d, res.x_adv, y), union)
    probs = torch.stack([d.classify(r.x_adv).softmax(-1) for r in alone])  # (4, B, K)
    own = probs.gather(-1, y.expand(4, -1)[..., None]).squeeze(-1)
    margin = own - probs.scatter(-1, y.expand(4, -1)[..., None], -1.0).max(-1).values
    first_stage = torch.where(union, broke.float().argmax(0), margin.argmin(0))
    assert (first_stage[~union] != 3).any()  # not simply the last stage
    kept = torch.stack([r.x_adv for r in alone])[first_stage, torch.arange(b)]
    assert torch.allclose(res.x_adv, kept, atol=1e-6)
    # losses: (4 iters + 1, B); an image broken in stage 1 carries its last loss forward
    assert res.losses.shape == (4 * iters + 1, b)
    gone = broke[0]
    assert torch.equal(res.losses[iters:, gone], res.losses[iters, gone].expand(3 * iters + 1, -1))
    assert torch.allclose(res.losses[: iters + 1], alone[0].losses, atol=1e-5)
    # path: (4 iters, B), stages concatenated; no evidence (True) where a stage did not attack
    path = res.path_correct[d.merge]
    assert path.shape == (4 * iters, b)
    assert path[iters:, gone].all()
    assert torch.equal(~path.all(0) | wrong(d, res.x_adv, y), union)


def test_standard_rand_skips_everything_once_stage_one_broke_all(mlp):
    clf, x, y = mlp
    d = Defense(clf)
    iters, b = 3, 64
    calls = []
    e0 = d.classifier.evals
    p = spec("standard_rand", gradient="classifier", iters=iters, eot=1)
    res = run_attack(p, d, x, y, rng_for(b), eps=0.4, step=STEP, progress=calls.append)
    assert d.classifier.evals - e0 == 1 + b + b * (iters + 1) + b  # stage 1 and its judging only
    assert wrong(d, res.x_adv, y).all()
    assert calls == list(range(4 * iters))  # the bar completes although stages 2-4 had nothing left
    assert torch.equal(res.losses[iters:], res.losses[iters].expand(3 * iters + 1, -1))


def test_standard_rand_with_restarts_runs_every_stage_with_restarts(mlp):
    clf, x, y = mlp
    d = Defense(Scaled(clf, 100.0))
    p = spec("standard_rand", gradient="classifier", iters=2, eot=1, restarts=2)
    total = attack_class("standard_rand").total_iters(p)
    calls = []
    res = run_attack(p, d, x, y, rng_for(64), eps=0.05, step=STEP, track_path=True, progress=calls.append)
    assert total == 4 * 2 * 2 and calls == list(range(total))
    assert res.path_correct["softmax"].shape == (total, 64) and res.losses.shape == (4 * 2 + 1, 64)
    assert ((res.x_adv - x).abs() <= 0.05 + 1e-6).all()


def test_standard_rand_with_three_classes_runs_one_untargeted_dlr_stage():
    clf = trained_mlp(classes=3)
    x, y = prototypes_data(32, 2, classes=3)
    d = Defense(clf)
    iters = 3
    p = spec("standard_rand", gradient="classifier", iters=iters, eot=1)
    assert attack_class("standard_rand").total_iters(p, classes=3) == 2 * iters
    seen = []
    res = run_attack(p, d, x, y, rng_for(32), eps=0.05, step=STEP, observer=lambda i, xi: seen.append(xi))
    assert res.losses.shape == (2 * iters + 1, 32) and len(seen) == 2 * (iters + 1)
    # stage 2 is untargeted APGD-DLR on the images stage 1 left: its last loss is the DLR there
    stage1 = run_attack(
        spec("apgd", gradient="classifier", iters=iters), d, x, y, rng_for(32), eps=0.05, step=STEP
    )
    left = ~wrong(d, stage1.x_adv, y)
    assert 0 < int(left.sum()) < 32 and torch.equal(seen[iters + 1], x[left])
    assert torch.allclose(res.losses[-1, left], dlr(clf(seen[-1]), y[left]), atol=1e-5)
    two = Defense(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)))
    with pytest.raises(ValueError, match="3 classes"):
        run_attack(p, two, x[:2], torch.tensor([0, 1]), rng_for(2), eps=0.01, step=STEP)


def test_standard_rand_on_adp_stays_in_the_ball_and_is_keyed_per_image(mlp):
    clf, x, y = mlp
    d = adp(clf, replicas=2, sigma=0.3)
    x, y, idx = x[:6], y[:6], torch.arange(10, 16)
    p = spec("standard_rand", gradient="full", iters=2, eot=2, n_target_classes=2)
    whole = run_attack(p, d, x, y, SampleRNG(3, idx), eps=0.1, step=STEP, track_path=True)
    assert ((whole.x_adv - x).abs() <= 0.1 + 1e-6).all() and whole.x_adv.min() >= 0 and whole.x_adv.max() <= 1
    assert whole.losses.shape == (3 * 2 + 1, 6) and whole.path_correct["vote"].shape == (3 * 2, 6)
    half = run_attack(p, d, x[3:], y[3:], SampleRNG(3, idx[3:]), eps=0.1, step=STEP)
    assert torch.allclose(whole.x_adv[3:], half.x_adv, atol=1e-5)
    zero = run_attack(p, d, x, y, SampleRNG(3, idx), eps=0.0, step=STEP)
    assert torch.equal(zero.x_adv, x)


# --- config -------------------------------------------------------------------------------------
def test_config_accepts_the_new_keys_and_rejects_bad_ones():
    cfg = C.load("cifar10_paper", ["attack=[standard_rand,bpda40_eot15]", "attacks.bpda40_eot15.loss=cw"])
    assert cfg.attacks.standard_rand.kind == "standard_rand" and cfg.attacks.standard_rand.eot == 20
    assert cfg.attacks.bpda40_eot15.loss == "cw" and cfg.attacks.bpda40_eot15.restarts == 1
    cfg = C.load("fmnist", ["attacks.bpda40_eot15.restarts=3"])
    assert cfg.attacks.bpda40_eot15.restarts == 3
    for override, piece in [
        ("attacks.bpda40_eot15.restarts=0", "attacks.bpda40_eot15.restarts"),
        ("attacks.bpda40_eot15.loss=margin", "ce, dlr, cw"),
        ("attacks.bpda40_eot15.target_rank=1", "attacks.bpda40_eot15.target_rank"),
    ]:
        with pytest.raises(ConfigError) as e:
            C.load("fmnist", [override])
        assert piece in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="n_target_classes"):
        C.load("fmnist", ["attack=[standard_rand]", "attacks.standard_rand.n_target_classes=0"])
    assert PGD.Params().restarts == 1


# --- later stages on the images the reported protocols still count robust (issue 20) --------------
def _coin_defense():
    """CodeNet behind a purifier that is right on 20 % of its draws whatever the attack does."""
    return Defense(CodeNet(), coin_purifier(0.2), replicas=1)


def _stage_rows(continue_on, protocols, draws, b=32, iters=2):
    d = _coin_defense()
    y = torch.arange(b) % 4
    x = code_images(y)
    seen = []
    e0 = d.classifier.evals
    p = spec("standard_rand", gradient="classifier", iters=iters, eot=1, continue_on=continue_on)
    run_attack(
        p, d, x, y, rng_for(b), eps=0.1, step=STEP, protocols=protocols, draws=draws,
        observer=lambda i, xi: seen.append(xi),
    )  # fmt: skip
    # each stage's x_0 is the rows it attacked; a stage left without images is skipped (no calls),
    # and so are all after it (the images to attack only ever shrink)
    firsts = seen[:: iters + 1]
    rows = [f.shape[0] for f in firsts] + [0] * (4 - len(firsts))
    return d, x, y, rows, d.classifier.evals - e0


def test_standard_rand_keeps_attacking_images_that_mean_of_n_still_counts_robust():
    b, n, iters = 32, 10, 2
    d, x, y, rows_any, evals = _stage_rows("any_protocol", ["single", "mean_of_n"], n, b, iters)
    # stage 1's judging draws, recomputed: the coin does not depend on the (powerless) attack
    rng = rng_for(b).child("apgd-ce_judge")
    first = judge(d, x, y, rng)[0]
    fresh = d.evaluate(x, y, rng.child("draws"), n=n - 1)[d.merge]
    draws = torch.cat([first[None], fresh])
    lucky = ~first & fresh.any(0)  # broken on the judging draw, correct on some fresh draws
    assert int(lucky.sum()) >= 3
    # mean-of-N counts an image robust unless every draw was wrong: exactly those go on to stage 2
    assert rows_any[0] == b and rows_any[1] == int(draws.any(0).sum())
    assert rows_any[1] > int(first.sum()) + 2  # more than the images the single draw left
    # the old rule (one judged draw) gives those lucky images up after stage 1
    _, _, _, rows_single, evals_single = _stage_rows("single", ["single", "mean_of_n"], n, b, iters)
    assert rows_single[1] == int(first.sum())
    # worst-of-N alone: an image wrong on any draw is broken for good, as under AutoAttack
    _, _, _, rows_worst, _ = _stage_rows("any_protocol", ["worst_of_n"], n, b, iters)
    assert rows_worst[1] == int(draws.all(0).sum())
    # cost: 1 row to count classes, B to rank targets, (iters + 1) per attacked image per stage and
    # N judging classifications (S = 1) per attacked image and stage; the single rule judges once
    assert evals == 1 + b + sum(k * (iters + 1) for k in rows_any) + n * sum(rows_any)
    assert evals_single == 1 + b + sum(k * (iters + 1) for k in rows_single) + sum(rows_single)


def test_robust_under_follows_each_protocols_definition():
    v = torch.tensor([[True, False, False, True], [True, False, True, True], [True, False, False, False]])
    path = torch.tensor([[True, True, True, False]])
    assert robust_under(["single"])(v, None).tolist() == [True, False, False, True]
    assert robust_under(["worst_of_n"])(v, None).tolist() == [True, False, False, False]
    assert robust_under(["mean_of_n"])(v, None).tolist() == [True, False, True, True]
    assert robust_under(["ever_broken"])(v, path).tolist() == [True, False, False, False]
    assert robust_under(["ever_broken"])(v, None).tolist() == [True, False, False, True]  # no path: draw 0
    assert robust_under(["worst_of_n", "worst_of_n_floor"])(v, None).tolist() == [True, False, False, False]
    assert robust_under(["majority_of_n"])(v, None).tolist() == [True, False, False, True]  # > N/2 correct
    assert judging_draws(["single", "majority_of_n"], 10) == 10
    assert judging_draws(["single", "ever_broken", "dwbox"], 10) == 1
    assert judging_draws(["single", "mean_of_n"], 10) == 10 and judging_draws(None, 10) == 1


def test_standard_rand_label_says_which_images_later_stages_attack():
    p = attack_params("standard_rand")
    assert p.continue_on == "any_protocol"
    assert display_label(p).endswith("; later stages on images some protocol counts robust)")
    assert display_label(replace(p, continue_on="single")).endswith(
        "; later stages on images one judged draw left unbroken)"
    )
