"""Experiment loggers: W&B everywhere (offline automatically without credentials), or CSV / none.

The W&B mode is, in order: the WANDB_MODE environment variable; `logger.mode` when not `auto`;
online when a key is configured (WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai); offline
otherwise. Keys are never read into the config, logged, or written anywhere by this project.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig

from advpure.config.compose import to_dict
from advpure.core.runtime import redirect_writes_for


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


def build_logger(cfg: DictConfig, stage: str, save_dir: str | Path):
    """A Lightning logger for one stage (classifier / score / benchmark), or False for none.

    W&B's caches, logs and staging go under `paths.cache` unless their variables are set
    (`advpure.core.runtime.redirect_writes`); its run files go to `save_dir`.
    """
    redirect_writes_for(cfg)
    lc = cfg.logger
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if lc.kind == "none":
        return False
    if lc.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name=stage)
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(lc.mode)
    logger = WandbLogger(
        project=lc.project,
        entity=lc.entity,
        name=lc.name or f"{cfg.experiment}-{stage}",
        group=lc.group or cfg.experiment,
        tags=list(lc.tags) + [stage],
        save_dir=str(save_dir),
        offline=mode == "offline",
        mode=mode,
        job_type=stage,
        config=to_dict(cfg),
    )
    return logger
