"""Attacks on a `Defense` (plain torch, no Lightning): PGD (classifier | full | bpda gradients,
EOT), the ADP paper's joint attacks, SPSA and APGD. Images in [0, 1], l-infinity threat model.

    >>> from advpure.attacks import run_attack
    >>> result = run_attack(cfg.attacks["bpda40_eot15"], defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255)
    >>> defense.evaluate(result.x_adv, y, SampleRNG(1, idx), n=10)
"""

from advpure.attacks.apgd import apgd_attack, apgd_checkpoints, should_halve
from advpure.attacks.joint import joint_attack
from advpure.attacks.losses import LOSSES, cross_entropy, defended_loss, dlr, per_sample_loss
from advpure.attacks.pgd import (
    AGGREGATES,
    GRADIENTS,
    AttackResult,
    Evaluation,
    aggregate_draws,
    eot_gradient,
    path_correct,
    pgd_attack,
)
from advpure.attacks.projection import project, random_start
from advpure.attacks.run import KINDS, check_attack, run_attack
from advpure.attacks.spsa import spsa_attack, spsa_gradient

__all__ = [
    "AGGREGATES",
    "GRADIENTS",
    "KINDS",
    "LOSSES",
    "AttackResult",
    "Evaluation",
    "aggregate_draws",
    "apgd_attack",
    "apgd_checkpoints",
    "check_attack",
    "cross_entropy",
    "defended_loss",
    "dlr",
    "eot_gradient",
    "joint_attack",
    "path_correct",
    "per_sample_loss",
    "pgd_attack",
    "project",
    "random_start",
    "run_attack",
    "should_halve",
    "spsa_attack",
    "spsa_gradient",
]
