"""Training stages: what `advpure train` runs for each trainable network kind, and what `benchmark`
and `certify` call to train the weights they miss (`ensure_weights`).

A stage is a network kind's `train(block, ctx)` (`advpure.nets.registry.NetKind`); `Stage` is the
context it gets: the data module, a resumable fit (step or epoch checkpoints, SLURM requeue, the
last good checkpoint named when a loss turns NaN), the export of the weights (rank 0) and a logger.

    runs/train/<experiment>/<stage>/checkpoints/last.ckpt   Lightning checkpoints (resume)
    runs/train/<experiment>/<stage>/stage.json              what they were made from
    <the kind's weights path>                              exported weights (EMA for the score net)
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from advpure.config.compose import fingerprint
from advpure.core.errors import CheckpointError, DataError, RunDirError
from advpure.core.fsio import write_text_atomic
from advpure.core.safe_load import check_torch_file, describe_load_error
from advpure.data import ImageDataModule
from advpure.data.sources import unavailable
from advpure.jobs.artifacts import Artifacts
from advpure.jobs.loggers import LoggerSpec, build_logger, finish_loggers
from advpure.jobs.trainer import build_trainer, interruptible, launch_rank, say
from advpure.nets.registry import net_kind
from advpure.nets.weights import check_weights_output, save_weights

RESUME_ADVICE = "delete it to train this stage from the start (or pass train.force=true)"
DATA_KEYS = ("name", "val_size", "split_seed", "train_subset", "crop_padding", "hflip")


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


def checkpoints(run_dir: Path, **every) -> ModelCheckpoint:
    """`last.ckpt` plus the newest numbered checkpoint under `run_dir/checkpoints` (resume reads them):
    every `every_n_train_steps` steps (named step<7 digits>) or every `every_n_epochs` epochs."""
    name = "step{step:07d}" if "every_n_train_steps" in every else "epoch{epoch:03d}"
    return ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename=name,
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
        **every,
    )


def drop_hpc_checkpoints(run_dir: Path) -> None:
    """After a finished fit: a leftover SLURM hpc checkpoint would be loaded by the next
    `trainer.test` in place of the trained weights (Lightning prefers it under SLURM)."""
    if launch_rank() == 0:
        for p in run_dir.glob("hpc_ckpt_*.ckpt"):
            p.unlink()
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Stage:
    """The context of one training stage (`advpure.nets.registry.StageContext`).

    kind: the network kind trained; block: its config block; weights: where it exports; run_dir:
    its checkpoint folder; data / paths / trainer / logger: the run's blocks; seed, experiment."""

    kind: str
    block: Any
    weights: Path
    run_dir: Path
    data: Any
    paths: Any
    trainer_block: Any
    logger: LoggerSpec
    seed: int
    experiment: str
    force: bool = False

    @property
    def max_epochs(self) -> int:
        return int(self.trainer_block.max_epochs)

    @property
    def log_images(self) -> bool:
        return bool(self.logger.block.log_images)

    def say(self, message: str) -> None:
        say(f"{self.kind}: {message}")

    def datamodule(self, **overrides: Any) -> ImageDataModule:
        return ImageDataModule(self.data, self.paths, seed=self.seed, **overrides)

    def fingerprint(self) -> str:
        """What the stage's checkpoints depend on (a resumed run must agree)."""
        data = {k: self.data[k] for k in DATA_KEYS}
        net = net_kind(self.kind).stage_inputs(self.block, self)
        return fingerprint({"data": data, "net": net, "seed": self.seed})

    def prepare(self) -> Path | None:
        """Create the stage dir; return the checkpoint to resume from, if any. Refuse to resume from
        checkpoints made by other settings (train.force=true starts over)."""
        manifest = self.run_dir / "stage.json"
        fp = self.fingerprint()
        if self.force and self.run_dir.exists() and launch_rank() == 0:
            shutil.rmtree(self.run_dir)
        if manifest.exists():
            stored = json.loads(manifest.read_text()).get("fingerprint")
            if stored != fp:
                raise RunDirError(
                    f"{self.run_dir} holds {self.kind} checkpoints of other settings; pass train.force=true to "
                    "start over or set paths.runs elsewhere"
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if launch_rank() == 0:
            info = {"fingerprint": fp, "stage": self.kind, "experiment": self.experiment}
            write_text_atomic(manifest, json.dumps(info), what="stage manifest")
        # SIGUSR1 under SLURM saves hpc_ckpt_N.ckpt (newer than the last step checkpoint): resume from
        # whichever is newest
        found = [
            p
            for p in [self.run_dir / "checkpoints" / "last.ckpt", *self.run_dir.glob("hpc_ckpt_*.ckpt")]
            if p.exists()
        ]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def fit(
        self,
        module,
        dm,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        ckpt_every_n_steps=None,
        **options,
    ):
        """Fit `module` for `steps` training steps (checkpoint every `ckpt_every_n_steps`) or `epochs`
        epochs (checkpoint every epoch), resuming from the newest checkpoint with weights_only=True
        (a truncated, HTML or code-carrying checkpoint is a one-line CheckpointError). Returns the Trainer."""
        resume = self.prepare()
        if resume is not None:
            self.say(f"resuming from {resume}")
            check_torch_file(resume, what="resume checkpoint", advice=RESUME_ADVICE)
        if steps is not None:
            ckpt = checkpoints(self.run_dir, every_n_train_steps=ckpt_every_n_steps)
            run = dict(max_epochs=-1, max_steps=steps, num_sanity_val_steps=0)
            callbacks = [ckpt, MidEpochResume(), LastGoodCheckpoint(ckpt), Throughput()]
        else:
            ckpt = checkpoints(self.run_dir, every_n_epochs=1)
            run = dict(max_epochs=epochs)
            callbacks = [ckpt, MidEpochResume(), Throughput()]
        trainer = build_trainer(
            self.trainer_block,
            logger=build_logger(self.logger, self.kind, self.run_dir),
            callbacks=callbacks,
            default_root_dir=str(self.run_dir),
            **run,
            **options,
        )
        self._trainer = trainer
        try:
            with interruptible(trainer, f"{self.kind} checkpoints are in {self.run_dir / 'checkpoints'}"):
                trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
        except pickle.UnpicklingError as e:  # only a checkpoint load unpickles inside fit
            if resume is None:
                raise
            raise CheckpointError(
                f"{describe_load_error(resume, e, 'resume checkpoint')}; {RESUME_ADVICE}"
            ) from None
        drop_hpc_checkpoints(self.run_dir)
        return trainer

    def export(self, arch: dict, net, meta: dict) -> Path:
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_weights(
                self.weights, self.kind, arch, net, meta, force=self.force, force_hint="train.force=true"
            )
            self.say(f"exported weights to {self.weights}")
        if dist.is_initialized():
            dist.barrier()  # other ranks load these weights next
        return self.weights

    def run(self) -> dict:
        """Train and export; close this stage's W&B run. Returns the exported weights' meta."""
        self._trainer = None
        check_weights_output(self.weights, force=self.force, force_hint="train.force=true")
        try:
            return net_kind(self.kind).train(self.block, self)
        finally:
            if self._trainer is not None:
                finish_loggers(self._trainer)


@dataclass
class Stages:
    """Everything training stages need from a run's config, built once at a command's top
    (`Stages.from_config(cfg)`): the network kinds' blocks (`Artifacts`), data, paths, trainer and
    logger blocks, seed, experiment, train.force."""

    artifacts: Artifacts
    data: Any
    paths: Any
    trainer_block: Any
    logger: LoggerSpec
    seed: int
    experiment: str
    force: bool = False

    @classmethod
    def from_config(cls, cfg) -> Stages:
        return cls(
            Artifacts.from_config(cfg),
            cfg.data,
            cfg.paths,
            cfg.trainer,
            LoggerSpec.from_config(cfg),
            int(cfg.seed),
            cfg.experiment,
            bool(cfg.train.force),
        )

    def stage(
        self, kind: str, *, block=None, weights: Path | None = None, run_name: str | None = None
    ) -> Stage:
        """The stage that trains `kind`: its block (or `block`), exporting to the kind's weights path
        (or `weights`), checkpoints under runs/train/<experiment>/<run_name or kind>/."""
        artifacts = self.artifacts if block is None else self.artifacts.with_block(kind, block)
        name = run_name or kind
        return Stage(
            kind=kind,
            block=artifacts.blocks[kind],
            weights=Path(weights) if weights is not None else artifacts.path(kind),
            run_dir=Path(self.paths.runs) / "train" / self.experiment / name,
            data=self.data,
            paths=self.paths,
            trainer_block=self.trainer_block,
            logger=self.logger.for_job(name),
            seed=self.seed,
            experiment=self.experiment,
            force=self.force,
        )

    def train(self, kinds: tuple[str, ...]) -> dict[str, dict]:
        """Train each of `kinds` (in order) whose weights are missing, or all with train.force=true."""
        out = {}
        for kind in kinds:
            stage = self.stage(kind)
            if stage.weights.exists() and not self.force:
                say(f"{kind}: {stage.weights} exists, skipping (train.force=true retrains)")
                continue
            L.seed_everything(self.seed, verbose=False)
            out[kind] = stage.run()
        return out

    def ensure(self, kinds: list[str], *, train_missing: bool) -> None:
        """Every weights file of `kinds` exists, or is trained now (`train_missing`); otherwise a
        one-line CheckpointError lists each missing file and how to get it, and the dataset files
        that cannot be downloaded when they are missing too (the ImageNet validation set). Those
        alone are a one-line DataError."""
        missing = self.artifacts.missing(kinds)
        data = unavailable(self.data.name, self.data.root, self.paths.data)
        if not missing:
            if data is not None:
                raise DataError(data)
            return
        untrainable = [k for k in missing if not net_kind(k).trainable or not self._trainable_here(k)]
        if not train_missing or untrainable or data is not None:
            raise CheckpointError(
                f"missing weights ({len(missing)}): "
                + "; ".join(self.artifacts.how_to_get(k) for k in missing)
                + ("" if data is None else f"; and missing data: {data}")
            )
        say(f"training what is missing: {', '.join(missing)}")
        self.train(tuple(missing))

    def _trainable_here(self, kind: str) -> bool:
        """A RobustBench classifier is read from the zoo, never trained here."""
        return getattr(self.artifacts.blocks[kind], "source", "advpure") != "robustbench"


__all__ = ["Stage", "Stages", "checkpoints"]
