"""Worst case over attacks (per image, from records) and the gradient-masking checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advpure.results import Record, check_consistency, summarize, wilson
from advpure.results.checks import (
    CHECK_TITLES,
    Check,
    black_box_vs_white_box,
    loss_still_rising,
    monotone_in_eps,
    more_budget,
    paired_comparison,
    unbounded_eps,
    zero_gradient_flags,
    zero_gradients,
)
from advpure.results.checks_report import checks_markdown, checks_metrics, run_checks
from advpure.results.worst_case import WORST_CASE, WORST_CASE_ALL, worst_case_records


def _unit(
    defense: str, attack: str, robust: dict[int, float], protocol: str = "single", merge: str = "softmax"
):
    return [Record(defense, attack, protocol, merge, i, v) for i, v in robust.items()]


def _flags(n: int, broken: set[int], first: int = 0) -> dict[int, float]:
    return {i: 0.0 if i in broken else 1.0 for i in range(first, first + n)}


def _row(rows, defense, attack, merge="softmax"):
    (row,) = [r for r in rows if (r["defense"], r["attack"], r["merge"]) == (defense, attack, merge)]
    return row


# --- worst case over attacks ------------------------------------------------------------------------
def _ensemble_records() -> list[Record]:
    """ADP: PGD and APGD on images 0..9, SPSA on the first 4 only; each breaks different images."""
    recs = _unit("adp", "natural", _flags(10, {9}))
    recs += _unit("adp", "pgd", _flags(10, {1, 9}))
    recs += _unit("adp", "apgd", _flags(10, {5, 9}))
    recs += _unit("adp", "spsa", _flags(4, {2}))
    # worst_of_n <= single per sample; each attack breaks one more image under worst_of_n
    recs += _unit("adp", "pgd", _flags(10, {1, 9, 7}), "worst_of_n")
    recs += _unit("adp", "apgd", _flags(10, {5, 9}), "worst_of_n")
    recs += _unit("adp", "spsa", _flags(4, {2, 3}), "worst_of_n")
    # a second merge rule where nothing is broken but image 0 by SPSA
    recs += _unit("adp", "pgd", _flags(10, set()), merge="vote")
    recs += _unit("adp", "apgd", _flags(10, set()), merge="vote")
    recs += _unit("adp", "spsa", _flags(4, {0}), merge="vote")
    # not included: an eps-sweep unit that breaks everything
    recs += _unit("adp", "pgd@eps0.5", _flags(10, set(range(10))))
    # the undefended model runs PGD only
    recs += _unit("none", "natural", _flags(10, set()))
    recs += _unit("none", "pgd", _flags(10, set(range(8))))
    return recs


def test_worst_case_is_per_image_over_attacks():
    recs = _ensemble_records()
    wc = worst_case_records(recs, ["pgd", "apgd", "spsa"])
    rows = summarize([*recs, *wc.records], labels=wc.labels)

    # images 0..3 were covered by all three attacks; broken: 1 (PGD only), 2 (SPSA only)
    covered = _row(rows, "adp", WORST_CASE)
    assert covered["n"] == 4 and covered["single_n"] == 4
    assert covered["single"] == pytest.approx(2 / 4)
    assert (covered["single_lo"], covered["single_hi"]) == pytest.approx(wilson(2, 4))
    assert covered["natural"] == 1.0  # clean accuracy on the same 4 images (9 is the only error)
    # worst_of_n: broken 1, 2, 3 among 0..3
    assert covered["worst_of_n"] == pytest.approx(1 / 4)
    assert covered["attack_label"] == "Worst case (all attacks; images every attack covered)"

    # all 10 images, each judged by the attacks that ran on it: broken 1, 2, 5, 9
    every = _row(rows, "adp", WORST_CASE_ALL)
    assert every["n"] == 10
    assert every["single"] == pytest.approx(6 / 10)
    assert (every["single_lo"], every["single_hi"]) == pytest.approx(wilson(6, 10))
    assert every["natural"] == pytest.approx(9 / 10)
    assert every["attack_label"] == "Worst case (all attacks; all images)"

    # an image broken by exactly one attack counts as broken (image 5: APGD only; image 2: SPSA only)
    per_image = {(r.attack, r.protocol, r.merge, r.idx): r.value for r in wc.records if r.defense == "adp"}
    assert per_image[(WORST_CASE_ALL, "single", "softmax", 5)] == 0.0
    assert per_image[(WORST_CASE, "single", "softmax", 2)] == 0.0
    assert per_image[(WORST_CASE_ALL, "single", "softmax", 4)] == 1.0
    # the other merge rule is combined on its own
    assert _row(rows, "adp", WORST_CASE, "vote")["single"] == pytest.approx(3 / 4)
    assert _row(rows, "adp", WORST_CASE_ALL, "vote")["single"] == pytest.approx(9 / 10)

    # never the average or the minimum of the per-attack percentages
    per_attack = [_row(rows, "adp", a)["single"] for a in ("pgd", "apgd", "spsa")]
    assert every["single"] < min(per_attack) and every["single"] != pytest.approx(np.mean(per_attack))

    # the eps-sweep unit that broke everything was not included
    assert per_image[(WORST_CASE_ALL, "single", "softmax", 0)] == 1.0
    # the synthetic records keep the protocols' per-sample relations; samples checked:
    # adp 4 + 10 per merge rule (2 rules), none 10 + 10
    assert check_consistency(wc.records) == 48


def test_worst_case_worst_of_n_and_fractions():
    recs = _ensemble_records()
    wc = worst_case_records(recs, ["pgd", "apgd", "spsa"])
    rows = summarize([*recs, *wc.records], labels=wc.labels)
    # worst_of_n over all images: PGD breaks 1, 7, 9; APGD 5, 9; SPSA (0..3) 2, 3 -> robust 0, 4, 6, 8
    assert _row(rows, "adp", WORST_CASE_ALL)["worst_of_n"] == pytest.approx(4 / 10)
    # mean_of_n (fractions) takes the per-image minimum
    frac = [
        Record("d", "a", "mean_of_n", "softmax", 0, 0.6),
        Record("d", "b", "mean_of_n", "softmax", 0, 0.3),
    ]
    frac += [
        Record("d", "a", "mean_of_n", "softmax", 1, 1.0),
        Record("d", "b", "mean_of_n", "softmax", 1, 0.9),
    ]
    out = worst_case_records(frac, ["a", "b"]).records
    assert sorted((r.idx, r.value) for r in out if r.attack == WORST_CASE) == [(0, 0.3), (1, 0.9)]


def test_worst_case_defense_with_fewer_attacks_and_note():
    wc = worst_case_records(_ensemble_records(), ["pgd", "apgd", "spsa"], labels={"spsa": "SPSA100"})
    rows = summarize(wc.records)
    # the undefended model ran PGD only: its worst case is PGD, over its 10 images
    assert _row(rows, "none", WORST_CASE)["single"] == pytest.approx(2 / 10)
    assert wc.attacks == {"adp": ("pgd", "apgd", "spsa"), "none": ("pgd",)}
    # the note states who ran on fewer images and what did not run
    assert "SPSA100 on 4 images" in wc.note and "SPSA100 ran on fewer images" in wc.note
    assert "4 images every attack covered, 10 in all" in wc.note
    assert "not run on this defense: apgd, SPSA100" in wc.note


def test_worst_case_protocol_missing_from_an_attack_is_stated():
    recs = _unit("d", "a", _flags(4, {0})) + _unit("d", "b", _flags(4, {1}))
    recs += _unit("d", "a", _flags(4, {0, 2}), "ever_broken")  # b recorded no ever_broken
    recs += _unit("d", "a", {0: 0.5, 1: 1.0, 2: 0.5, 3: 1.0}, "mean_of_n")  # nor mean_of_n
    wc = worst_case_records(recs, ["a", "b"])
    rows = summarize(wc.records)
    row = _row(rows, "d", WORST_CASE)
    assert row["single"] == pytest.approx(2 / 4)
    # ever_broken <= single per sample: b's single bounds its ever_broken (image 1 broken by b)
    assert row["ever_broken"] == pytest.approx(1 / 4)
    # mean_of_n declares no bound: b is left out there
    assert row["mean_of_n"] == pytest.approx(3 / 4)
    assert check_consistency(wc.records) == 8
    assert "no ever_broken records for b (4 images): bounded by their single" in wc.note
    assert "no mean_of_n records for b (4 images): left out of the mean_of_n worst case" in wc.note


def test_worst_case_bad_input():
    recs = _unit("d", "a", _flags(2, set()))
    with pytest.raises(ValueError, match="at least one"):
        worst_case_records(recs, [])
    with pytest.raises(ValueError, match="natural"):
        worst_case_records(recs, ["a", "natural"])
    with pytest.raises(ValueError, match="repeated"):
        worst_case_records(recs, ["a", "a"])
    with pytest.raises(ValueError, match="already contain"):
        worst_case_records([*recs, *_unit("d", WORST_CASE, _flags(2, set()))], ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        worst_case_records([Record("d", "a", "single", "softmax", 0, 1.5)], ["a"])


# --- (a) zero gradients -----------------------------------------------------------------------------
def _ce_input_grad(model, x, y, dtype):
    x = x.clone().to(dtype).requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def test_zero_gradients_fp16_confident_classifier_warns():
    torch.manual_seed(0)
    n, d = 16, 8
    y = torch.arange(n) % 2
    x = torch.randn(n, d)
    w = torch.zeros(d, 2)
    w[0] = torch.tensor([-1.0, 1.0])
    x[:, 0] = (2 * y - 1).float() * 30.0  # margin 60: softmax rounds to exactly 1 in fp16
    x[: n // 2, 0] *= 0.02  # half the images only margin 1.2: their gradient survives fp16

    def fp16_model(v):
        return v @ w.half()

    def fp32_model(v):
        return v @ w

    g16 = _ce_input_grad(fp16_model, x, y, torch.float16)
    g32 = _ce_input_grad(fp32_model, x, y, torch.float32)
    f16, f32 = zero_gradient_flags(g16), zero_gradient_flags(g32)
    assert f16.shape == (n,) and f16[n // 2 :].all() and not f16[: n // 2].any()
    assert not f32.any()

    warn = zero_gradients({("adp", "pgd"): dict(enumerate(f16)), ("none", "pgd"): f32})
    assert warn.status == "warn"
    assert "adp/pgd 8/16 (50.00%)" in warn.message and "none/pgd" not in warn.message
    assert "fp16" in warn.message and "cleverhans#350" in warn.message
    ok = zero_gradients({("adp", "pgd"): f32, ("none", "pgd"): f32})
    assert ok.status == "pass" and "0 of 32" in ok.message
    assert zero_gradients({}).status == "skip"


def test_zero_gradients_quantised_net_warns():
    """A masked net (input quantisation without a straight-through gradient) has gradient 0."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(12, 3)
    x, y = torch.rand(5, 12), torch.tensor([0, 1, 2, 0, 1])
    grad = _ce_input_grad(lambda v: lin(torch.round(v * 4) / 4), x, y, torch.float32)
    flags = zero_gradient_flags(grad)
    assert flags.all()
    assert zero_gradients({("quant", "pgd"): flags}).status == "warn"
    assert not zero_gradient_flags(_ce_input_grad(lin, x, y, torch.float32)).any()


# --- (b) unbounded eps ------------------------------------------------------------------------------
def test_unbounded_eps():
    recs = _unit("adp", "pgd@eps1", _flags(20, set(range(10))))  # 50 % left at eps = 1
    recs += _unit("none", "pgd@eps1", _flags(20, set(range(20))))
    rows = summarize(recs)
    check = unbounded_eps(rows, "pgd@eps1")
    assert check.status == "warn" and "adp/pgd@eps1 50.00%" in check.message and "none/" not in check.message
    healthy = summarize(
        _unit("adp", "pgd@eps1", _flags(20, set(range(20))))
        + _unit("none", "pgd@eps1", _flags(20, set(range(20))))
    )
    ok = unbounded_eps(healthy, ["pgd@eps1"])
    assert ok.status == "pass" and "adp/pgd@eps1 0.00%" in ok.message
    assert unbounded_eps(rows, "other").status == "skip"


# --- (c) black box vs white box ---------------------------------------------------------------------
def test_black_box_stronger_than_white_box_warns():
    recs = _unit("adp", "pgd", _flags(40, set(range(4))))  # PGD leaves 36/40
    recs += _unit("adp", "apgd", _flags(40, set(range(8))))  # the best white box: 32/40
    recs += _unit("adp", "spsa", _flags(20, set(range(14))))  # SPSA on the first 20: 6/20
    check = black_box_vs_white_box(recs, "spsa", ["pgd", "apgd"])
    assert check.status == "warn"
    # compared with the best white-box attack on the 20 shared images: APGD 12/20, SPSA 6/20
    assert "best white-box apgd 60.00%" in check.message and "spsa 30.00%" in check.message
    assert "broken only by spsa: 6, only by best white-box apgd: 0" in check.message


def test_black_box_weaker_than_white_box_passes():
    rng = np.random.default_rng(0)
    wb_broken = set(rng.choice(40, 16, replace=False).tolist())
    recs = _unit("adp", "apgd", _flags(40, wb_broken))
    # SPSA breaks a subset of what APGD broke, plus one image APGD missed
    spsa_broken = set(sorted(wb_broken)[:6]) | {next(i for i in range(40) if i not in wb_broken)}
    recs += _unit("adp", "spsa", _flags(40, spsa_broken))
    check = black_box_vs_white_box(recs, "spsa", ["apgd"])
    assert check.status == "pass" and "broken only by spsa: 1" in check.message
    assert black_box_vs_white_box(recs, "spsa", ["pgd"]).status == "skip"


def test_paired_comparison_is_exact_mcnemar():
    a = _flags(30, set(range(2)))
    b = _flags(30, set(range(10)))  # b breaks 8 more, never fewer
    pr = paired_comparison(a, b)
    assert (pr.n, pr.robust_a, pr.robust_b, pr.only_b_broke, pr.only_a_broke) == (30, 28, 20, 8, 0)
    assert pr.p_b_stronger == pytest.approx(0.5**8)  # P(X >= 8), X ~ Bin(8, 1/2)
    assert paired_comparison(a, a).p_b_stronger == 1.0
    with pytest.raises(ValueError, match="0/1"):
        paired_comparison({0: 0.5}, {0: 1.0})
    with pytest.raises(ValueError, match="share no image"):
        paired_comparison({0: 1.0}, {1: 1.0})


# --- (d) monotone in eps ----------------------------------------------------------------------------
def _sweep_rows(accs: dict[float, int], n: int = 50):
    recs, sweep = [], {}
    for eps, robust in accs.items():
        key = f"pgd@eps{eps:.4g}"
        sweep[key] = eps
        recs += _unit("adp", key, _flags(n, set(range(n - robust))))
    return summarize(recs), sweep


def test_monotone_in_eps():
    rows, sweep = _sweep_rows({0.0: 45, 0.02: 20, 0.05: 12, 0.1: 40})  # more robust at the largest eps
    check = monotone_in_eps(rows, sweep)
    assert check.status == "warn"
    assert "eps 0.1 80.00% > upper bound" in check.message and "of eps 0.05" in check.message
    # a small rise within the CI is noise, not a warning
    rows, sweep = _sweep_rows({0.0: 45, 0.02: 20, 0.05: 12, 0.1: 14})
    ok = monotone_in_eps(rows, sweep)
    assert ok.status == "pass" and "eps 0.1 28.00%" in ok.message
    assert monotone_in_eps(rows, {"pgd@eps0.1": 0.1}).status == "skip"


# --- (e) loss still rising --------------------------------------------------------------------------
def test_loss_still_rising():
    rng = np.random.default_rng(0)
    t = np.arange(41, dtype=np.float64)
    rising = {i: (0.05 * t + rng.normal(0, 0.05, t.size)).astype(np.float32) for i in range(12)}
    flat = {
        i: (2.0 * (1 - np.exp(-t / 4)) + rng.normal(0, 0.05, t.size)).astype(np.float32) for i in range(12)
    }
    check = loss_still_rising({("adp", "pgd"): rising, ("adp", "apgd"): flat})
    assert (
        check.status == "warn" and "adp/pgd: slope 0.05" in check.message and "adp/apgd" not in check.message
    )
    assert "last 5 of 41 iterates" in check.message
    ok = loss_still_rising({("adp", "apgd"): flat})
    assert ok.status == "pass"
    # too short to judge
    assert loss_still_rising({("adp", "fgsm"): {0: np.array([0.1, 0.2])}}).status == "skip"


# --- (f) more budget --------------------------------------------------------------------------------
def test_more_budget():
    base = _flags(50, set(range(10)))  # EOT 15: 40/50 robust
    strong = _flags(20, set(range(10)) | set(range(10, 18)))  # EOT 30 on the first 20: 8 more broken
    recs = _unit("adp", "bpda", base) + _unit("adp", "bpda_eot2x", strong)
    check = more_budget(recs, [("bpda", "bpda_eot2x")], labels={"bpda_eot2x": "BPDA 2x EOT"})
    assert check.status == "warn"
    assert "bpda 50.00%" in check.message and "BPDA 2x EOT 10.00%" in check.message  # on the 20 shared
    # the same budget again (different noise): a few flips both ways
    flip = dict(base)
    flip.update({3: 1.0, 12: 0.0, 15: 0.0})
    recs = _unit("adp", "bpda", base) + _unit("adp", "bpda_eot2x", {i: flip[i] for i in range(20)})
    ok = more_budget(recs, [("bpda", "bpda_eot2x")])
    assert ok.status == "pass" and "only by bpda_eot2x: 2, only by bpda: 1" in ok.message
    assert more_budget(recs, [("bpda", "missing")]).status == "skip"


# --- rendering --------------------------------------------------------------------------------------
def test_healthy_run_is_quiet_and_rendered():
    n = 30
    recs = []
    for d in ("none", "adp"):
        recs += _unit(d, "natural", _flags(n, {0}))
        broken = set(range(0, 24, 2))  # APGD breaks 12 of 30
        recs += _unit(d, "apgd", _flags(n, broken))
        recs += _unit(d, "spsa", _flags(10, {0, 2, 5}))  # weaker on its 10: one image APGD missed
        recs += _unit(d, "apgd_iters2x", _flags(10, {0, 2, 4, 6, 9}))  # 2x iterations: one flip each way
        recs += _unit(d, "apgd@eps1", _flags(10, set(range(10))))
        for eps, k in ((0.0, 29), (0.03, 18), (0.06, 5)):
            recs += _unit(d, f"apgd@eps{eps:.4g}", _flags(n, set(range(n - k))))
    rows = summarize(recs)
    t = np.arange(21, dtype=np.float64)
    traces = {(d, "apgd"): {i: 3 * (1 - np.exp(-t / 3)) for i in range(n)} for d in ("none", "adp")}
    zero = {(d, "apgd"): np.zeros(n, bool) for d in ("none", "adp")}
    checks = run_checks(
        records=recs,
        rows=rows,
        traces=traces,
        zero_grad=zero,
        unbounded="apgd@eps1",
        sweep={"apgd@eps0": 0.0, "apgd@eps0.03": 0.03, "apgd@eps0.06": 0.06},
        black_box="spsa",
        white_box=["apgd"],
        budget_pairs=[("apgd", "apgd_iters2x")],
        reach={"spsa": (20, 0.01, 0.1)},
    )
    assert [c.name for c in checks] == list(CHECK_TITLES)
    assert [c.status for c in checks] == ["pass"] * 7, [c.message for c in checks]
    assert checks_metrics(checks) == {**{f"checks/{k}": 1.0 for k in CHECK_TITLES}, "checks/warnings": 0.0}

    skipped = run_checks()
    assert {c.status for c in skipped} == {"skip"} and checks_metrics(skipped) == {"checks/warnings": 0.0}

    mixed = [*checks[:5], Check("more_budget", "warn", "bpda 50.00% vs 2x EOT 10.00%")]
    md = checks_markdown(mixed)
    assert md.startswith("## Checks\n") and "5 pass, 1 warn, 0 skipped" in md
    assert f"| more_budget | {CHECK_TITLES['more_budget']} | WARN |" in md
    assert "- **more_budget** (warn): bpda 50.00% vs 2x EOT 10.00%" in md
    assert (
        checks_metrics(mixed)["checks/more_budget"] == 0.0 and checks_metrics(mixed)["checks/warnings"] == 1.0
    )
    with pytest.raises(ValueError, match="status"):
        Check("x", "fail", "")


def test_reaches_eps_warns_for_a_fixed_step_attack_that_cannot_travel_eps():
    from advpure.results.checks_reach import reaches_eps

    short = reaches_eps({"bpda": (10, 0.01, 0.15), "pgd": (20, 0.01, 0.15)}, {"bpda": "BPDA10+EOT4"})
    assert short.status == "warn"
    assert "BPDA10+EOT4: 10 x 0.01 = 0.1 < eps 0.15 (at most 67% of the radius)" in short.message
    assert "pgd" not in short.message.split(";")[0] and "PGD" not in short.message
    exact = reaches_eps({"pgd": (15, 0.01, 0.15)})  # 15 x 0.01 is 0.15 up to rounding: reaches it
    assert exact.status == "pass" and "1 fixed-step attack(s)" in exact.message
    assert reaches_eps({}).status == "skip"
    zero = reaches_eps({"bpda": (2, 0.01, 0.0)})  # the eps = 0 sanity run: trivially reached, no division
    assert zero.status == "pass" and "at eps = 0" in zero.message


def test_only_fixed_step_attacks_are_held_to_iterations_x_step():
    from advpure.attacks import attack_class

    assert attack_class("pgd").fixed_step and attack_class("spsa").fixed_step
    assert attack_class("joint_full").fixed_step
    assert not attack_class("apgd").fixed_step and not attack_class("standard_rand").fixed_step
