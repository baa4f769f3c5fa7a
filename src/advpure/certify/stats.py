"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019, Section 3.2).

All bounds come from statsmodels / scipy; nothing here is a hand-written formula.

* CERTIFY: with `n_A` of `n` estimation draws in the class `c_A` guessed from the `n0` selection
  draws, `p_A` = the one-sided (1 - alpha) Clopper-Pearson lower confidence bound of the
  binomial proportion (the lower end of the two-sided 2 * alpha "beta" interval). Abstain if
  `p_A < 1/2`; otherwise the smoothed classifier is `c_A` within the l2 radius
  `R = sigma * Phi^-1(p_A)` around x, with probability >= 1 - alpha over the draws (Theorem 1
  with the bound p_B <= 1 - p_A).
* PREDICT: top two counts `n_A >= n_B` of `n` draws; abstain if the two-sided binomial test of
  `n_A` successes in `n_A + n_B` trials at p = 1/2 has a p-value > alpha; otherwise return the top
  class, which is wrong (differs from the smoothed classifier) with probability <= alpha.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from advpure.core.errors import ConfigError

ABSTAIN = -1  # the prediction of an abstaining smoothed classifier


def check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"certify: alpha must be in (0, 1), got {alpha}")


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion n_a / n, in [0, 1).

    Equals `scipy.stats.beta.ppf(alpha, n_a, n - n_a + 1)` (0 when n_a = 0).
    Raises ConfigError for alpha outside (0, 1), ValueError for counts outside 0 <= n_a <= n, n >= 1.
    """
    check_alpha(alpha)
    n_a, n = int(n_a), int(n)
    if n < 1 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
    low, _ = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")
    return float(np.nan_to_num(low, nan=0.0))


def certified_radius(p_a: float, sigma: float) -> float:
    """l2 radius sigma * Phi^-1(p_A) (units of the [0, 1] image scale); 0 at p_A = 1/2."""
    return float(sigma * norm.ppf(p_a))


def certify_from_counts(
    counts0: Sequence[int], counts: Sequence[int], sigma: float, alpha: float
) -> tuple[int, int, float, float, bool]:
    """CERTIFY's decision from the class counts of the n0 selection draws and the n estimation draws.

    Returns (guess, prediction, p_A, radius, abstained): `guess` = c_A = argmax of `counts0`
    (ties: lowest class index); `prediction` = c_A, or ABSTAIN (-1) when p_A < 1/2; `radius` =
    sigma * Phi^-1(p_A), or 0.0 when abstaining (as in Cohen et al.'s code: no certificate).
    """
    c0 = np.asarray(counts0, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    guess = int(np.argmax(c0))
    p_a = lower_confidence_bound(int(c[guess]), int(c.sum()), alpha)
    if p_a < 0.5:
        return guess, ABSTAIN, p_a, 0.0, True
    return guess, guess, p_a, certified_radius(p_a, sigma), False


def predict_from_counts(counts: Sequence[int], alpha: float) -> tuple[int, float]:
    """PREDICT's decision from the class counts of n draws: (prediction or ABSTAIN, p-value).

    Top two classes by count (ties: lower class index first); two-sided `scipy.stats.binomtest`
    of n_A in n_A + n_B at 1/2; abstain when the p-value > alpha.
    """
    check_alpha(alpha)
    c = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-c, kind="stable")
    n_a = int(c[order[0]])
    n_b = int(c[order[1]]) if c.size > 1 else 0
    if n_a + n_b == 0:
        raise ValueError("predict_from_counts: no draws counted")
    pvalue = float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return (ABSTAIN if pvalue > alpha else int(order[0])), pvalue


def certified_accuracy(records: Iterable[Mapping], radii: Sequence[float]) -> dict[float, float]:
    """Certified accuracy at each l2 radius r (Cohen et al. 2019): the fraction of records whose
    CERTIFY prediction is the label (so not abstained) with certified radius >= r.

    `records` are mappings with keys `label`, `prediction`, `radius` (e.g. `CertifyResult.as_record()`).
    Returns {r: fraction in [0, 1]} (NaN for no records).
    """
    recs = list(records)
    out = {}
    for r in radii:
        hits = sum(
            1
            for t in recs
            if t["prediction"] == t["label"] and t["prediction"] != ABSTAIN and t["radius"] >= r
        )
        out[float(r)] = hits / len(recs) if recs else float("nan")
    return out
