"""The config schema: one dataclass per fixed config group (data, classifier, score, ebm,
trainer, logger, train, benchmark, certify, paths) and the root `Config`.

Field metadata (`advpure.core.params`: choice / at_least / between) states the allowed values and the
comment next to a field is its `--help` text. The `defense` block and the `attacks.<name>` blocks
are not here: they are typed by their kind's `Params` (`advpure.purify`, `advpure.attacks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advpure.attacks.base import EPS_HINT
from advpure.core.params import at_least, between, choice, schema


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
    eps: float = between(0.1, 0.0, 1.0, hint=EPS_HINT)
    step: float = between(0.01, 0.0, 1.0, hint=EPS_HINT, strict=True)


@schema
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


@schema
@dataclass
class ClassifierConfig:
    arch: str = choice("small_cnn", "small_cnn", "wrn28_10", "resnet18")
    dropout: float = between(0.0, 0.0, 1.0)
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_smoothing: float = between(0.0, 0.0, 1.0)
    # Gaussian-noise augmentation of training batches, std in [0, 1] image units (0 = off): train at
    # the smoothing sigma to make randomized smoothing's bare-classifier baseline fair (Cohen et al. 2019)
    noise_sd: float = at_least(0.0, 0.0)
    weights: str = "${paths.artifacts}/${data.name}/classifier.pt"
    # where the classifier comes from: trained by advpure (`weights`), or a RobustBench model-zoo
    # file (Croce et al. 2021) read offline from paths.models (arch is then the zoo entry's)
    source: str = choice("advpure", "advpure", "robustbench")
    robustbench_name: str = "Standard"
    threat_model: str = choice("Linf", "Linf", "L2", "corruptions")


@schema
@dataclass
class ScoreConfig:
    arch: str = choice("ncsnv2", "ncsnv2")
    ngf: int = at_least(128, 1)  # base channels: 128 = the paper's CIFAR-10 net
    # DSM noise levels (Song & Ermon 2020): L geometric levels dsm_sigma_max -> dsm_sigma_min
    dsm_sigma_max: float = at_least(50.0, 0.0, strict=True)
    dsm_sigma_min: float = at_least(0.01, 0.0, strict=True)
    dsm_levels: int = at_least(232, 1)
    dsm_sigma_fixed: float | None = at_least(None, 0.0, strict=True)  # train at one level instead
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


@schema
@dataclass
class EBMConfig:
    """Energy-based model trained by maximum likelihood with persistent short-run Langevin MCMC
    (Hill, Mitchell & Zhu, ICLR 2021). Defaults: their CIFAR-10 run (conf/ebm/ebm_cifar10.yaml says
    where each number comes from); pixel units are [0, 1]."""

    arch: str = choice("conv", "conv")  # Hill et al.'s lightweight conv EBM
    nf: int = at_least(32, 1)  # base channels (Hill et al.: 32)
    activation: str = choice("silu", "silu", "softplus", "elu", "leaky_relu")  # Hill et al.: leaky_relu
    leak: float = at_least(0.05, 0.0)  # negative slope of leaky_relu
    batch_size: int = at_least(100, 1)
    lr: float = at_least(1e-4, 0.0, strict=True)  # Adam
    beta1: float = between(0.9, 0.0, 1.0)
    beta2: float = between(0.999, 0.0, 1.0)
    weight_decay: float = at_least(0.0, 0.0)
    grad_clip: float | None = None  # clip the weight gradient's norm (Trainer gradient_clip_val)
    l2: float = at_least(0.0, 0.0)  # weight of mean(E_data^2 + E_model^2)
    mcmc_steps: int = at_least(100, 0)  # K Langevin steps per training step
    step_size: float = at_least(0.5, 0.0)  # eta in x <- x - eta/2 grad E + noise_std n
    noise_std: float | None = 0.005  # null: sqrt(step_size) (Langevin proper, temperature 1)
    data_noise: float = at_least(0.01, 0.0)  # std of the noise added to data images (positives)
    buffer_size: int = at_least(10000, 0)  # persistent chains (0: fresh short-run chains every step)
    reinit_prob: float = between(0.0, 0.0, 1.0)  # restart probability of a drawn chain
    init: str = choice("uniform", "uniform", "data")  # where restarted chains start
    clamp: bool = False  # clip chains to [0, 1] after every Langevin step
    energy_bound: float = at_least(1e4, 0.0, strict=True)  # stop when max |E| exceeds this
    max_steps: int = at_least(250_000, 1)
    ckpt_every_n_steps: int = at_least(1000, 1)
    sample_every_n_steps: int = at_least(1000, 0)  # grid of MCMC samples (W&B + PNG); 0: never
    scale_sigma: float = at_least(0.25, 0.0, strict=True)  # screening sigma of the field scale
    scale_images: int = at_least(1000, 1)  # training images used to estimate the field scale
    weights: str = "${paths.artifacts}/${data.name}/ebm.pt"


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
    (noisy | denoised | adp) at each sigma. ADP's parameters come from the `defense` block (kind adp)."""

    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5])  # smoothing noise std, [0, 1] units
    bases: list[str] = field(default_factory=lambda: ["noisy", "denoised", "adp"])
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
    experiment: str = "fmnist"
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ebm: EBMConfig = field(default_factory=EBMConfig)
    defense: Any = field(default_factory=lambda: {"kind": "adp"})  # typed by its kind (see module doc)
    attacks: dict[str, Any] = field(default_factory=dict)  # name -> block typed by its kind
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
