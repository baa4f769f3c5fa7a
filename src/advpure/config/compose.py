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
from advpure.config.schema import (  # noqa: F401 (the schema, re-exported)
    BenchmarkConfig,
    CertifyConfig,
    Config,
    DataConfig,
    LoggerConfig,
    PathsConfig,
    TrainConfig,
    TrainerConfig,
    root_schema,
)
from advpure.core.errors import ConfigError
from advpure.core.params import check_finite_tree
from advpure.core.params import validate as validate_fields
from advpure.core.registry import load_plugins
from advpure.nets.registry import NET_KINDS
from advpure.purify.base import purifier_class, purify_precision
from advpure.results.protocols import PROTOCOLS

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
PACKAGE_CONF = Path(__file__).resolve().parents[1] / "conf"  # ships with the package (package data)


def config_dirs() -> list[Path]:
    """Where config files are looked for, first match wins: the folders of ADVPURE_CONFIG_PATH
    (colon-separated; each laid out like the package's: `<dir>/<group>/<option>.yaml`,
    `<dir>/experiment/<name>.yaml`), then the package's own `advpure/conf/`."""
    extra = [Path(p) for p in os.environ.get("ADVPURE_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, PACKAGE_CONF]


def _options(folder: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / folder).glob("*.yaml")})


def _find(folder: str, name: str) -> Path | None:
    for d in config_dirs():
        path = d / folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def groups() -> tuple[str, ...]:
    """The config groups: data, one per network kind (classifier, score, ebm, ...), defense,
    attack (a list), trainer, logger."""
    from advpure.nets.registry import NET_KINDS

    root_schema()  # registers the built-in kinds
    return ("data", *(k for k in NET_KINDS if ":" not in k), "defense", "attack", "trainer", "logger")


def group_options(group: str) -> list[str]:
    return _options(group)


def experiment_names() -> list[str]:
    return _options("experiment")


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
    path = _find(group, option)
    if path is None:
        raise ConfigError(
            f"unknown {group} option '{option}'; allowed: {', '.join(group_options(group)) or '(none)'}"
        )
    return path


def _experiment_path(name: str) -> Path:
    """An experiment by name, or a YAML file by path (`experiment=my/exp.yaml`)."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path}")
        return path
    path = _find("experiment", name)
    if path is None:
        raise ConfigError(
            f"unknown experiment '{name}'; allowed: {', '.join(experiment_names())} (or a path to a .yaml file)"
        )
    return path


def _experiment_file(name: str, chain: tuple[str, ...] = ()) -> dict:
    path = _experiment_path(name)
    if name in chain:
        raise ConfigError(f"experiment '{name}' extends itself: {' -> '.join((*chain, name))}")
    body = _read_yaml(path)
    parent = body.pop("extends", None)
    if parent is None:
        return body
    base = _experiment_file(parent, (*chain, name))
    defaults = {**base.pop("defaults", {}), **body.pop("defaults", {})}
    plugins = [*base.pop("plugins", []), *body.pop("plugins", [])]
    merged = OmegaConf.to_container(OmegaConf.merge(base, body))
    merged["defaults"] = defaults
    if plugins:
        merged["plugins"] = list(dict.fromkeys(plugins))
    return merged


def experiment_label(name: str) -> str:
    """The run name of an experiment given by name or path (a path's file stem)."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) or os.sep in name else name


# --- command line parsing -----------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """A YAML value: `[a,b]` -> a list (of names, numbers, or flow mappings such as
    `[langevin,{option: adp_ebm, replicas: 4}]`), scalars as YAML reads them (numbers, bools, null)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            inner = text[1:-1].strip()
            return [_parse_value(t) for t in inner.split(",")] if inner else []
        return value if isinstance(value, list) else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Split `key=value` tokens into group selections and dotted overrides."""
    selection: dict[str, Any] = {}
    dotted: list[tuple[str, Any]] = []
    for token in overrides:
        if "=" not in token:
            raise ConfigError(f"expected key=value, got '{token}'")
        key, value = token.split("=", 1)
        key = key.strip()
        if key in groups() or key == "experiment":
            selection[key] = _parse_value(value)
        else:
            dotted.append((key, _parse_value(value)))
    return selection, dotted


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
    load_plugins(os.environ.get("ADVPURE_PLUGINS"))
    tokens = list(overrides)
    chosen = [t.split("=", 1)[1].strip() for t in tokens if t.split("=", 1)[0].strip() == "experiment"]
    experiment = chosen[-1] if chosen else (experiment or "fmnist")
    if not isinstance(experiment, str) or not experiment:
        raise ConfigError(f"experiment must be a name or a .yaml path, got {experiment!r}")
    body = _experiment_file(experiment)
    where = f"experiment '{experiment}'"
    plugins = body.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"{where}: 'plugins' must be a list of module names")
    load_plugins([str(p) for p in plugins])  # before the schema: they may register network kinds
    selection, dotted = split_overrides([t for t in tokens if t.split("=", 1)[0].strip() != "experiment"])
    all_groups = groups()
    defaults = body.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: 'defaults' must map group -> option")
    for g in defaults:
        if g not in all_groups:
            raise ConfigError(f"{where}: unknown group '{g}'; allowed: {', '.join(all_groups)}")
    selected = {**defaults, **selection}

    schema = root_schema()
    cfg = OmegaConf.structured(schema)
    for group in all_groups:
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
                    f"{where}: attacks.{name}: unknown attack; allowed: {', '.join(group_options('attack'))}"
                )
            del body["attacks"][name]
    cfg = _merge(cfg, body, where)
    cfg.experiment = experiment_label(experiment)
    for key, value in dotted:
        if key.split(".")[0] not in schema.__dataclass_fields__:
            allowed = ", ".join([*schema.__dataclass_fields__, "attack (group)"])
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
    validate_fields(cfg, root_schema(), "")
    kind = cfg.defense.get("kind", "adp") if isinstance(cfg.defense, DictConfig) else "adp"
    cfg.defense = typed_block(cfg.defense, purifier_class(kind), "defense.", "defense kind")
    purify_precision(purifier_class(kind), cfg.defense, None)  # bf16 refused with its reason, before any work
    for name in list(cfg.attacks):
        block = cfg.attacks[name]
        cls = attack_class(block.get("kind", "pgd"))
        cfg.attacks[name] = typed_block(block, cls, f"attacks.{name}.", "attack kind")
    for name, kind in NET_KINDS.items():
        if name in cfg:
            kind.check(cfg[name])
    stages = train_stages()
    for st in cfg.train.stages:
        if st not in stages:
            raise ConfigError(f"train.stages: unknown stage '{st}'; allowed: {', '.join(stages)}")
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
    from advpure.results.cited import CITED

    for name in cfg.benchmark.cited:
        if name not in CITED:
            raise ConfigError(
                f"benchmark.cited: unknown cited table '{name}'; allowed: {', '.join(CITED.names())}"
            )
    if cfg.benchmark.sigmas and not hasattr(purifier_class(cfg.defense.kind).Params, "sigma"):
        raise ConfigError(f"benchmark.sigmas: defense kind '{cfg.defense.kind}' has no screening sigma")
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


def train_stages() -> list[str]:
    """The training stages: the registered network kinds that can be trained, in registry order."""
    root_schema()  # registers the built-in kinds
    return [name for name, kind in NET_KINDS.items() if kind.trainable]


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
