"""Experiment loggers: W&B everywhere (offline automatically without credentials), or CSV / none.

The W&B mode is, in order: the WANDB_MODE environment variable; `logger.mode` when not `auto`;
online when a key is configured (WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai); offline
otherwise. Keys are never read into the config, logged, or written anywhere by this project.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from advpure.config.compose import to_dict
from advpure.core.fsio import storage_errors, write_text_atomic


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str = "auto") -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env in ("dryrun", "dry-run"):
        return "offline"
    if configured != "auto":
        return configured
    return "online" if _has_wandb_key() else "offline"


@dataclass(frozen=True)
class LoggerSpec:
    """What a job's logger is made from: the `logger` block, the experiment (W&B group), the run's
    resolved config (W&B config, as a plain dict) and the job name (W&B job type)."""

    block: Any
    experiment: str
    config: dict
    job: str = ""

    @classmethod
    def from_config(cls, cfg, job: str = "") -> LoggerSpec:
        return cls(cfg.logger, cfg.experiment, to_dict(cfg), job)

    def for_job(self, job: str, **config_updates: Any) -> LoggerSpec:
        return replace(self, job=job, config={**self.config, **config_updates})


def build_logger(spec: LoggerSpec, stage: str, save_dir: str | Path):
    """A Lightning logger for one job (classifier / score / benchmark / ...), or False for none.

    Its run files go to `save_dir`. A W&B run keeps its id in `save_dir/wandb_run_id`, so a rerun or
    a requeued job resumes the same run instead of starting another one."""
    lc = spec.block
    save_dir = Path(save_dir)
    with storage_errors(save_dir, "log folder", "create"):
        save_dir.mkdir(parents=True, exist_ok=True)
    if lc.kind == "none":
        return False
    if lc.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name=stage)
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(lc.mode)
    run = run_id(save_dir)
    drop_empty_runs(save_dir, run)
    return WandbLogger(
        project=lc.project,
        entity=lc.entity,
        name=lc.name or f"{spec.experiment}-{stage}",
        group=lc.group or spec.experiment,
        tags=list(lc.tags) + [stage],
        save_dir=str(save_dir),
        offline=mode == "offline",
        mode=mode,
        job_type=stage,
        config=spec.config,
        id=run,
        resume="allow",
    )


def run_id(save_dir: Path) -> str:
    """The W&B run id of a run directory: read from `save_dir/wandb_run_id`, or made and written
    there (rank 0) the first time."""
    import secrets

    path = Path(save_dir) / "wandb_run_id"
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = secrets.token_hex(4)
    write_text_atomic(path, new + "\n", what="W&B run id")
    return new


def drop_empty_runs(save_dir: Path, run: str) -> list[Path]:
    """Delete the offline W&B folders of run `run` under `save_dir/wandb` whose run file holds no
    record (a start killed before anything was logged leaves a 7-byte header): `wandb sync` would
    upload them as empty runs. Returns the folders deleted."""
    import shutil

    gone = []
    for folder in (Path(save_dir) / "wandb").glob(f"offline-run-*-{run}"):
        files = list(folder.glob("run-*.wandb"))
        if all(f.stat().st_size <= 7 for f in files):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def forget_inherited_wandb_service() -> None:
    """Drop a W&B service token (`WANDB_SERVICE`) inherited from the parent process.

    wandb stores the address of its service process in the environment, so every child of a process
    that used W&B (a notebook, a pytest session, a driver script) would log through the parent's
    service. If such a child is killed (`kill -9`, a SLURM preemption), its run stays open in the
    parent's service and the rerun is refused with "run ID ... is in use". Each advpure command
    therefore starts its own service (only rank 0 of a DDP job logs to W&B)."""
    os.environ.pop("WANDB_SERVICE", None)


def finish_loggers(trainer) -> None:
    """Close this process's W&B run (only if it created one: touching `.experiment` would start one)."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None)
        if logger.__class__.__name__ == "WandbLogger" and run is not None:
            run.finish()
