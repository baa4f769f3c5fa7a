"""What every attack shares: the registry, the common parameters, the result, and `Trace`.

An attack is one module with one registered class (torchattacks-style: one attack per file):

    @register_attack("fgsm")
    class FGSM(Attack):
        '''FGSM (Goodfellow et al. 2015): one signed gradient step of size eps.'''

        @dataclass
        class Params(AttackParams):            # the common keys + this kind's own
            kind: str = "fgsm"
            iters: int = at_least(1, 1)

        @classmethod
        def label(cls, p):                     # the table's attack label
            return "FGSM"

        @classmethod
        def run(cls, p, defense, x, y, rng, *, eps, step, trace) -> AttackResult:
            ev = classifier_objective(defense, x, y, p.loss)
            trace.visit(0, x, ev.loss, ev.chains)
            x_adv = project(x + eps * ev.grad.sign(), x, eps)
            return trace.finish(x_adv, classifier_objective(defense, x_adv, y, p.loss, grad=False).loss)

plus a YAML file `conf/attack/fgsm.yaml` (`kind: fgsm`). `run_attack` validates the parameters
(`check`), clones the inputs out of inference mode and calls `run`; the benchmark, the labels,
the config validation and `--help` find the attack through the registry.

Images are (B, C, H, W) in [0, 1]; eps and step are l_inf distances in the same units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from advpure.attacks.losses import LOSSES
from advpure.core.errors import ConfigError
from advpure.core.params import at_least, between, choice, validate
from advpure.core.registry import Registry
from advpure.core.rng import RNG
from advpure.purify.merge import MERGE_RULES, correct_by_merge

Progress = Callable[[int], None]
Observer = Callable[[int, torch.Tensor], None]

EPS_HINT = "images are in [0, 1]; did you mean 8/255?"


@dataclass
class AttackParams:
    """Keys every `attacks.<name>` block has, whatever its kind."""

    name: str = ""  # filled with the option name when composed
    kind: str = "pgd"  # a registered attack name, or module.path:Class
    iters: int = at_least(40, 1)
    eps: float | None = between(None, 0.0, 1.0, hint=EPS_HINT)  # None: the dataset's data.eps
    step: float | None = between(None, 0.0, 1.0, hint=EPS_HINT, strict=True)  # None: data.step
    loss: str = choice("ce", *LOSSES)  # the per-sample objective the attacker maximises
    random_start: bool = False  # start uniformly in the eps-ball instead of at x
    max_images: int | None = at_least(None, 1)  # attack only the first n benchmark images
    protocols: list[str] | None = (
        None  # evaluation protocols of this attack's rows (null: benchmark.protocols)
    )


@dataclass
class AttackResult:
    """What an attack returns. For a single run (one start, one attack) the rows of `losses` are
    the iterates x_0 .. x_iters and those of `path_correct` x_0 .. x_{iters-1}. An attack made of
    several runs (restarts, `advpure.attacks.restarts`; the `standard_rand` ensemble) states its
    own layout: `path_correct` then has one row per iterate of every run, `Attack.total_iters`
    rows, so "ever broken" (all rows correct) is judged over every run."""

    x_adv: torch.Tensor  # (B, C, H, W) final adversarial input (detached)
    losses: torch.Tensor  # (iters + 1, B): the attack's objective at the iterates x_0 .. x_iters
    path_correct: dict[str, torch.Tensor] | None  # {merge rule: (iters, B) bool} at x_0 .. x_{iters-1}
    loss_adv: torch.Tensor | None = None  # (B,) the objective at x_adv; None: losses[-1] (x_adv = x_iters)
    zero_grad: torch.Tensor | None = None  # (B,) bool: the attack's gradient at x_0 was exactly zero

    def adv_loss(self) -> torch.Tensor:
        """(B,) the attack's objective at x_adv (APGD returns its best point, not the last)."""
        return self.losses[-1] if self.loss_adv is None else self.loss_adv


class Attack:
    """Base class of registered attacks: `Params`, `label`, `check`, `run` (see the module doc)."""

    name: str = ""  # set by the registry
    Params: type = AttackParams

    @classmethod
    def label(cls, p: Any) -> str:
        """The attack's label in result tables, e.g. "BPDA40+EOT15"."""
        return f"{cls.name}{p.iters}"

    @classmethod
    def short_label(cls, p: Any) -> str:
        """The attack's name in plots and table rows, a few words (default: `label`); an attack whose
        `label` is a description overrides it (the description goes to captions)."""
        return cls.label(p)

    @classmethod
    def total_iters(cls, p: Any, classes: int | None = None) -> int:
        """Iterations the attack runs per image, all restarts and stages together: the number of
        `progress` calls and of `path_correct` rows. `classes`: the number of classes, for
        attacks whose stages depend on it (None: assume enough)."""
        return int(p.iters) * int(getattr(p, "restarts", 1))

    black_box: bool = False  # queries the defense only (no gradients): the white- vs black-box check
    fixed_step: bool = True  # steps of size `step` (iters x step bounds the distance it can travel)
    budget_fields: tuple[str, ...] = ("iters", "eot")  # doubled by the gradient-masking "2x budget" run

    @classmethod
    def gradient_source(cls, p: Any) -> str | None:
        """Where the attack's gradients come from: "classifier" (preprocessor-blind), "bpda", "full"
        (exact, through the purifier), or None (no gradients: black-box)."""
        return getattr(p, "gradient", None)

    @classmethod
    def requires(cls, p: Any) -> tuple[str, ...]:
        """Network signatures the attacked defense must have (`advpure.nets.registry.SIGNATURES`),
        e.g. ("field",) for an attack that follows the purifier's time-free score field."""
        return ()

    @classmethod
    def needs_purifier(cls, p: Any) -> bool:
        """True if the attack cannot run on the undefended classifier (no score net, no purifier)."""
        return False

    @classmethod
    def check(cls, p: Any, defense) -> None:
        """Raise a one-line ValueError if `p` cannot run on `defense` (beyond the schema checks)."""

    @classmethod
    def run(
        cls, p: Any, defense, x: torch.Tensor, y: torch.Tensor, rng: RNG, *, eps, step, trace
    ) -> AttackResult:
        """Attack `defense` (a `Defense`, or the undefended classifier wrapped as one) with params `p`.

        x: (B, C, H, W) clean images in [0, 1]; y: (B,) int64 labels; rng: the per-image random
        stream (children of it key the attack's own noise); eps, step: l_inf radius and step size in
        the images' [0, 1] units (floats, or (B,) tensors); trace: the `Trace` that records losses,
        gradients and the defense's correctness at each iterate (or None). Returns an AttackResult
        whose x_adv (B, C, H, W) lies in [0, 1] and within eps of x."""
        raise NotImplementedError


ATTACKS = Registry("attack kind", base=Attack)
register_attack = ATTACKS.register


def attack_class(kind: str) -> type[Attack]:
    """The attack class registered as `kind` (or imported from `module.path:Class`)."""
    return ATTACKS.get(kind)


def attack_params(kind: str, **values: Any) -> Any:
    """A Params instance of attack `kind` (for the Python API), e.g.
    `attack_params("pgd", gradient="bpda", iters=40, eot=15)`. Unknown keys are a ConfigError."""
    cls = attack_class(kind)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"attack '{kind}': unknown parameter '{unknown[0]}'; allowed: {', '.join(sorted(fields))}"
        )
    p = cls.Params(**{**values, "kind": kind})
    validate(p, cls.Params, f"attack '{values.get('name') or kind}': ")
    return p


def _with_options(base: str, p: Any, eps: float | None, restarts_text: str) -> str:
    """`base` with the option suffixes shared by all kinds (loss, vote, restarts, eps)."""
    if p.loss != "ce" and p.loss.upper() not in base:  # APGD's label names its loss itself
        base += f" {p.loss.upper()} loss"
    if getattr(p, "eot_aggregate", "mean") == "vote":
        base += " vote"
    restarts = int(getattr(p, "restarts", 1))
    if restarts > 1:
        base += f" x{restarts} {restarts_text}"
    elif p.random_start:
        base += " rs"
    return base if eps is None else f"{base} @ ε={eps:.4g}"


def display_label(p: Any, eps: float | None = None) -> str:
    """The full description of attack parameters `p`, with the option suffixes shared by all kinds: a
    loss other than CE ("BPDA40+EOT15 CW loss"), "vote", "x3 restarts (random starts)" or "rs"."""
    # every restart starts at random
    return _with_options(attack_class(p.kind).label(p), p, eps, "restarts (random starts)")


def short_display_label(p: Any, eps: float | None = None) -> str:
    """The short name of attack parameters `p` (plots, table rows): `Attack.short_label` with the
    same option suffixes as `display_label` ("x3 restarts" without the explanation)."""
    return _with_options(attack_class(p.kind).short_label(p), p, eps, "restarts")


# --- per-iterate bookkeeping -----------------------------------------------------------------------
def path_correct(defense, x, y, chains: torch.Tensor | None, rng: RNG) -> dict[str, torch.Tensor]:
    """{merge rule: (B,) bool}: is the defended prediction (S replicas merged) correct at x?

    Reuses the attack's own chains when it has >= S of them at x (the first S, merged), since
    they are S independent draws of the defense at x; otherwise evaluates the defense with fresh
    draws from `rng`. A deterministic defense needs one classification."""
    if not defense.stochastic:
        if chains is None:
            with torch.no_grad():
                chains = defense.chain_logits(x.detach(), rng, 1)[0]
        out = correct_by_merge(chains[:1].detach().unsqueeze(0), y)
    elif chains is not None and chains.shape[0] >= defense.replicas:
        out = correct_by_merge(chains[: defense.replicas].detach().unsqueeze(0), y)
    else:
        out = defense.evaluate(x.detach(), y, rng, n=1)
    return {rule: v[0] for rule, v in out.items()}


class Trace:
    """Per-iterate bookkeeping shared by all attacks: the objective at x_0 .. x_iters, the
    defense's correctness at x_0 .. x_{iters-1} (when tracked), and the caller's hooks."""

    def __init__(
        self,
        defense,
        y,
        rng: RNG,
        *,
        track_path: bool = False,
        progress: Progress | None = None,
        observer: Observer | None = None,
        protocols: tuple[str, ...] | None = None,
        draws: int = 1,
    ):
        self.defense, self.y = defense, y
        self.track_path = track_path
        # what the benchmark will report (attacks made of stages read them, `run_attack`'s doc):
        # the protocols' names and N, the fresh draws of worst-of-N / mean-of-N
        self.protocols, self.draws = (tuple(protocols) if protocols else None), int(draws)
        self.progress, self.observer = progress, observer
        self.path_rng = rng.child("path")
        self.losses: list[torch.Tensor] = []
        self.path: dict[str, list[torch.Tensor]] = {rule: [] for rule in MERGE_RULES}
        self.zero_grad: torch.Tensor | None = None

    def visit(
        self,
        i: int,
        x: torch.Tensor,
        loss: torch.Tensor,
        chains: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
    ) -> None:
        """Record iterate x_i (i < iters) before the attack steps away from it. `grad`: the ascent
        direction at x_i; at x_0 its exactly-zero rows are recorded (a masked or underflowing
        gradient leaves those images where they are; Carlini et al. 2019)."""
        self.losses.append(loss.detach())
        if i == 0 and grad is not None:
            self.zero_grad = grad.detach().flatten(1).abs().amax(1) == 0
        if self.observer is not None:
            self.observer(i, x.detach())
        if self.track_path:
            for rule, v in path_correct(self.defense, x, self.y, chains, self.path_rng).items():
                self.path[rule].append(v)

    def step_done(self, i: int) -> None:
        if self.progress is not None:
            self.progress(i)

    def finish(
        self,
        x_last: torch.Tensor,
        loss_last: torch.Tensor,
        x_adv: torch.Tensor | None = None,
        loss_adv: torch.Tensor | None = None,
    ) -> AttackResult:
        """Record the last iterate x_iters and build the result (x_adv defaults to x_last; pass
        loss_adv, the objective at x_adv, when x_adv is not the last iterate)."""
        iters = len(self.losses)
        self.losses.append(loss_last.detach())
        if self.observer is not None:
            self.observer(iters, x_last.detach())
        path = {rule: torch.stack(v) for rule, v in self.path.items()} if self.track_path else None
        x_adv = x_last if x_adv is None else x_adv
        loss_adv = None if loss_adv is None else loss_adv.detach()
        return AttackResult(x_adv.detach(), torch.stack(self.losses), path, loss_adv, self.zero_grad)


__all__ = [
    "ATTACKS",
    "EPS_HINT",
    "Attack",
    "AttackParams",
    "AttackResult",
    "Observer",
    "Progress",
    "Trace",
    "attack_class",
    "attack_params",
    "display_label",
    "short_display_label",
    "path_correct",
    "register_attack",
]
