"""The classifier's optimizers and learning-rate schedules (pure torch, no Lightning): the names a
config may give (`OPTIMIZERS`, `SCHEDULES`, read by the `classifier.optim` block's schema)."""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "multistep", "onecycle")


def build_optimizer(params, oc) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW from the classifier's `optim` config block."""
    if oc.name == "sgd":
        return torch.optim.SGD(
            params, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov, weight_decay=oc.weight_decay
        )
    if oc.name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def build_schedule(opt, oc, total_steps: int):
    """Step-wise schedules over the whole run (`total_steps` optimizer steps)."""
    total_steps = max(1, int(total_steps))
    if oc.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if oc.schedule == "multistep":
        milestones = sorted({max(1, int(m * total_steps)) for m in oc.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=oc.gamma)
    if oc.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=oc.lr, total_steps=total_steps, pct_start=0.25)
    return None


__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule"]
