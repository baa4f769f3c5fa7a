"""DiffusionModule: continuous-time denoising score matching of an eps-prediction diffusion net
(`advpure.nets.diffusion.DiffusionNet`: score_sde's DDPM++ `NCSNpp`, Ho et al.'s `DDPMUNet`).

Objective (`advpure.training.losses_diffusion.vp_dsm_loss`; Song et al., ICLR 2021, Eq. 7 with
lambda(t) = 1 - abar(t), score_sde ``reduce_mean=True``): on images u0 = 2x - 1 in [-1, 1],

    u_t = sqrt(abar(t)) u0 + sqrt(1 - abar(t)) z,   loss = mean over rows and pixels of (eps_theta(u_t, t) - z)^2

with z ~ N(0, I) and, for a continuous schedule (VP SDE), t ~ U(t_eps, 1), t_eps = 1e-5 (score_sde's
``eps``); for a discrete T-step chain (Ho et al. 2020, Algorithm 1) the step i ~ U{0, ..., T-1}, t = (i + 1) / T.

Randomness: t and z of a training step come from a generator keyed by (seed, global step, rank), and the
net's dropout masks are drawn under a torch seed keyed the same way, so a run killed and resumed from a
step checkpoint computes the same steps as an uninterrupted one. Validation noise is keyed by the batch's
position in the validation split.

Optimisation (score_sde ``losses.optimization_manager``, Ho et al.'s ``run_cifar.py``): Adam, the learning
rate ramped linearly lr * min(s / warmup, 1) at the s-th update (s = 0, 1, ...: the first update has
learning rate 0, as in score_sde), gradient norm clipped (the Trainer's ``gradient_clip_val``), an EMA of
the weights (`advpure.training.ema.EMA`, optionally score_sde's num_updates ramp) as a submodule, so it is
in every checkpoint; validation and the exported weights use it.

Logged: ``train/loss``, ``train/lr``, the loss per t-bucket ``train/loss_t0.0-0.2`` ... (the DSM loss
depends strongly on t: large near t = 0 where eps is hard to see, small near t = 1), the same on the
validation split (``val/loss``, ``val/loss_t...``), and the one-step denoising PSNR at t* (default 0.1,
DiffPure's CIFAR-10 starting point; image-noise std sigma(t*) = sqrt((1 - abar) / abar) / 2 = 0.17 in
[0, 1] units): ``val/psnr_noisy_t0.1`` of x + sigma z, ``val/psnr_denoised_t0.1`` of the EMA net's
x0-estimate (u_t - sqrt(1 - abar) eps_theta) / sqrt(abar) mapped to [0, 1], and their difference
``val/psnr_gain_t0.1`` (dB). A grid (W&B) shows clean / diffused / one-step denoised images at t = 0.1
and 0.5 (ancestral or probability-flow sampling from noise takes hundreds of net calls: too slow here).
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch

from advpure.core.errors import TrainingError
from advpure.core.rng import mix
from advpure.nets.diffusion import DiffusionNet
from advpure.nets.families import build_diffusion_net
from advpure.training.ema import EMA
from advpure.training.losses import psnr
from advpure.training.losses_diffusion import VP_T_EPS, sample_times, vp_dsm_loss

__all__ = ["DiffusionModule", "GRID_TIMES", "bucket_names", "one_step_x0", "draw_times"]

GRID_TIMES = (0.1, 0.5)  # rows of the denoising grid
VAL_SEED_OFFSET = 10**9  # validation noise keys: mix(seed, VAL_SEED_OFFSET + batch position)


def bucket_names(k: int) -> list[str]:
    """Names of k equal t-buckets of [0, 1]: "t0.0-0.2", "t0.2-0.4", ... (k = 5)."""
    return [
        f"t{i / k:.1f}-{(i + 1) / k:.1f}" if k <= 10 else f"t{i / k:.2f}-{(i + 1) / k:.2f}" for i in range(k)
    ]


def draw_times(
    net: DiffusionNet, n: int, gen: torch.Generator, device, t_eps: float = VP_T_EPS
) -> torch.Tensor:
    """n training times (float32, (n,)) for `net`'s schedule: U(t_eps, 1) for continuous time; for a discrete
    chain of T steps, t = (i + 1) / T with i ~ U{0, ..., T-1} (Ho et al. 2020, Algorithm 1)."""
    steps = getattr(net.schedule, "steps", None)
    if steps:
        i = torch.randint(0, steps, (n,), generator=gen, device=device)
        return (i + 1).to(torch.float32) / steps
    return sample_times(n, eps=t_eps, generator=gen, device=device)


def one_step_x0(net, u_t: torch.Tensor, t: torch.Tensor, schedule) -> torch.Tensor:
    """The one-step estimate of u0 (Ho et al. 2020 Eq. 15): (u_t - sqrt(1 - abar(t)) eps(u_t, t)) / sqrt(abar(t)).
    u_t (R, C, H, W) in diffusion units, t (R,) in (0, 1]; `net(u, t)` returns eps. Returns (R, C, H, W)."""
    ab = schedule.alpha_bar(t.double()).to(u_t.dtype).view(-1, *([1] * (u_t.ndim - 1)))
    return (u_t - (1 - ab).sqrt() * net(u_t, t)) / ab.sqrt()


@contextlib.contextmanager
def keyed_torch_rng(key: int, device: torch.device):
    """Run the block under torch's global generator seeded with `key` (dropout masks), restoring the
    previous state afterwards (CPU and, on CUDA, the device's generator)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(key)
        yield


class DiffusionModule(L.LightningModule):
    """Continuous-time DSM of an eps-prediction net (see the module docstring). Batches (B, C, H, W) in
    [0, 1]; `arch` is a diffusion arch dict (`advpure.nets.families.build_diffusion_net`)."""

    def __init__(
        self,
        arch: dict,
        *,
        lr: float = 2e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup: int = 5000,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        t_eps: float = VP_T_EPS,
        t_star: float = 0.1,
        t_buckets: int = 5,
        seed: int = 0,
        val_batches: int = 4,
        log_images: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.net = build_diffusion_net(arch)
        self.ema = EMA(self.net, ema_decay, warmup=ema_warmup)
        self.seed, self.val_batches, self.log_images = seed, val_batches, log_images
        self.t_star, self.t_eps, self.k = float(t_star), float(t_eps), int(t_buckets)
        self.buckets = bucket_names(self.k)
        self.last_good_ckpt: str | None = None

    KEYS = ("lr", "beta1", "beta2", "adam_eps", "weight_decay", "warmup", "ema_decay", "ema_warmup", "t_eps")

    @classmethod
    def from_block(cls, arch: dict, block, *, seed: int, log_images: bool) -> DiffusionModule:
        """The module of a diffusion kind's config block (`advpure.kinds.ddpmpp.DdpmppConfig`, ...)."""
        return cls(
            arch, **{k: block[k] for k in cls.KEYS}, t_star=block.val_t_star, t_buckets=block.t_buckets,
            seed=seed, val_batches=block.val_batches, log_images=log_images,
        )  # fmt: skip

    @property
    def schedule(self):
        return self.net.schedule

    def forward(self, u, t):
        return self.ema(u, t)

    def draw(self, u0: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (R,), z (R, C, H, W)) from a generator seeded with `key`."""
        gen = torch.Generator(device=u0.device)
        gen.manual_seed(key)
        t = draw_times(self.net, u0.shape[0], gen, u0.device, self.t_eps)
        z = torch.randn(u0.shape, generator=gen, device=u0.device, dtype=u0.dtype)
        return t.to(u0.dtype), z

    def _bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.k).long().clamp(0, self.k - 1)

    def training_step(self, batch, batch_idx):
        u0 = batch[0] * 2 - 1
        key = mix(self.seed, self.global_step, self.global_rank)
        t, z = self.draw(u0, key)
        with keyed_torch_rng(mix(key, 1), u0.device):  # dropout
            per_row = vp_dsm_loss(self.net, u0, t, z, reduction="none")
        loss = per_row.mean()
        if not torch.isfinite(loss):
            where = self.last_good_ckpt or "none saved yet"
            raise TrainingError(
                f"diffusion DSM loss is {loss.item()} at step {self.global_step}; last good checkpoint: {where}"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self._trainer else self.hparams.lr)
        b = self._bucket_of(t.detach())
        for i, name in enumerate(self.buckets):
            m = b == i
            if bool(m.any()):
                self.log(f"train/loss_{name}", per_row.detach()[m].mean(), batch_size=int(m.sum()))
        return loss

    def optimizer_step(self, *args, **kwargs):
        # EMA right after the weights change, before any callback (e.g. the step checkpoint) runs
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def _val_names(self) -> list[str]:
        s = f"t{self.t_star:g}"
        return ["val/loss", *(f"val/loss_{n}" for n in self.buckets)] + [
            f"val/psnr_{k}_{s}" for k in ("noisy", "denoised", "gain")
        ]

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """The EMA net's DSM loss (overall and per t-bucket) and one-step denoising PSNR at t*.

        As in `ScoreModule.validation_step`: every rank logs the same keys (a batch with no work logs zeros
        with weight 0) and the noise is keyed by the batch's position in the validation split, so any number
        of ranks gives the numbers of one process."""
        x = batch[0]
        if batch_idx >= self.val_batches or len(x) == 0:
            zero = x.new_zeros(())
            for name in self._val_names():
                self.log(name, zero, sync_dist=True, batch_size=0)
            return
        pos = batch_idx * self.trainer.world_size + self.global_rank if self._trainer else batch_idx
        n, u0, net = len(x), x * 2 - 1, self.ema.shadow
        t, z = self.draw(u0, mix(self.seed, VAL_SEED_OFFSET + pos))
        per_row = vp_dsm_loss(net, u0, t, z, reduction="none")
        self.log("val/loss", per_row.mean(), sync_dist=True, batch_size=n)
        b = self._bucket_of(t)
        for i, name in enumerate(self.buckets):
            m = b == i
            value = per_row[m].mean() if bool(m.any()) else per_row.new_zeros(())
            self.log(f"val/loss_{name}", value, sync_dist=True, batch_size=int(m.sum()))
        noisy, den = self.denoise_at(net, x, z, self.t_star)
        p_noisy, p_den = psnr(noisy.clamp(0, 1), x).mean(), psnr(den.clamp(0, 1), x).mean()
        s = f"t{self.t_star:g}"
        self.log(f"val/psnr_noisy_{s}", p_noisy, sync_dist=True, batch_size=n)
        self.log(f"val/psnr_denoised_{s}", p_den, sync_dist=True, batch_size=n)
        self.log(f"val/psnr_gain_{s}", p_den - p_noisy, sync_dist=True, batch_size=n)
        if pos == 0 and self.log_images:
            rows = [x[:8]]
            for tg in GRID_TIMES:
                rows += [r[:8].clamp(0, 1) for r in self.denoise_at(net, x[:8], z[:8], tg)]
            self._log_grid(rows)

    def denoise_at(
        self, net, x: torch.Tensor, z: torch.Tensor, t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, denoised) in [0, 1] image units (not clamped): x diffused to time t with noise z, shown
        rescaled as x + sigma(t) z (sigma(t) = sqrt((1 - abar) / abar) / 2), and the one-step estimate of x."""
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        ab = float(self.schedule.alpha_bar(torch.tensor(t, dtype=torch.float64)))
        u_t = ab**0.5 * (x * 2 - 1) + (1 - ab) ** 0.5 * z
        noisy = (u_t / ab**0.5 + 1) / 2
        return noisy, (one_step_x0(net, u_t, tt, self.schedule) + 1) / 2

    def _log_grid(self, rows: list[torch.Tensor]) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image") or self.global_rank != 0:
            return
        lines = [torch.cat(list(r.float().cpu()), dim=-1) for r in rows]  # (C, H, 8W) each
        grid = torch.cat(lines, dim=-2).clamp(0, 1)
        times = " / ".join(f"diffused to t={t:g} / one-step denoised" for t in GRID_TIMES)
        logger.log_image(
            key="val/denoising",
            images=[grid],
            caption=[f"rows: clean / {times} (EMA)"],
            step=self.global_step,
        )

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(
            self.net.parameters(),
            lr=hp.lr,
            betas=(hp.beta1, hp.beta2),
            eps=hp.adam_eps,
            weight_decay=hp.weight_decay,
        )
        if not hp.warmup:
            return opt
        warmup = int(hp.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / warmup, 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
