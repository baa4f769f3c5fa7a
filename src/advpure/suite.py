"""What a benchmark evaluates: the defenses (undefended + ADP per sigma) and, for each, the attacks.

A `Unit` is one (defense, attack) pair: one block of rows in the results table. Its fingerprint
(defense settings + resolved attack settings) is what a run directory remembers, so a re-run can
add new units to an existing run but never mixes records made by different settings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from advpure.config import attack_eps_step, fingerprint, to_dict
from advpure.errors import ConfigError
from advpure.purify.defense import defense_name


@dataclass
class Unit:
    defense: str  # defense name, e.g. "none", "adp_s0.25"
    attack: str  # attack key, e.g. "bpda40_eot15" or "bpda40_eot15@eps0.05" (eps sweep)
    spec: DictConfig  # the AttackConfig
    eps: float
    step: float
    label: str
    sweep: bool = False  # part of the robust-vs-eps sweep

    @property
    def key(self) -> str:
        return f"{self.defense}/{self.attack}"


@dataclass
class Suite:
    defenses: dict[str, DictConfig]  # name -> DefenseConfig (sigma resolved)
    units: list[Unit]
    labels: dict[str, str] = field(default_factory=dict)

    def units_of(self, defense: str) -> list[Unit]:
        return [u for u in self.units if u.defense == defense]

    @property
    def needs_score(self) -> bool:
        return any(d.kind != "none" for d in self.defenses.values())


def attack_label(spec, eps: float | None = None) -> str:
    it, eot = spec.iters, spec.eot
    if spec.kind == "pgd":
        base = {
            "classifier": f"PGD{it} (classifier, blind)",
            "bpda": f"BPDA{it}+EOT{eot}",
            "full": f"PGD{it}-EOT{eot} (full gradient)",
        }[spec.gradient]
    elif spec.kind == "apgd":
        src = {"full": "", "bpda": ", BPDA", "classifier": ", classifier"}[spec.gradient]
        base = f"APGD-{spec.loss.upper()}{it}-EOT{eot}{src}"
    elif spec.kind == "joint_score":
        base = f"Joint (score) {it}+EOT{eot}"
    elif spec.kind == "joint_full":
        base = f"Joint (full) {it}+EOT{eot}"
    else:
        base = f"SPSA{it} (N={spec.spsa_samples})"
    if spec.eot_aggregate == "vote":
        base += " vote"
    if spec.random_start:
        base += " rs"
    return base if eps is None else f"{base} @ ε={eps:.4g}"


def defense_label(d) -> str:
    if d.kind == "none":
        return "Undefended"
    return {"adp": "ADP", "langevin": "Langevin (ML)"}[d.kind] + f" σ={d.sigma:g}"


def _needs_score(spec) -> bool:
    return spec.kind in ("joint_score", "joint_full")


def build_suite(cfg: DictConfig) -> Suite:
    """Defenses and units from the config; bad names and impossible pairs are config errors."""
    bc = cfg.benchmark
    attacks = cfg.attacks
    defenses: dict[str, DictConfig] = {}
    plan: dict[str, list[str]] = {}
    if cfg.defense.kind != "none":
        for sigma in list(bc.sigmas) or [cfg.defense.sigma]:
            d = copy.deepcopy(cfg.defense)
            d.sigma = float(sigma)
            defenses[defense_name(d)] = d
            plan[defense_name(d)] = list(attacks)
    if bc.undefended or cfg.defense.kind == "none":
        d = OmegaConf.merge(cfg.defense, {"kind": "none", "sigma": 0.0, "replicas": 1})
        names = list(bc.undefended_attacks) if cfg.defense.kind != "none" else list(attacks)
        for n in names:
            if n not in attacks:
                raise ConfigError(
                    f"benchmark.undefended_attacks: '{n}' is not a selected attack; selected: {', '.join(attacks)}"
                )
            if _needs_score(attacks[n]):
                raise ConfigError(
                    f"benchmark.undefended_attacks: '{n}' needs a purifier; the undefended model has none"
                )
        defenses = {"none": d, **defenses}
        plan = {"none": names, **plan}

    units: list[Unit] = []
    labels: dict[str, str] = {name: defense_label(d) for name, d in defenses.items()}
    for dname, names in plan.items():
        for n in names:
            spec = attacks[n]
            eps, step = attack_eps_step(cfg, spec)
            units.append(Unit(dname, n, spec, eps, step, attack_label(spec)))
            labels[n] = attack_label(spec)
    if bc.eps_sweep:
        sweep = bc.sweep_attack or next(iter(attacks), None)
        if sweep not in attacks:
            raise ConfigError(
                f"benchmark.sweep_attack: '{sweep}' is not a selected attack; selected: {', '.join(attacks)}"
            )
        for dname in plan:
            if dname == "none" and _needs_score(attacks[sweep]):
                continue
            for e in bc.eps_sweep:
                spec = attacks[sweep]
                base_eps, base_step = attack_eps_step(cfg, spec)
                # the step scales with eps (fixed step/eps ratio): with a fixed step, a few
                # iterations could not even reach the larger balls
                step = base_step * e / base_eps if base_eps > 0 and e > 0 else base_step
                key = f"{sweep}@eps{e:.4g}"
                units.append(Unit(dname, key, spec, float(e), step, attack_label(spec, float(e)), sweep=True))
                labels[key] = attack_label(spec, float(e))
    return Suite(defenses, units, labels)


def unit_fingerprint(suite: Suite, unit: Unit, cfg: DictConfig) -> str:
    """Everything that makes one (defense, attack) block of records."""
    attack = {k: v for k, v in to_dict(unit.spec).items() if k != "name"}
    return fingerprint(
        {
            "defense": to_dict(suite.defenses[unit.defense]),
            "attack": attack,
            "eps": unit.eps,
            "step": unit.step,
            "image_grid": cfg.benchmark.image_grid,
        }
    )


def natural_fingerprint(suite: Suite, defense: str) -> str:
    return fingerprint({"defense": to_dict(suite.defenses[defense])})
