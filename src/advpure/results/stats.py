"""Confidence intervals for accuracies measured on a few hundred images.

Why Wilson and not the normal approximation p ± z·sqrt(p(1-p)/n): robust accuracies are often near
0 or 1 and n is small (200 images), where the normal interval collapses to zero width or leaves
[0, 1]. The Wilson score interval keeps its coverage there and never leaves [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

Z95 = 1.959964  # two-sided 95% standard normal quantile


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (statsmodels' `proportion_confint(method="wilson")`) of a binomial
    proportion with k successes out of n trials, at the two-sided level of the normal quantile z.

    n = 0 carries no information: the interval is the whole (0, 1). Raises ValueError unless
    0 <= k <= n.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 2.0 * (1.0 - float(norm.cdf(z)))
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    # At k = 0 or k = n the bound is exactly 0 or 1 in exact arithmetic; pin it against rounding.
    return (0.0 if k == 0 else max(0.0, float(lo))), (1.0 if k == n else min(1.0, float(hi)))


def accuracy(values: Iterable[float] | np.ndarray, z: float = Z95) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n) of per-sample correctness values; mean is NaN when n = 0.

    For 0/1 values this is the sample accuracy with its Wilson interval. For fractional values
    (mean_of_n: the fraction of N draws that were correct) the interval is an approximation: it
    treats k = sum(values) as a binomial count out of n images. That ignores the extra
    information in the N draws per image, so it is usually conservative, but it is not exact.
    """
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(
        -1
    )
    n = int(v.size)
    if n == 0:
        return float("nan"), 0.0, 1.0, 0
    k = float(v.sum())
    lo, hi = wilson(min(k, n), n, z)
    return k / n, lo, hi, n
