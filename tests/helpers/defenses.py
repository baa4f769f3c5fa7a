"""Defense builders of the tests: ADP and Langevin defenses from a classifier and a field net, with
the purifier's parameters as keywords (the rest at their `Params` defaults)."""

from __future__ import annotations

from torch import nn

from advpure.purify import ADPPurifier, Defense, LangevinPurifier


def adp_defense(
    classifier: nn.Module,
    field: nn.Module,
    *,
    replicas: int = 1,
    checkpointing: bool = True,
    cls: type[Defense] = Defense,
    **options,
) -> Defense:
    """Defense(classifier, ADP on `field`); `options`: ADP's parameters (sigma, steps, tau, ...) and
    the Defense's keywords (max_batch, amp_dtype, channels, image_size, merge, name)."""
    params = {k: options.pop(k) for k in list(options) if k in ADPPurifier.Params.__dataclass_fields__}
    purifier = ADPPurifier(ADPPurifier.Params(**params), checkpointing=checkpointing)
    return cls(classifier, purifier, {"field": field}, field_slot="field", replicas=replicas, **options)


def langevin_defense(classifier: nn.Module, field: nn.Module, *, replicas: int = 1, **options) -> Defense:
    """Defense(classifier, Langevin on `field`); `options` as for `adp_defense`."""
    params = {k: options.pop(k) for k in list(options) if k in LangevinPurifier.Params.__dataclass_fields__}
    purifier = LangevinPurifier(LangevinPurifier.Params(**params))
    return Defense(classifier, purifier, {"field": field}, field_slot="field", replicas=replicas, **options)
