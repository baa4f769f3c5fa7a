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
stages are those of its `standard` version (there: 9 targets). A later stage attacks only the
images still robust after the previous stages, and "robust" is decided the way the reported
protocols decide it (`continue_on`):

* `any_protocol` (default): after each stage its adversarial inputs are classified by N fresh
  defended predictions (N = `draws` given to `run_attack`, the benchmark's worst_of_n; draw 0 on
  stream `<stage>_judge`, the others on its child `draws`; each S replicas merged by the defense's
  rule), and an image is attacked again when SOME requested protocol (`protocols` given to
  `run_attack`, the benchmark's protocols) would still count it robust on those draws: its value
  on them is > 0. Per protocol that is: single — draw 0 correct; worst_of_n — all N correct;
  mean_of_n — at least one of the N correct (its value is the fraction correct, so an image is
  given up only when it is wrong on every draw); majority_of_n — more than N/2 correct;
  ever_broken — correct at every iterate of the stages so far and on draw 0 (once broken along the
  path it stays broken); dwbox (its own run on the frozen defense) — draw 0 correct. A protocol
  that needs the path when none is tracked counts as single. Under worst-of-N alone this is
  AutoAttack's rule; under mean-of-N an image broken on one draw but still correct on some fresh
  draws keeps being attacked. Without `protocols`, the single draw decides (N = 1).
* `single`: one defended evaluation decides (AutoAttack's rule, the behaviour before issue 20).

Per image, the adversarial input kept is the stage's whose judged draws were least often correct;
among equals the first stage that broke it, else the stage whose input the judging draw found
closest to broken (the lowest margin of the merged scores, true class minus best other; the
stages' losses, CE and DLR towards different targets, cannot be compared). Every stage starts
again from the clean image (or a random start).

Result: x_adv (B, C, H, W); losses (stages * iters + 1, B): stage 1's curve x_0 .. x_iters, then
each later stage's iterates x_1 .. x_iters (CE first, then targeted DLR: the units change at stage
boundaries), an image a stage skipped carrying its last value forward; path_correct
{rule: (stages * restarts * iters, B)}, the stages' paths concatenated, an image not attacked in a
stage counting as correct there (no evidence), so "ever broken" holds if any stage broke it at any
iterate. `restarts` k > 1 runs every stage with k random restarts (`advpure.attacks.restarts`).

Cost: the stages' gradients (stage s on the images left by stage s-1), the ranking evaluation
(S chains per image), N judging evaluations (S chains each; 1 under `single` or with only the
single / ever_broken / dwbox protocols) per attacked image per stage, and with restarts one per
restart. The defense's counters (score evals, the table's cost column) include all of it.

    >>> p = attack_params("standard_rand", iters=100, eot=20)
    >>> run_attack(p, defense, x, y, SampleRNG(0, idx), eps=8/255, step=2/255).x_adv
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from advpure.attacks.apgd import APGD, apgd_run, target_classes
from advpure.attacks.base import Attack, AttackParams, AttackResult, register_attack
from advpure.attacks.objectives import GRADIENTS
from advpure.attacks.restarts import Run, StillRobust, concatenated_losses, run_on_unbroken
from advpure.core.params import at_least, choice

CONTINUE_ON = ("any_protocol", "single")
# protocols whose value on an image reads draw 0 only (and the path): judging them needs one draw
SINGLE_DRAW = frozenset({"single", "ever_broken", "dwbox"})


def robust_under(protocols: Sequence[str]) -> StillRobust:
    """The rule "some protocol of `protocols` still counts the image robust": for verdicts (N, R)
    bool (N fresh defended predictions of the adversarial inputs) and the path (I, R) bool or None,
    (R,) bool, True where some protocol's value is > 0. Protocols of the clean noise floors
    (run="clean") play no part; one that needs the path gets draw 0 alone when there is none.
    Raises ValueError (via the registry) for an unknown protocol name."""
    from advpure.results.protocols import Observations, protocol  # results imports attacks

    chosen = [protocol(name) for name in protocols]
    chosen = [p for p in chosen if p.run != "clean"] or [protocol("single")]

    def rule(verdicts: torch.Tensor, path: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(verdicts.shape[1], dtype=torch.bool, device=verdicts.device)
        for p in chosen:
            final = verdicts if p.run == "shared" else verdicts[:1]
            value = p(Observations(final, path if p.needs_path else None))
            out |= (value.float() > 0) if value is not None else verdicts[0]
        return out

    return rule


def judging_draws(protocols: Sequence[str] | None, draws: int) -> int:
    """How many fresh draws judge a stage: 1 when every protocol reads draw 0 only, else `draws`."""
    return 1 if not protocols or set(protocols) <= SINGLE_DRAW else int(draws)


def stage_names(n_target_classes: int, classes: int | None = None) -> list[str]:
    """The stages that run for `classes` classes (None: assume >= 4): their stream names."""
    if classes is not None and classes < 4:
        return ["apgd-ce", "apgd-dlr"]
    return ["apgd-ce"] + [f"apgd-t{t}" for t in range(1, n_target_classes + 1)]


@register_attack("standard_rand")
class StandardRand(Attack):
    """APGD-CE then APGD-T-DLR over the top n_target_classes classes, each stage only on the images
    the earlier stages did not break; per-image worst case (see the module doc)."""

    fixed_step = False  # APGD stages: the step starts at 2 eps and adapts

    @dataclass
    class Params(AttackParams):
        kind: str = "standard_rand"
        iters: int = at_least(100, 1)  # per stage
        eot: int = at_least(20, 1)  # purification draws per gradient
        gradient: str = choice("full", *GRADIENTS)
        n_target_classes: int = at_least(3, 1)  # targeted DLR stages (>= 4 classes)
        restarts: int = at_least(1, 1)  # random restarts of every stage
        # which images later stages attack: those some requested protocol still counts robust on N
        # fresh draws (any_protocol), or those one judged draw found unbroken (single, AutoAttack's)
        continue_on: str = choice("any_protocol", *CONTINUE_ON)

    @classmethod
    def label(cls, p) -> str:
        src = {"full": "", "bpda": ", BPDA", "classifier": ", classifier"}[p.gradient]
        rule = {
            "any_protocol": "later stages on images some protocol counts robust",
            "single": "later stages on images one judged draw left unbroken",
        }[p.continue_on]
        return f"standard_rand (APGD-CE, APGD-T-DLR x{p.n_target_classes}; {p.iters} it, EOT {p.eot}{src}; {rule})"

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
        if p.continue_on == "any_protocol" and trace.protocols:
            draws = judging_draws(trace.protocols, trace.draws)
            rule = robust_under(trace.protocols)
        else:
            draws, rule = 1, None
        out = run_on_unbroken(defense, x, y, rng, trace, runs, keep="margin", draws=draws, still_robust=rule)
        first = out.results[0]  # the first stage attacks every image: its start gradient is the check's
        zero = first.zero_grad if first is not None else None
        return AttackResult(out.x_adv, concatenated_losses(out, runs), out.path, zero_grad=zero)


__all__ = ["CONTINUE_ON", "StandardRand", "judging_draws", "robust_under", "stage_names"]
