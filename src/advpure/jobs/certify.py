"""`advpure certify`: certified l2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019)
of the classifier with each base classifier (noisy | denoised | adp | diffusion) at each sigma.

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
from advpure.data import ImageDataModule
from advpure.jobs.artifacts import Artifacts, load_file
from advpure.jobs.certify_loop import CertifyModule, unit_key
from advpure.jobs.loggers import LoggerSpec, build_logger
from advpure.jobs.report import RecordsReport
from advpure.jobs.stages import Stages
from advpure.jobs.trainer import build_trainer, launch_rank, resolve_accelerator, say, test_and_read_results
from advpure.nets.weights import file_sha256, read_weights
from advpure.results.certify_report import radius_key, write_certify_report
from advpure.results.rundir import delete_certificate_units
from advpure.results.rundir import open_run_dir as open_rundir

PAPER = {"n0": 100, "n": 100_000, "alpha": 0.001, "n_images": 500}  # Cohen et al.'s CIFAR-10 protocol


# 1 ------------------------------------------------------------------------------------------------
@dataclass
class CertifyPlan:
    units: list[tuple[str, float]]  # (base, sigma) in table order: bases outer, sigmas inner
    adp: dict = field(default_factory=dict)  # lam, delta, tau, steps of the adp base
    noisy_paths: dict[float, Path] = field(default_factory=dict)  # sigma -> classifier of the noisy base
    options: dict = field(default_factory=dict)  # certify settings the bases read (diffusion_net)

    @property
    def nets(self) -> list[str]:
        """The network kinds the bases need besides the classifier, in first-use order."""
        return list(dict.fromkeys(k for b, _ in self.units for k in self.slots(b).values()))

    def slots(self, base: str) -> dict[str, str]:
        """{slot: network kind} of base `base` under this plan's options."""
        return BASES.get(base).nets(self.options)

    def params(self, base: str) -> dict:
        """What a (base, sigma) unit depends on besides sigma and weights: ADP's parameters, the
        diffusion base's net kind."""
        if base == "adp":
            return self.adp
        return {"diffusion_net": self.options["diffusion_net"]} if base == "diffusion" else {}


def noisy_classifier_path(template: str | None, main: Path, sigma: float) -> Path:
    """The classifier weights the `noisy` base uses at `sigma`: certify.noisy_classifier (`template`)
    with `{sigma}` replaced (e.g. `classifier_noise{sigma}.pt` -> `classifier_noise0.25.pt`), else
    the main classifier's file `main`."""
    if template is None:
        return main
    return Path(str(template).replace("{sigma}", f"{float(sigma):g}"))


def plan_units(cfg: DictConfig, artifacts: Artifacts) -> CertifyPlan:
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
        adp = {k: cfg.defense[k] for k in BASES.get("adp").params}
    plan = CertifyPlan(units, adp, options={"diffusion_net": str(cc.diffusion_net)})
    if "score" in plan.nets:
        path = artifacts.path("score")
        meta = read_weights(path).get("meta", {}) if path.exists() else None
        lo, hi = score_sigma_range(meta, artifacts.blocks["score"])
        for base, sigma in units:
            if "field" in plan.slots(base):
                check_sigma_covered(sigma, lo, hi)
    if "noisy" in cc.bases:
        main = artifacts.path("classifier")
        plan.noisy_paths = {
            s: noisy_classifier_path(cc.noisy_classifier, main, s) for s in map(float, cc.sigmas)
        }
    return plan


# 2 ------------------------------------------------------------------------------------------------
def ensure_weights(stages: Stages, plan: CertifyPlan, train_missing: bool) -> None:
    """Every weights file exists, or is trained now (certify.train_missing): the classifier, the nets
    of the bases, and each noisy-base classifier (trained with Gaussian noise of its sigma,
    classifier.noise_sd, Cohen et al. 2019; checkpoints under runs/train/<experiment>/classifier-noise<sigma>/).
    Otherwise a one-line CheckpointError lists what is missing."""
    artifacts = stages.artifacts
    main = artifacts.path("classifier")
    noisy = {s: p for s, p in plan.noisy_paths.items() if p != main and not p.exists()}
    kinds = ["classifier", *plan.nets]
    if noisy and not train_missing:
        what = [artifacts.how_to_get(k) for k in artifacts.missing(kinds)]
        what += [
            f"{p}: train it with classifier.noise_sd={s:g} (certify.train_missing=true)"
            for s, p in noisy.items()
        ]
        raise CheckpointError(f"missing weights ({len(what)}): " + "; ".join(what))
    stages.ensure(kinds, train_missing=train_missing)
    for sigma, path in noisy.items():
        say(f"training the noisy base's classifier with Gaussian noise sd {sigma:g} -> {path}")
        block = copy.deepcopy(artifacts.blocks["classifier"])
        block.noise_sd = float(sigma)
        stages.stage(
            "classifier", block=block, weights=path, run_name=f"classifier-noise{float(sigma):g}"
        ).run()


# 3 ------------------------------------------------------------------------------------------------
def describe_classifier(path: Path, meta: dict) -> str:
    sd = float(meta.get("noise_sd", 0.0) or 0.0)
    trained = f"trained with Gaussian noise sd {sd:g}" if sd > 0 else "not noise-trained (noise_sd 0)"
    return f"{path}, {trained}"


def build_bases(plan: CertifyPlan, artifacts: Artifacts) -> tuple[dict, dict, list[str]]:
    """({(base, sigma): module}, {unit key: weights hashes}, header lines naming each base's nets)."""
    spec, blocks = artifacts.spec, artifacts.blocks
    classifier, main_meta = artifacts.load("classifier")
    main_path = artifacts.path("classifier")
    hashes = {"classifier": artifacts.sha("classifier")}
    nets = artifacts.nets(plan.nets)
    hashes.update({k: artifacts.sha(k) for k in plan.nets})
    score_range = None
    lines = []
    if "score" in plan.nets:
        score_range = score_sigma_range(artifacts.load("score")[1], blocks["score"])
    noisy_nets: dict[Path, tuple] = {}
    for path in plan.noisy_paths.values():
        if path == main_path:
            noisy_nets[path] = (classifier, main_meta, hashes["classifier"])
        elif path not in noisy_nets:
            net, arch, meta = load_file(path, "classifier")
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
            slots = plan.slots(name)
            params = plan.adp if name == "adp" else {}
            by_slot = {slot: nets[kind] for slot, kind in slots.items()}
            bases[(name, sigma)] = build_base(
                name, classifier, sigma, nets=by_slot, score_range=score_range, options=plan.options, **params
            )
            unit_weights[unit_key(name, sigma)] = {
                "classifier": hashes["classifier"],
                **{kind: hashes[kind] for kind in slots.values()},
            }
    c = blocks["classifier"].arch
    names = {b for b, _ in plan.units}
    if "noisy" in names:
        paths = dict.fromkeys(plan.noisy_paths.values())
        desc = "; ".join(
            f"σ={', '.join(f'{s:g}' for s, p in plan.noisy_paths.items() if p == path)}: "
            f"{describe_classifier(path, noisy_nets[path][1])}"
            for path in paths
        )
        lines.append(f"noisy = the bare classifier on x + σn (Cohen et al. 2019), {c}: {desc}")
    clf = describe_classifier(main_path, main_meta if blocks["classifier"].source != "robustbench" else {})
    if "score" in plan.nets:
        lo, hi = score_range
        den = (
            f"score net {artifacts.path('score')} (NCSNv2 ngf {blocks['score'].ngf}, DSM noise levels "
            f"[{lo:g}, {hi:g}])"
        )
        if "denoised" in names:
            lines.append(
                f"denoised = one-step Tweedie denoiser clip(x~ + σ f(x~)) with the {den}, then the classifier "
                f"{c} {clf} (Salman et al. 2020; Carlini et al. 2023)"
            )
        if "adp" in names:
            a = plan.adp
            lines.append(
                f"adp = ADP's adaptive deterministic updates from x~ (T={a['steps']}, λ={a['lam']:g}, "
                f"δ={a['delta']:g}, τ={a['tau']:g}; Yoon et al. 2021) with the same score net, then the classifier {c}"
            )
    if "diffusion" in names:
        kind = plan.options["diffusion_net"]
        steps = ", ".join(
            f"σ={s:g}: t={bases[(b, s)].t:.4g}, ᾱ={bases[(b, s)].alpha_bar:.4g}"
            for b, s in plan.units
            if b == "diffusion"
        )
        lines.append(
            f"diffusion = one-shot denoising x̂0 of x~ scaled into diffusion space at the step with "
            f"√((1−ᾱ)/ᾱ) ≥ 2σ ({steps}) by the eps net `{kind}` {artifacts.path(kind)} (Carlini et al. 2023), "
            f"then the classifier {c}"
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
        params = plan.params(name)
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
            + "; see conf/experiment/cifar10_certify.yaml"
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
    t0 = time.perf_counter()
    cc = cfg.certify
    stages = Stages.from_config(cfg)
    artifacts = stages.artifacts
    plan = plan_units(cfg, artifacts)
    spec = artifacts.spec
    indices = test_indices(cfg, spec.test_size) if spec.test_size else None  # checked before any work
    ensure_weights(stages, plan, cc.train_missing)
    bases, unit_weights, base_lines = build_bases(plan, artifacts)
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
        cfg.trainer,
        logger=build_logger(LoggerSpec.from_config(cfg), "certify", run_dir),
        callbacks=[report],
        default_root_dir=str(run_dir),
        enable_progress_bar=False,  # CertifyModule's own bar counts images x units
    )
    say(
        f"certify: {len(plan.units)} (base, sigma) unit(s) x {len(indices)} images, n0={cc.n0}, n={cc.n}, "
        f"alpha={cc.alpha:g} -> {run_dir}"
    )
    return test_and_read_results(trainer, module, dm, run_dir, "certify", t0)
