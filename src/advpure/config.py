"""Structured configs (dataclasses are the schema) and their composition with OmegaConf.

A run's config is composed in this order (later wins):
  1. the dataclass defaults below;
  2. one file per config group (`conf/<group>/<option>.yaml`), chosen by the experiment's
     `defaults:` and by `group=option` on the command line (`attack=[a,b]` selects several);
  3. the experiment file's own keys (`experiments/<name>.yaml`, which may `extends:` another);
  4. dotted overrides from the command line (`trainer.max_epochs=3`).

Every mistake is a `ConfigError` with one line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from advpure.errors import ConfigError

GROUPS = ("data", "classifier", "score", "defense", "attack", "trainer", "logger")


# --- field helpers: the metadata drives `validate()` -------------------------------------------
def choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


def at_least(default: Any, lo: float, strict: bool = False) -> Any:
    return field(default=default, metadata={"min": lo, "strict": strict})


def between(default: Any, lo: float, hi: float) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


# --- schema -------------------------------------------------------------------------------------
@dataclass
class PathsConfig:
    artifacts: str = "artifacts"  # exported weights that later stages load
    runs: str = "runs"  # checkpoints, logs, benchmark run directories
    data: str = "data"  # download cache (searched when data.root is unset)
    cache: str = "${paths.runs}/cache"  # library caches, logs and temp files of a run (advpure.runenv)


@dataclass
class DataConfig:
    name: str = choice("fmnist", "fmnist", "mnist", "cifar10", "cifar100")
    root: str | None = None  # the dataset's standard files; when set, the only place searched
    download: bool = True  # fetch from the canonical URL (checksummed) when no local copy exists
    val_size: int = at_least(5000, 0)  # held out from the training set with `split_seed`
    split_seed: int = 0
    batch_size: int = at_least(128, 1)
    eval_batch_size: int = at_least(500, 1)
    crop_padding: int = at_least(0, 0)  # random crop with this zero padding (0 = off)
    hflip: bool = False  # random horizontal flip (not for digits / clothing with text)
    train_subset: int | None = None  # use only the first n training images (tiny runs, tests)
    # Threat model of this dataset (l_inf), used by attacks that leave eps/step unset.
    eps: float = at_least(0.1, 0.0)
    step: float = at_least(0.01, 0.0, strict=True)


@dataclass
class OptimConfig:
    name: str = choice("sgd", "sgd", "adam", "adamw")
    lr: float = at_least(0.1, 0.0, strict=True)
    momentum: float = between(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = at_least(5e-4, 0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = choice("cosine", "none", "cosine", "multistep", "onecycle")
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])  # fractions of training
    gamma: float = between(0.2, 0.0, 1.0)
    grad_clip: float | None = None


@dataclass
class ClassifierConfig:
    arch: str = choice("small_cnn", "small_cnn", "wrn28_10", "resnet18")
    dropout: float = between(0.0, 0.0, 1.0)
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_smoothing: float = between(0.0, 0.0, 1.0)
    weights: str = "${paths.artifacts}/${data.name}/classifier.pt"


@dataclass
class ScoreConfig:
    arch: str = choice("ncsnv2", "ncsnv2")
    ngf: int = at_least(128, 1)  # base channels: 128 = the paper's CIFAR-10 net
    sigma_max: float = at_least(50.0, 0.0, strict=True)
    sigma_min: float = at_least(0.01, 0.0, strict=True)
    num_sigmas: int = at_least(232, 1)  # L geometric levels between sigma_max and sigma_min
    sigma_fixed: float | None = None  # train at one sigma instead of the geometric list
    batch_size: int = at_least(128, 1)
    lr: float = at_least(1e-4, 0.0, strict=True)
    beta1: float = between(0.9, 0.0, 1.0)
    weight_decay: float = at_least(0.0, 0.0)
    grad_clip: float | None = None
    ema_decay: float = between(0.999, 0.0, 1.0)
    max_steps: int = at_least(300_000, 1)
    ckpt_every_n_steps: int = at_least(5000, 1)
    val_every_n_steps: int = at_least(5000, 1)
    val_batches: int = at_least(4, 1)  # batches of the validation split used for val metrics
    hflip: bool = False
    weights: str = "${paths.artifacts}/${data.name}/score.pt"


@dataclass
class DefenseConfig:
    kind: str = choice("adp", "adp", "langevin", "none")
    sigma: float = at_least(0.25, 0.0)  # screening noise std (images in [0,1])
    lam: float = at_least(0.05, 0.0, strict=True)  # lambda: step scale of the adaptive update
    delta: float = at_least(1e-3, 0.0, strict=True)  # probe size of the step-size estimate
    tau: float = at_least(1e-3, 0.0)  # stop a sample once its step alpha <= tau
    steps: int = at_least(10, 1)  # T: at most this many updates
    replicas: int = at_least(10, 1)  # S: independent chains merged into one prediction
    noise: str = choice("gaussian", "gaussian", "rademacher")
    merge: str = choice("softmax", "softmax", "logits", "vote")
    # Langevin (ML/MCMC baseline, Hill et al. 2021): x <- x + eta/2 * s(x) + sqrt(eta) * n,
    # with s = f_theta / langevin_sigma the score of the noise level the chain runs at.
    langevin_eta: float = at_least(1e-4, 0.0, strict=True)
    langevin_sigma: float = at_least(0.05, 0.0, strict=True)
    max_batch: int = at_least(4096, 1)  # memory budget: rows per score-net forward (chunking)


@dataclass
class AttackConfig:
    name: str = ""  # filled with the option name when composed
    kind: str = choice("pgd", "pgd", "apgd", "joint_score", "joint_full", "spsa")
    # pgd/apgd gradient source: classifier (preprocessor-blind), full (through the purifier),
    # bpda (classifier gradient at the purified point, identity backward through the purifier)
    gradient: str = choice("bpda", "classifier", "full", "bpda")
    iters: int = at_least(40, 1)
    eps: float | None = None  # None: the dataset's data.eps
    step: float | None = None  # None: the dataset's data.step
    eot: int = at_least(1, 1)  # expectation over transformation: purification draws per step
    eot_aggregate: str = choice("mean", "mean", "vote")  # vote = per-draw sign steps (original code)
    random_start: bool = False
    loss: str = choice("ce", "ce", "dlr")
    eps_mix: float = between(0.5, 0.0, 1.0)  # joint attacks: weight of the purifier term
    joint_grad: str = choice("input", "input", "bpda")  # bpda = the original code's variant
    spsa_samples: int = at_least(128, 1)
    spsa_delta: float = at_least(0.01, 0.0, strict=True)
    apgd_rho: float = between(0.75, 0.0, 1.0)
    apgd_momentum: float = between(0.75, 0.0, 1.0)
    max_images: int | None = None  # attack only the first n benchmark images (expensive attacks)


@dataclass
class TrainerConfig:
    accelerator: str = choice("auto", "auto", "cpu", "gpu", "cuda", "mps")
    devices: Any = 1  # int, or "auto"
    num_nodes: int = at_least(1, 1)
    strategy: str = "auto"
    precision: str = choice("32-true", "32-true", "bf16-mixed", "16-mixed", "64-true")
    max_epochs: int = at_least(10, 0)  # classifier epochs
    log_every_n_steps: int = at_least(50, 1)
    deterministic: bool = False
    enable_progress_bar: bool = True
    num_threads: int | None = None  # torch intra-op threads per process (None: torch's default)


@dataclass
class LoggerConfig:
    kind: str = choice("wandb", "wandb", "csv", "none")
    project: str = "advpure"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = choice("auto", "auto", "online", "offline", "disabled")  # auto: offline without a key
    log_images: bool = True


@dataclass
class TrainConfig:
    stages: list[str] = field(default_factory=lambda: ["classifier", "score"])
    force: bool = False  # retrain even when exported weights exist


@dataclass
class BenchmarkConfig:
    n_images: int = at_least(200, 1)  # the first n images of the test set
    batch_size: int = at_least(100, 1)
    undefended: bool = True  # also attack the bare classifier (identity purifier)
    undefended_attacks: list[str] = field(default_factory=lambda: ["pgd40_blind"])
    sigmas: list[float] = field(default_factory=list)  # one ADP row per sigma (empty: defense.sigma)
    worst_of_n: int = at_least(10, 1)  # protocol "worst of N": classify N times
    ever_broken: bool = True  # protocol "ever broken": check the defense at every iterate
    eps_sweep: list[float] = field(default_factory=list)  # robust accuracy vs eps plot
    sweep_attack: str | None = None  # attack used for the sweep (default: the first one)
    run_dir: str = "${paths.runs}/benchmark/${experiment}"
    resume: bool = True  # skip batches whose records are already stored
    overwrite: bool = False  # allow a run_dir written by another config (its records are deleted)
    train_missing: bool = True  # train classifier / score net when their weights are missing
    image_grid: int = at_least(8, 0)  # clean / attacked / purified examples in the grid plot
    compile: bool = False  # torch.compile the score net (compile time reported; checked against eager)


@dataclass
class Config:
    experiment: str = "fmnist"
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    attacks: dict[str, AttackConfig] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


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
        raise ConfigError(f"unknown key '{e.full_key}' ({where}); allowed here: {allowed}") from None
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
            cfg = _merge(cfg, {"attacks": attacks}, "attack group")
        else:
            if not isinstance(option, str):
                raise ConfigError(f"{group}: expected one option name, got {option!r}")
            cfg = _merge(cfg, {group: _read_yaml(_group_file(group, option))}, f"conf/{group}/{option}.yaml")
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
            raise ConfigError(f"unknown key '{key}'; allowed top-level keys and groups: {allowed}")
        if key.startswith("attacks.") and key.count(".") >= 2:
            name = key.split(".")[1]
            if name not in cfg.attacks:
                raise ConfigError(
                    f"unknown key '{key}': attack '{name}' is not selected; selected: {', '.join(cfg.attacks)}"
                )
        cfg = _merge(cfg, _nest(key, value), "command line")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve interpolation: {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


# --- validation ---------------------------------------------------------------------------------
def _check_field(path: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{path}: unknown value {value!r}; allowed: {allowed}")
    if "min" in meta and value is not None:
        lo, strict = meta["min"], meta.get("strict", False)
        if value < lo or (strict and value == lo):
            raise ConfigError(f"{path}: must be {'>' if strict else '>='} {lo}, got {value}")
    if "max" in meta and value is not None and value > meta["max"]:
        raise ConfigError(f"{path}: must be <= {meta['max']}, got {value}")


def _validate_node(node: DictConfig, schema: type, prefix: str) -> None:
    for f in dataclasses.fields(schema):
        value = node[f.name]
        sub_schema = _SCHEMAS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if sub_schema is not None and isinstance(value, DictConfig):
            _validate_node(value, sub_schema, f"{prefix}{f.name}.")
        else:
            _check_field(f"{prefix}{f.name}", f, value)


def validate(cfg: DictConfig) -> None:
    """Range and choice checks from the schema metadata, plus checks across fields."""
    _validate_node(cfg, Config, "")
    for name, attack in cfg.attacks.items():
        _validate_node(attack, AttackConfig, f"attacks.{name}.")
        for k in ("eps", "step"):
            v = attack[k]
            if v is not None and (v < 0 or (k == "step" and v == 0)):
                raise ConfigError(f"attacks.{name}.{k}: must be {'>' if k == 'step' else '>='} 0, got {v}")
    s = cfg.score
    if s.sigma_min > s.sigma_max:
        raise ConfigError(f"score.sigma_min ({s.sigma_min}) must be <= score.sigma_max ({s.sigma_max})")
    if s.sigma_fixed is not None and s.sigma_fixed <= 0:
        raise ConfigError(f"score.sigma_fixed: must be > 0, got {s.sigma_fixed}")
    for st in cfg.train.stages:
        if st not in ("classifier", "score"):
            raise ConfigError(f"train.stages: unknown stage '{st}'; allowed: classifier, score")
    for sigma in cfg.benchmark.sigmas:
        if sigma < 0:
            raise ConfigError(f"benchmark.sigmas: sigma must be >= 0, got {sigma}")
    for e in cfg.benchmark.eps_sweep:
        if e < 0:
            raise ConfigError(f"benchmark.eps_sweep: eps must be >= 0, got {e}")
    devices = cfg.trainer.devices
    if not (
        devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
    ):
        raise ConfigError(f"trainer.devices: expected a positive int or 'auto', got {devices!r}")


_SCHEMAS = {
    c.__name__: c
    for c in (
        PathsConfig,
        DataConfig,
        OptimConfig,
        ClassifierConfig,
        ScoreConfig,
        DefenseConfig,
        AttackConfig,
        TrainerConfig,
        LoggerConfig,
        TrainConfig,
        BenchmarkConfig,
    )
}


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
