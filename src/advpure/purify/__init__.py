"""Purifiers and the Defense interface (plain torch, no Lightning).

Built-in purifiers register themselves on import: `none` (identity), `adp` (Yoon et al. 2021),
`langevin` (Hill et al. 2021), and the diffusion purifiers `diffpure` (Nie et al. 2022), `gdmp`
(Wang et al. 2022) and `ve` (reverse VE SDE on the NCSNv2 score net), whose exact gradients are taken
by step-wise replay (`advpure.purify.replay`). See `advpure.purify.base` for how to add one.
"""

from advpure.purify.adp import ADPPurifier, adp_chain, adp_purify, adp_step, step_size
from advpure.purify.base import (
    NOISE_TYPES,
    PURIFIERS,
    DefenseParams,
    IdentityPurifier,
    Purifier,
    PurifyResult,
    check_images,
    purifier_class,
    register_purifier,
    rows,
    screen,
    screened_rows,
)
from advpure.purify.defense import (
    Counted,
    Defense,
    build_defense,
    chunked,
    defense_label,
    defense_name,
)
from advpure.purify.diffpure import DiffPurePurifier
from advpure.purify.gdmp import GDMPPurifier
from advpure.purify.langevin import LangevinPurifier, langevin_chain, langevin_purify
from advpure.purify.merge import MERGE_RULES, correct_by_merge, merge_predict, merge_scores
from advpure.purify.reverse_ve import ReverseVEPurifier

__all__ = [
    "MERGE_RULES",
    "NOISE_TYPES",
    "PURIFIERS",
    "ADPPurifier",
    "Counted",
    "Defense",
    "DefenseParams",
    "DiffPurePurifier",
    "GDMPPurifier",
    "IdentityPurifier",
    "LangevinPurifier",
    "Purifier",
    "PurifyResult",
    "ReverseVEPurifier",
    "adp_chain",
    "adp_purify",
    "adp_step",
    "build_defense",
    "check_images",
    "chunked",
    "correct_by_merge",
    "defense_label",
    "defense_name",
    "langevin_chain",
    "langevin_purify",
    "merge_predict",
    "merge_scores",
    "purifier_class",
    "register_purifier",
    "rows",
    "screen",
    "screened_rows",
    "step_size",
]
