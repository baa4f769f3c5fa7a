"""ADP defenses of the perf figures, built through the package's own API (`ADPPurifier` with its
`probe` option, `Defense` with its purification precision): nothing re-implemented here."""

from __future__ import annotations

import torch
from torch import nn

from advpure.purify import ADPPurifier, Defense


def probe_defense(
    score: nn.Module,
    clf: nn.Module,
    *,
    sigma: float,
    lam: float,
    delta: float,
    tau: float,
    steps: int,
    replicas: int,
    probe: str = "secant",
    dtype: str = "fp32",
    checkpointing: bool = True,
) -> Defense:
    """ADP (`probe`: secant | jvp) on the field `score` defending `clf`; dtype "bf16": classifier and
    purification under bf16 autocast (refused for the secant probe, `ADPPurifier.low_precision`),
    "fp32": both in fp32. Raises ConfigError for bf16 with the secant probe."""
    params = ADPPurifier.Params(
        sigma=sigma, lam=lam, delta=delta, tau=tau, steps=steps, probe=probe, precision=dtype
    )
    reason = ADPPurifier.low_precision(params) if dtype == "bf16" else None
    if reason:
        from advpure.core.errors import ConfigError

        raise ConfigError(f"defense.precision=bf16: {reason}")
    return Defense(
        clf,
        ADPPurifier(params, checkpointing=checkpointing),
        {"field": score},
        field_slot="field",
        replicas=replicas,
        amp_dtype=torch.bfloat16 if dtype == "bf16" else None,
        precision=dtype,
    )


__all__ = ["probe_defense"]
