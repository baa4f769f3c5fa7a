"""EBMModule: maximum-likelihood training of an energy-based model with persistent short-run
Langevin MCMC (Nijkamp et al. 2019/2020; Hill, Mitchell & Zhu, ICLR 2021, Algorithm 2).

One step, on a data batch x (images in [0, 1]):
  1. positives  x_data = x + data_noise * n                    (Hill et al.'s data_epsilon)
  2. negatives  B chains from the replay buffer (a fraction reinit_prob restarted from noise or
                data), K Langevin steps x <- x - (eta/2) grad E(x) + s * n, written back
  3. loss       mean E(x_data) - mean E(x_model) + l2 * mean(E^2)     Adam; gradient clipping by
                the Trainer (`ebm.grad_clip`)
  4. stop       TrainingError naming the step and the last good checkpoint when the loss or a
                chain is non-finite or max |E| exceeds `energy_bound`.

Randomness is keyed by (seed, global step, rank) (`advpure.core.rng.mix`) and the buffer is saved in
every checkpoint (key "ebm_chains"), so a run killed and resumed from its last step checkpoint
continues the same chains with the same noise as an uninterrupted run. Under DDP every rank holds
the whole buffer: the rows of a step are drawn from a stream shared by all ranks (each rank takes
its slice), and the updated chains are all-gathered so the copies stay identical (rank 0 saves).
The MCMC runs in fp32 whatever `trainer.precision` says.

Logged: train/loss, train/energy_data, train/energy_model, train/energy_gap (= E_data - E_model,
Nijkamp et al.'s d_{s_t}), train/langevin_grad_norm (their r_{s_t}), and every
`sample_every_n_steps` a titled grid of MCMC samples (`samples_title`; W&B image
"train/mcmc_samples", and the same figure as a PNG in `sample_dir` when set).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from advpure.core.errors import CheckpointError, TrainingError
from advpure.core.rng import mix, stream_id
from advpure.nets.ebm import energy_net_from_arch
from advpure.training.mcmc import PersistentChains, langevin_sample, ml_loss

CHAINS_KEY = "ebm_chains"
_SHARED = stream_id("ebm/shared")
_INIT = stream_id("ebm/init")


def samples_title(n: int, mcmc_steps: int, step: int) -> str:
    """The line above (and the W&B caption of) a grid of the EBM's MCMC samples."""
    return (
        f"ML-EBM samples: {n} persistent Langevin chains after {mcmc_steps} steps each "
        f"(training step {step}; images in [0, 1])"
    )


class EBMModule(L.LightningModule):
    """Maximum-likelihood EBM training (see the module docstring). Batches are (x, y, idx) with x
    float images in [0, 1] (the project's ImageDataModule); labels are ignored."""

    def __init__(
        self,
        arch: dict,
        *,
        lr: float = 1e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
        l2: float = 0.0,
        mcmc_steps: int = 100,
        step_size: float = 0.5,
        noise_std: float | None = 0.005,
        data_noise: float = 0.01,
        buffer_size: int = 10000,
        reinit_prob: float = 0.0,
        init: str = "uniform",
        clamp: bool = False,
        energy_bound: float = 1e4,
        seed: int = 0,
        sample_every_n_steps: int = 500,
        log_images: bool = True,
        sample_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.net = energy_net_from_arch(arch)
        shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
        self.chains = PersistentChains(buffer_size, shape, reinit_prob=reinit_prob, init=init)
        self.noise_std = float(step_size**0.5 if noise_std is None else noise_std)
        self.seed = seed
        self.last_good_ckpt: str | None = None
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_block(
        cls, arch: dict, block, *, seed: int, log_images: bool, sample_dir: str | None
    ) -> EBMModule:
        """The module of an `ebm` config block (`advpure.kinds.ebm.EBMConfig`)."""
        keys = (
            "lr", "beta1", "beta2", "weight_decay", "l2", "mcmc_steps", "step_size", "noise_std", "data_noise",
            "buffer_size", "reinit_prob", "init", "clamp", "energy_bound", "sample_every_n_steps",
        )  # fmt: skip
        return cls(
            arch, **{k: block[k] for k in keys}, seed=seed, log_images=log_images, sample_dir=sample_dir
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _gen(self, key: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(key)
        return g

    def _diverged(self, what: str) -> TrainingError:
        where = self.last_good_ckpt or "none saved yet"
        return TrainingError(f"EBM {what} at step {self.global_step}; last good checkpoint: {where}")

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        x = batch[0].float()
        n, step, rank, world = x.shape[0], self.global_step, self.global_rank, self.trainer.world_size
        local = self._gen(mix(self.seed, step, rank))
        shared = self._gen(mix(self.seed, step, _SHARED))
        if not self.chains.initialized:
            self.chains.initialize(self._gen(mix(self.seed, _INIT)), self.device)
        self.chains.to(self.device)

        x_data = x + hp.data_noise * torch.randn(x.shape, generator=local, device=x.device)
        x0, idx = self.chains.draw(n, shared, local, x_data, rank=rank, world=world)
        self.net.requires_grad_(False)  # the chains need grad_x only
        try:
            with torch.autocast(device_type=x.device.type, enabled=False):
                x_model, grad_norm = langevin_sample(
                    self.net,
                    x0,
                    steps=hp.mcmc_steps,
                    step_size=hp.step_size,
                    noise_std=self.noise_std,
                    generator=local,
                    clamp=(0.0, 1.0) if hp.clamp else None,
                )
        finally:
            self.net.requires_grad_(True)
        if not torch.isfinite(x_model).all():
            raise self._diverged("Langevin chains became non-finite (the energy's gradient diverged)")
        if idx is not None:
            if world > 1:
                all_x = self.all_gather(x_model).reshape(-1, *x_model.shape[1:])
                all_idx = self.all_gather(idx).reshape(-1)
                self.chains.put(all_idx, all_x)
            else:
                self.chains.put(idx, x_model)

        energies = self.net(torch.cat([x_data, x_model]))
        e_data, e_model = energies[:n], energies[n:]
        loss, stats = ml_loss(e_data.float(), e_model.float(), hp.l2)
        if not torch.isfinite(loss):
            raise self._diverged(f"loss is {loss.item()} (energy diverged)")
        peak = energies.detach().abs().max().item()
        if peak > hp.energy_bound:
            raise self._diverged(
                f"energy diverged: max |E| = {peak:.4g} > ebm.energy_bound = {hp.energy_bound:g}"
            )
        self.log("train/loss", loss, prog_bar=True)
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k == "energy_gap")
        self.log("train/langevin_grad_norm", grad_norm)
        self.last_stats = {k: float(v) for k, v in stats.items()} | {"langevin_grad_norm": float(grad_norm)}
        if hp.sample_every_n_steps and (step + 1) % hp.sample_every_n_steps == 0:
            self._log_samples(x_model[:64], step + 1)
        return loss

    def _log_samples(self, x: torch.Tensor, step: int) -> None:
        if self.global_rank != 0:
            return
        hp = self.hparams
        title = samples_title(x.shape[0], hp.mcmc_steps, step)
        logger = self.logger
        to_wandb = hp.log_images and logger is not None and hasattr(logger, "log_image")
        if not (hp.sample_dir or to_wandb):
            return
        from advpure.results.plots import figure_rgb, sample_grid_figure, save

        fig = sample_grid_figure(x.detach().float().clamp(0, 1).cpu().numpy(), title)
        if hp.sample_dir:
            save(fig, Path(hp.sample_dir) / f"mcmc_step{step:07d}.png")
        if to_wandb:  # the same figure as the PNG, its title as the caption
            logger.log_image(
                key="train/mcmc_samples", images=[figure_rgb(fig)], caption=[title], step=self.global_step
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHAINS_KEY] = self.chains.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CHAINS_KEY not in checkpoint:
            raise CheckpointError("EBM checkpoint has no replay buffer (key 'ebm_chains'); start over")
        try:
            self.chains.load_state_dict(checkpoint[CHAINS_KEY])
        except ValueError as e:
            raise CheckpointError(f"EBM checkpoint: {e}") from None

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(
            self.net.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay
        )
