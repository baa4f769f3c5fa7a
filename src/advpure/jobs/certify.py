"""`advpure certify`: certified l2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019)
of the classifier with each base classifier (noisy | denoised | adp) at each sigma.

Reads top to bottom:
  1. plan_units       (base, sigma) pairs, ADP parameters, the noisy base's classifier per sigma;
                      the DSM noise range of the score net must cover every sigma (before any work)
  2. ensure_weights   the classifier, score net and noise-trained classifiers exist (or train them)
  3. build the bases  from the weights files, their metadata stated in the table header
  4. open_run_dir     resolved config + manifest; refuse a run dir made by other settings
  5. trainer.test     CertifyModule: per-image certificates stored per process, resumable
  6. report           results.{json,csv,md}, plots/certified_accuracy.png, console, W&B (rank 0)
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from advpure.certify import build_base, check_sigma_covered, score_sigma_range
from advpure.certify.bases import BASES
from advpure.config.compose import fingerprint, to_dict, to_yaml
from advpure.core.errors import CheckpointError, ConfigError
from advpure.core.runtime import redirect_writes_for
from advpure.data import ImageDataModule, get_spec
from advpure.jobs.certify_loop import CertifyModule, unit_key
from advpure.jobs.loggers import build_logger
from advpure.jobs.report import RecordsReport
from advpure.jobs.train import train, train_classifier, weights_path
from advpure.jobs.trainer import build_trainer, launch_rank, resolve_accelerator, say, test_and_read_results
from advpure.nets import load_net_with_meta, load_nets
from advpure.nets.weights import file_sha256, read_weights
from advpure.results.certify_report import radius_key, write_certify_report
from advpure.results.rundir import delete_certificate_units
from advpure.results.rundir import open_run_dir as open_rundir

ADP_KEYS = ("lam", "delta", "tau", "steps")
PAPER = {"n0": 100, "n": 100_000, "alpha": 0.001, "n_images": 500}  # Cohen et al.'s CIFAR-10 protocol


# 1 ------------------------------------------------------------------------------------------------
@dataclass
class CertifyPlan:
    units: list[tuple[str, float]]  # (base, sigma) in table order: bases outer, sigmas inner
    adp: dict = field(default_factory=dict)  # lam, delta, tau, steps of the adp base
    noisy_paths: dict[float, Path] = field(default_factory=dict)  # sigma -> classifier of the noisy base

    @property
    def needs_score(self) -> bool:
        return any(BASES[b].needs_score for b, _ in self.units)


def noisy_classifier_path(cfg: DictConfig, sigma: float) -> Path:
    """The classifier weights the `noisy` base uses at `sigma`: certify.noisy_classifier with `{sigma}`
    replaced (e.g. `classifier_noise{sigma}.pt` -> `classifier_noise0.25.pt`), else classifier.weights."""
    template = cfg.certify.noisy_classifier
    if template is None:
        return weights_path(cfg, "classifier")
    return Path(str(template).replace("{sigma}", f"{float(sigma):g}"))


def plan_units(cfg: DictConfig) -> CertifyPlan:
    """The certification units; every mistake is a one-line ConfigError, raised before any work:
    adp without a kind-adp defense block, a sigma outside the score net's DSM noise levels (read from
    the weights' metadata when the file exists, else from the score config that would train it)."""
    cc = cfg.certify
    units = [(str(b), float(s)) for b in cc.bases for s in cc.sigmas]
    adp = {}
    if "adp" in cc.bases:
        if cfg.defense.kind != "adp":
            raise ConfigError(
                f"certify.bases: 'adp' takes its parameters from the defense block, but defense.kind is "
                f"'{cfg.defense.kind}'; use defense=adp or drop adp"
            )
        adp = {k: cfg.defense[k] for k in ADP_KEYS}
    plan = CertifyPlan(units, adp)
    if plan.needs_score:
        path = Path(cfg.score.weights)
        meta = read_weights(path).get("meta", {}) if path.exists() else None
        lo, hi = score_sigma_range(meta, cfg.score)
        for base, sigma in units:
            if BASES[base].needs_score:
                check_sigma_covered(sigma, lo, hi)
    if "noisy" in cc.bases:
        plan.noisy_paths = {s: noisy_classifier_path(cfg, s) for s in map(float, cc.sigmas)}
    return plan


# 2 ------------------------------------------------------------------------------------------------
def ensure_weights(cfg: DictConfig, plan: CertifyPlan) -> None:
    """Every weights file exists, or is trained now (certify.train_missing): the classifier, the score
    net, and each noisy-base classifier (trained with Gaussian noise of its sigma, classifier.noise_sd,
    Cohen et al. 2019). Otherwise a one-line CheckpointError lists what is missing."""
    from advpure.jobs.benchmark import how_to_get

    stages = ["classifier"] + (["score"] if plan.needs_score else [])
    missing = [s for s in stages if not weights_path(cfg, s).exists()]
    main = weights_path(cfg, "classifier")
    noisy = {s: p for s, p in plan.noisy_paths.items() if p != main and not p.exists()}
    if not missing and not noisy:
        return
    external = cfg.classifier.source == "robustbench" and "classifier" in missing
    if not cfg.certify.train_missing or external:
        what = [how_to_get(cfg, s) for s in missing]
        what += [
            f"{p}: train it with classifier.noise_sd={s:g} (certify.train_missing=true)"
            for s, p in noisy.items()
        ]
        raise CheckpointError(f"missing weights ({len(what)}): " + "; ".join(what))
    if missing:
        say(f"training what is missing: {', '.join(missing)}")
        train(cfg, stages=tuple(missing))
    for sigma, path in noisy.items():
        say(f"training the noisy base's classifier with Gaussian noise sd {sigma:g} -> {path}")
        train_classifier(noise_config(cfg, sigma, path))


def noise_config(cfg: DictConfig, sigma: float, path: Path) -> DictConfig:
    """The training config of a classifier with Gaussian-noise augmentation at `sigma`, exported to
    `path` (its checkpoints under runs/train/<experiment>-noise<sigma>/)."""
    c = copy.deepcopy(cfg)
    c.classifier.noise_sd = float(sigma)
    c.classifier.weights = str(path)
    c.experiment = f"{cfg.experiment}-noise{float(sigma):g}"
    return c


# 3 ------------------------------------------------------------------------------------------------
def classifier_meta(path: Path) -> dict:
    try:
        return dict(read_weights(path).get("meta", {}))
    except CheckpointError:
        return {}


def describe_classifier(path: Path, meta: dict) -> str:
    sd = float(meta.get("noise_sd", 0.0) or 0.0)
    trained = f"trained with Gaussian noise sd {sd:g}" if sd > 0 else "not noise-trained (noise_sd 0)"
    return f"{path}, {trained}"


def build_bases(cfg: DictConfig, plan: CertifyPlan, spec, classifier, score) -> tuple[dict, dict, list[str]]:
    """({(base, sigma): module}, {unit key: weights hashes}, header lines naming each base's nets)."""
    main_path = weights_path(cfg, "classifier")
    main_meta = classifier_meta(main_path) if cfg.classifier.source != "robustbench" else {}
    hashes = {"classifier": file_sha256(main_path)[:16]}
    score_range = None
    lines = []
    if plan.needs_score:
        score_meta = read_weights(cfg.score.weights).get("meta", {})
        score_range = score_sigma_range(score_meta, cfg.score)
        hashes["score"] = file_sha256(cfg.score.weights)[:16]
    noisy_nets: dict[Path, tuple] = {}
    for path in plan.noisy_paths.values():
        if path == main_path:
            noisy_nets[path] = (classifier, main_meta, hashes["classifier"])
        elif path not in noisy_nets:
            net, arch, meta = load_net_with_meta(path, "classifier")
            want = (spec.channels, spec.image_size, spec.num_classes)
            have = (arch.get("in_channels"), arch.get("image_size"), arch.get("num_classes"))
            if have != want:
                raise CheckpointError(
                    f"{path}: a classifier of (channels, size, classes) {have}, the data needs {want}"
                )
            noisy_nets[path] = (net, meta, file_sha256(path)[:16])
    bases, unit_weights = {}, {}
    for name, sigma in plan.units:
        if name == "noisy":
            net, meta, digest = noisy_nets[plan.noisy_paths[sigma]]
            bases[(name, sigma)] = build_base(name, net, sigma)
            unit_weights[unit_key(name, sigma)] = {"classifier": digest}
        else:
            params = plan.adp if name == "adp" else {}
            bases[(name, sigma)] = build_base(
                name, classifier, sigma, score_net=score, score_range=score_range, **params
            )
            unit_weights[unit_key(name, sigma)] = {
                "classifier": hashes["classifier"],
                "score": hashes["score"],
            }
    c = cfg.classifier.arch
    if "noisy" in cfg.certify.bases:
        paths = dict.fromkeys(plan.noisy_paths.values())
        desc = "; ".join(
            f"σ={', '.join(f'{s:g}' for s, p in plan.noisy_paths.items() if p == path)}: "
            f"{describe_classifier(path, noisy_nets[path][1])}"
            for path in paths
        )
        lines.append(f"noisy = the bare classifier on x + σn (Cohen et al. 2019), {c}: {desc}")
    clf = describe_classifier(main_path, main_meta)
    if plan.needs_score:
        lo, hi = score_range
        den = f"score net {cfg.score.weights} (NCSNv2 ngf {cfg.score.ngf}, DSM noise levels [{lo:g}, {hi:g}])"
        if "denoised" in cfg.certify.bases:
            lines.append(
                f"denoised = one-step Tweedie denoiser clip(x~ + σ f(x~)) with the {den}, then the classifier "
                f"{c} {clf} (Salman et al. 2020; Carlini et al. 2023)"
            )
        if "adp" in cfg.certify.bases:
            a = plan.adp
            lines.append(
                f"adp = ADP's adaptive deterministic updates from x~ (T={a['steps']}, λ={a['lam']:g}, "
                f"δ={a['delta']:g}, τ={a['tau']:g}; Yoon et al. 2021) with the same score net, then the classifier {c}"
            )
    return bases, unit_weights, lines


# 4 ------------------------------------------------------------------------------------------------
def base_fingerprint(cfg: DictConfig) -> str:
    """What every certificate depends on: the data, the noise key (seed, block, device type: CPU and
    CUDA generators differ), the CERTIFY constants and the precision the base classifiers run in."""
    cc = cfg.certify
    return fingerprint(
        {
            "data": cfg.data.name,
            "seed": cfg.seed,
            "block": cc.block,
            "n0": cc.n0,
            "n": cc.n,
            "alpha": cc.alpha,
            "device": resolve_accelerator(cfg.trainer.accelerator),
            "precision": cfg.trainer.precision,
        }
    )


def unit_fingerprints(plan: CertifyPlan, unit_weights: dict) -> dict[str, str]:
    """Per (base, sigma): its parameters and the hashes of the weights it uses."""
    out = {}
    for name, sigma in plan.units:
        key = unit_key(name, sigma)
        params = plan.adp if name == "adp" else {}
        out[key] = fingerprint({"base": name, "sigma": sigma, "params": params, "weights": unit_weights[key]})
    return out


def open_run_dir(cfg: DictConfig, units: dict[str, str]) -> Path:
    """Create or reopen the run dir (`advpure.results.rundir.open_run_dir`): refused, changing
    nothing, when some of its certificates were made by other settings, unless certify.overwrite=true,
    which deletes those units only (all of them when the base settings changed). certify.resume=false
    starts over."""
    cc = cfg.certify
    return open_rundir(
        cc.run_dir,
        {"base": base_fingerprint(cfg), "units": units},
        config_yaml=to_yaml(cfg),
        section="certify",
        things="certificates",
        base_what="data, seed, block, n0, n, alpha, device or precision",
        delete=lambda run_dir, keys: delete_certificate_units(
            run_dir, [(k.rsplit("/s", 1)[0], float(k.rsplit("/s", 1)[1])) for k in keys]
        ),
        resume=cc.resume,
        overwrite=cc.overwrite,
        rank=launch_rank(),
    )


def header_lines(cfg: DictConfig, indices: list[int], base_lines: list[str], max_batch: int) -> list[str]:
    """The settings stated above the results table: the images, CERTIFY's constants, each base's nets
    (which classifier, whether it was noise-trained), and what is smaller than the paper's protocol."""
    cc = cfg.certify
    if cc.skip > 1:
        shown = ", ".join(str(i) for i in indices[:2]) + (", …" if len(indices) > 2 else "")
        which = (
            f"one in every {cc.skip}: indices {shown}, {indices[-1]}"
            if len(indices) > 2
            else f"indices {shown}"
        )
    else:
        which = f"the first {len(indices)}"
    lines = [
        f"{cfg.data.name}: {len(indices)} test images ({which}); "
        f"experiment `{cfg.experiment}`; seed {cfg.seed}; {resolve_accelerator(cfg.trainer.accelerator)}, "
        f"{cfg.trainer.precision}",
        f"CERTIFY (Cohen et al. 2019): n0 = {cc.n0:,} selection draws, n = {cc.n:,} estimation draws, "
        f"α = {cc.alpha:g} (one-sided Clopper-Pearson p_A; abstain when p_A < 1/2; radius σ Φ⁻¹(p_A)); "
        f"σ ∈ {{{', '.join(f'{s:g}' for s in cc.sigmas)}}}; noise keyed per image in blocks of {cc.block} rows; "
        f"{max_batch} rows per forward",
        *base_lines,
    ]
    small = [f"{k} = {cc[k]:,}" for k in ("n0", "n", "n_images") if cc[k] < PAPER[k]]
    if cc.alpha > PAPER["alpha"]:
        small.append(f"α = {cc.alpha:g}")
    if small or cfg.data.name != "cifar10":
        lines.append(
            "smaller than Cohen et al.'s CIFAR-10 protocol (N = 100,000, n0 = 100, α = 0.001, 500 images)"
            + (f": {', '.join(small)}" if small else f" in dataset ({cfg.data.name})")
            + "; see experiments/cifar10_certify.yaml"
        )
    return lines


# 6 ------------------------------------------------------------------------------------------------
class CertifyReportCallback(RecordsReport):
    """When the test loop ends, rank 0 turns all processes' certificates into the results files and
    the plot, prints the table and sends the same numbers, the table and the plot to W&B."""

    def __init__(self, run_dir, *, indices, units, radii, header_lines, meta):
        super().__init__(run_dir)
        self.indices, self.units, self.radii = indices, units, radii
        self.header_lines, self.meta = header_lines, meta
        self.t0 = time.perf_counter()

    def write(self, trainer, pl_module) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return write_certify_report(
            self.run_dir,
            indices=self.indices,
            units=self.units,
            radii=self.radii,
            header_lines=self.header_lines,
            meta={
                **self.meta,
                "wall_seconds_rank0": time.perf_counter() - self.t0,
                "cpu_seconds_rank0": usage.ru_utime + usage.ru_stime,
                "computed_rank0": pl_module.computed,
            },
        )

    def wandb_table(self, wandb):
        rcols = [radius_key(r) for r in self.radii]
        columns = [
            "base",
            "sigma",
            *rcols,
            "abstain",
            "natural_predict",
            "acr",
            "n",
            "images_per_s",
            "overhead",
        ]
        data = [[r.get(c) for c in columns] for r in self.report["rows"]]
        return "certify/results", wandb.Table(columns=columns, data=data)


# the command ---------------------------------------------------------------------------------------
def test_indices(cfg: DictConfig, test_size: int) -> list[int]:
    """Dataset indices of the certified test images: every `skip`-th, the first `n_images` of them."""
    cc = cfg.certify
    indices = list(range(0, test_size, cc.skip))
    if cc.n_images > len(indices):
        raise ConfigError(
            f"certify.n_images={cc.n_images}: the {cfg.data.name} test set has only {len(indices)} images "
            f"at certify.skip={cc.skip}"
        )
    return indices[: cc.n_images]


def certify(cfg: DictConfig) -> dict | None:
    """Run `advpure certify` for the resolved config; returns results.json's content (rank 0)."""
    redirect_writes_for(cfg)  # library caches and temp files under paths.cache
    t0 = time.perf_counter()
    cc = cfg.certify
    plan = plan_units(cfg)
    spec = get_spec(cfg.data.name)
    indices = test_indices(cfg, spec.test_size) if spec.test_size else None  # checked before any work
    ensure_weights(cfg, plan)
    spec, classifier, score = load_nets(cfg, score=plan.needs_score)
    bases, unit_weights, base_lines = build_bases(cfg, plan, spec, classifier, score)
    max_batch = int(cc.max_batch if cc.max_batch is not None else cfg.defense.max_batch)
    dm = ImageDataModule(cfg.data, cfg.paths, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("test")
    if indices is None:
        indices = test_indices(cfg, len(dm.test_x))
    run_dir = open_run_dir(cfg, unit_fingerprints(plan, unit_weights))
    dm.test_n, dm.test_batch_size, dm.test_stride = len(indices), cc.batch_size, cc.skip
    module = CertifyModule(
        bases,
        run_dir=str(run_dir),
        seed=cfg.seed,
        num_classes=spec.num_classes,
        n0=cc.n0,
        n=cc.n,
        alpha=cc.alpha,
        max_batch=max_batch,
        block=cc.block,
        measure_limit=cc.measure_limit,
        progress=cfg.trainer.enable_progress_bar,
    )
    header = header_lines(cfg, indices, base_lines, max_batch)
    report = CertifyReportCallback(
        run_dir,
        indices=indices,
        units=plan.units,
        radii=[float(r) for r in cc.radii],
        header_lines=header,
        meta={"config": to_dict(cfg), "indices": indices},
    )
    trainer = build_trainer(
        cfg,
        logger=build_logger(cfg, "certify", run_dir),
        callbacks=[report],
        default_root_dir=str(run_dir),
        enable_progress_bar=False,  # CertifyModule's own bar counts images x units
    )
    say(
        f"certify: {len(plan.units)} (base, sigma) unit(s) x {len(indices)} images, n0={cc.n0}, n={cc.n}, "
        f"alpha={cc.alpha:g} -> {run_dir}"
    )
    return test_and_read_results(trainer, module, dm, run_dir, "certify", t0)
