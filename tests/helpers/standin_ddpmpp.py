"""A stand-in for the `ddpmpp` network kind (score_sde DDPM++, continuous VP), for branches where it has
not landed: registered under that name only when no `ddpmpp` kind exists, with a config folder of its
own (`conf/ddpmpp/ddpmpp_28.yaml`), so that experiments naming `ddpmpp` load, plan and run.

The net is the ncsnv2 RefineNet of the score kind (`ngf` channels) fed the diffusion state, with the time
added as a learned per-channel bias: eps(u, t) of signature "eps" on a `VPSchedule`, costing about as
much per forward as the NCSNv2 score net of the same `ngf` (what a time estimate made with it assumes).
Its training stage runs `max_steps` steps of continuous-time DSM (Song et al. 2021), enough to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn

from advpure.core.params import at_least
from advpure.nets.ncsnv2 import make_score_net
from advpure.nets.registry import NET_KINDS, NetKind, register_net_kind
from advpure.nets.schedules import VPSchedule


class StandInEps(nn.Module):
    """eps(u, t): u (R, C, H, W) in diffusion space, t (R,) in [0, 1]; `.schedule` a VP schedule."""

    def __init__(self, arch: dict):
        super().__init__()
        self.body = make_score_net({"arch": "ncsnv2", **arch})
        self.temb = nn.Parameter(torch.zeros(arch["in_channels"]))
        self.schedule = VPSchedule()

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bias = t.to(u.dtype).view(-1, 1, 1, 1) * self.temb.view(1, -1, 1, 1)
        return -self.body(((u + 1) / 2).clamp(-1, 2)) + bias


@dataclass
class StandInConfig:
    ngf: int = at_least(16, 1)
    max_steps: int = at_least(2, 1)
    batch_size: int = at_least(16, 1)
    weights: str = "${paths.artifacts}/${data.name}/ddpmpp.pt"


class StandInModule(L.LightningModule):
    def __init__(self, arch: dict, seed: int):
        super().__init__()
        self.net, self.seed = StandInEps(arch), seed

    def training_step(self, batch, batch_idx):
        u0 = batch[0] * 2 - 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.global_step)
        t = torch.rand(u0.shape[0], generator=g) * (1 - 1e-3) + 1e-3
        n = torch.randn(u0.shape, generator=g)
        ab = self.net.schedule.alpha_bar(t).view(-1, 1, 1, 1)
        return ((self.net(ab.sqrt() * u0 + (1 - ab).sqrt() * n, t) - n) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StandInKind(NetKind):
    """Stand-in DDPM++ eps-net (see the module docstring)."""

    Config = StandInConfig
    signature = "eps"
    label = "stand-in diffusion eps-net (tests)"
    resume_free = ("max_steps", "weights")

    @classmethod
    def arch(cls, block, spec) -> dict:
        return {"ngf": block.ngf, "in_channels": spec.channels, "image_size": spec.image_size}

    @classmethod
    def build(cls, arch) -> nn.Module:
        return StandInEps(dict(arch))

    @classmethod
    def train(cls, block, ctx) -> dict:
        dm = ctx.datamodule(batch_size=block.batch_size)
        arch = cls.arch(block, dm.spec)
        module = StandInModule(arch, ctx.seed)
        trainer = ctx.fit(
            module, dm, steps=block.max_steps, ckpt_every_n_steps=block.max_steps, limit_val_batches=0
        )
        ctx.export(arch, module.net, {"steps": int(trainer.global_step)})
        return {"steps": int(trainer.global_step)}


def register(conf: Path) -> bool:
    """Register the stand-in as `ddpmpp` unless a real kind has that name, and write its config folder
    under `conf` (put `conf` on ADVPURE_CONFIG_PATH). Returns whether the stand-in was registered."""
    import advpure.kinds  # noqa: F401 (the built-in kinds first)

    if "ddpmpp" in NET_KINDS:
        return False
    register_net_kind("ddpmpp")(StandInKind)
    (conf / "ddpmpp").mkdir(parents=True, exist_ok=True)
    (conf / "ddpmpp" / "ddpmpp_28.yaml").write_text("ngf: 16\nmax_steps: 2\nbatch_size: 16\n")
    return True
