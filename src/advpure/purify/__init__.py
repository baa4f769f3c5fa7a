"""Purifiers and the Defense interface (plain torch, no Lightning)."""

from advpure.purify.adp import PurifyResult, adp_chain, adp_purify, check_images, screen, step_size
from advpure.purify.defense import (
    MERGE_RULES,
    ADPPurifier,
    Counted,
    Defense,
    IdentityPurifier,
    LangevinPurifier,
    Purifier,
    build_defense,
    chunked,
    correct_by_merge,
    defense_name,
    merge_predict,
    merge_scores,
)
from advpure.purify.langevin import langevin_chain, langevin_purify

__all__ = [
    "MERGE_RULES",
    "ADPPurifier",
    "Counted",
    "Defense",
    "IdentityPurifier",
    "LangevinPurifier",
    "Purifier",
    "PurifyResult",
    "adp_chain",
    "adp_purify",
    "build_defense",
    "check_images",
    "chunked",
    "correct_by_merge",
    "defense_name",
    "langevin_chain",
    "langevin_purify",
    "merge_predict",
    "merge_scores",
    "screen",
    "step_size",
]
