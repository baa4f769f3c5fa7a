"""`make gpu-check`'s DDP part: a tiny Lightning fit with strategy="ddp" on one device."""

from __future__ import annotations

import tempfile

import torch
from torch import nn


def ddp_check(dev: torch.device) -> bool:
    """A 2-step Lightning fit with strategy="ddp", devices=1 on `dev`; True when the training step saw
    an initialised process group of world size 1 (destroyed afterwards)."""
    import lightning as L
    import torch.distributed as dist

    seen: dict = {}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def training_step(self, batch, i):
            seen["initialized"] = dist.is_available() and dist.is_initialized()
            seen["world_size"] = dist.get_world_size() if seen["initialized"] else 0
            seen["backend"] = dist.get_backend() if seen["initialized"] else None
            return self.lin(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    with tempfile.TemporaryDirectory(prefix="advpure-gpu-check-") as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, strategy="ddp", max_steps=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(Tiny(), data)
    print(f"  ddp: {seen}", flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return bool(seen.get("initialized")) and seen.get("world_size") == 1


__all__ = ["ddp_check"]
