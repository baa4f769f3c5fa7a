"""`standard_rand`: an APGD ensemble for randomized defenses, in the spirit of AutoAttack's `rand`
version (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks").

Stages, each APGD-EOT (`advpure.attacks.apgd`) with `iters` iterations, `eot` draws per gradient
and the same gradient source (default: exact gradients through the purifier):

1. APGD-CE (untargeted cross-entropy);
2. APGD-T-DLR for target ranks 1 .. n_target_classes: the targeted DLR loss towards the t-th most
   likely class other than the true one (ranked once, at the clean input, by one defended
   prediction: the mean logits of S chains on stream `targets`), when there are >= 4 classes and
   more than n_target_classes of them; with 3 classes one untargeted APGD-DLR stage instead (DLR
   needs >= 3 classes, so 2 classes is an error).

AutoAttack's `rand` version runs APGD-CE and untargeted APGD-DLR with EOT 20; the targeted DLR
stages are those of its `standard` version (there: 9 targets). As in AutoAttack, a stage attacks
only the images still robust after the previous stages: after each stage one defended
evaluation (S replicas merged by the defense's rule, stream `<stage>_judge`) decides which of
its images it broke. Per image, the adversarial input kept is the first stage's that broke it;
for an image no stage broke, the stage whose input that evaluation found closest to broken (the
lowest margin of the merged scores, true class minus best other; the stages' losses, CE and DLR
towards different targets, cannot be compared). Every stage starts again from the clean image
(or a random start).

Result: x_adv (B, C, H, W); losses (stages * iters + 1, B): stage 1's curve x_0 .. x_iters, then
each later stage's iterates x_1 .. x_iters (CE first, then targeted DLR: the units change at stage
boundaries), an image a stage skipped carrying its last value forward; path_correct
{rule: (stages * restarts * iters, B)}, the stages' paths concatenated, an image not attacked in a
stage counting as correct there (no evidence), so "ever broken" holds if any stage broke it at any
iterate. `restarts` k > 1 runs every stage with k random restarts (`advpure.attacks.restarts`).

Cost: the stages' gradients (stage s on the images left by stage s-1), the ranking evaluation
(S chains per image), one judging evaluation (S chains) per attacked image per stage, and with
restarts one per restart. The defense's counters (score evals) include all of it.

    >>> p = attack_params("standard_rand", iters=100, eot=20)
    >>> run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255).x_adv
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advpure.attacks.apgd import APGD, apgd_run, target_classes
from advpure.attacks.base import Attack, AttackParams, AttackResult, register_attack
from advpure.attacks.objectives import GRADIENTS
from advpure.attacks.restarts import Run, concatenated_losses, run_on_unbroken
from advpure.core.params import at_least, choice


def stage_names(n_target_classes: int, classes: int | None = None) -> list[str]:
    """The stages that run for `classes` classes (None: assume >= 4): their stream names."""
    if classes is not None and classes < 4:
        return ["apgd-ce", "apgd-dlr"]
    return ["apgd-ce"] + [f"apgd-t{t}" for t in range(1, n_target_classes + 1)]


@register_attack("standard_rand")
class StandardRand(Attack):
    """APGD-CE then APGD-T-DLR over the top n_target_classes classes, each stage only on the images
    the earlier stages did not break; per-image worst case (see the module doc)."""

    @dataclass
    class Params(AttackParams):
        kind: str = "standard_rand"
        iters: int = at_least(100, 1)  # per stage
        eot: int = at_least(20, 1)  # purification draws per gradient
        gradient: str = choice("full", *GRADIENTS)
        n_target_classes: int = at_least(3, 1)  # targeted DLR stages (>= 4 classes)
        restarts: int = at_least(1, 1)  # random restarts of every stage

    @classmethod
    def label(cls, p) -> str:
        src = {"full": "", "bpda": ", BPDA", "classifier": ", classifier"}[p.gradient]
        return (
            f"standard_rand (APGD-CE, APGD-T-DLR x{p.n_target_classes}; {p.iters} it, EOT {p.eot}{src};"
            " later stages on unbroken images)"
        )

    @classmethod
    def short_label(cls, p) -> str:
        src = {"full": "", "bpda": " (BPDA)", "classifier": " (classifier)"}[p.gradient]
        return f"standard_rand{src}"

    @classmethod
    def total_iters(cls, p, classes: int | None = None) -> int:
        return len(stage_names(p.n_target_classes, classes)) * p.iters * p.restarts

    @classmethod
    def check(cls, p, defense) -> None:
        if p.loss != "ce":
            raise ValueError(
                f"standard_rand fixes its losses (CE, then targeted DLR); loss '{p.loss}' is not used"
            )

    @classmethod
    def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
        with torch.no_grad():
            classes = defense.classify(x[:1]).shape[-1]
        names = stage_names(p.n_target_classes, classes)
        targets = None
        if names[1] != "apgd-dlr":
            targets = target_classes(defense, x, y, rng.child("targets"), p.n_target_classes)

        def stage(name: str, loss: str, target: torch.Tensor | None):
            sp = APGD.Params(
                name=name,
                kind="apgd",
                iters=p.iters,
                loss=loss,
                random_start=p.random_start,
                gradient=p.gradient,
                eot=p.eot,
                restarts=p.restarts,
            )

            def fn(x_r, y_r, rng_r, trace_r, rows):
                t = None if target is None else target[rows]
                return apgd_run(sp, defense, x_r, y_r, rng_r, eps=eps, trace=trace_r, target=t)

            return Run(f"{name}_judge", fn, p.iters * p.restarts, stream=name, curve=p.iters)

        runs = [stage("apgd-ce", "ce", None)]
        if targets is None:
            runs.append(stage("apgd-dlr", "dlr", None))
        else:
            runs += [stage(n, "dlr", targets[:, t]) for t, n in enumerate(names[1:])]
        out = run_on_unbroken(defense, x, y, rng, trace, runs, keep="margin")
        first = out.results[0]  # the first stage attacks every image: its start gradient is the check's
        zero = first.zero_grad if first is not None else None
        return AttackResult(out.x_adv, concatenated_losses(out, runs), out.path, zero_grad=zero)


__all__ = ["StandardRand", "stage_names"]
