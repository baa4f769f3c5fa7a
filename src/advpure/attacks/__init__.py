"""Attacks on a `Defense` (plain torch, no Lightning), one registered class per attack: PGD
(classifier | full | bpda gradients, EOT), the ADP paper's joint attacks, SPSA, APGD (untargeted
and targeted) and the `standard_rand` APGD ensemble. Losses ce | dlr | cw; random restarts for PGD
and APGD. Images in [0, 1], l-infinity threat model. See `advpure.attacks.base` for how to add one.

    >>> from advpure.attacks import attack_params, run_attack
    >>> p = attack_params("pgd", gradient="bpda", iters=40, eot=15)
    >>> result = run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255)
    >>> defense.evaluate(result.x_adv, y, SampleRNG(1, idx), n=10)
"""

from advpure.attacks.apgd import APGD, apgd_attack, apgd_checkpoints, apgd_run, should_halve, target_classes
from advpure.attacks.base import (
    ATTACKS,
    Attack,
    AttackParams,
    AttackResult,
    Trace,
    attack_class,
    attack_params,
    display_label,
    path_correct,
    register_attack,
    short_display_label,
)
from advpure.attacks.ensemble import StandardRand
from advpure.attacks.joint import JointFull, JointScore, joint_attack
from advpure.attacks.losses import (
    LOSSES,
    cross_entropy,
    cw_margin,
    defended_loss,
    dlr,
    dlr_targeted,
    per_sample_loss,
)
from advpure.attacks.objectives import (
    AGGREGATES,
    GRADIENTS,
    Evaluation,
    aggregate_draws,
    bpda_objective,
    classifier_objective,
    eot_gradient,
    full_objective,
)
from advpure.attacks.pgd import PGD, pgd_attack
from advpure.attacks.projection import project, random_start
from advpure.attacks.restarts import Run, run_on_unbroken, with_restarts
from advpure.attacks.run import check_attack, run_attack
from advpure.attacks.spsa import SPSA, spsa_attack, spsa_gradient

__all__ = [
    "AGGREGATES",
    "APGD",
    "ATTACKS",
    "GRADIENTS",
    "LOSSES",
    "PGD",
    "SPSA",
    "Run",
    "StandardRand",
    "Attack",
    "AttackParams",
    "AttackResult",
    "Evaluation",
    "JointFull",
    "JointScore",
    "Trace",
    "aggregate_draws",
    "apgd_attack",
    "apgd_checkpoints",
    "apgd_run",
    "attack_class",
    "attack_params",
    "bpda_objective",
    "check_attack",
    "classifier_objective",
    "cross_entropy",
    "cw_margin",
    "defended_loss",
    "display_label",
    "dlr",
    "dlr_targeted",
    "eot_gradient",
    "full_objective",
    "joint_attack",
    "path_correct",
    "per_sample_loss",
    "pgd_attack",
    "project",
    "short_display_label",
    "random_start",
    "register_attack",
    "run_attack",
    "run_on_unbroken",
    "should_halve",
    "spsa_attack",
    "spsa_gradient",
    "target_classes",
    "with_restarts",
]
