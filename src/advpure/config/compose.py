"""Structured configs (dataclasses are the schema) and their composition with OmegaConf.

A run's config is composed in this order (later wins):
  1. the dataclass defaults below;
  2. one file per config group (`conf/<group>/<option>.yaml`), chosen by the experiment's
     `defaults:` and by `group=option` on the command line (`attack=[a,b]` selects several);
  3. the experiment file's own keys (`experiments/<name>.yaml`, which may `extends:` another);
  4. dotted overrides from the command line (`trainer.max_epochs=3`).

The `defense` block and each `attacks.<name>` block are typed by their kind: `kind` names a
registered purifier / attack (or `module.path:Class`), whose `Params` dataclass is the schema of
that block. Selecting a group option (`defense=langevin`) replaces the whole block, so one kind's
keys never leak into another's.

Every mistake is a `ConfigError` with one line that names the key and what is allowed. Floats are
always finite (a NaN anywhere is an error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from advpure.attacks.base import EPS_HINT, attack_class
from advpure.config.schema import (  # noqa: F401 (the schema, re-exported: `config.Config`, ...)
    BenchmarkConfig,
    CertifyConfig,
    ClassifierConfig,
    Config,
    DataConfig,
    EBMConfig,
    LoggerConfig,
    OptimConfig,
    PathsConfig,
    ScoreConfig,
    TrainConfig,
    TrainerConfig,
)
from advpure.core.errors import ConfigError
from advpure.core.params import check_finite_tree
from advpure.core.params import validate as validate_fields
from advpure.purify.base import purifier_class
from advpure.results.protocols import PROTOCOLS

GROUPS = ("data", "classifier", "score", "defense", "attack", "trainer", "logger", "ebm")
KIND_GROUPS = ("defense", "attack")  # blocks typed by their `kind` (registries)

# keys that were renamed: a config that still uses the old name gets a one-line pointer
RENAMED = {
    "score.sigma_max": "score.dsm_sigma_max",
    "score.sigma_min": "score.dsm_sigma_min",
    "score.num_sigmas": "score.dsm_levels",
    "score.sigma_fixed": "score.dsm_sigma_fixed",
    "defense.langevin_eta": "defense.eta (defense=langevin)",
    "defense.langevin_sigma": "defense.dsm_sigma (defense=langevin)",
    "attacks.*.spsa_samples": "samples",
    "attacks.*.spsa_delta": "delta",
    "attacks.*.apgd_rho": "rho",
    "attacks.*.apgd_momentum": "momentum",
    "benchmark.ever_broken": "benchmark.protocols (a list; ever_broken is one of them)",
}


def _renamed(key: str) -> str:
    parts = key.split(".")
    generic = f"attacks.*.{parts[-1]}" if parts[0] == "attacks" else key
    new = RENAMED.get(key) or RENAMED.get(generic)
    return f" ('{parts[-1]}' was renamed: use {new})" if new else ""


# --- locating config files ----------------------------------------------------------------------
def project_root() -> Path:
    """The directory holding `conf/` and `experiments/` (env ADVPURE_ROOT, else the source tree)."""
    env = os.environ.get("ADVPURE_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in [*here.parents, Path.cwd()]:
        if (parent / "conf").is_dir() and (parent / "experiments").is_dir():
            return parent
    raise ConfigError("cannot find the conf/ and experiments/ directories; set ADVPURE_ROOT")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (project_root() / "conf" / group).glob("*.yaml"))


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (project_root() / "experiments").glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _group_file(group: str, option: str) -> Path:
    path = project_root() / "conf" / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown {group} option '{option}'; allowed: {', '.join(group_options(group)) or '(none)'}"
        )
    return path


def _experiment_file(name: str, chain: tuple[str, ...] = ()) -> dict:
    path = project_root() / "experiments" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown experiment '{name}'; allowed: {', '.join(experiment_names())}")
    if name in chain:
        raise ConfigError(f"experiment '{name}' extends itself: {' -> '.join((*chain, name))}")
    body = _read_yaml(path)
    parent = body.pop("extends", None)
    if parent is None:
        return body
    base = _experiment_file(parent, (*chain, name))
    defaults = {**base.pop("defaults", {}), **body.pop("defaults", {})}
    merged = OmegaConf.to_container(OmegaConf.merge(base, body))
    merged["defaults"] = defaults
    return merged


# --- command line parsing -----------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """`[a,b]` -> list of names; other values are parsed as YAML scalars (numbers, bools, null)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_value(t) for t in inner.split(",")] if inner else []
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Split `key=value` tokens into group selections and dotted overrides."""
    groups: dict[str, Any] = {}
    dotted: list[tuple[str, Any]] = []
    for token in overrides:
        if "=" not in token:
            raise ConfigError(f"expected key=value, got '{token}'")
        key, value = token.split("=", 1)
        key = key.strip()
        if key in GROUPS or key == "experiment":
            groups[key] = _parse_value(value)
        else:
            dotted.append((key, _parse_value(value)))
    return groups, dotted


# --- composition --------------------------------------------------------------------------------
def _schema_keys(node: Any) -> str:
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    return ", ".join(str(k) for k in keys)


def _merge(base: DictConfig, update: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        parent = e.full_key.rsplit(".", 1)[0] if e.full_key and "." in e.full_key else ""
        node = OmegaConf.select(base, parent) if parent else base
        allowed = _schema_keys(node)
        raise ConfigError(
            f"unknown key '{e.full_key}' ({where}); allowed here: {allowed}{_renamed(e.full_key)}"
        ) from None
    except ValidationError as e:
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]} ({where})") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"{key}: {str(e).splitlines()[0]} ({where})") from None


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def _switch_kind(cfg: DictConfig, where: str) -> None:
    """`defense.kind=X` on the command line: keep the block's keys that kind X also has (the common
    ones, a shared sigma...), drop the others; later overrides are then checked against X."""
    block = OmegaConf.select(cfg, where)
    kind = block.get("kind")
    cls = purifier_class(kind) if where == "defense" else attack_class(kind)
    allowed = {f.name for f in dataclasses.fields(cls.Params)}
    kept = {k: v for k, v in OmegaConf.to_container(block).items() if k in allowed}
    if where == "defense":
        cfg.defense = kept
    else:
        cfg.attacks[where.split(".", 1)[1]] = kept


def load(experiment: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config of `experiment` with command-line style `overrides`; validate it."""
    groups, dotted = split_overrides(list(overrides))
    experiment = groups.pop("experiment", None) or experiment or "fmnist"
    if not isinstance(experiment, str):
        raise ConfigError(f"experiment must be a name, got {experiment!r}")
    body = _experiment_file(experiment)
    defaults = body.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"experiments/{experiment}.yaml: 'defaults' must map group -> option")
    for g in defaults:
        if g not in GROUPS:
            raise ConfigError(
                f"experiments/{experiment}.yaml: unknown group '{g}'; allowed: {', '.join(GROUPS)}"
            )
    selected = {**defaults, **groups}

    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        option = selected.get(group)
        if option is None:
            continue
        if group == "attack":
            names = option if isinstance(option, list) else [option]
            attacks = {}
            for n in names:
                data = _read_yaml(_group_file("attack", str(n)))
                attacks[str(n)] = {**data, "name": str(n)}
            cfg.attacks = attacks  # replaces the blocks: each attack's keys come from its own file
        else:
            if not isinstance(option, str):
                raise ConfigError(f"{group}: expected one option name, got {option!r}")
            data = _read_yaml(_group_file(group, option))
            if group == "defense":
                cfg.defense = data  # replaces the block (one kind's keys never leak into another's)
            else:
                cfg = _merge(cfg, {group: data}, f"conf/{group}/{option}.yaml")
    # an experiment's per-attack deltas apply to the attacks that are selected; a name that is no
    # attack option at all is a typo
    for name in list(body.get("attacks") or {}):
        if name not in cfg.attacks:
            if name not in group_options("attack"):
                raise ConfigError(
                    f"experiments/{experiment}.yaml: attacks.{name}: unknown attack; "
                    f"allowed: {', '.join(group_options('attack'))}"
                )
            del body["attacks"][name]
    cfg = _merge(cfg, body, f"experiments/{experiment}.yaml")
    cfg.experiment = experiment
    for key, value in dotted:
        if key.split(".")[0] not in Config.__dataclass_fields__:
            allowed = ", ".join([*Config.__dataclass_fields__, "attack (group)"])
            raise ConfigError(
                f"unknown key '{key}'; allowed top-level keys and groups: {allowed}{_renamed(key)}"
            )
        if key.startswith("attacks.") and key.count(".") >= 2:
            name = key.split(".")[1]
            if name not in cfg.attacks:
                raise ConfigError(
                    f"unknown key '{key}': attack '{name}' is not selected; selected: {', '.join(cfg.attacks)}"
                )
        cfg = _merge(cfg, _nest(key, value), "command line")
        if key == "defense.kind" or (
            key.startswith("attacks.") and key.endswith(".kind") and key.count(".") == 2
        ):
            _switch_kind(cfg, key.rsplit(".", 1)[0])
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve interpolation: {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


# --- validation ---------------------------------------------------------------------------------
def typed_block(node: Any, cls: type, prefix: str, what: str) -> DictConfig:
    """`node` (a plain block) merged onto `cls.Params` (its kind's schema) and validated.

    Unknown keys name the kind and what it allows; wrong types and out-of-range values name the key.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    params = cls.Params
    allowed = [f.name for f in dataclasses.fields(params)]
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{prefix}{key}: not a parameter of {what} '{data.get('kind')}'; allowed: "
                f"{', '.join(allowed)}{_renamed(prefix + key)}"
            )
    try:
        typed = OmegaConf.merge(OmegaConf.structured(params), data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"{prefix}{key}: {str(e).splitlines()[0]}") from None
    validate_fields(typed, params, prefix)
    return typed


def defense_option(entry: Any) -> tuple[str, DictConfig]:
    """(row name, typed defense block) of one `benchmark.defenses` entry: an option name of
    conf/defense/, or a mapping {option: <name>, name: <row name>, <key>: <value>...}."""
    if isinstance(entry, str):
        entry = {"option": entry}
    data = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else dict(entry)
    option = data.pop("option", None)
    if not isinstance(option, str):
        raise ConfigError(
            f"benchmark.defenses: expected an option name or {{option: <name>, ...}}, got {entry!r}"
        )
    name = data.pop("name", option)
    block = {**_read_yaml(_group_file("defense", option)), **data}
    kind = block.get("kind", "adp")
    return str(name), typed_block(block, purifier_class(kind), f"benchmark.defenses.{name}.", "defense kind")


def validate(cfg: DictConfig) -> None:
    """Types the kind blocks by their registries, then range/choice/finiteness checks from the
    schema metadata, plus checks across fields. Raises ConfigError naming the key."""
    check_finite_tree(OmegaConf.to_container(cfg, resolve=True), "")
    validate_fields(cfg, Config, "")
    kind = cfg.defense.get("kind", "adp") if isinstance(cfg.defense, DictConfig) else "adp"
    cfg.defense = typed_block(cfg.defense, purifier_class(kind), "defense.", "defense kind")
    for name in list(cfg.attacks):
        block = cfg.attacks[name]
        cls = attack_class(block.get("kind", "pgd"))
        cfg.attacks[name] = typed_block(block, cls, f"attacks.{name}.", "attack kind")
    s = cfg.score
    if s.dsm_sigma_min > s.dsm_sigma_max:
        raise ConfigError(
            f"score.dsm_sigma_min ({s.dsm_sigma_min}) must be <= score.dsm_sigma_max ({s.dsm_sigma_max})"
        )
    for st in cfg.train.stages:
        if st not in TRAIN_STAGES:
            raise ConfigError(f"train.stages: unknown stage '{st}'; allowed: {', '.join(TRAIN_STAGES)}")
    lists = {"benchmark.protocols": cfg.benchmark.protocols}
    lists.update(
        {f"attacks.{n}.protocols": a.protocols for n, a in cfg.attacks.items() if a.protocols is not None}
    )
    for key, names in lists.items():
        for p in names:
            PROTOCOLS.get(p)  # unknown protocol: ConfigError listing the registered ones
        if "single" not in names:
            raise ConfigError(f"{key}: must include 'single' (the natural and CI rows use it)")
    for name in cfg.benchmark.defenses:
        defense_option(name)  # an unknown option or a bad block: one line naming it
    if cfg.benchmark.sigmas and not hasattr(purifier_class(cfg.defense.kind).Params, "sigma"):
        raise ConfigError(f"benchmark.sigmas: defense kind '{cfg.defense.kind}' has no screening sigma")
    e = cfg.ebm
    if e.noise_std is not None and e.noise_std < 0:
        raise ConfigError(f"ebm.noise_std: must be >= 0 (or null for sqrt(step_size)), got {e.noise_std}")
    for sigma in cfg.benchmark.sigmas:
        if sigma < 0:
            raise ConfigError(f"benchmark.sigmas: sigma must be >= 0, got {sigma}")
    for e in cfg.benchmark.eps_sweep:
        if not 0 <= e <= 1:
            raise ConfigError(f"benchmark.eps_sweep: eps must be in [0, 1], got {e} ({EPS_HINT})")
    check_certify(cfg.certify)
    devices = cfg.trainer.devices
    if not (
        devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
    ):
        raise ConfigError(f"trainer.devices: expected a positive int or 'auto', got {devices!r}")


TRAIN_STAGES = ("classifier", "score", "ebm")


def check_certify(cc: DictConfig) -> None:
    """The `certify` block's lists: known base names (no repeats), sigmas > 0, radii >= 0."""
    from advpure.certify.bases import BASES

    if not cc.bases:
        raise ConfigError(f"certify.bases: empty; allowed: {', '.join(BASES)}")
    for b in cc.bases:
        if b not in BASES:
            raise ConfigError(f"certify.bases: unknown base classifier '{b}'; allowed: {', '.join(BASES)}")
    if not cc.sigmas:
        raise ConfigError("certify.sigmas: empty; give at least one smoothing sigma")
    for name in ("bases", "sigmas"):
        values = [float(v) if name == "sigmas" else v for v in cc[name]]
        if len(set(values)) != len(values):
            raise ConfigError(f"certify.{name}: repeated values in {values}")
    for sigma in cc.sigmas:
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
            raise ConfigError(f"certify.sigmas: sigma must be a number > 0, got {sigma!r}")
    for r in cc.radii:
        if not isinstance(r, (int, float)) or isinstance(r, bool) or r < 0:
            raise ConfigError(f"certify.radii: radius must be a number >= 0, got {r!r}")


# --- helpers for consumers ----------------------------------------------------------------------
def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def fingerprint(node: Any) -> str:
    """A short stable hash of a config (sub)tree: identifies what a run directory was made from."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attack_eps_step(cfg: DictConfig, attack: DictConfig) -> tuple[float, float]:
    eps = cfg.data.eps if attack.eps is None else attack.eps
    step = cfg.data.step if attack.step is None else attack.step
    return float(eps), float(step)
