"""Noise levels a score net was trained on, and the settings that must stay inside them.

A DSM score net f (f(x + s n) ~ -n, i.e. f ~ s grad log p_s) is fitted only at the noise levels
s of its training, [dsm_sigma_min, dsm_sigma_max] (one level with dsm_sigma_fixed). Asked about
x + sigma n with sigma far outside, it answers with untrained values, and purification degrades
silently: `defense.sigma=1e6` runs to 0 % natural accuracy. So every entry point checks, before
any work, the sigma-like settings that feed the net (`purifier_sigmas`: ADP's screening sigma,
Langevin's screening sigma and score level, the VE reverse diffusion's sigma*; the benchmark's
sigma sweep; certification's smoothing sigmas) against the range read from the weights' meta
(`score_sigma_range`), and refuses one outside with a one-line ConfigError naming the key and the
range (`check_trained_range`).

sigma = 0 (no screening noise) is always allowed for screening: it feeds clean images, the
net's own smallest level. Sigmas are in [0, 1] image units, as in the configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from advpure.core.errors import ConfigError

SIGMA_RTOL = 1e-6  # sigma == sigma_max written as 0.5 vs 0.50000001 is covered

# defense kind -> its settings that are noise levels of the score net (field=dsm only)
PURIFIER_SIGMAS: dict[str, tuple[str, ...]] = {
    "adp": ("sigma",),
    "langevin": ("sigma", "dsm_sigma"),
    "ve": ("sigma_star",),
}
SCREENING = frozenset({"sigma"})  # screening noise: 0 means none and is always allowed


def score_sigma_range(meta: Mapping[str, Any] | None = None, score_block: Any = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) the score net was trained on by DSM, [0, 1] image units.

    Read from the weights file's meta (keys `dsm_sigma_min`, `dsm_sigma_max`, `dsm_sigma_fixed`,
    written by `advpure train` and `advpure import-weights`) when present, else from the score
    config block (same names). A net trained at one fixed sigma covers only that sigma. Raises
    ConfigError when neither has them."""
    for src in (meta, score_block):
        if src is None:
            continue
        get = src.get if isinstance(src, Mapping) else (lambda k, s=src: getattr(s, k, None))
        fixed = get("dsm_sigma_fixed")
        if fixed:
            return float(fixed), float(fixed)
        lo, hi = get("dsm_sigma_min"), get("dsm_sigma_max")
        if lo is not None and hi is not None:
            return float(lo), float(hi)
    raise ConfigError(
        "the score net's DSM noise range is unknown (no dsm_sigma_min/dsm_sigma_max in its meta or config)"
    )


def sigma_covered(sigma: float, sigma_min: float, sigma_max: float) -> bool:
    """sigma_min <= sigma <= sigma_max, with relative tolerance SIGMA_RTOL."""
    lo, hi = float(sigma_min) * (1 - SIGMA_RTOL), float(sigma_max) * (1 + SIGMA_RTOL)
    return lo <= float(sigma) <= hi


def check_sigma_covered(
    sigma: float,
    sigma_min: float,
    sigma_max: float,
    *,
    key: str = "sigma",
    advice: str = "choose a value in that range",
) -> None:
    """Raise a one-line ConfigError "<key>=<sigma> is outside the score net's DSM noise levels
    [min, max]; retrain it with ... or <advice>" unless sigma_min <= sigma <= sigma_max (relative
    tolerance 1e-6)."""
    if not sigma_covered(sigma, sigma_min, sigma_max):
        raise ConfigError(
            f"{key}={float(sigma):g} is outside the score net's DSM noise levels "
            f"[{float(sigma_min):g}, {float(sigma_max):g}]; retrain it with score.dsm_sigma_min/score.dsm_sigma_max "
            f"covering {float(sigma):g} or {advice}"
        )


def purifier_sigmas(params: Any, prefix: str = "defense") -> dict[str, float | None]:
    """{"<prefix>.<key>": value} of a defense block's settings that are noise levels of its DSM score
    net (`PURIFIER_SIGMAS`): adp sigma, langevin sigma and dsm_sigma, ve sigma_star. Empty for other
    kinds and for field=ebm (an EBM has no DSM levels). `params`: a DictConfig, dict or dataclass."""
    get = params.get if hasattr(params, "get") else (lambda k, d=None: getattr(params, k, d))
    if (get("field", "dsm") or "dsm") != "dsm":
        return {}
    return {f"{prefix}.{k}": get(k, None) for k in PURIFIER_SIGMAS.get(get("kind", ""), ())}


def check_trained_range(
    values: Mapping[str, float | None],
    meta: Mapping[str, Any] | None = None,
    score_block: Any = None,
) -> tuple[float, float]:
    """Check every {config key: sigma} of `values` against the score net's DSM range
    (`score_sigma_range(meta, score_block)`); None values are skipped, and 0 for a screening sigma
    (a key ending in `.sigma` or `sigmas[i]`: no noise). Returns the range. Raises ConfigError (one
    line, the first key outside the range, or an unknown range)."""
    lo, hi = score_sigma_range(meta, score_block)
    for key, sigma in values.items():
        if sigma is None:
            continue
        leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
        if float(sigma) == 0.0 and (leaf in SCREENING or leaf == "sigmas"):
            continue
        check_sigma_covered(float(sigma), lo, hi, key=key)
    return lo, hi


__all__ = [
    "PURIFIER_SIGMAS",
    "SIGMA_RTOL",
    "check_sigma_covered",
    "check_trained_range",
    "purifier_sigmas",
    "score_sigma_range",
    "sigma_covered",
]
