"""`advpure train`: the configured training stages (`train.stages`, default classifier then score;
every trainable network kind is a stage: `advpure.kinds`). Each stage is skipped when its exported
weights exist (train.force=true retrains), resumes from its newest checkpoint, and ends by exporting
weights that later commands load with `weights_only=True` (`advpure.jobs.stages`).

    runs/train/<experiment>/<stage>/checkpoints/last.ckpt   Lightning checkpoints (resume)
    runs/train/<experiment>/<stage>/stage.json              what they were made from
    runs/train/<experiment>/ebm/samples/*.png               MCMC sample grids of the EBM stage
    <each kind's weights path>                              exported weights (EMA for the score net)
"""

from __future__ import annotations

from omegaconf import DictConfig

from advpure.jobs.stages import Stages


def train(cfg: DictConfig) -> dict[str, dict]:
    """Run `advpure train` for the resolved config: each stage of `train.stages` in order.
    Returns {stage: exported meta} of the stages that ran. Raises ConfigError, RunDirError (a stage
    dir of other settings), CheckpointError (a bad resume checkpoint) or TrainingError (a NaN loss,
    naming the step and the last good checkpoint)."""
    return Stages.from_config(cfg).train(tuple(cfg.train.stages))
