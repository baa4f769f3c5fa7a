"""Attacks on a `Defense` (plain torch, no Lightning), one registered class per attack: PGD
(classifier | full | bpda gradients, EOT), the ADP paper's joint attacks, SPSA and APGD. Images in
[0, 1], l-infinity threat model. See `advpure.attacks.base` for how to add one.

    >>> from advpure.attacks import attack_params, run_attack
    >>> p = attack_params("pgd", gradient="bpda", iters=40, eot=15)
    >>> result = run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255)
    >>> defense.evaluate(result.x_adv, y, SampleRNG(1, idx), n=10)
"""

from advpure.attacks.apgd import APGD, apgd_attack, apgd_checkpoints, should_halve
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
)
from advpure.attacks.joint import JointFull, JointScore, joint_attack
from advpure.attacks.losses import LOSSES, cross_entropy, defended_loss, dlr, per_sample_loss
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
    "attack_class",
    "attack_params",
    "bpda_objective",
    "check_attack",
    "classifier_objective",
    "cross_entropy",
    "defended_loss",
    "display_label",
    "dlr",
    "eot_gradient",
    "full_objective",
    "joint_attack",
    "path_correct",
    "per_sample_loss",
    "pgd_attack",
    "project",
    "random_start",
    "register_attack",
    "run_attack",
    "should_halve",
    "spsa_attack",
    "spsa_gradient",
]
