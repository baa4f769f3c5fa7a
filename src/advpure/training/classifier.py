"""ClassifierModule: cross-entropy training of g_phi on images in [0, 1] (normalization inside the net)."""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch import nn

from advpure.core.errors import TrainingError
from advpure.data.augment import gaussian_noise
from advpure.nets.classifiers import make_classifier
from advpure.training.optim import build_optimizer, build_schedule


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a classifier on (B, C, H, W) images in [0, 1], with optional
    Gaussian noise augmentation (randomized smoothing's base classifier); logs train/val/test
    accuracy (torchmetrics)."""

    def __init__(
        self,
        arch: dict,
        spec,
        optim: dict,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        noise_sd: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "arch": arch,
                "optim": optim,
                "dropout": dropout,
                "label_smoothing": label_smoothing,
                "noise_sd": noise_sd,
            }
        )
        self.arch, self.optim_cfg = arch, optim
        # Gaussian-noise augmentation of training batches only (Cohen et al. 2019): the classifier of
        # randomized smoothing's baseline must have seen x + sigma * n
        self.noise_sd = float(noise_sd)
        self.net = make_classifier(arch, spec, dropout)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = arch["num_classes"]
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=n)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=n)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=n)

    @classmethod
    def from_block(cls, arch: dict, spec, block) -> ClassifierModule:
        """The module of a `classifier` config block (`advpure.kinds.classifier.ClassifierConfig`)."""
        from omegaconf import OmegaConf

        optim = (
            OmegaConf.to_container(block.optim, resolve=True)
            if not isinstance(block.optim, dict)
            else block.optim
        )
        return cls(arch, spec, optim, block.dropout, block.label_smoothing, noise_sd=block.noise_sd)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        x = gaussian_noise(x, self.noise_sd)
        logits = self.net(x)
        loss = self.loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(f"classifier loss is {loss.item()} at step {self.global_step}")
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        if len(y):  # torchmetrics refuses empty inputs
            self.val_acc(logits, y)
        # the empty batch of a DDP rank without validation batches logs the same keys (every rank
        # must join the epoch-end sync) with weight 0; the synced mean is weighted by batch size
        loss = self.loss_fn(logits, y) if len(y) else logits.new_zeros(())
        self.log("val/loss", loss, sync_dist=True, batch_size=len(y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        if len(y):  # an empty batch (a DDP rank without test batches) adds nothing
            self.test_acc(self.net(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        from omegaconf import OmegaConf

        oc = OmegaConf.create(self.optim_cfg)
        opt = build_optimizer(self.parameters(), oc)
        sched = build_schedule(opt, oc, self.trainer.estimated_stepping_batches)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
