"""The benchmark plan: which defenses are evaluated (undefended + the configured purifier, one
row per screening sigma) and, for each, which attacks; their labels and fingerprints.

A `Unit` is one (defense, attack) pair: one block of rows in the results table. Its fingerprint
(what made that block: the defense's and the attack's own parameters, eps/step, the weights the
defense uses) is what a run directory remembers, so a re-run can add new units to an existing
run, and changing one unit never invalidates another unit's records.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from omegaconf import DictConfig

from advpure.attacks.base import attack_class
from advpure.config.compose import attack_eps_step, defense_option, fingerprint, to_dict, typed_block
from advpure.core.errors import ConfigError
from advpure.nets.registry import net_kind
from advpure.purify.base import IdentityPurifier, purifier_class
from advpure.purify.defense import defense_name
from advpure.results.labels import Label, attack_label, defense_labels
from advpure.results.protocols import protocol

# defense keys that change how results are computed or shown, not what they are
_NOT_IN_FINGERPRINT = ("merge", "max_batch")


@dataclass
class Unit:
    defense: str  # defense name, e.g. "none", "adp_s0.25"
    attack: str  # attack key, e.g. "bpda40_eot15" or "bpda40_eot15@eps0.05" (eps sweep)
    spec: DictConfig  # the attack's typed block
    eps: float
    step: float
    label: str  # the short label (`advpure.results.labels`)
    sweep: bool = False  # part of the robust-vs-eps sweep
    check: str | None = None  # a gradient-masking check run ("unbounded", "budget"), not a table row

    @property
    def key(self) -> str:
        return f"{self.defense}/{self.attack}"


@dataclass
class Plan:
    defenses: dict[str, DictConfig]  # name -> typed defense block (sigma resolved)
    units: list[Unit]
    # defense names and attack keys -> short labels (table rows, plots) and full descriptions
    # (settings, captions): one `advpure.results.labels.Label` each, split for the report
    labels: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def units_of(self, defense: str) -> list[Unit]:
        return [u for u in self.units if u.defense == defense]

    @property
    def table_units(self) -> list[Unit]:
        """The units of the results table: the threat model's attacks (no sweep, no check runs)."""
        return [u for u in self.units if not u.sweep and u.check is None]

    def needs(self, defense: str) -> tuple[str, ...]:
        """The network kinds whose weights make this defense's records: the classifier and the
        kinds its purifier names (`Purifier.nets`)."""
        d = self.defenses[defense]
        return ("classifier", *dict.fromkeys(purifier_class(d.kind).nets(d).values()))

    @property
    def nets(self) -> set[str]:
        """Every network kind some defense of the plan uses."""
        return {n for d in self.defenses for n in self.needs(d)}


def check_requirements(plan: Plan) -> None:
    """Every attack's needs (`Attack.requires`: e.g. the joint (score) attack needs a time-free
    field f(x)) are met by the networks of the defense it attacks: a ConfigError naming the pair
    otherwise, before any weights are loaded or trained."""
    for u in plan.units:
        need = set(attack_class(u.spec.kind).requires(u.spec))
        if not need:
            continue
        d = plan.defenses[u.defense]
        have = {net_kind(k).signature for k in purifier_class(d.kind).nets(d).values()}
        lacking = sorted(need - have)
        if lacking:
            raise ConfigError(
                f"attack '{u.attack}' on defense '{u.defense}': the attack needs a network of signature "
                f"{', '.join(lacking)} ({SIGNATURE_WORDS.get(lacking[0], lacking[0])}), and the defense's purifier "
                f"'{d.kind}' has none"
            )


SIGNATURE_WORDS = {"field": "a time-free score field f(x)", "eps": "a diffusion eps(u, t) net"}


def build_plan(cfg: DictConfig) -> Plan:
    """Defenses and units from the config; bad names and impossible pairs are config errors."""
    bc = cfg.benchmark
    attacks = cfg.attacks
    defenses: dict[str, DictConfig] = {}
    plan: dict[str, list[str]] = {}
    if cfg.defense.kind != "none":
        for sigma in list(bc.sigmas) or [None]:
            d = copy.deepcopy(cfg.defense)
            if sigma is not None:
                d.sigma = float(sigma)
            defenses[defense_name(d)] = d
            plan[defense_name(d)] = list(attacks)
    for entry in bc.defenses:  # side by side, under their option (or given) names
        name, block = defense_option(entry)
        if name in defenses:
            raise ConfigError(f"benchmark.defenses: '{name}' names a row twice")
        defenses[name] = block
        plan[name] = list(attacks)
    if bc.undefended or cfg.defense.kind == "none":
        d = typed_block(
            {"kind": "none", "merge": cfg.defense.merge, "max_batch": cfg.defense.max_batch},
            IdentityPurifier,
            "defense.",
            "defense kind",
        )
        names = list(bc.undefended_attacks) if cfg.defense.kind != "none" else list(attacks)
        for n in names:
            if n not in attacks:
                raise ConfigError(
                    f"benchmark.undefended_attacks: '{n}' is not a selected attack; selected: {', '.join(attacks)}"
                )
            if attack_class(attacks[n].kind).needs_purifier(attacks[n]):
                raise ConfigError(
                    f"benchmark.undefended_attacks: '{n}' needs a purifier; the undefended model has none"
                )
        defenses = {"none": d, **defenses}
        plan = {"none": names, **plan}

    units: list[Unit] = []
    named: dict[str, Label] = dict(defense_labels(defenses))
    for dname, names in plan.items():
        for n in names:
            spec = attacks[n]
            eps, step = attack_eps_step(cfg, spec)
            named[n] = attack_label(spec)
            units.append(Unit(dname, n, spec, eps, step, named[n].short))
    if bc.eps_sweep:
        sweep = bc.sweep_attack or next(iter(attacks), None)
        if sweep not in attacks:
            raise ConfigError(
                f"benchmark.sweep_attack: '{sweep}' is not a selected attack; selected: {', '.join(attacks)}"
            )
        spec = attacks[sweep]
        base_eps, base_step = attack_eps_step(cfg, spec)
        for dname in plan:
            if dname == "none" and attack_class(spec.kind).needs_purifier(spec):
                continue
            for e in bc.eps_sweep:
                # the step scales with eps (fixed step/eps ratio): with a fixed step, a few
                # iterations could not even reach the larger balls
                step = base_step * e / base_eps if base_eps > 0 and e > 0 else base_step
                key = f"{sweep}@eps{e:.4g}"
                named[key] = attack_label(spec, float(e))
                units.append(Unit(dname, key, spec, float(e), step, named[key].short, sweep=True))
    if bc.checks:
        for u in check_units(cfg, attacks, plan, defenses):
            units.append(u)
            named[u.attack] = Label(u.label, u.label)
    named = _distinct_attack_labels(named, set(defenses))
    for u in units:
        u.label = named[u.attack].short
    labels = {k: v.short for k, v in named.items()}
    plan = Plan(defenses, units, labels, {k: v.full for k, v in named.items()})
    check_requirements(plan)
    return plan


def _distinct_attack_labels(named: dict[str, Label], defenses: set[str]) -> dict[str, Label]:
    """Attacks whose short labels coincide (two budgets of standard_rand) are shown by their full one."""
    count = Counter(v.short for k, v in named.items() if k not in defenses)
    return {
        k: Label(v.full, v.full) if k not in defenses and count[v.short] > 1 else v for k, v in named.items()
    }


def check_attack_name(cfg: DictConfig, attacks) -> str | None:
    """The attack the gradient-masking checks re-run: `benchmark.check_attack`, else the first
    selected attack with exact (full) gradients, else one with BPDA gradients, else None."""
    if cfg.benchmark.check_attack is not None:
        if cfg.benchmark.check_attack not in attacks:
            raise ConfigError(
                f"benchmark.check_attack: '{cfg.benchmark.check_attack}' is not a selected attack; "
                f"selected: {', '.join(attacks)}"
            )
        return cfg.benchmark.check_attack
    for gradient in ("full", "bpda"):
        for name, spec in attacks.items():
            if attack_class(spec.kind).gradient_source(spec) == gradient:
                return name
    return None


def check_units(
    cfg: DictConfig, attacks, plan: dict[str, list[str]], blocks: dict[str, DictConfig]
) -> list[Unit]:
    """The extra runs of the gradient-masking checks, on the first `check_images` images:
    `<a>@unbounded` (eps = 1 with the attack's step/eps ratio: every defense must fall to ~0%) for
    every defense, and `<a>@2x` (twice the iterations and EOT draws: must not lower robust accuracy
    beyond the CI) for the stochastic ones."""
    name = check_attack_name(cfg, attacks)
    if name is None:
        return []
    spec = attacks[name]
    n = int(cfg.benchmark.check_images)
    eps, step = attack_eps_step(cfg, spec)
    out = []
    for dname in plan:
        if dname == "none" and attack_class(spec.kind).needs_purifier(spec):
            continue
        wide = copy.deepcopy(spec)
        wide.max_images = n
        ratio_step = min(1.0, step / eps) if eps > 0 else step
        label = f"{attack_label(spec).short} @ ε=1 (check)"
        out.append(Unit(dname, f"{name}@unbounded", wide, 1.0, ratio_step, label, check="unbounded"))
        if purifier_class(blocks[dname].kind).is_stochastic(blocks[dname]):
            more = copy.deepcopy(spec)
            more.max_images = n
            for key in attack_class(spec.kind).budget_fields:
                if key in more:
                    more[key] = int(spec[key]) * 2
            label = f"{attack_label(more).short} (check: 2x budget)"
            out.append(Unit(dname, f"{name}@2x", more, eps, step, label, check="budget"))
    return out


def _defense_part(plan: Plan, defense: str) -> dict:
    return {k: v for k, v in to_dict(plan.defenses[defense]).items() if k not in _NOT_IN_FINGERPRINT}


def unit_fingerprint(plan: Plan, unit: Unit, weights: dict[str, str]) -> str:
    """Everything that makes one (defense, attack) block of records: the defense's own
    parameters, the attack's, eps/step, and the hashes of the weights the defense uses."""
    attack = {k: v for k, v in to_dict(unit.spec).items() if k != "name"}
    return fingerprint(
        {
            "defense": _defense_part(plan, unit.defense),
            "attack": attack,
            "eps": unit.eps,
            "step": unit.step,
            "weights": {k: weights[k] for k in plan.needs(unit.defense)},
        }
    )


def natural_fingerprint(plan: Plan, defense: str, weights: dict[str, str]) -> str:
    """What makes a defense's clean-accuracy records."""
    return fingerprint(
        {"defense": _defense_part(plan, defense), "weights": {k: weights[k] for k in plan.needs(defense)}}
    )


def attack_steps(plan: Plan) -> str:
    """The step sizes the table's attacks took: "step 0.01" when every fixed-step attack took the same,
    else one per attack label; "<labels>: adaptive step" for APGD-type attacks (which ignore `step`)."""
    fixed: dict[str, float] = {}
    adaptive = []
    for u in plan.table_units:
        if attack_class(u.spec.kind).fixed_step:
            fixed.setdefault(u.label, u.step)
        else:
            adaptive.append(u.label)
    parts = []
    if len(set(fixed.values())) == 1:
        parts.append(f"step {next(iter(fixed.values())):.4g}")
    elif fixed:
        parts.append("steps " + ", ".join(f"{label} {step:.4g}" for label, step in fixed.items()))
    if adaptive:
        parts.append(f"{', '.join(dict.fromkeys(adaptive))}: adaptive step")
    return "; ".join(parts) or "no attack"


def header_lines(cfg: DictConfig, plan: Plan) -> list[str]:
    """The settings stated above every results table: data, threat model, each defense's own
    parameters (from its purifier's `settings`), protocols, and what is smaller than the paper."""
    bc = cfg.benchmark
    eps = sorted({u.eps for u in plan.units if not u.sweep and u.check is None})  # checks: own section
    lines = [
        f"{cfg.data.name}: first {bc.n_images} test images; l_inf eps {', '.join(f'{e:.4g}' for e in eps)} "
        f"({attack_steps(plan)}); experiment `{cfg.experiment}`; classifier {cfg.classifier.arch}",
    ]
    for name, d in plan.defenses.items():
        line = plan.descriptions.get(name) or purifier_class(d.kind).settings(d)
        if d.kind != "none" and line not in lines:
            lines.append(line)
    names = ", ".join(protocol(p).label for p in bc.protocols)
    lines.append(f"protocols: {names} (N={bc.worst_of_n})")
    if cfg.data.name != "cifar10" or bc.n_images < 10000:
        lines.append(
            "smaller than the ADP paper's protocol (CIFAR-10, 10k images, WRN-28-10): see conf/experiment/cifar10_paper.yaml"
        )
    capped = [f"{u.attack} on the first {u.spec.max_images}" for u in plan.table_units if u.spec.max_images]
    if capped:
        lines.append("attacks on fewer images: " + ", ".join(dict.fromkeys(capped)))
    return lines
