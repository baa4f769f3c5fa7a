"""ScoreModule: denoising score matching (Vincent 2011; Song & Ermon 2020) for the purifier's score net f_theta.

Each step draws sigma per sample from the noise list and eps ~ N(0, I) from a generator keyed by
(seed, global step, rank): a run killed and resumed from its last step checkpoint draws the same
noise as an uninterrupted one. An EMA of the weights (decay 0.999) is a submodule, so it is saved
in every checkpoint; validation and the exported weights use it.
"""

from __future__ import annotations

import lightning as L
import torch

from advpure.core.errors import TrainingError
from advpure.core.rng import mix
from advpure.nets.ncsnv2 import make_score_net
from advpure.training.ema import EMA
from advpure.training.losses import dsm_loss, geometric_sigmas, one_step_denoise, psnr

VAL_SIGMAS = (0.1, 0.25)


class ScoreModule(L.LightningModule):
    """Denoising score matching of an NCSNv2 (see the module docstring): batches (B, C, H, W) in
    [0, 1], per-sample sigma from the geometric levels dsm_sigma_max -> dsm_sigma_min (or one fixed
    level), the EMA copy validated by one-step denoising PSNR at sigma in VAL_SIGMAS."""

    def __init__(
        self,
        arch: dict,
        *,
        dsm_sigma_max: float,
        dsm_sigma_min: float,
        dsm_levels: int,
        dsm_sigma_fixed: float | None = None,
        lr: float = 1e-4,
        beta1: float = 0.9,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        seed: int = 0,
        val_batches: int = 4,
        log_images: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.net = make_score_net(arch)
        self.ema = EMA(self.net, ema_decay)
        sigmas = (
            torch.tensor([float(dsm_sigma_fixed)])
            if dsm_sigma_fixed
            else geometric_sigmas(dsm_sigma_max, dsm_sigma_min, dsm_levels)
        )
        self.register_buffer("sigmas", sigmas)
        self.seed, self.val_batches, self.log_images = seed, val_batches, log_images
        self.last_good_ckpt: str | None = None

    @classmethod
    def from_block(cls, arch: dict, block, *, seed: int, log_images: bool) -> ScoreModule:
        """The module of a `score` config block (`advpure.kinds.score.ScoreConfig`)."""
        keys = (
            "dsm_sigma_max",
            "dsm_sigma_min",
            "dsm_levels",
            "dsm_sigma_fixed",
            "lr",
            "beta1",
            "weight_decay",
        )
        return cls(
            arch, **{k: block[k] for k in keys}, ema_decay=block.ema_decay, seed=seed,
            val_batches=block.val_batches, log_images=log_images,
        )  # fmt: skip

    def forward(self, x):
        return self.ema(x)

    def _noise(self, x: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(key)
        level = torch.randint(0, len(self.sigmas), (x.shape[0],), generator=gen, device=x.device)
        eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return self.sigmas[level].to(x.dtype), eps

    def training_step(self, batch, batch_idx):
        x = batch[0]
        sigma, eps = self._noise(x, mix(self.seed, self.global_step, self.global_rank))
        loss = dsm_loss(self.net, x, sigma, eps)
        if not torch.isfinite(loss):
            where = self.last_good_ckpt or "none saved yet"
            raise TrainingError(
                f"DSM loss is {loss.item()} at step {self.global_step}; last good checkpoint: {where}"
            )
        self.log("train/dsm_loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        # EMA right after the weights change, before any callback (e.g. the step checkpoint) runs
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """DSM loss and one-step denoising PSNR (dB) of the EMA net on a validation batch.

        Every rank logs the same keys (all join the epoch-end sync); the synced means are weighted
        by batch size, and a batch with no work (the empty batch of a DDP rank without validation
        batches, or one past `val_batches`) logs zeros with weight 0. The noise is keyed by the
        batch's position in the validation split (rank r holds batches r, r + world, ...), so any
        number of ranks draws the noise of one process.
        """
        x = batch[0]
        if batch_idx >= self.val_batches or len(x) == 0:
            zero = x.new_zeros(())
            names = ["val/dsm_loss"] + [
                f"val/psnr_{k}_s{s:g}" for s in VAL_SIGMAS for k in ("noisy", "denoised", "gain")
            ]
            for name in names:
                self.log(name, zero, sync_dist=True, batch_size=0)
            return
        b = batch_idx * self.trainer.world_size + self.global_rank if self._trainer else batch_idx
        n = len(x)
        sigma, eps = self._noise(x, mix(self.seed, 10**9 + b))  # same noise at every validation
        self.log("val/dsm_loss", dsm_loss(self.ema, x, sigma, eps), sync_dist=True, batch_size=n)
        for s in VAL_SIGMAS:
            noisy = x + s * eps
            den = one_step_denoise(self.ema, noisy, s).clamp(0, 1)
            p_noisy, p_den = psnr(noisy.clamp(0, 1), x).mean(), psnr(den, x).mean()
            self.log(f"val/psnr_noisy_s{s:g}", p_noisy, sync_dist=True, batch_size=n)
            self.log(f"val/psnr_denoised_s{s:g}", p_den, sync_dist=True, batch_size=n)
            self.log(f"val/psnr_gain_s{s:g}", p_den - p_noisy, sync_dist=True, batch_size=n)
        if b == 0 and self.log_images:
            self._log_grid(
                x[:8],
                (x[:8] + 0.25 * eps[:8]).clamp(0, 1),
                one_step_denoise(self.ema, x[:8] + 0.25 * eps[:8], 0.25).clamp(0, 1),
            )

    def _log_grid(self, clean, noisy, denoised):
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image") or self.global_rank != 0:
            return
        rows = [torch.cat(list(t.float().cpu()), dim=-1) for t in (clean, noisy, denoised)]  # (C, H, 8W)
        grid = torch.cat(rows, dim=-2).clamp(0, 1)
        logger.log_image(
            key="val/denoising_s0.25",
            images=[grid],
            caption=["rows: clean / noisy (sigma 0.25) / one-step denoised (EMA)"],
            step=self.global_step,
        )

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(
            self.net.parameters(), lr=hp.lr, betas=(hp.beta1, 0.999), weight_decay=hp.weight_decay
        )
