"""A user's own network kind and a purifier that uses it, outside the package (tests/test_kinds.py):
one module, registered on import (`ADVPURE_PLUGINS=helpers.toy_kind` or `plugins: [helpers.toy_kind]`).

* network kind `toy_eps`: a two-layer conv net eps(u, t) on u in [-1, 1] with the time as an extra
  input channel (signature "eps", a VP schedule), its config block `toy_eps:`, a training stage
  (denoising score matching in continuous time, a few steps) and an importer `toy-npz` reading a
  dict {"w1", "b1", "w2", "b2"} saved with torch.save.
* purifier `helpers.toy_kind:OneShot`: diffuse u = 2x - 1 to t* with fresh noise and return the
  one-shot estimate u0 = (u_t - sqrt(1 - abar) eps(u_t, t*)) / sqrt(abar), mapped back to [0, 1].
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from advpure.core.params import at_least
from advpure.core.safe_load import load_torch_file
from advpure.nets.registry import Importer, NetKind, register_net_kind
from advpure.nets.schedules import VPSchedule
from advpure.nets.weights import save_weights
from advpure.purify import DefenseParams, Purifier, PurifyResult, rows


class ToyEps(nn.Module):
    """eps(u, t): u (R, C, H, W) in [-1, 1], t (R,) in [0, 1]; `.schedule` a VP schedule."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)
        self.schedule = VPSchedule()

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = t.to(u.dtype).view(-1, 1, 1, 1).expand(u.shape[0], 1, *u.shape[2:])
        return self.conv2(torch.nn.functional.silu(self.conv1(torch.cat([u, time], 1))))


@dataclass
class ToyEpsConfig:
    width: int = at_least(4, 1)
    max_steps: int = at_least(3, 1)
    batch_size: int = at_least(16, 1)
    weights: str = "${paths.artifacts}/${data.name}/toy_eps.pt"


class ToyModule(L.LightningModule):
    """Continuous-time DSM of the VP SDE (Song et al. 2021): E ||eps(sqrt(abar) u + sqrt(1-abar) n, t) - n||^2."""

    def __init__(self, arch: dict, seed: int):
        super().__init__()
        self.net = ToyEps(arch["in_channels"], arch["width"])
        self.seed = seed

    def training_step(self, batch, batch_idx):
        u0 = batch[0] * 2 - 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.global_step)
        t = torch.rand(u0.shape[0], generator=g) * (1 - 1e-3) + 1e-3
        n = torch.randn(u0.shape, generator=g)
        ab = self.net.schedule.alpha_bar(t).view(-1, 1, 1, 1)
        loss = ((self.net(ab.sqrt() * u0 + (1 - ab).sqrt() * n, t) - n) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class ToyImport(Importer):
    help = "a toy checkpoint {w1, b1, w2, b2} -> toy_eps weights"
    description = "Convert a toy checkpoint (a dict of the two convolutions' tensors) into toy_eps weights."
    example = "advpure import-weights toy-npz toy.pth artifacts/fmnist/toy_eps.pt"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint")
        parser.add_argument("out")
        parser.add_argument("--channels", type=int, default=1)

    @classmethod
    def run(cls, args) -> str:
        raw = load_torch_file(args.checkpoint, what="toy checkpoint")
        width = raw["w1"].shape[0]
        net = ToyEps(args.channels, width)
        net.load_state_dict(
            {
                "conv1.weight": raw["w1"],
                "conv1.bias": raw["b1"],
                "conv2.weight": raw["w2"],
                "conv2.bias": raw["b2"],
            }
        )
        arch = {"width": width, "in_channels": args.channels, "image_size": 28}
        save_weights(args.out, "toy_eps", arch, net, {"source": str(args.checkpoint)})
        return f"import-weights: {args.out} <- {args.checkpoint} (toy, width {width})"


@register_net_kind("toy_eps")
class ToyEpsKind(NetKind):
    """A tiny diffusion eps-net (signature eps(u, t))."""

    Config = ToyEpsConfig
    signature = "eps"
    label = "toy diffusion eps-net"
    importers = {"toy-npz": ToyImport}
    resume_free = ("max_steps", "weights")

    @classmethod
    def arch(cls, block, spec) -> dict:
        return {"width": block.width, "in_channels": spec.channels, "image_size": spec.image_size}

    @classmethod
    def build(cls, arch) -> nn.Module:
        return ToyEps(arch["in_channels"], arch["width"])

    @classmethod
    def train(cls, block, ctx) -> dict:
        dm = ctx.datamodule(batch_size=block.batch_size)
        arch = cls.arch(block, dm.spec)
        module = ToyModule(arch, ctx.seed)
        trainer = ctx.fit(
            module, dm, steps=block.max_steps, ckpt_every_n_steps=block.max_steps, limit_val_batches=0
        )
        meta = {"steps": int(trainer.global_step)}
        ctx.export(arch, module.net, meta)
        return meta


class OneShot(Purifier):
    """Diffuse to t* and denoise in one shot with a `toy_eps` net (a deterministic estimate of u0)."""

    @dataclass
    class Params(DefenseParams):
        t_star: float = at_least(0.1, 0.0)
        net: str = "toy_eps"
        replicas: int = at_least(2, 1)

    label = "OneShot"

    @classmethod
    def nets(cls, p) -> dict[str, str]:
        return {"eps": p.net}

    @classmethod
    def from_params(cls, p, nets):
        return cls(p.t_star, nets["eps"].schedule)

    def __init__(self, t_star: float, schedule):
        super().__init__()
        self.t_star, self.schedule = t_star, schedule

    @classmethod
    def describe(cls, p):
        return f"OneShot t*={p.t_star:g}"

    def forward(self, x, rng, draws, fns, differentiable=False):
        u = rows(x, draws) * 2 - 1
        t = torch.full((u.shape[0],), self.t_star, dtype=x.dtype, device=x.device)
        ab = float(self.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)))
        n = rng.normal(draws, x).reshape(u.shape)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            ut = math.sqrt(ab) * u + math.sqrt(1 - ab) * n
            u0 = (ut - math.sqrt(1 - ab) * fns["eps"](ut, t)) / math.sqrt(ab)
        ones = torch.ones(u.shape[0], dtype=torch.long, device=x.device)
        return PurifyResult(((u0 + 1) / 2).clamp(0, 1), ones, ones.clone())
