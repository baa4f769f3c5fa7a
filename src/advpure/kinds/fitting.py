"""The step-counted training fit that the score and diffusion kinds share: `block.max_steps` steps,
a checkpoint every `block.ckpt_every_n_steps`, gradient clipping at `block.grad_clip`, validation
on `block.val_batches` batches every `block.val_every_n_steps` steps."""

from __future__ import annotations

from typing import Any


def fit_validated(ctx: Any, module: Any, dm: Any, block: Any) -> tuple[Any, dict[str, float]]:
    """Fit `module` on `dm` through the stage context `ctx` (`advpure.nets.registry.StageContext`)
    with the block's step, checkpoint, clipping and validation settings. Returns the Lightning
    Trainer and the last validation metrics ({"val/...": float})."""
    trainer = ctx.fit(
        module,
        dm,
        steps=block.max_steps,
        ckpt_every_n_steps=block.ckpt_every_n_steps,
        gradient_clip_val=block.grad_clip,
        val_check_interval=block.val_every_n_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=block.val_batches,
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return trainer, metrics


__all__ = ["fit_validated"]
