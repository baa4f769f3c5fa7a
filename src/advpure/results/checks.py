"""Automatic gradient-masking checks on a benchmark run, each a `Check` with pass / warn / skip.

Gradient masking makes a defense look robust because the attack's gradient is useless, not
because the defense is robust. The checklist of Carlini et al. 2019 ("On Evaluating Adversarial
Robustness", arXiv 1902.06705) lists the symptoms an evaluation must rule out; AutoAttack (Croce &
Hein 2020) checks some of them on every run. Implemented here, each on plain data a run directory
already holds (or that the benchmark records next to it); quoted item names are the checklist's:

* `zero_gradients`        — the attack's gradient at the start is exactly zero for some images
  (e.g. fp16 cross-entropy of a confident classifier underflows to 0: cleverhans#350,
  auto-attack#51 and #73), or a layer whose gradient vanishes ("Approximate non-differentiable
  layers"). Such images never move under PGD without a random start.
* `unbounded_eps`         — at eps = 1 (any image in [0, 1] is reachable) every defense must fall
  to about 0 % ("attacks eventually reach 100 % success").
* `black_box_vs_white_box` — a black-box attack (SPSA) that beats the best white-box attack on the
  same images means the white-box gradients are masked ("check that the gradient-free attacks
  succeed less often than gradient-based attacks", per example).
* `monotone_in_eps`       — robust accuracy must not rise with eps ("increasing the perturbation
  budget strictly increases attack success rate"; a larger ball contains the smaller one).
* `loss_still_rising`     — the attack loss still rising over the last iterations: the budget was
  too small ("verify that the attacks have converged").
* `more_budget`           — more EOT draws or iterations must not lower robust accuracy beyond
  chance ("doubling the number of iterations does not increase attack success rate"; for EOT,
  Athalye et al. 2018, "Synthesizing robust adversarial examples").
* `reaches_eps` (`checks_reach.py`) — a fixed-step attack (PGD, BPDA, the joint attacks, SPSA: sign steps
  of size `step`) can leave x by at most iters x step per pixel; below eps it cannot reach the
  ball's boundary and the threat model is not what the table says (a budget cut without scaling
  the step). Adaptive-step attacks (APGD, whose step starts at 2 eps) are exempt.

Paired comparisons (black-box vs white-box, more budget) use the exact McNemar test on the
images both attacks covered: under "equally strong", the images broken by exactly one of the two
attacks split like a fair coin (`scipy.stats.binomtest`); a one-sided p below `alpha` warns.

Input shapes (all plain Python / numpy; `load_records`, `summarize` and `load_traces` produce them):

* records: `Record(defense, attack, protocol, merge, idx, value)` or such 6-tuples, values in [0, 1];
* rows: the dicts of `tables.summarize` (keys defense, attack, merge, `<p>`, `<p>_lo`, `<p>_hi`,
  `<p>_n`, accuracies as fractions);
* traces: `{(defense, attack): {idx: 1-D array of the attack loss at the iterates x_0 .. x_T}}`;
* zero-gradient flags: `{(defense, attack): {idx: bool}}` (or a sequence / array of bools per unit).

`advpure.results.checks_report` runs them all, renders the "## Checks" section and the W&B scalars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from advpure.results.stats import wilson

PASS, WARN, SKIP = "pass", "warn", "skip"

# name -> what the check verifies (the "Checks" table's second column)
CHECK_TITLES = {
    "zero_gradients": "no image starts the attack with an exactly zero gradient",
    "unbounded_eps": "eps = 1 (unbounded) takes every defense to about 0 %",
    "black_box_vs_white_box": "the black-box attack is not stronger than the white-box ones on the same images",
    "monotone_in_eps": "robust accuracy does not rise with eps",
    "loss_still_rising": "the attack loss is not still rising over the last iterations",
    "more_budget": "more EOT draws / iterations do not lower robust accuracy beyond chance",
    "reaches_eps": "every fixed-step attack can travel the whole eps (iterations x step >= eps)",
}


@dataclass(frozen=True)
class Check:
    """One check's outcome. status: "pass" | "warn" | "skip"; message: the numbers behind it."""

    name: str
    status: str
    message: str

    def __post_init__(self) -> None:
        if self.status not in (PASS, WARN, SKIP):
            raise ValueError(f"check status must be pass, warn or skip, got {self.status!r}")


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _ci(acc: float, lo: float, hi: float, n: int) -> str:
    return f"{_pct(acc)} [{_pct(lo)}, {_pct(hi)}], n={n}"


def _unit(defense: str, attack: str) -> str:
    return f"{defense}/{attack}"


# --- (a) zero gradients -----------------------------------------------------------------------------
def zero_gradient_flags(grad: Any) -> np.ndarray:
    """(B,) bool: True where the gradient of image b, `grad[b]` of any shape (e.g. (C, H, W)), is
    exactly zero everywhere. grad: torch tensor or array of shape (B, ...). A NaN gradient is not
    zero (it is flagged by the attack's own finiteness checks)."""
    if hasattr(grad, "detach"):
        grad = grad.detach().cpu().float().numpy()
    g = np.asarray(grad)
    if g.ndim < 1:
        raise ValueError(f"gradient must have a batch dimension, got shape {g.shape}")
    return (g.reshape(g.shape[0], -1) == 0).all(axis=1)


def zero_gradients(
    flags: Mapping[tuple[str, str], Mapping[int, bool] | Sequence[bool] | np.ndarray],
) -> Check:
    """Warn when any unit has images whose attack gradient at the start was exactly zero.

    flags: {(defense, attack): {idx: True if the gradient at x_0 was exactly zero}} (or a sequence of
    bools per unit); e.g. `zero_gradient_flags(grad)` of the first gradient of each batch.
    Pass when every fraction is 0; skip without flags. Such images are counted robust by PGD
    without random start although the attack never moved them; the usual cause is fp16 attack
    gradients (the softmax of a confident classifier rounds to exactly one; cleverhans#350,
    auto-attack#51/#73), otherwise a non-differentiable layer (quantisation, argmax) in the model.
    """
    name = "zero_gradients"
    fractions = {}
    for unit, f in flags.items():
        vals = np.asarray(list(f.values()) if isinstance(f, Mapping) else f, dtype=bool).reshape(-1)
        if vals.size:
            fractions[unit] = (int(vals.sum()), int(vals.size))
    if not fractions:
        return Check(name, SKIP, "no zero-gradient flags were recorded")
    bad = {u: kn for u, kn in fractions.items() if kn[0] > 0}
    if not bad:
        total = sum(n for _, n in fractions.values())
        return Check(name, PASS, f"0 of {total} start gradients are exactly zero ({len(fractions)} units)")
    listed = ", ".join(f"{_unit(*u)} {k}/{n} ({_pct(k / n)})" for u, (k, n) in sorted(bad.items()))
    return Check(
        name,
        WARN,
        f"exactly zero attack gradient at the start for {listed}; these images never move under PGD "
        "without random start and count as robust. Usual cause: fp16 attack gradients underflowing "
        "(cleverhans#350, auto-attack#51/#73): compute the loss and its gradient in fp32",
    )


# --- (b) unbounded eps ------------------------------------------------------------------------------
def unbounded_eps(
    rows: Iterable[Mapping[str, Any]],
    attacks: str | Sequence[str],
    *,
    threshold: float = 0.05,
    protocol: str = "single",
    merge: str = "softmax",
) -> Check:
    """Warn when a defense keeps robust accuracy above `threshold` (a fraction) under eps = 1.

    rows: `summarize` rows; those of the check unit(s) `attacks` (attack keys run at eps = 1, usually
    on a small subset) and merge rule `merge` are read, field `protocol` with its CI and n.
    At eps = 1 the attacker can replace the image by any image in [0, 1], so an attack that works
    takes every defense to ~0 % (Carlini et al. 2019: "attacks eventually reach 100 % success"); a
    defense left above `threshold` points
    to gradient masking or a too-weak attack. Skip when there are no such rows.
    """
    name = "unbounded_eps"
    keys = {attacks} if isinstance(attacks, str) else set(attacks)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a fraction in [0, 1], got {threshold}")
    found = [r for r in rows if r["attack"] in keys and r["merge"] == merge and r.get(protocol) is not None]
    if not found:
        return Check(
            name, SKIP, f"no eps = 1 check unit among the rows ({', '.join(sorted(keys)) or 'none'})"
        )
    parts, bad = [], []
    for r in found:
        text = f"{_unit(r['defense'], r['attack'])} {_ci(r[protocol], r[f'{protocol}_lo'], r[f'{protocol}_hi'], r[f'{protocol}_n'])}"
        parts.append(text)
        if r[protocol] > threshold:
            bad.append(text)
    if bad:
        return Check(
            name,
            WARN,
            f"robust accuracy ({protocol}) above {_pct(threshold)} at eps = 1: {'; '.join(bad)}; an unbounded "
            "attack must reach ~0 %: gradient masking or too weak an attack",
        )
    return Check(
        name, PASS, f"every defense at most {_pct(threshold)} at eps = 1 ({protocol}): {'; '.join(parts)}"
    )


# --- paired comparisons ----------------------------------------------------------------------------
def _per_image(
    records: Iterable[Sequence], protocol: str, merge: str
) -> dict[tuple[str, str], dict[int, float]]:
    out: dict[tuple[str, str], dict[int, float]] = {}
    for defense, attack, name, m, idx, value in records:
        if name == protocol and m == merge:
            out.setdefault((defense, attack), {})[int(idx)] = float(value)
    return out


@dataclass(frozen=True)
class Paired:
    """Two attacks on the same n images: accuracies and the discordant counts."""

    n: int
    robust_a: int  # images robust under a
    robust_b: int
    only_b_broke: int  # images robust under a, broken by b
    only_a_broke: int
    p_b_stronger: float  # one-sided exact McNemar p-value for "b breaks more images than a"


def paired_comparison(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Compare attacks a and b on the images both covered ({idx: 0/1 robust}).

    Exact McNemar test (McNemar 1947) as a binomial test on the discordant images
    (`scipy.stats.binomtest`, one-sided "b stronger"): p = P(X >= only_b_broke), X ~ Bin(d, 1/2),
    d = discordant images. p = 1 when there is no discordant image.
    Raises ValueError when no image is shared or a value is not 0 or 1 (use a 0/1 protocol such as
    single, worst_of_n or ever_broken, not mean_of_n).
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two attacks share no image")
    va = np.array([a[i] for i in common])
    vb = np.array([b[i] for i in common])
    if not (np.isin(va, (0.0, 1.0)).all() and np.isin(vb, (0.0, 1.0)).all()):
        raise ValueError(
            "a paired comparison needs 0/1 values (single, worst_of_n, ever_broken), not fractions"
        )
    only_b = int(((va == 1) & (vb == 0)).sum())
    only_a = int(((va == 0) & (vb == 1)).sum())
    d = only_a + only_b
    p = float(stats.binomtest(only_b, d, 0.5, alternative="greater").pvalue) if d else 1.0
    return Paired(len(common), int(va.sum()), int(vb.sum()), only_b, only_a, p)


def _paired_text(label_a: str, label_b: str, pr: Paired) -> str:
    ca = _ci(pr.robust_a / pr.n, *wilson(pr.robust_a, pr.n), pr.n)
    cb = _ci(pr.robust_b / pr.n, *wilson(pr.robust_b, pr.n), pr.n)
    return (
        f"{label_a} {ca} vs {label_b} {cb} on the same images; broken only by {label_b}: "
        f"{pr.only_b_broke}, only by {label_a}: {pr.only_a_broke}; one-sided exact McNemar p = {pr.p_b_stronger:.3g}"
    )


def _paired_verdict(
    name: str, comparisons: list[tuple[str, Paired]], *, alpha: float, protocol: str, skip: str, warn: str
) -> Check:
    """The check `name` over `comparisons` [(text, paired comparison of a vs b)]: WARN (`warn`, then the
    texts) when b broke significantly more images than a (one-sided p < alpha), SKIP (`skip`) when
    there is nothing to compare, else PASS with every text."""
    if not comparisons:
        return Check(name, SKIP, skip)
    bad = [t for t, pr in comparisons if pr.p_b_stronger < alpha and pr.robust_b < pr.robust_a]
    if bad:
        return Check(name, WARN, warn.format(head=f"({protocol}, p < {alpha:g}): {'; '.join(bad)}"))
    return Check(name, PASS, f"({protocol}) " + "; ".join(t for t, _ in comparisons))


def black_box_vs_white_box(
    records: Iterable[Sequence],
    black_box: str | Sequence[str],
    white_box: Sequence[str],
    *,
    protocol: str = "single",
    merge: str = "softmax",
    alpha: float = 0.05,
) -> Check:
    """Warn when a black-box attack is significantly stronger than the best white-box attack.

    records: the run's records. black_box: attack key(s) of gradient-free attacks (e.g. "spsa").
    white_box: attack keys of gradient attacks (PGD, APGD, BPDA, ...). For each defense and each
    black-box attack, the white-box attack with the lowest robust accuracy on the images both
    covered is compared with it on those images (paired; `paired_comparison`); p < alpha warns.
    A black-box attack that beats white-box gradients means the gradients are masked (Carlini et
    al. 2019, "Apply gradient-free attacks", compared per example). Skip when no defense has both.
    """
    name = "black_box_vs_white_box"
    bb = [black_box] if isinstance(black_box, str) else list(black_box)
    per = _per_image(records, protocol, merge)
    defenses = sorted({d for d, _ in per})
    comparisons = []
    for defense in defenses:
        for b in bb:
            if (defense, b) not in per:
                continue
            comps = []
            for w in white_box:
                if (defense, w) in per and set(per[(defense, w)]) & set(per[(defense, b)]):
                    comps.append((paired_comparison(per[(defense, w)], per[(defense, b)]), w))
            if not comps:
                continue
            pr, w = min(comps, key=lambda c: (c[0].robust_a / c[0].n, c[1]))
            comparisons.append((f"{defense}: " + _paired_text(f"best white-box {w}", b, pr), pr))
    return _paired_verdict(
        name,
        comparisons,
        alpha=alpha,
        protocol=protocol,
        skip="no defense has both a black-box and a white-box attack on shared images",
        warn="black-box stronger than white-box {head}; the white-box gradients are likely masked",
    )


def more_budget(
    records: Iterable[Sequence],
    pairs: Sequence[tuple[str, str]],
    *,
    protocol: str = "single",
    merge: str = "softmax",
    alpha: float = 0.05,
    labels: Mapping[str, str] | None = None,
) -> Check:
    """Warn when an attack with more budget breaks significantly more images than the base attack.

    records: the run's records. pairs: [(base attack key, stronger attack key)], the stronger one
    being the base with e.g. 2x EOT draws or 2x iterations, usually on a subset of the images. For
    each defense with both, the two are compared on the images both covered (paired;
    `paired_comparison`); p < alpha warns: the reported budget did not make the attack converge
    (Carlini et al. 2019, "Verify that the attacks have converged"). Skip when no defense has a pair.
    """
    name = "more_budget"
    labels = labels or {}
    per = _per_image(records, protocol, merge)
    comparisons = []
    for defense in sorted({d for d, _ in per}):
        for base, strong in pairs:
            if (defense, base) not in per or (defense, strong) not in per:
                continue
            if not set(per[(defense, base)]) & set(per[(defense, strong)]):
                continue
            pr = paired_comparison(per[(defense, base)], per[(defense, strong)])
            text = f"{defense}: " + _paired_text(labels.get(base, base), labels.get(strong, strong), pr)
            comparisons.append((text, pr))
    return _paired_verdict(
        name,
        comparisons,
        alpha=alpha,
        protocol=protocol,
        skip="no (base, stronger-budget) pair of units ran on shared images",
        warn="more budget lowers robust accuracy {head}; the reported numbers are upper bounds that a "
        "longer attack lowers",
    )


# --- (d) monotone in eps ----------------------------------------------------------------------------
def monotone_in_eps(
    rows: Iterable[Mapping[str, Any]],
    sweep: Mapping[str, float],
    *,
    protocol: str = "single",
    merge: str = "softmax",
) -> Check:
    """Warn where robust accuracy at a larger eps exceeds the upper 95% bound at a smaller eps.

    rows: `summarize` rows. sweep: {attack key: eps} of the robust-vs-eps units (the same mapping as
    `write_report(sweep=...)`; eps in the image's [0, 1] units). For each defense every pair
    eps_i < eps_j is compared (not only neighbours, so a slow rise over several points is caught):
    warn when acc(eps_j) > Wilson upper bound of acc(eps_i). The l_inf ball of eps_j contains the
    ball of eps_i, so a working attack cannot do worse at eps_j (Carlini et al. 2019, "Perform
    basic sanity tests").
    Skip when no defense has two sweep points.
    """
    name = "monotone_in_eps"
    curves: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for r in rows:
        if r["merge"] == merge and r["attack"] in sweep and r.get(protocol) is not None:
            curves.setdefault(r["defense"], []).append((float(sweep[r["attack"]]), r))
    curves = {d: sorted(c, key=lambda t: t[0]) for d, c in curves.items() if len(c) >= 2}
    if not curves:
        return Check(name, SKIP, "no defense has two or more eps-sweep points")
    bad, summary = [], []
    for defense, points in sorted(curves.items()):
        summary.append(f"{defense}: " + ", ".join(f"eps {e:.4g} {_pct(r[protocol])}" for e, r in points))
        for i, (ei, ri) in enumerate(points):
            for ej, rj in points[i + 1 :]:
                if ej > ei and rj[protocol] > ri[f"{protocol}_hi"]:
                    bad.append(
                        f"{defense}: eps {ej:.4g} {_pct(rj[protocol])} > upper bound {_pct(ri[f'{protocol}_hi'])} "
                        f"of eps {ei:.4g} ({_ci(ri[protocol], ri[f'{protocol}_lo'], ri[f'{protocol}_hi'], ri[f'{protocol}_n'])})"
                    )
    if bad:
        return Check(
            name,
            WARN,
            f"robust accuracy ({protocol}) rises with eps beyond the 95% CI: {'; '.join(bad)}; a larger ball "
            "contains the smaller one: the attack is failing at the larger eps (masking or step size)",
        )
    return Check(name, PASS, f"non-increasing within the CI ({protocol}): " + "; ".join(summary))


# --- (e) loss still rising --------------------------------------------------------------------------
def loss_still_rising(
    traces: Mapping[tuple[str, str], Mapping[int, Any]],
    *,
    tail: float = 0.1,
    tolerance: float = 0.05,
    alpha: float = 0.05,
    min_points: int = 3,
) -> Check:
    """Warn when the mean attack loss is still rising over the last `tail` of the iterations.

    traces: {(defense, attack): {idx: 1-D loss at the iterates x_0 .. x_T}} (`load_traces`; pass
    only the units to check, e.g. without eps-sweep units). Per unit, over the last
    max(min_points, ceil(tail * (T + 1))) iterates, each image's least-squares slope (`np.polyfit`)
    is taken; their mean is the slope of the mean loss curve (loss units per iteration). Warn when
    the rise over that window, slope * (window - 1), exceeds `tolerance` times the range of the
    mean curve over the whole attack AND the slopes are significantly positive (one-sided one-sample
    t-test, `scipy.stats.ttest_1samp`, p < alpha): the attack had not converged, the budget was too
    small (Carlini et al. 2019, "Verify that the attacks have converged"). Images whose trace
    length differs from the unit's most common
    one are left out (counted in the message). Skip when no unit has min_points + 1 iterates.
    """
    name = "loss_still_rising"
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail is a fraction in (0, 1], got {tail}")
    parts, bad, skipped = [], [], []
    for (defense, attack), per_image in sorted(traces.items()):
        arrays = [np.asarray(t, dtype=np.float64).reshape(-1) for t in per_image.values()]
        if not arrays:
            continue
        lengths = [a.size for a in arrays]
        length = max(set(lengths), key=lambda n: (lengths.count(n), n))
        kept = np.stack([a for a in arrays if a.size == length])
        kept = kept[np.isfinite(kept).all(axis=1)]
        window = max(min_points, math.ceil(tail * length))
        unit = _unit(defense, attack)
        if length < window + 1 or kept.shape[0] == 0:
            skipped.append(f"{unit} ({length} iterates)")
            continue
        mean_curve = kept.mean(axis=0)
        span = float(mean_curve.max() - mean_curve.min())
        x = np.arange(window, dtype=np.float64)
        slopes = np.polyfit(x, kept[:, -window:].T, 1)[0]  # (images,)
        slope = float(slopes.mean())
        rise = slope * (window - 1)
        if kept.shape[0] > 1 and not np.allclose(slopes, slopes[0], rtol=1e-9, atol=1e-12):
            p = float(stats.ttest_1samp(slopes, 0.0, alternative="greater").pvalue)
        else:
            p = 0.0 if slope > 0 else 1.0
        dropped = len(arrays) - kept.shape[0]
        text = (
            f"{unit}: slope {slope:.4g}/iteration over the last {window} of {length} iterates "
            f"(rise {rise:.4g} = {_ratio(rise, span)} of the loss range {span:.4g}; p = {p:.3g}; "
            f"{kept.shape[0]} images" + (f", {dropped} left out" if dropped else "") + ")"
        )
        parts.append(text)
        if rise > tolerance * span and span > 0 and p < alpha:
            bad.append(text)
    if not parts:
        why = f"; too few iterates: {', '.join(skipped)}" if skipped else ""
        return Check(name, SKIP, f"no loss traces to check{why}")
    tail_note = f"; not checked (too few iterates): {', '.join(skipped)}" if skipped else ""
    if bad:
        return Check(
            name,
            WARN,
            f"attack loss still rising at the end (rise > {tolerance:g} x range, p < {alpha:g}): "
            f"{'; '.join(bad)}; raise the iterations (the budget is too small){tail_note}",
        )
    return Check(name, PASS, "; ".join(parts) + tail_note)


def _ratio(rise: float, span: float) -> str:
    return f"{100 * rise / span:.1f}%" if span > 0 else "–"


__all__ = [
    "CHECK_TITLES",
    "PASS",
    "SKIP",
    "WARN",
    "Check",
    "Paired",
    "black_box_vs_white_box",
    "loss_still_rising",
    "monotone_in_eps",
    "more_budget",
    "paired_comparison",
    "unbounded_eps",
    "zero_gradient_flags",
    "zero_gradients",
]
