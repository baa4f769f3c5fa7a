"""The config schema: one dataclass per fixed config group (paths, data, trainer, logger, train,
benchmark, certify) and the root `Config`; each network kind brings its own block
(`advpure.kinds`), added by `root_schema()`.

Field metadata (`advpure.core.params`: choice / at_least / between) states the allowed values and the
comment next to a field is its `--help` text. The `defense` block and the `attacks.<name>` blocks
are not here: they are typed by their kind's `Params` (`advpure.purify`, `advpure.attacks`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from advpure.attacks.base import EPS_HINT
from advpure.core.params import at_least, between, choice, schema
from advpure.data.sources import SPECS


@schema
@dataclass
class PathsConfig:
    artifacts: str = "artifacts"  # exported weights that later stages load
    runs: str = "runs"  # checkpoints, logs, benchmark run directories
    data: str = "data"  # download cache (searched when data.root is unset)
    models: str = "models"  # RobustBench's model directory: <models>/<dataset>/<threat_model>/<name>.pt
    cache: str = "${paths.runs}/cache"  # library caches, logs and temp files of a run (advpure.core.runtime)


@schema
@dataclass
class DataConfig:
    name: str = choice("fmnist", *SPECS)
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
    eps: float = between(0.1, 0.0, 1.0, hint=EPS_HINT)
    step: float = between(0.01, 0.0, 1.0, hint=EPS_HINT, strict=True)


@schema
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


@schema
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


@schema
@dataclass
class TrainConfig:
    stages: list[str] = field(default_factory=lambda: ["classifier", "score"])
    force: bool = False  # retrain even when exported weights exist


@schema
@dataclass
class BenchmarkConfig:
    n_images: int = at_least(200, 1)  # the first n images of the test set
    batch_size: int = at_least(100, 1)
    undefended: bool = True  # also attack the bare classifier (identity purifier)
    undefended_attacks: list[str] = field(default_factory=lambda: ["pgd40_blind"])
    sigmas: list[float] = field(default_factory=list)  # one ADP row per sigma (empty: defense.sigma)
    # more defenses side by side with the configured one, attacked by the same attacks: each a
    # conf/defense option name, or {option: <name>, <key>: <value>...} with overrides; the row is
    # named after the option (or `name:`), e.g. [langevin, {option: adp_ebm, replicas: 4}] (Fig. 2)
    defenses: list[Any] = field(default_factory=list)
    worst_of_n: int = at_least(10, 1)  # N fresh classifications of each final input
    # evaluation protocols (registered names); single is always computed
    protocols: list[str] = field(
        default_factory=lambda: ["single", "worst_of_n", "mean_of_n", "ever_broken", "dwbox"]
    )  # worst_of_n and ever_broken bring their noise floors (eps = 0, as many evaluations)
    # published tables printed after the results, as cited (`advpure.results.cited`: adp_paper,
    # adp_reevaluations, diffpure_cifar10, gdmp_cifar10, diffpure_imagenet, or a user's)
    cited: list[str] = field(default_factory=list)
    eps_sweep: list[float] = field(default_factory=list)  # robust accuracy vs eps plot
    sweep_attack: str | None = None  # attack used for the sweep (default: the first one)
    run_dir: str = "${paths.runs}/benchmark/${experiment}"
    resume: bool = True  # skip batches whose records are already stored
    overwrite: bool = False  # allow a run_dir written by another config (its records are deleted)
    train_missing: bool = True  # train classifier / score net when their weights are missing
    image_grid: int = at_least(8, 0)  # clean / attacked / purified examples in the grid plot
    compile: bool = False  # torch.compile the score net (compile time reported; checked against eager)
    # gradient-masking checks (Carlini et al. 2019): extra runs of one white-box attack on the first
    # `check_images` images, at eps = 1 (must reach ~0%) and with twice the iterations and EOT draws
    checks: bool = True
    check_images: int = at_least(8, 1)
    check_attack: str | None = None  # default: the first selected attack with full, else bpda gradients


@schema
@dataclass
class CertifyConfig:
    """`advpure certify`: randomized smoothing (Cohen et al. 2019) of the classifier with each base
    (noisy | denoised | adp | diffusion) at each sigma. ADP's parameters come from the `defense` block
    (kind adp); the diffusion base's eps-net is the network kind `diffusion_net`."""

    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5])  # smoothing noise std, [0, 1] units
    bases: list[str] = field(default_factory=lambda: ["noisy", "denoised", "adp"])
    # network kind of the `diffusion` base's eps(u, t) net (Carlini et al. 2023's one-shot denoiser)
    diffusion_net: str = "ddpmpp"
    n0: int = at_least(100, 1)  # selection draws (guess c_A)
    n: int = at_least(100_000, 1)  # estimation draws (bound p_A)
    alpha: float = between(0.001, 0.0, 0.5, strict=True)  # failure probability of each certificate
    n_images: int = at_least(500, 1)  # test images: every `skip`-th, the first n_images of those
    skip: int = at_least(20, 1)
    batch_size: int = at_least(10, 1)  # images per test step (one store transaction per base and sigma)
    max_batch: int | None = at_least(None, 1)  # rows per forward of the base (None: defense.max_batch)
    block: int = at_least(1000, 1)  # rows per keyed noise block (part of the noise key)
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # l2, [0, 1] units
    run_dir: str = "${paths.runs}/certify/${experiment}"
    resume: bool = True  # skip images whose certificates are stored
    overwrite: bool = False  # allow a run_dir written by other settings (those records are deleted)
    train_missing: bool = True  # train classifier / score net (and noisy_classifier) when missing
    # weights of the classifier the `noisy` base uses (Cohen et al.'s baseline is fair only for a
    # classifier trained with Gaussian noise at sigma, classifier.noise_sd); `{sigma}` in the path
    # is replaced by each sigma (one noise-trained classifier per sigma); None: classifier.weights
    noisy_classifier: str | None = None
    measure_limit: bool = True  # time the base alone on one chunk of rows per base and sigma (overhead)


@dataclass
class Config:
    """The fixed sections of the root config; `root_schema()` adds one block per network kind."""

    experiment: str = "fmnist"
    seed: int = 0
    plugins: list[str] = field(default_factory=list)  # modules imported first (your own kinds, purifiers...)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    defense: Any = field(default_factory=lambda: {"kind": "adp"})  # typed by its kind (see module doc)
    attacks: dict[str, Any] = field(default_factory=dict)  # name -> block typed by its kind
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)


_ROOTS: dict[tuple, type] = {}


def root_schema() -> type:
    """The root config dataclass: `Config`'s sections with one block per registered network kind
    (`advpure.nets.registry.NET_KINDS`: classifier, score, ebm, ... named after the kind), placed
    after `data`. Rebuilt when a plugin registers another kind."""
    import advpure.kinds  # noqa: F401 (registers the built-in kinds)
    from advpure.nets.registry import NET_KINDS

    kinds = tuple((name, cls.Config) for name, cls in NET_KINDS.items() if ":" not in name)
    if kinds not in _ROOTS:
        hints = typing.get_type_hints(Config)
        fields = []
        for f in dataclasses.fields(Config):
            default = (
                field(default=f.default)
                if f.default is not dataclasses.MISSING
                else field(default_factory=f.default_factory)
            )
            fields.append((f.name, hints[f.name], default))
            if f.name == "data":
                fields += [(name, block, field(default_factory=block)) for name, block in kinds]
        _ROOTS[kinds] = dataclasses.make_dataclass("Config", fields, namespace={"__doc__": Config.__doc__})
    return _ROOTS[kinds]
