"""`advpure train`: the classifier, then the score model (and, when `train.stages` names it, the
maximum-likelihood EBM). Each stage is skipped when its exported weights exist (train.force=true
retrains), resumes from its last step checkpoint when one is there, and ends by exporting weights
that later stages load with `weights_only=True`.

    runs/train/<experiment>/<stage>/checkpoints/last.ckpt   Lightning checkpoints (resume)
    runs/train/<experiment>/<stage>/stage.json              the config they were made from
    runs/train/<experiment>/ebm/samples/*.png               MCMC sample grids of the EBM stage
    artifacts/<dataset>/{classifier,score,ebm}.pt           exported weights (EMA for the score net)
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig

from advpure.config.compose import fingerprint, to_dict
from advpure.core.errors import CheckpointError, ConfigError, RunDirError
from advpure.core.rng import mix, stream_id
from advpure.core.runtime import redirect_writes_for
from advpure.core.safe_load import check_torch_file, describe_load_error
from advpure.data import ImageDataModule
from advpure.jobs.loggers import build_logger
from advpure.jobs.trainer import build_trainer, launch_rank, say
from advpure.nets.ebm import estimate_field_scale
from advpure.nets.factory import classifier_arch, score_arch
from advpure.nets.weights import save_weights
from advpure.training.classifier import ClassifierModule
from advpure.training.ebm import EBMModule, ebm_arch
from advpure.training.score import ScoreModule

STAGES = ("classifier", "score", "ebm")


def weights_path(cfg: DictConfig, stage: str) -> Path:
    """The weights file a stage writes and later stages read (a RobustBench classifier's zoo file)."""
    if stage == "classifier" and cfg.classifier.source == "robustbench":
        from advpure.importers.robustbench import robustbench_path

        c = cfg.classifier
        return Path(robustbench_path(c.robustbench_name, cfg.data.name, c.threat_model, cfg.paths.models))
    return Path(
        {"classifier": cfg.classifier.weights, "score": cfg.score.weights, "ebm": cfg.ebm.weights}[stage]
    )


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg.paths.runs) / "train" / cfg.experiment / stage


def _classifier_fields(cfg: DictConfig) -> dict:
    """The classifier block; `noise_sd` only when set, so runs made before the field existed resume."""
    net = to_dict(cfg.classifier)
    if not net.get("noise_sd"):
        net.pop("noise_sd", None)
    return net


def stage_fingerprint(cfg: DictConfig, stage: str) -> str:
    """What a stage's checkpoints depend on; schedule lengths of the score net may grow on resume."""
    data = {
        k: cfg.data[k] for k in ("name", "val_size", "split_seed", "train_subset", "crop_padding", "hflip")
    }
    if stage == "classifier":
        return fingerprint(
            {
                "data": data,
                "batch": cfg.data.batch_size,
                "net": _classifier_fields(cfg),
                "epochs": cfg.trainer.max_epochs,
                "seed": cfg.seed,
            }
        )
    if stage == "ebm":
        # a run may be extended (max_steps) or logged differently; the field scale is set at export
        ebm = {
            k: v
            for k, v in to_dict(cfg.ebm).items()
            if k
            not in (
                "max_steps",
                "ckpt_every_n_steps",
                "sample_every_n_steps",
                "energy_bound",
                "scale_sigma",
                "scale_images",
                "weights",
            )
        }
        return fingerprint({"data": data, "net": ebm, "seed": cfg.seed})
    score = {
        k: v
        for k, v in to_dict(cfg.score).items()
        if k not in ("max_steps", "ckpt_every_n_steps", "val_every_n_steps", "val_batches", "weights")
    }
    return fingerprint({"data": data, "net": score, "seed": cfg.seed})


def prepare_stage_dir(cfg: DictConfig, stage: str) -> Path | None:
    """Create the stage dir; return the checkpoint to resume from, if any. Refuse to resume from
    checkpoints made by another config (train.force=true starts over)."""
    run_dir = stage_dir(cfg, stage)
    manifest = run_dir / "stage.json"
    fp = stage_fingerprint(cfg, stage)
    if cfg.train.force and run_dir.exists():
        shutil.rmtree(run_dir)
    if manifest.exists():
        stored = json.loads(manifest.read_text()).get("fingerprint")
        if stored != fp:
            raise RunDirError(
                f"{run_dir} holds {stage} checkpoints of another config; pass train.force=true to start over "
                f"or set paths.runs elsewhere"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    if launch_rank() == 0:
        manifest.write_text(json.dumps({"fingerprint": fp, "stage": stage, "experiment": cfg.experiment}))
    # SIGUSR1 under SLURM saves hpc_ckpt_N.ckpt (newer than the last step checkpoint): resume from
    # whichever is newest
    found = [
        p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def drop_hpc_checkpoints(run_dir: Path) -> None:
    """After a finished fit: a leftover SLURM hpc checkpoint would be loaded by the next
    `trainer.test` in place of the trained weights (Lightning prefers it under SLURM)."""
    if launch_rank() == 0:
        for p in run_dir.glob("hpc_ckpt_*.ckpt"):
            p.unlink()
    if dist.is_initialized():
        dist.barrier()


RESUME_ADVICE = "delete it to train this stage from the start (or pass train.force=true)"


def fit(trainer: L.Trainer, module: L.LightningModule, dm, resume: Path | None) -> None:
    """``trainer.fit`` resuming from `resume` (weights_only=True) once it is known to be a complete
    PyTorch file: a truncated, HTML or code-carrying checkpoint is a one-line CheckpointError, not
    Lightning's traceback."""
    if resume is not None:
        check_torch_file(resume, what="resume checkpoint", advice=RESUME_ADVICE)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    except pickle.UnpicklingError as e:  # only a checkpoint load unpickles inside fit
        if resume is None:
            raise
        raise CheckpointError(
            f"{describe_load_error(resume, e, 'resume checkpoint')}; {RESUME_ADVICE}"
        ) from None


class MidEpochResume(Callback):
    """Lightning restarts a resumed epoch's loader from its first batch; skip those already trained."""

    def on_train_start(self, trainer, pl_module):
        done = trainer.global_step - trainer.current_epoch * trainer.num_training_batches
        dm = trainer.datamodule
        if done > 0 and hasattr(dm, "resume_mid_epoch"):
            dm.resume_mid_epoch(done)


class Throughput(Callback):
    """Training images per second of each epoch (data loading included): `train/images_per_s`."""

    def on_train_start(self, trainer, pl_module):  # a resumed epoch gets no on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._t, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += batch[0].shape[0] * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module):
        rate = self._n / max(time.perf_counter() - self._t, 1e-9)
        pl_module.log("train/images_per_s", rate, rank_zero_only=True)
        pl_module.images_per_s = rate


class LastGoodCheckpoint(Callback):
    """Tells the module which checkpoint to name if its loss turns NaN/Inf."""

    def __init__(self, ckpt: ModelCheckpoint):
        self.ckpt = ckpt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.last_good_ckpt = self.ckpt.best_model_path or self.ckpt.last_model_path or None


def _export(cfg, stage, arch, net, meta) -> None:
    path = weights_path(cfg, stage)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_weights(path, stage, arch, net, meta)
        say(f"{stage}: exported weights to {path}")
    if dist.is_initialized():
        dist.barrier()  # other ranks load these weights next


def train_classifier(cfg: DictConfig) -> dict:
    """Train the classifier (`advpure.training.classifier.ClassifierModule`) for trainer.max_epochs on
    [0, 1] images (Gaussian noise augmentation at classifier.noise_sd when > 0), resuming from the
    stage's last.ckpt; exports kind "classifier" weights. Returns their meta (test_acc in [0, 1],
    seconds, images_per_s, ...)."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    dm = ImageDataModule(cfg.data, cfg.paths, seed=cfg.seed)
    arch = classifier_arch(cfg, dm.spec)
    module = ClassifierModule(
        arch,
        dm.spec,
        to_dict(cfg.classifier.optim),
        cfg.classifier.dropout,
        cfg.classifier.label_smoothing,
        noise_sd=cfg.classifier.noise_sd,
    )
    resume = prepare_stage_dir(cfg, "classifier")
    run_dir = stage_dir(cfg, "classifier")
    ckpt = _checkpoints(run_dir, filename="epoch{epoch:03d}", every_n_epochs=1)
    trainer = build_trainer(
        cfg,
        max_epochs=cfg.trainer.max_epochs,
        logger=build_logger(cfg, "classifier", run_dir),
        callbacks=[ckpt, MidEpochResume(), Throughput()],
        default_root_dir=str(run_dir),
        gradient_clip_val=cfg.classifier.optim.grad_clip,
    )
    say(
        f"classifier: training {arch['arch']} on {cfg.data.name} for {cfg.trainer.max_epochs} epochs"
        + (f" (resuming from {resume})" if resume else "")
    )
    fit(trainer, module, dm, resume)
    drop_hpc_checkpoints(run_dir)
    test = trainer.test(module, datamodule=dm, verbose=False)
    acc = float(test[0]["test/acc"]) if test else float("nan")
    seconds = time.perf_counter() - t0
    meta = {
        "test_acc": acc,
        "epochs": int(trainer.current_epoch),
        "seconds": seconds,
        "dataset": cfg.data.name,
        "images_per_s": float(getattr(module, "images_per_s", float("nan"))),
        "noise_sd": float(cfg.classifier.noise_sd),  # Gaussian training noise (randomized smoothing)
    }
    _export(cfg, "classifier", arch, module.net, meta)
    say(
        f"classifier: test accuracy {100 * acc:.2f}% after {seconds:.0f} s "
        f"({meta['images_per_s']:.0f} training images/s)"
    )
    _finish(trainer)
    return meta


def _checkpoints(run_dir: Path, **every) -> ModelCheckpoint:
    """`last.ckpt` plus the newest numbered checkpoint under `run_dir/checkpoints` (resume reads them)."""
    return ModelCheckpoint(
        dirpath=run_dir / "checkpoints", save_last=True, save_top_k=1, auto_insert_metric_name=False, **every
    )


def step_checkpoints(run_dir: Path, every_n_steps: int) -> ModelCheckpoint:
    """A checkpoint every `every_n_steps` training steps, named `step<7 digits>.ckpt`."""
    return _checkpoints(run_dir, filename="step{step:07d}", every_n_train_steps=every_n_steps)


def _step_trainer(cfg: DictConfig, stage: str, run_dir: Path, ckpt: ModelCheckpoint, **options):
    """A Trainer for a step-counted stage (score, ebm): its logger, `ckpt`, mid-epoch resume, the
    last-good-checkpoint guard and the throughput meter; `options` (max_steps, ...) go to Lightning."""
    return build_trainer(
        cfg,
        max_epochs=-1,
        num_sanity_val_steps=0,
        logger=build_logger(cfg, stage, run_dir),
        callbacks=[ckpt, MidEpochResume(), LastGoodCheckpoint(ckpt), Throughput()],
        default_root_dir=str(run_dir),
        **options,
    )


def train_score(cfg: DictConfig) -> dict:
    """Train the score net by DSM (`advpure.training.score.ScoreModule`) for score.max_steps steps,
    resuming from the stage's last.ckpt; exports the EMA weights as kind "score" with the DSM noise
    levels (dsm_sigma_min/max, dsm_levels) in meta. Returns the meta."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    sc = cfg.score
    dm = ImageDataModule(
        cfg.data, cfg.paths, seed=cfg.seed, batch_size=sc.batch_size, crop_padding=0, hflip=sc.hflip
    )
    # validation uses the first val_batches batches of the split, whatever the number of ranks
    dm.val_n = sc.val_batches * cfg.data.eval_batch_size
    arch = score_arch(cfg, dm.spec)
    module = ScoreModule(
        arch,
        dsm_sigma_max=sc.dsm_sigma_max,
        dsm_sigma_min=sc.dsm_sigma_min,
        dsm_levels=sc.dsm_levels,
        dsm_sigma_fixed=sc.dsm_sigma_fixed,
        lr=sc.lr,
        beta1=sc.beta1,
        weight_decay=sc.weight_decay,
        ema_decay=sc.ema_decay,
        seed=cfg.seed,
        val_batches=sc.val_batches,
        log_images=cfg.logger.log_images,
    )
    resume = prepare_stage_dir(cfg, "score")
    run_dir = stage_dir(cfg, "score")
    ckpt = step_checkpoints(run_dir, sc.ckpt_every_n_steps)
    trainer = _step_trainer(
        cfg,
        "score",
        run_dir,
        ckpt,
        max_steps=sc.max_steps,
        gradient_clip_val=sc.grad_clip,
        val_check_interval=sc.val_every_n_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=sc.val_batches,
    )
    say(
        f"score: training NCSNv2 (ngf {sc.ngf}) by DSM for {sc.max_steps} steps"
        + (f" (resuming from {resume})" if resume else "")
    )
    fit(trainer, module, dm, resume)
    drop_hpc_checkpoints(run_dir)
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    meta = {
        "steps": int(trainer.global_step),
        "seconds": seconds,
        "dataset": cfg.data.name,
        # the DSM noise range: certification checks that its smoothing sigma lies inside it
        "dsm_sigma_min": float(module.sigmas.min()),
        "dsm_sigma_max": float(module.sigmas.max()),
        **metrics,
    }
    _export(cfg, "score", arch, module.ema.shadow, meta)
    gain = metrics.get("val/psnr_gain_s0.25")
    say(
        f"score: {trainer.global_step} steps in {seconds:.0f} s; one-step denoising PSNR gain at sigma 0.25: "
        + (f"{gain:+.2f} dB" if gain is not None else "n/a")
    )
    _finish(trainer)
    return meta


def field_scale_of(cfg: DictConfig, dm: ImageDataModule, net) -> dict:
    """The EBM field's fixed rescaling (`advpure.nets.ebm.estimate_field_scale`) on the first
    `ebm.scale_images` training images screened at `ebm.scale_sigma`, with noise keyed by the seed."""
    e = cfg.ebm
    dm.setup()
    x = dm.train_x[dm.train_indices[: e.scale_images]].float() / 255
    gen = torch.Generator().manual_seed(mix(cfg.seed, stream_id("ebm/field_scale")))
    noise = torch.randn(x.shape, generator=gen)
    return estimate_field_scale(net, x, e.scale_sigma, noise)


def train_ebm(cfg: DictConfig) -> dict:
    """Maximum-likelihood EBM (`advpure.training.ebm.EBMModule`); exports kind "ebm" weights whose meta
    holds the field scale ("field_scale") and the training sampler's settings."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    e = cfg.ebm
    dm = ImageDataModule(
        cfg.data, cfg.paths, seed=cfg.seed, batch_size=e.batch_size, crop_padding=0, hflip=False
    )
    arch = ebm_arch(cfg, dm.spec)
    resume = prepare_stage_dir(cfg, "ebm")
    run_dir = stage_dir(cfg, "ebm")
    module = EBMModule(
        arch,
        lr=e.lr,
        beta1=e.beta1,
        beta2=e.beta2,
        weight_decay=e.weight_decay,
        l2=e.l2,
        mcmc_steps=e.mcmc_steps,
        step_size=e.step_size,
        noise_std=e.noise_std,
        data_noise=e.data_noise,
        buffer_size=e.buffer_size,
        reinit_prob=e.reinit_prob,
        init=e.init,
        clamp=e.clamp,
        energy_bound=e.energy_bound,
        seed=cfg.seed,
        sample_every_n_steps=e.sample_every_n_steps,
        log_images=cfg.logger.log_images,
        sample_dir=str(run_dir / "samples"),
    )
    ckpt = step_checkpoints(run_dir, e.ckpt_every_n_steps)
    trainer = _step_trainer(
        cfg, "ebm", run_dir, ckpt, max_steps=e.max_steps, gradient_clip_val=e.grad_clip, limit_val_batches=0
    )
    say(
        f"ebm: training a {e.arch} EBM (nf {e.nf}, {e.activation}) by maximum likelihood with "
        f"{e.mcmc_steps}-step persistent Langevin chains for {e.max_steps} steps"
        + (f" (resuming from {resume})" if resume else "")
    )
    with warnings.catch_warnings():  # the datamodule serves a val split the EBM stage does not use
        warnings.filterwarnings("ignore", message=".*val_dataloader.*validation_step.*")
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    drop_hpc_checkpoints(run_dir)
    net = module.net.cpu().eval()
    scale = field_scale_of(cfg, dm, net)
    seconds = time.perf_counter() - t0
    meta = {
        "steps": int(trainer.global_step),
        "seconds": seconds,
        "dataset": cfg.data.name,
        "field_scale": scale["field_scale"],
        "field_scale_sigma": float(e.scale_sigma),
        "field_target_norm": scale["target_norm"],
        "field_grad_norm": scale["grad_norm"],
        "mcmc_steps": int(e.mcmc_steps),
        "mcmc_step_size": float(e.step_size),
        "mcmc_noise_std": float(module.noise_std),
        "mcmc_clamp": bool(e.clamp),
        **{f"train/{k}": v for k, v in module.last_stats.items()},
    }
    _export(cfg, "ebm", arch, net, meta)
    say(
        f"ebm: {trainer.global_step} steps in {seconds:.0f} s; field scale {scale['field_scale']:.4g} "
        f"(median ||x - x~||/sigma {scale['target_norm']:.3g}, median ||grad E|| {scale['grad_norm']:.3g} "
        f"at sigma {e.scale_sigma:g})"
    )
    _finish(trainer)
    return meta


def _finish(trainer) -> None:
    """Close this process's W&B run (only if it created one: touching `.experiment` would start one)."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None)
        if logger.__class__.__name__ == "WandbLogger" and run is not None:
            run.finish()


def train(cfg: DictConfig, stages: tuple[str, ...] | None = None) -> dict:
    """Run the configured stages; each is skipped when its weights exist (unless train.force)."""
    redirect_writes_for(cfg)  # library caches and temp files under paths.cache
    out = {}
    stages = stages or tuple(cfg.train.stages)
    if "classifier" in stages and cfg.classifier.source == "robustbench":
        raise ConfigError(
            "classifier.source=robustbench: the classifier comes from the RobustBench model zoo and is not "
            f"trained here; put its file at {weights_path(cfg, 'classifier')} (or train.stages=[score])"
        )
    for stage in stages:
        path = weights_path(cfg, stage)
        if path.exists() and not cfg.train.force:
            say(f"{stage}: {path} exists, skipping (train.force=true retrains)")
            continue
        out[stage] = {"classifier": train_classifier, "score": train_score, "ebm": train_ebm}[stage](cfg)
    return out
